"""Export stage: each model the stages before it saved, exported for deployment in three formats beside
its PyTorch fp32 original (tasks/export/formats.py):
- onnx-fp32: torch.onnx (dynamo) with dynamic batch and sequence axes, then checked against PyTorch on
  held-out sentences (the first task's validation split, padded batches of export.check_batch_size): a
  largest |difference| above export.fp32_atol stops the stage, naming the model and the difference;
- onnx-int8: onnxruntime.quantization's dynamic int8 of the fp32 graph;
- pytorch-int8: torch's dynamic int8 (nn.Linear).
The two int8 variants are compared with PyTorch too (their largest difference, and for a classifier how
often they predict the same class); their accuracy is the evaluate stage's to measure. A task model is
exported as its classifier (logits), a pretraining model as its bare encoder (last hidden states).

Output, per model `<slug>/` (written beside, then moved into place as each finishes: an interrupted
stage resumes after the last finished model; outputs.py reads it):
    export.json             registry name, source folder, task, inputs and output, per variant its
                            folder, disk bytes and difference from PyTorch, and how it was checked
    onnx-fp32/ onnx-int8/   model.onnx + the tokenizer (registered in MLflow as <name>-onnx-fp32 / -int8)
    pytorch-int8/           model.pt (state dict) + config.json + the tokenizer
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from models.deploy import TASK_OUTPUTS, input_names, load_deployable
from tasks.artifacts import atomic_write_json, replace_dir
from tasks.config import PipelineConfig
from tasks.downstream import data as downstream
from tasks.export import STAGE, formats
from tasks.export.outputs import EXPORT_JSON, encode_feeds, model_slug
from tasks.stage import StageContext, StageError, StageReport

log = logging.getLogger(__name__)


def models_to_export(cfg: PipelineConfig, ctx: StageContext) -> list[dict[str, Any]]:
    """[{name, path, task}] of the models the upstream stages saved, in stage order (or export.models)."""
    found = {}
    for record in ctx.upstream.values():
        for entry in record.manifest.get("models", []):
            found[entry["name"]] = {"name": entry["name"], "path": str(record.dir / entry["path"]),
                                    "task": entry.get("task") if entry.get("task") in TASK_OUTPUTS
                                    else "feature-extraction"}
    wanted = cfg.export.models
    if wanted is None:
        return list(found.values())
    missing = [n for n in wanted if n not in found]
    if missing:
        raise StageError(f"export.models names {missing}, which this run did not save (saved: {sorted(found)}); "
                         "drop them from export.models")
    return [found[n] for n in wanted]


def check_texts(cfg: PipelineConfig) -> list[str]:
    dcfg = cfg.evaluate.downstream
    data, _ = downstream.load_task(dcfg.tasks[0], dcfg, cfg.run.resolved_cache_dir())
    texts = list(data["validation"]["text"])[: cfg.export.check_examples]
    if not texts:
        raise StageError(f"the first downstream task ({downstream.task_name(dcfg.tasks[0])}) has no validation "
                         "sentences to check the exports on; give it a validation split")
    return texts


def export_one(spec: dict[str, Any], cfg: PipelineConfig, texts: list[str], folder: Path) -> dict[str, Any]:
    """Write the three variants of one model into `folder` and check them; returns its export.json."""
    ecfg, name, task = cfg.export, spec["name"], spec["task"]
    source = Path(spec["path"])
    model = load_deployable(source, task)
    tok = AutoTokenizer.from_pretrained(str(source))
    names, output = input_names(model), TASK_OUTPUTS[task]
    max_len = min(cfg.evaluate.downstream.max_seq_len, model.config.max_position_embeddings)
    dirs = {v: folder / v for v in ("onnx-fp32", "onnx-int8", "pytorch-int8")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(d)  # every exported format carries its tokenizer
    try:
        formats.export_onnx(model, names, output, dirs["onnx-fp32"] / formats.ONNX_FILE, ecfg.opset)
    except Exception as exc:
        raise StageError(f"export: {name} ({source}): torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    formats.quantize_onnx_int8(dirs["onnx-fp32"] / formats.ONNX_FILE, dirs["onnx-int8"] / formats.ONNX_FILE,
                               ecfg.int8_weight_type, ecfg.per_channel)
    formats.save_torch_int8(model, dirs["pytorch-int8"])

    feeds = encode_feeds(tok, texts, names, ecfg.check_batch_size, max_len)
    reference = formats.torch_runner(model, task)
    runners = {"onnx-fp32": formats.OrtRunner(dirs["onnx-fp32"] / formats.ONNX_FILE, threads=1),
               "onnx-int8": formats.OrtRunner(dirs["onnx-int8"] / formats.ONNX_FILE, threads=1),
               "pytorch-int8": formats.torch_runner(formats.load_torch_int8(dirs["pytorch-int8"], task), task)}
    checks = {v: formats.compare(reference, r, feeds) for v, r in runners.items()}
    diff = checks["onnx-fp32"]["max_abs_diff"]
    if not diff <= ecfg.fp32_atol:
        raise StageError(f"export: {name}: the ONNX fp32 export differs from PyTorch by up to {diff:.3g} on its "
                         f"{output} ({len(texts)} held-out sentences), above export.fp32_atol={ecfg.fp32_atol:g}; "
                         "nothing was registered. Check the exporter (torch.onnx dynamo) against this model, or "
                         "raise export.fp32_atol if the difference is expected")
    variants = {"pytorch-fp32": {"path": str(source), "disk_bytes": weights_bytes(source), "max_abs_diff": 0.0,
                                 "argmax_agreement": 1.0 if task == "text-classification" else None}}
    for v, d in dirs.items():
        variants[v] = {"path": v, "disk_bytes": weights_bytes(d), **checks[v]}
    log.info(f"export: {name}: ONNX fp32 within {diff:.2g} of PyTorch; int8 differences ONNX "
             f"{checks['onnx-int8']['max_abs_diff']:.3g}, PyTorch {checks['pytorch-int8']['max_abs_diff']:.3g}")
    return {"name": name, "source": str(source), "task": task, "family": model.config.model_type,
            "inputs": list(names), "output": output, "opset": ecfg.opset, "variants": variants,
            "check": {"sentences": len(texts), "source": f"{downstream.task_name(cfg.evaluate.downstream.tasks[0])} "
                      "validation", "batch_size": ecfg.check_batch_size, "max_len": max_len,
                      "fp32_atol": ecfg.fp32_atol}}


def weights_bytes(folder: Path) -> int:
    """Bytes of a variant's weights on disk (model.onnx, model.pt, *.safetensors; not the tokenizer)."""
    files = [p for p in folder.iterdir() if p.suffix in (".onnx", ".pt", ".safetensors", ".data")]
    return sum(p.stat().st_size for p in files)


def build_export(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    specs = models_to_export(cfg, ctx)
    texts = check_texts(cfg)
    counts: dict[str, float] = {"models": len(specs)}
    models, exported = [], []
    for spec in specs:
        slug = model_slug(spec["name"])
        folder = ctx.out_dir / slug
        if ctx.resuming and (folder / EXPORT_JSON).is_file():
            info = json.loads((folder / EXPORT_JSON).read_text(encoding="utf-8"))  # an interrupted attempt's
        else:
            log.info(f"export: {spec['name']}")
            tmp = ctx.out_dir / f".{slug}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            info = export_one(spec, cfg, texts, tmp)
            atomic_write_json(tmp / EXPORT_JSON, info)
            replace_dir(tmp, folder)
        exported.append(spec["name"])
        for v, check in info["variants"].items():
            key = f"{slug}_{v.replace('-', '_')}"
            counts[f"{key}_max_abs_diff"] = check["max_abs_diff"]
            counts[f"{key}_disk_bytes"] = check["disk_bytes"]
        for v in ("onnx-fp32", "onnx-int8"):
            models.append({"path": f"{slug}/{v}", "name": STAGE.models[f"{{model}}-{v}"].format(model=slug),
                           "flavor": "onnx", "task": info["task"], "inputs": ",".join(info["inputs"]),
                           "output": info["output"]})
    return StageReport(counts=counts, inputs=[{"stage": n, "fingerprint": r.fingerprint} for n, r in ctx.upstream.items()],
                       details={"exported": exported}, models=models)
