"""Deployable forms of a saved model: the one tensor its users read (a classifier's logits, an encoder's
last hidden states) behind a positional forward that the ONNX exporter traces, and PyTorch's dynamic int8
(nn.Linear weights in int8, activations quantised on the fly: no calibration data)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PreTrainedModel

from models.albert import load_albert

# What a saved model is exported as, by its registry task: the tensor it answers with.
TASK_OUTPUTS = {"text-classification": "logits", "feature-extraction": "last_hidden_state"}


def load_deployable(path: Path, task: str) -> PreTrainedModel:
    """A task model as its classifier, anything else as its bare encoder (pretraining heads dropped), in
    eval mode; an ALBERT with lightbert's sharing ties restored."""
    if task not in TASK_OUTPUTS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASK_OUTPUTS)}")
    from transformers.utils import logging as hf_logging

    family = AutoConfig.from_pretrained(str(path)).model_type
    cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dropped pretraining heads' "UNEXPECTED" keys are expected
    try:
        if family == "albert":
            from transformers import AlbertForSequenceClassification, AlbertModel

            cls = AlbertForSequenceClassification if task == "text-classification" else AlbertModel
            model = load_albert(path, cls=cls)
        else:
            model = cls.from_pretrained(str(path), use_safetensors=True)
    finally:
        hf_logging.set_verbosity(previous)
    return model.eval()


def input_names(model: PreTrainedModel) -> tuple[str, ...]:
    """The inputs an export takes: token types only for a model whose forward has them (not DistilBERT)."""
    import inspect

    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    return ("input_ids", "attention_mask", *(("token_type_ids",) if takes_types else ()))


class SingleOutput(nn.Module):
    """model(...).<output> with named tensor inputs (what torch.onnx.export traces; `names` says which of
    them the model takes)."""

    def __init__(self, model: PreTrainedModel, names: tuple[str, ...], output: str):
        super().__init__()
        self.model, self.names, self.output = model, names, output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return getattr(self.model(**{n: inputs[n] for n in self.names}), self.output)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear dynamically quantised to int8 (torch.ao's eager-mode API: its
    deprecation notice is about a future release and says nothing of this one's results)."""
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
