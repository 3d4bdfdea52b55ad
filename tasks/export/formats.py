"""The three exported formats of one model and how each is run: ONNX fp32 (torch.onnx's dynamo exporter,
dynamic batch and sequence axes), ONNX int8 (onnxruntime.quantization's dynamic quantisation of it) and
PyTorch dynamic int8 (models/deploy.py), beside the saved PyTorch fp32 model itself. Every runner takes a
feed {input name: int64 array (batch, sequence)} and answers the exported tensor as a float32 array, so
the check, the evaluation and the benchmark drive all four the same way.

torch + transformers + onnx + onnxruntime only: no Prefect, no MLflow. (torch.onnx's legacy TorchScript
exporter, dynamo=False, traces transformers 5's attention masks into constants: with torch 2.13 its
graphs differ from PyTorch by up to 2.6 on a BERT's hidden states once the sequence length changes.)
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.deploy import TASK_OUTPUTS, SingleOutput, input_names, quantize_dynamic_int8

ONNX_FILE = "model.onnx"
TORCH_INT8_FILE = "model.pt"  # pytorch-int8: the quantised state dict


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs a warning per torchvision operator it cannot register (no torchvision
    here) and onnxruntime's quantiser one about pre-processing; none of them concerns these models."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # the axis-renaming notes and torch.utils' pytree deprecations
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model: nn.Module, names: tuple[str, ...], output: str, path: Path, opset: int) -> None:
    """model -> ONNX at `path`: inputs `names` (int64, dynamic batch and sequence), one output `output`."""
    example = tuple(torch.ones(2, 8, dtype=torch.long) if n != "token_type_ids" else torch.zeros(2, 8, dtype=torch.long)
                    for n in names)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(SingleOutput(model, names, output).eval(), example, input_names=list(names),
                                    output_names=[output], dynamic_shapes={n: {0: batch, 1: sequence} for n in names},
                                    dynamo=True, opset_version=opset, verbose=False)
    program.save(str(path))


def quantize_onnx_int8(src: Path, dst: Path, weight_type: str = "qint8", per_channel: bool = False) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_exporter():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8 if weight_type == "qint8" else QuantType.QUInt8,
                         per_channel=per_channel)


def save_torch_int8(model: nn.Module, folder: Path) -> None:
    """The dynamic-int8 copy's state dict (packed int8 weights) beside the fp32 config it is rebuilt from."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(quantize_dynamic_int8(model).state_dict(), folder / TORCH_INT8_FILE)
    model.config.save_pretrained(folder)


def load_torch_int8(folder: Path, task: str) -> nn.Module:
    """save_torch_int8's model back: built from its config, quantised the same way, its int8 weights loaded."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    conf = AutoConfig.from_pretrained(str(folder))
    cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    model = cls.from_config(conf)
    if conf.model_type == "albert":
        from models.albert import apply_sharing

        model = apply_sharing(model)
    model = quantize_dynamic_int8(model.eval())
    with warnings.catch_warnings():  # packed int8 weights are still TypedStorage-backed in torch 2.13
        warnings.simplefilter("ignore", UserWarning)
        state = torch.load(folder / TORCH_INT8_FILE, weights_only=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# running a variant
# ------------------------------------------------------------------------------------------------
@dataclass
class TorchRunner:
    model: nn.Module
    names: tuple[str, ...]
    output: str

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out = getattr(self.model(**{n: torch.from_numpy(feed[n]) for n in self.names}), self.output)
        return out.float().numpy()


class OrtRunner:
    """An onnxruntime CPU session on `threads` intra-op threads (one inter-op: the graph is sequential)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = tuple(i.name for i in self.session.get_inputs())

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {n: feed[n] for n in self.names})[0]


def torch_runner(model: nn.Module, task: str) -> TorchRunner:
    return TorchRunner(model.eval(), input_names(model), TASK_OUTPUTS[task])


def max_abs_difference(reference: np.ndarray, other: np.ndarray, feed: dict[str, np.ndarray]) -> float:
    """max |other - reference|; for hidden states, at real tokens only (padding's states are never read)."""
    diff = np.abs(other.astype(np.float64) - reference.astype(np.float64))
    if diff.ndim == 3:
        diff = diff[feed["attention_mask"].astype(bool)]
    return float(diff.max()) if diff.size else 0.0


def compare(reference, other, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Max abs difference of two runners over the feeds, and how often they agree on the argmax (a
    classifier's predicted class; for an encoder, only the difference is meaningful)."""
    worst, agree, total = 0.0, 0, 0
    for feed in feeds:
        a, b = reference(feed), other(feed)
        worst = max(worst, max_abs_difference(a, b, feed))
        if a.ndim == 2:
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(a)
    return {"max_abs_diff": worst, "argmax_agreement": agree / total if total else None}
