"""Every exported model x variant (PyTorch fp32, ONNX Runtime fp32, ONNX Runtime int8, PyTorch int8, from
tasks/export/) measured side by side: CPU latency at batch 1 and throughput at batch 32 in one interleaved
run (each repeat times every runner once, in an order rotated by one each repeat, so drift in the
machine's speed falls evenly on all of them), disk size, and for a task classifier its accuracy on the
task's validation and test splits, every variant on the same examples.

Used by the evaluate stage (the report's deployment table and plot, the registry's metrics of the ONNX
models) and by benchmarks/export.py; torch + transformers + onnxruntime only."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from tasks import scoring
from tasks.downstream import finetune
from tasks.export import outputs as export
from tasks.export.config import VARIANTS

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def load_runners(export_dir: Path, infos: dict[str, dict[str, Any]], threads: int) -> dict[tuple[str, str], Runner]:
    """{(registry name, variant): runner} of every exported model and variant."""
    return {(name, v): export.load_runner(export_dir, info, v, threads) for name, info in infos.items() for v in VARIANTS}


def timed_pass(runner: Runner, feeds: list[dict[str, np.ndarray]]) -> float:
    t0 = time.perf_counter()
    for feed in feeds:
        runner(feed)
    return time.perf_counter() - t0


def interleaved_timing(runners: dict[tuple[str, str], Runner], feeds: dict[str, dict[str, list]], repeats: int,
                       threads: int) -> dict[tuple[str, str], dict[str, Any]]:
    """Batch-1 latency and batch-32 throughput of every runner, all timed in one run: one untimed warm-up
    pass each, then `repeats` rounds, each timing every runner once (the order rotated each round). torch
    runs on `threads` threads (restored after); the ONNX sessions were built with the same number."""
    keys = list(runners)
    passes: dict[tuple[str, str], dict[str, list[float]]] = {k: {"b1": [], "b32": []} for k in keys}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in keys:  # warm-up: kernel selection, ORT's first-run allocations
            timed_pass(runners[k], feeds[k[0]]["b1"][:8])
            timed_pass(runners[k], feeds[k[0]]["b32"][:1])
        for r in range(repeats):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                passes[k]["b1"].append(timed_pass(runners[k], feeds[k[0]]["b1"]))
                passes[k]["b32"].append(timed_pass(runners[k], feeds[k[0]]["b32"]))
    finally:
        torch.set_num_threads(previous)
    out = {}
    for k in keys:
        n1 = len(feeds[k[0]]["b1"])
        n32 = sum(len(f["input_ids"]) for f in feeds[k[0]]["b32"])
        out[k] = {"cpu_latency_ms": 1000.0 * statistics.median(passes[k]["b1"]) / n1,
                  "throughput_sequences_per_s": n32 / statistics.median(passes[k]["b32"]),
                  "latency_passes": [round(p, 5) for p in passes[k]["b1"]],
                  "throughput_passes": [round(p, 5) for p in passes[k]["b32"]]}
    return out


def timing_feeds(export_dir: Path, infos: dict[str, dict[str, Any]], sentences: list[str], batch_size: int,
                 max_len: int) -> dict[str, dict[str, list]]:
    """{registry name: {"b1": feeds of one sentence, "b32": feeds of `batch_size`}} from its own tokenizer."""
    out = {}
    for name, info in infos.items():
        tok = AutoTokenizer.from_pretrained(str(export.variant_path(export_dir, info, "onnx-fp32")))
        names = tuple(info["inputs"])
        out[name] = {"b1": export.encode_feeds(tok, sentences, names, 1, max_len),
                     "b32": export.encode_feeds(tok, sentences, names, batch_size, max_len)}
    return out


def split_logits(runner: Runner, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([runner(f) for f in feeds])


def accuracy_of(runners: dict[tuple[str, str], Runner], export_dir: Path, exported: dict[str, Any], data,
                info: dict[str, Any], max_len: int, bootstrap: int) -> dict[str, dict[str, Any]]:
    """{variant: {"test": metrics, "test_ci95", "validation": metrics}} of one exported classifier on its
    task's validation and test splits: the same examples, in the same batches of 32, for every variant."""
    name = exported["name"]
    tok = AutoTokenizer.from_pretrained(str(export.variant_path(export_dir, exported, "onnx-fp32")))
    pair = "text_pair" in data["test"].column_names
    regression = info.get("task_type") == "regression"
    feeds, labels = {}, {}
    for split in ("validation", "test"):
        texts = list(data[split]["text"])
        if pair:  # sentence pairs: the tokenizer's pair encoding, as fine-tuning saw them
            texts = list(zip(texts, data[split]["text_pair"], strict=True))
        feeds[split] = export.encode_feeds(tok, texts, tuple(exported["inputs"]), 32, max_len)
        labels[split] = np.asarray(data[split]["label"])
    out: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        logits = {s: split_logits(runners[(name, v)], feeds[s]) for s in feeds}
        predictions = finetune.to_predictions(logits["test"], regression)
        out[v] = {"test": finetune.split_metrics(info, labels["test"], logits["test"]),
                  "validation": finetune.split_metrics(info, labels["validation"], logits["validation"]),
                  "test_ci95": list(scoring.bootstrap_ci(labels["test"], predictions, info["metric"],
                                                         info.get("task_type", "classification"), n_resamples=bootstrap))}
    return out


# ------------------------------------------------------------------------------------------------
# the report's deployment section
# ------------------------------------------------------------------------------------------------
def model_roles(tasks: list[str]) -> dict[str, tuple[str, str | None]]:
    """{registry name: (report model name, task or None for an encoder)} of every model a stage may save."""
    from tasks.downstream.data import task_slug
    from tasks.pipeline import MODEL_NAMES, REGISTERED_NAMES, task_registered_name

    roles: dict[str, tuple[str, str | None]] = {REGISTERED_NAMES[m]: (m, None) for m in MODEL_NAMES}
    roles.update({task_registered_name(m, task_slug(t)): (m, t) for m in MODEL_NAMES for t in tasks})
    return roles


def measure_deployment(export_dir: Path, sentences: list[str], source: str, task_data: dict[str, tuple[Any, dict]],
                       threads: int, repeats: int, batch_size: int, max_len: int, bootstrap: int,
                       machine: dict[str, Any], reference: str = "teacher",
                       only: list[str] | None = None) -> dict[str, Any]:
    """The report's "deployment" section: {"protocol", "rows": [one per model x variant]}; `only`: these
    registry names (default: every exported model)."""
    infos = {n: i for n, i in export.exported_models(export_dir).items() if only is None or n in only}
    runners = load_runners(export_dir, infos, threads)
    feeds = timing_feeds(export_dir, infos, sentences, batch_size, max_len)
    timing = interleaved_timing(runners, feeds, repeats, threads)
    roles = model_roles(list(task_data))
    rows = []
    for name, info in infos.items():
        model, task = roles.get(name, (name, None))
        scores = None
        if task is not None and info["task"] == "text-classification":
            data, tinfo = task_data[task]
            scores = accuracy_of(runners, export_dir, info, data, tinfo, max_len, bootstrap)
        for v in VARIANTS:
            row = {"name": name, "model": model, "task": task, "kind": info["task"], "variant": v,
                   **{k: info["variants"][v][k] for k in ("disk_bytes", "max_abs_diff", "argmax_agreement")},
                   **timing[(name, v)], "metric": None, "test": None, "test_ci95": None, "validation": None}
            if scores is not None:
                row.update(metric=task_data[task][1]["metric"],
                           **{k: scores[v][k] for k in ("test", "test_ci95", "validation")})
            rows.append(row)
    add_relative(rows, reference)
    return {"protocol": {"variants": list(VARIANTS), "threads": threads, "cpu": machine["cpu"],
                         "matmul_gflops": machine["matmul_gflops"], "latency_batch_size": 1,
                         "throughput_batch_size": batch_size, "sentences": len(sentences), "source": source,
                         "repeats": repeats, "max_len": max_len,
                         "order": "one interleaved run: every round times every model x variant once, the order "
                                  "rotated by one each round", "statistic": "median round"},
            "rows": rows}


def add_relative(rows: list[dict[str, Any]], reference: str) -> None:
    """speedup: the reference's (teacher's) PyTorch fp32 batch-1 latency, of the same kind of model (its
    classifier of the same task, or its encoder), over this row's; accuracy_delta: this row's test metric
    minus the same model's PyTorch fp32 one."""
    fp32 = {(r["model"], r["task"]): r for r in rows if r["variant"] == "pytorch-fp32"}
    for r in rows:
        ref, own = fp32.get((reference, r["task"])), fp32[(r["model"], r["task"])]
        r["speedup"] = ref["cpu_latency_ms"] / r["cpu_latency_ms"] if ref else None
        r["throughput_ratio"] = r["throughput_sequences_per_s"] / ref["throughput_sequences_per_s"] if ref else None
        r["accuracy_delta"] = (r["test"][r["metric"]] - own["test"][r["metric"]]) if r["test"] is not None else None


def row_metrics(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, float]:
    """A row's numbers as registry tags; an encoder's downstream figures are its classifiers' (the same model
    fine-tuned, in the same variant), averaged over tasks, so the champion rule can compare its versions."""
    out = {k: float(row[k]) for k in ("cpu_latency_ms", "throughput_sequences_per_s", "disk_bytes", "max_abs_diff",
                                      "speedup", "accuracy_delta", "argmax_agreement") if row.get(k) is not None}
    mine = [row] if row["test"] is not None else [r for r in rows if r["model"] == row["model"] and r["task"]
                                                  and r["variant"] == row["variant"] and r["test"] is not None]
    if mine:
        out["downstream_score"] = float(np.mean([r["test"][r["metric"]] for r in mine]))
        out["downstream_validation"] = float(np.mean([r["validation"][r["metric"]] for r in mine]))
    return out


def registry_entries(deployment: dict[str, Any], record, protocol: dict[str, str]) -> list[dict[str, Any]]:
    """Registry entries of the export stage's registered ONNX models (its manifest's models, each the
    folder <slug>/<variant>), with the measured metrics of their variant."""
    rows = deployment["rows"]
    by_folder = {f"{export.model_slug(r['name'])}/{r['variant']}": r for r in rows}
    return [{"name": model["name"], "fingerprint": record.fingerprint, "metrics": row_metrics(by_folder[model["path"]], rows),
             "protocol": protocol} for model in record.manifest.get("models", []) if model["path"] in by_folder]


def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def deployment_markdown(deployment: dict[str, Any]) -> list[str]:
    p = deployment["protocol"]
    lines = ["## Deployment: every model x variant", "",
             f"{p['cpu']}, {p['threads']} thread(s) for every variant (torch and ONNX Runtime), fp32 matmul "
             f"{p['matmul_gflops']:.0f} GFLOP/s. Batch 1: {p['sentences']} {p['source']} sentences one at a time; "
             f"batch {p['throughput_batch_size']}: the same sentences in padded batches; the median of "
             f"{p['repeats']} rounds of {p['order']}. Speed-up: the teacher's PyTorch fp32 batch-1 latency (its "
             "classifier of the same task, or its encoder) / this one's. Max |diff|: against the same model in "
             "PyTorch fp32 on the export's held-out check sentences. Δ: test metric minus the same model's "
             "PyTorch fp32.", "",
             "| model | variant | disk MiB | batch-1 ms | speed-up | batch-32 seq/s | max abs diff | test [95%] | Δ |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in deployment["rows"]:
        score = "–"
        if r["test"] is not None:
            low, high = r["test_ci95"]
            score = f"{r['metric']} {r['test'][r['metric']]:.3f} [{low:.3f}, {high:.3f}]"
        lines.append(f"| {export.model_slug(r['name'])} | {r['variant']} | {r['disk_bytes'] / 2**20:.1f} "
                     f"| {r['cpu_latency_ms']:.2f} | {_f(r['speedup'], '.2f')}x | {r['throughput_sequences_per_s']:,.0f} "
                     f"| {r['max_abs_diff']:.2g} | {score} | {_f(r['accuracy_delta'], '+.3f')} |")
    return [*lines, ""]


def deployment_plot(deployment: dict[str, Any], path: Path) -> bool:
    """Test metric (95% interval) against batch-1 CPU latency of every classifier x variant; False if none."""
    rows = [r for r in deployment["rows"] if r["test"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = dict(zip(VARIANTS, "osD^", strict=True))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        x = [r["cpu_latency_ms"] for r in mine]
        y = [r["test"][r["metric"]] for r in mine]
        err = [[yy - r["test_ci95"][0] for yy, r in zip(y, mine, strict=True)],
               [r["test_ci95"][1] - yy for yy, r in zip(y, mine, strict=True)]]
        ax.errorbar(x, y, yerr=err, fmt=markers[v], capsize=3, label=v)
        for xx, yy, r in zip(x, y, mine, strict=True):
            ax.annotate(r["model"], (xx, yy), textcoords="offset points", xytext=(5, 3), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel(f"CPU latency, batch 1 (ms/sentence, {deployment['protocol']['threads']} thread(s))")
    ax.set_ylabel(f"test {rows[0]['metric']} (95% interval)")
    ax.set_title("accuracy / latency of every model x variant")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return True
