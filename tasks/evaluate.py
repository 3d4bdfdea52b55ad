"""Evaluate stage: the teacher and every student scored the same way, and the comparison report.

For each model (the teacher, DistilBERT, each ALBERT variant):
- size: backbone parameters (embeddings + encoder, heads excluded, a shared tensor counted once: the
  papers' convention), parameters with the pretraining heads, and the bytes of its safetensors on disk;
- held-out masked LM: accuracy and perplexity over every masked token of the validation pairs (NSP view;
  the same positions for every model);
- sentence-pair tasks, as ALBERT's Table 5: a model with a sentence-pair head is scored with that head on
  both tasks, NSP (the NSP view) and SOP (the SOP view). The teacher's head was trained for NSP, ALBERT's
  for SOP; both answer 1 for "not in order" (random B' / swapped). DistilBERT has no such head (null);
- CPU latency at batch size 1 (the DistilBERT paper's protocol): one timed pass runs the backbone over a
  fixed list of validation sentences of the downstream task one at a time; the median of `latency_repeats`
  passes is reported, with the torch thread count used. On a GPU, also throughput at a large batch (bf16);
- downstream: each model fine-tuned on each task (tasks/downstream.py) with the same budget and seeds;
  test accuracy per seed and its mean. `downstream_accuracy` (mean over tasks) decides the registry's
  `champion` alias (flows/registry.py).
Then retention (student / teacher per quality metric) and speed-up (teacher latency / student latency).

Output: `report.json` (schema below), `report.md` (a table to read), `plots/*.png`, and `models/<name>.json`
per model (written as each finishes, so an interrupted stage resumes after the last finished model).

report.json (schema 1)
  schema             1
  reference          "teacher": the model retention and speed-up are relative to
  protocol           what was measured and how: validation pairs, masked tokens, latency settings
                     (sentences, repeats, threads, batch size 1, statistic), GPU (device or null, batch size),
                     downstream (tasks, seeds, epochs, learning rate, batch size, max_seq_len, examples)
  baselines          nsp_majority_accuracy, sop_majority_accuracy: always answering the commoner class
  models[]           one entry per model, in pipeline order:
    name               teacher | distilbert | albert-scratch | albert-distilled
    registered_name    its name in MLflow's model registry
    family             bert | distilbert | albert
    path               the saved model (save_pretrained folder, with its tokenizer)
    source_fingerprint output fingerprint of the stage that trained it (= the registry version's
                       lightbert.output_fingerprint tag)
    parameters, parameters_with_heads, disk_bytes
    mlm_accuracy, mlm_perplexity, mlm_loss
    pair_head          nsp | sop | null (none, or an untrained one: a pretrained teacher saved without it)
    nsp_accuracy, nsp_accuracy_ci95, sop_accuracy, sop_accuracy_ci95   (null without a pair head; the
                       interval is Wilson's, [low, high])
    cpu_latency_ms     median pass time / sentences, in milliseconds per sentence
    cpu_latency_pass_seconds   the median pass, and cpu_latency_passes: every pass
    gpu_throughput_sequences_per_s     null without a GPU
    downstream         {task: {test_accuracy (mean over seeds), test_accuracy_std, runs: [{seed,
                       test_accuracy, validation_accuracy, steps, seconds, ...}]}}
    downstream_accuracy    mean over tasks of test_accuracy
    parameter_ratio    parameters / the teacher's
    retention          {metric: student / teacher} for mlm_accuracy, nsp_accuracy, sop_accuracy,
                       downstream_accuracy and each downstream/<task>; mlm_perplexity as teacher / student
                       (so above 1 is better for every ratio); 1.0 for the teacher itself
    speedup            {cpu_latency: teacher / this model, gpu_throughput: this model / teacher}
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, load_from_disk
from torch import nn
from transformers import AutoConfig, AutoTokenizer, BertForPreTraining, DistilBertForMaskedLM

from models.albert import count_parameters, load_albert
from models.bert import IGNORE_INDEX
from models.distilbert import mlm_head
from tasks import downstream, engine
from tasks.albert import wilson_interval
from tasks.artifacts import atomic_write_json, atomic_write_text
from tasks.config import MODEL_NAMES, PipelineConfig
from tasks.stage import StageContext, StageError, StageReport, StageSpec

REPORT_SCHEMA = 1
MODELS_DIR = "models"
PLOTS_DIR = "plots"
REFERENCE = "teacher"
# Registry names of the models the stages save (their manifests' "models" entries) -> report names.
REPORT_NAMES = {"lightbert-teacher": "teacher", "lightbert-distilbert": "distilbert",
                "lightbert-albert-scratch": "albert-scratch", "lightbert-albert-distilled": "albert-distilled"}
# The two views of the pairs schema (tasks/pairs.py) under one set of names.
VIEWS: dict[str, dict[str, str]] = {
    "nsp": {"input_ids": "input_ids", "token_type_ids": "token_type_ids", "attention_mask": "attention_mask",
            "labels": "labels", "next_sentence_label": "pair_label", "length": "length"},
    "sop": {"sop_input_ids": "input_ids", "sop_token_type_ids": "token_type_ids",
            "sop_attention_mask": "attention_mask", "sop_labels": "labels", "sentence_order_label": "pair_label",
            "sop_length": "length"},
}
BATCH_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "labels", "pair_label")
PAIR_HEADS = {"bert": "nsp", "albert": "sop", "distilbert": None}


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def load_model(path: Path) -> tuple[nn.Module, str]:
    """A saved checkpoint with its pretraining heads, and its family (bert | distilbert | albert)."""
    family = AutoConfig.from_pretrained(path).model_type
    if family == "bert":
        return BertForPreTraining.from_pretrained(path, use_safetensors=True), family
    if family == "distilbert":
        return DistilBertForMaskedLM.from_pretrained(path, use_safetensors=True), family
    if family == "albert":
        return load_albert(path), family  # the cross-layer ties restored
    raise StageError(f"{path}: model type {family!r} is not one lightbert evaluates (bert, distilbert, albert)")


def backbone(model: nn.Module) -> nn.Module:
    """Embeddings + encoder (+ pooler), the part every task head sits on."""
    return model.base_model


# (mlm logits at the labelled positions, their labels, sentence-pair logits or None) of a padded batch
Predict = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def predictor(model: nn.Module, family: str) -> Predict:
    """The masked LM head run only at the labelled positions, and the model's sentence-pair head."""

    def predict(batch: dict[str, torch.Tensor]):
        where = batch["labels"] != IGNORE_INDEX
        if family == "distilbert":
            hidden = model.distilbert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      return_dict=True).last_hidden_state
            return mlm_head(model, hidden[where]), batch["labels"][where], None
        out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"], return_dict=True)
        hidden = out.last_hidden_state[where]
        if family == "bert":
            return (model.cls.predictions(hidden), batch["labels"][where],
                    model.cls.seq_relationship(out.pooler_output))
        return model.predictions(hidden), batch["labels"][where], model.sop_classifier(out.pooler_output)

    return predict


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------
# held-out masked LM and sentence-pair tasks
# ------------------------------------------------------------------------------------------------
def load_view(pairs_dir: Path, view: str, max_examples: int | None = None) -> Dataset:
    path = pairs_dir / "validation"
    if not path.is_dir():
        raise StageError(f"{path} is missing: the pairs stage output is incomplete; rerun the pairs stage")
    ds = load_from_disk(str(path))
    if max_examples is not None and max_examples < len(ds):
        ds = ds.select(range(max_examples))  # the first rows: the same for every model
    return ds.select_columns(list(VIEWS[view])).rename_columns(VIEWS[view])


def score_view(model: nn.Module, family: str, ds: Dataset, pad_id: int, batch_size: int, rt: engine.Runtime,
               with_mlm: bool) -> dict[str, Any]:
    """Masked LM accuracy / perplexity (with_mlm) and the sentence-pair head's accuracy on one view."""
    predict = predictor(model, family)
    collate = engine.PadCollator(BATCH_COLUMNS, {"input_ids": pad_id, "labels": IGNORE_INDEX})
    totals = dict.fromkeys(("masked", "correct", "ce", "pairs", "pair_correct", "positive"), 0.0)
    model.eval()
    with torch.inference_mode(), rt.autocast():
        for idx in engine.length_bucketed_batches(np.asarray(ds["length"]), batch_size, seed=0, epoch=0):
            rows = ds[idx]
            batch = {k: v.to(rt.device) for k, v in collate(rows).items()}
            if not with_mlm:
                batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)  # no vocabulary projection
            logits, labels, pair_logits = predict(batch)
            if with_mlm:
                totals["masked"] += labels.numel()
                totals["correct"] += (logits.argmax(-1) == labels).sum().item()
                totals["ce"] += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            totals["pairs"] += len(idx)
            totals["positive"] += batch["pair_label"].sum().item()
            if pair_logits is not None:
                totals["pair_correct"] += (pair_logits.argmax(-1) == batch["pair_label"]).sum().item()
    out: dict[str, Any] = {"pairs": int(totals["pairs"]),
                           "majority_accuracy": max(totals["positive"], totals["pairs"] - totals["positive"])
                           / max(totals["pairs"], 1.0)}
    if with_mlm:
        masked = max(totals["masked"], 1.0)
        out.update(masked_tokens=int(totals["masked"]), mlm_accuracy=totals["correct"] / masked,
                   mlm_loss=totals["ce"] / masked, mlm_perplexity=float(np.exp(totals["ce"] / masked)))
    if PAIR_HEADS[family] is not None:
        out["pair_accuracy"] = totals["pair_correct"] / max(totals["pairs"], 1.0)
        out["pair_accuracy_ci95"] = list(wilson_interval(totals["pair_correct"], totals["pairs"]))
    return out


# ------------------------------------------------------------------------------------------------
# speed
# ------------------------------------------------------------------------------------------------
def encode_sentences(tok, sentences: list[str], family: str, max_len: int) -> list[dict[str, torch.Tensor]]:
    """One batch-of-1 input per sentence, as the model's backbone takes it."""
    out = []
    for text in sentences:
        enc = tok(text, truncation=True, max_length=max_len, return_tensors="pt")
        if family == "distilbert":
            enc.pop("token_type_ids", None)
        out.append(dict(enc))
    return out


def cpu_latency(model: nn.Module, inputs: list[dict[str, torch.Tensor]], repeats: int, threads: int) -> dict[str, Any]:
    """Median over `repeats` timed passes of the backbone over every input at batch size 1, on `threads`
    torch threads (restored after). One untimed warm-up pass over a few inputs comes first."""
    net = backbone(model).cpu().eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    passes = []
    try:
        with torch.inference_mode():
            for enc in inputs[: min(len(inputs), 16)]:
                net(**enc)
            for _ in range(repeats):
                t0 = time.perf_counter()
                for enc in inputs:
                    net(**enc)
                passes.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    median = statistics.median(passes)
    return {"cpu_latency_ms": 1000.0 * median / len(inputs), "cpu_latency_pass_seconds": median,
            "cpu_latency_passes": [round(p, 5) for p in passes]}


def throughput(model: nn.Module, tok, sentences: list[str], family: str, batch_size: int, max_len: int,
               device: torch.device, dtype: torch.dtype | None = torch.bfloat16, min_batches: int = 20) -> float:
    """Sequences per second of the backbone at a large batch (the sentences cycled to fill `min_batches`
    batches, each padded to its longest); bf16 autocast unless dtype is None. Runs on any device (a GPU in
    the stage; the tests use the CPU)."""
    net = backbone(model).to(device).eval()
    reps = max(1, -(-min_batches * batch_size // len(sentences)))
    pool = (sentences * reps)[: min_batches * batch_size]
    batches = []
    for i in range(0, len(pool), batch_size):
        enc = tok(pool[i : i + batch_size], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        if family == "distilbert":
            enc.pop("token_type_ids", None)
        batches.append({k: v.to(device) for k, v in enc.items()})
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                                  enabled=False)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode(), autocast:
        net(**batches[0])  # warm-up (kernel selection)
        sync()
        t0 = time.perf_counter()
        for b in batches:
            net(**b)
        sync()
        seconds = time.perf_counter() - t0
    return len(pool) / seconds


# ------------------------------------------------------------------------------------------------
# retention, speed-up and the report
# ------------------------------------------------------------------------------------------------
QUALITY = ("mlm_accuracy", "nsp_accuracy", "sop_accuracy", "downstream_accuracy")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_relative(entries: list[dict[str, Any]]) -> None:
    """Retention, speed-up and parameter ratio of every entry against the reference (teacher)."""
    ref = next((e for e in entries if e["name"] == REFERENCE), None)
    if ref is None:
        return
    for e in entries:
        retention = {m: _ratio(e.get(m), ref.get(m)) for m in QUALITY}
        retention["mlm_perplexity"] = _ratio(ref.get("mlm_perplexity"), e.get("mlm_perplexity"))
        for task, res in e.get("downstream", {}).items():
            retention[f"downstream/{task}"] = _ratio(res["test_accuracy"],
                                                     ref.get("downstream", {}).get(task, {}).get("test_accuracy"))
        e["retention"] = retention
        e["speedup"] = {"cpu_latency": _ratio(ref.get("cpu_latency_ms"), e.get("cpu_latency_ms")),
                        "gpu_throughput": _ratio(e.get("gpu_throughput_sequences_per_s"),
                                                 ref.get("gpu_throughput_sequences_per_s"))}
        e["parameter_ratio"] = _ratio(e["parameters"], ref["parameters"])


def flat_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """The numbers of one report entry as flat {name: float} (registry tags, MLflow metrics)."""
    out: dict[str, float] = {}
    for key in ("parameters", "parameters_with_heads", "disk_bytes", "mlm_accuracy", "mlm_perplexity",
                "nsp_accuracy", "sop_accuracy", "cpu_latency_ms", "gpu_throughput_sequences_per_s",
                "downstream_accuracy", "parameter_ratio"):
        if isinstance(entry.get(key), int | float):
            out[key] = float(entry[key])
    for task, res in entry.get("downstream", {}).items():
        out[f"downstream_{task.replace('/', '_')}_test_accuracy"] = float(res["test_accuracy"])
    for group in ("retention", "speedup"):
        for key, value in (entry.get(group) or {}).items():
            if value is not None:
                out[f"{group}_{key.replace('/', '_')}"] = float(value)
    return out


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def report_markdown(report: dict[str, Any]) -> str:
    p = report["protocol"]
    lat = p["latency"]
    lines = [
        "# lightbert comparison report", "",
        f"Reference: the {REFERENCE}. Retention = model / {REFERENCE} (perplexity: {REFERENCE} / model); "
        f"speed-up = {REFERENCE}'s CPU latency / the model's.", "",
        "| model | parameters | disk | MLM acc | MLM ppl | NSP acc | SOP acc | CPU ms/sentence | speed-up "
        "| downstream acc | retention (downstream) | retention (MLM) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in report["models"]:
        ret, sp = e.get("retention") or {}, e.get("speedup") or {}
        lines.append(
            f"| {e['name']} | {e['parameters'] / 1e6:.2f}M | {e['disk_bytes'] / 2**20:.1f} MiB "
            f"| {_fmt(e['mlm_accuracy'])} | {_fmt(e['mlm_perplexity'], '.1f')} | {_fmt(e['nsp_accuracy'])} "
            f"| {_fmt(e['sop_accuracy'])} | {_fmt(e['cpu_latency_ms'], '.2f')} | {_fmt(sp.get('cpu_latency'), '.2f')}x "
            f"| {_fmt(e['downstream_accuracy'])} | {_fmt(ret.get('downstream_accuracy'))} "
            f"| {_fmt(ret.get('mlm_accuracy'))} |")
    b = report["baselines"]
    lines += [
        "", "## How it was measured", "",
        f"- Masked LM: {p['validation_pairs']:,} validation pairs, {p['masked_tokens']:,} masked tokens (NSP view). "
        "Parameters: embeddings + encoder, heads excluded, shared tensors once.",
        f"- NSP / SOP: each model's own sentence-pair head on both tasks (ALBERT's Table 5); always answering "
        f"the commoner class scores {b['nsp_majority_accuracy']:.3f} (NSP) and {b['sop_majority_accuracy']:.3f} "
        "(SOP). 95% intervals are in report.json.",
        f"- CPU latency: batch size 1, {lat['sentences']} {lat['source']} sentences per pass, median of "
        f"{lat['repeats']} passes, {lat['threads']} torch thread(s), {lat['cpu']}.",
    ]
    gpu = p["gpu"]
    if gpu["device"]:
        lines.append(f"- GPU throughput: {gpu['device']}, batch {gpu['batch_size']}, bf16.")
        lines += ["", "| model | GPU sequences/s | speed-up |", "|---|---:|---:|"]
        lines += [f"| {e['name']} | {_fmt(e['gpu_throughput_sequences_per_s'], ',.0f')} "
                  f"| {_fmt((e.get('speedup') or {}).get('gpu_throughput'), '.2f')}x |" for e in report["models"]]
    else:
        lines.append("- GPU throughput: no GPU in this run.")
    d = p["downstream"]
    lines += [f"- Downstream: {', '.join(d['tasks'])}; every model fine-tuned with the same budget "
              f"({d['epochs']:g} epoch(s), lr {d['learning_rate']:g}, batch {d['batch_size']}, "
              f"max_seq_len {d['max_seq_len']}) and seeds {d['seeds']}; test accuracy, mean over seeds.", ""]
    for task in d["tasks"]:
        lines += [f"### {task}", "", "| model | test accuracy per seed | mean | std |", "|---|---|---:|---:|"]
        for e in report["models"]:
            res = e["downstream"][task]
            runs = ", ".join(f"{r['test_accuracy']:.3f}" for r in res["runs"])
            lines.append(f"| {e['name']} | {runs} | {res['test_accuracy']:.3f} | {res['test_accuracy_std']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def write_plots(report: dict[str, Any], folder: Path) -> list[str]:
    """Downstream accuracy against parameters and against CPU latency, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, key, label in (("accuracy_vs_parameters.png", "parameters", "parameters (millions)"),
                              ("accuracy_vs_cpu_latency.png", "cpu_latency_ms", "CPU latency, batch 1 (ms/sentence)")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for e in report["models"]:
            x = e[key] / 1e6 if key == "parameters" else e[key]
            ax.scatter([x], [e["downstream_accuracy"]], s=60)
            ax.annotate(e["name"], (x, e["downstream_accuracy"]), textcoords="offset points", xytext=(6, 4))
        ax.set_xlabel(label)
        ax.set_ylabel("downstream test accuracy")
        ax.set_title(f"{', '.join(report['protocol']['downstream']['tasks'])}: accuracy vs {key.split('_')[0]}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = folder / f".{fname}.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        tmp.replace(folder / fname)
        written.append(f"{PLOTS_DIR}/{fname}")
    return written


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
def models_to_evaluate(cfg: PipelineConfig, ctx: StageContext) -> list[dict[str, Any]]:
    """[{name, registered_name, path, source_fingerprint}] from the upstream stages' saved models."""
    found: dict[str, dict[str, Any]] = {}
    for stage in ("teacher", "distilbert", "albert"):
        record = ctx.upstream.get(stage)
        if record is None:
            continue
        for entry in record.manifest.get("models", []):
            name = REPORT_NAMES.get(entry["name"])
            if name is not None:
                found[name] = {"name": name, "registered_name": entry["name"], "path": record.dir / entry["path"],
                               "source_fingerprint": record.fingerprint,
                               # a pretrained teacher loaded without an NSP head has a random one
                               "pair_head_trained": record.manifest.get("details", {}).get("nsp_head_trained", True)}
    wanted = cfg.evaluate.models
    if wanted is None:
        wanted = [n for n in MODEL_NAMES if n in found]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise StageError(f"evaluate.models names {missing}, which this run did not train (trained: "
                         f"{sorted(found)}); drop them from evaluate.models or add them to albert.variants")
    if REFERENCE not in wanted:
        wanted = [REFERENCE, *wanted]  # the reference of retention and speed-up
    return [found[n] for n in MODEL_NAMES if n in wanted]


def evaluate_one(spec: dict[str, Any], cfg: PipelineConfig, views: dict[str, Dataset],
                 tasks_data: dict[str, tuple[Any, dict[str, Any]]], sentences: list[str], rt: engine.Runtime,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    ecfg = cfg.evaluate
    path = Path(spec["path"])
    model, family = load_model(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    entry: dict[str, Any] = {"name": spec["name"], "registered_name": spec["registered_name"], "family": family,
                             "path": str(path), "source_fingerprint": spec["source_fingerprint"],
                             "parameters": count_parameters(backbone(model)),
                             "parameters_with_heads": count_parameters(model), "disk_bytes": disk_bytes(path),
                             "pair_head": PAIR_HEADS[family] if spec.get("pair_head_trained", True) else None}
    model.to(rt.device)
    progress("masked LM and sentence-pair tasks")
    nsp = score_view(model, family, views["nsp"], tok.pad_token_id, ecfg.batch_size, rt, with_mlm=True)
    entry.update({k: nsp[k] for k in ("mlm_accuracy", "mlm_perplexity", "mlm_loss")})
    if entry["pair_head"] is None:
        entry.update(nsp_accuracy=None, nsp_accuracy_ci95=None, sop_accuracy=None, sop_accuracy_ci95=None)
    else:
        sop = score_view(model, family, views["sop"], tok.pad_token_id, ecfg.batch_size, rt, with_mlm=False)
        entry.update(nsp_accuracy=nsp["pair_accuracy"], nsp_accuracy_ci95=nsp["pair_accuracy_ci95"],
                     sop_accuracy=sop["pair_accuracy"], sop_accuracy_ci95=sop["pair_accuracy_ci95"])
    progress("CPU latency")
    max_len = ecfg.downstream.max_seq_len
    entry.update(cpu_latency(model, encode_sentences(tok, sentences, family, max_len), ecfg.latency_repeats,
                             ecfg.latency_threads))
    entry["gpu_throughput_sequences_per_s"] = None
    if rt.device.type == "cuda":
        progress("GPU throughput")
        entry["gpu_throughput_sequences_per_s"] = throughput(model, tok, sentences, family, ecfg.gpu_batch_size,
                                                             max_len, rt.device)
    del model
    entry["downstream"] = {}
    for task, (data, info) in tasks_data.items():
        runs = []
        for seed in ecfg.downstream.seeds:
            progress(f"fine-tuning on {task}, seed {seed}")
            res = downstream.finetune(path, data, ecfg.downstream, seed=seed, num_labels=info["num_labels"],
                                      runtime=rt, cpu_threads=ecfg.downstream.cpu_threads)
            runs.append({"seed": seed, **res})
        accs = [r["test_accuracy"] for r in runs]
        entry["downstream"][task] = {"test_accuracy": float(np.mean(accs)),
                                     "test_accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                                     "runs": runs}
    entry["downstream_accuracy"] = float(np.mean([r["test_accuracy"] for r in entry["downstream"].values()]))
    return entry


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_evaluate(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    t0 = time.perf_counter()
    ecfg = cfg.evaluate
    specs = models_to_evaluate(cfg, ctx)
    rt = engine.setup_runtime("auto")
    pairs_dir = ctx.upstream_dir("pairs")
    views = {v: load_view(pairs_dir, v, ecfg.max_eval_examples) for v in VIEWS}
    tasks_data = {t: downstream.load_task(t, ecfg.downstream, cfg.run.resolved_cache_dir())
                  for t in ecfg.downstream.tasks}
    first_task = ecfg.downstream.tasks[0]
    validation = tasks_data[first_task][0]["validation"]
    sentences = list(validation["text"][: ecfg.latency_sentences])

    results_dir = ctx.out_dir / MODELS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for spec in specs:
        result_path = results_dir / f"{spec['name']}.json"
        if ctx.resuming and result_path.is_file():  # finished by an interrupted attempt with this key
            entry = json.loads(result_path.read_text(encoding="utf-8"))
        else:
            def progress(what: str, name: str = spec["name"]) -> None:
                print(f"evaluate: {name}: {what}", flush=True)

            entry = evaluate_one(spec, cfg, views, tasks_data, sentences, rt, progress)
            atomic_write_json(result_path, entry)
            ctx.log_metrics({f"{spec['name']}_{k}": v for k, v in flat_metrics(entry).items()})
        entries.append(entry)
    add_relative(entries)

    nsp_base = score_view_baseline(views["nsp"])
    sop_base = score_view_baseline(views["sop"])
    report = {
        "schema": REPORT_SCHEMA,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "reference": REFERENCE,
        "protocol": {
            "validation_pairs": len(views["nsp"]),
            "masked_tokens": count_masked(views["nsp"]),
            "latency": {"batch_size": 1, "sentences": len(sentences), "source": f"{first_task} validation",
                        "repeats": ecfg.latency_repeats, "threads": ecfg.latency_threads,
                        "statistic": "median pass time / sentences", "cpu": _cpu_name()},
            "gpu": {"device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None,
                    "batch_size": ecfg.gpu_batch_size if rt.device.type == "cuda" else None},
            "downstream": {"tasks": list(ecfg.downstream.tasks), "seeds": list(ecfg.downstream.seeds),
                           "epochs": ecfg.downstream.epochs, "learning_rate": ecfg.downstream.learning_rate,
                           "batch_size": ecfg.downstream.batch_size, "max_seq_len": ecfg.downstream.max_seq_len,
                           "data": {t: info for t, (_, info) in tasks_data.items()}},
        },
        "baselines": {"nsp_majority_accuracy": nsp_base, "sop_majority_accuracy": sop_base},
        "models": entries,
    }
    atomic_write_json(ctx.out_dir / "report.json", report)
    atomic_write_text(ctx.out_dir / "report.md", report_markdown(report))
    artifacts = ["report.json", "report.md"]
    if ecfg.plots:
        artifacts += write_plots(report, ctx.out_dir / PLOTS_DIR)

    counts: dict[str, float] = {"models": len(entries), "seconds": round(time.perf_counter() - t0, 3)}
    for e in entries:
        counts.update({f"{e['name']}_{k}": v for k, v in flat_metrics(e).items()})
    return StageReport(
        counts=counts,
        inputs=[{"stage": n, "fingerprint": r.fingerprint} for n, r in ctx.upstream.items()]
        + [{"downstream": t, **{k: v for k, v in info.items() if k in ("fingerprint", "num_labels")}}
           for t, (_, info) in tasks_data.items()],
        artifacts=artifacts,
        details={"registry": [{"name": e["registered_name"], "fingerprint": e["source_fingerprint"],
                               "metrics": flat_metrics(e)} for e in entries],
                 "summary": {e["name"]: {k: e.get(k) for k in ("downstream_accuracy", "mlm_accuracy",
                                                               "cpu_latency_ms", "parameters")} for e in entries}},
    )


def score_view_baseline(ds: Dataset) -> float:
    labels = np.asarray(ds["pair_label"])
    positive = float(labels.sum())
    return max(positive, len(labels) - positive) / max(len(labels), 1)


def count_masked(ds: Dataset) -> int:
    return int(sum(sum(1 for t in row if t != IGNORE_INDEX) for row in ds["labels"]))


def evaluate_key(cfg: PipelineConfig) -> dict[str, Any]:
    return {"evaluate": cfg.section("evaluate"), "seed": cfg.run.seed}


STAGE = StageSpec(
    name="evaluate",
    build=build_evaluate,
    upstream=("pairs", "teacher", "distilbert", "albert"),
    key_config=evaluate_key,
    code_modules=("tasks.downstream", "tasks.engine", "models.albert", "models.bert", "models.distilbert"),
    resumable=True,
)
