"""The export stage's section: which models are exported, and how closely an export must match PyTorch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.section import Section

VARIANTS = ("pytorch-fp32", "onnx-fp32", "onnx-int8", "pytorch-int8")


class ExportConfig(Section):
    models: list[str] | None = Field(
        None, description="registry names of the saved models to export (lightbert-teacher, "
        "lightbert-distilbert-movie-sentences...); None = every model the stages before it saved")
    opset: int = Field(18, ge=18, description="ONNX opset of the exporter (torch.onnx's dynamo exporter)")
    check_examples: int = Field(64, ge=1, description="held-out sentences (the first task's validation split) "
                                "the ONNX fp32 export is checked on against PyTorch, in padded batches")
    check_batch_size: int = Field(16, ge=1, description="their batch: not the traced one, so the dynamic "
                                  "batch and sequence axes are exercised")
    fp32_atol: float = Field(1e-3, gt=0, description="largest |ONNX fp32 - PyTorch fp32| allowed on the "
                             "exported output (logits, or hidden states at real tokens); more stops the stage")
    int8_weight_type: Literal["qint8", "quint8"] = Field(
        "qint8", description="onnxruntime.quantization weight type (QInt8: signed, as PyTorch's)")
    per_channel: bool = Field(False, description="onnxruntime per-channel weight scales")


def export_key(cfg) -> dict:
    """The section, and the first task and sequence length the check inputs come from."""
    d = cfg.section("evaluate")["downstream"]
    return {"export": cfg.section("export"), "check_inputs": {"task": d["tasks"][0], "max_seq_len": d["max_seq_len"]}}
