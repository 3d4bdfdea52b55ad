"""Reading the export stage's output: per model `<slug>/` (slug: its registry name without "lightbert-"),
`export.json` (what was exported, from where, and how closely each variant matches PyTorch) and one folder
per exported variant, each with its tokenizer: onnx-fp32/model.onnx, onnx-int8/model.onnx,
pytorch-int8/model.pt (+ config.json). The PyTorch fp32 variant is the saved model itself (`source`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tasks.export.config import VARIANTS
from tasks.export.formats import ONNX_FILE, TORCH_INT8_FILE  # noqa: F401 (the file names, for readers)
from tasks.stage import StageError

EXPORT_JSON = "export.json"
ONNX_VARIANTS = ("onnx-fp32", "onnx-int8")


def model_slug(registered_name: str) -> str:
    return registered_name.removeprefix("lightbert-")


def exported_models(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """{registry name: its export.json} of every model the stage exported, in export order."""
    manifest = json.loads((Path(stage_dir) / "manifest.json").read_text(encoding="utf-8"))
    out = {}
    for name in manifest["details"]["exported"]:
        path = Path(stage_dir) / model_slug(name) / EXPORT_JSON
        if not path.is_file():
            raise StageError(f"{path} is missing: the export stage output is incomplete; rerun it")
        out[name] = json.loads(path.read_text(encoding="utf-8"))
    return out


def variant_path(stage_dir: Path, info: dict[str, Any], variant: str) -> Path:
    """The folder a variant is loaded from (the saved model itself for pytorch-fp32)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    if variant == "pytorch-fp32":
        return Path(info["source"])
    return Path(stage_dir) / model_slug(info["name"]) / variant


def load_runner(stage_dir: Path, info: dict[str, Any], variant: str, threads: int):
    """A runner of one variant (tasks/export/formats.py): feed -> float32 output array."""
    from models.deploy import load_deployable
    from tasks.export import formats

    folder = variant_path(stage_dir, info, variant)
    if variant in ONNX_VARIANTS:
        return formats.OrtRunner(folder / formats.ONNX_FILE, threads)
    if variant == "pytorch-int8":
        return formats.torch_runner(formats.load_torch_int8(folder, info["task"]), info["task"])
    return formats.torch_runner(load_deployable(folder, info["task"]), info["task"])


def encode_feeds(tok, texts: list[str], names: tuple[str, ...], batch_size: int, max_len: int) -> list[dict[str, np.ndarray]]:
    """The texts as padded int64 feeds of `batch_size` (the last one shorter), each as long as its longest."""
    feeds = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], truncation=True, max_length=max_len, padding=True, return_tensors="np")
        feeds.append({n: (enc[n] if n in enc else np.zeros_like(enc["input_ids"])).astype(np.int64) for n in names})
    return feeds
