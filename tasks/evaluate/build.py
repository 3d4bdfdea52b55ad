"""Evaluate stage: the teacher and every student scored the same way, and the comparison report.

For each model (the teacher, DistilBERT, each ALBERT variant):
- size: backbone parameters (embeddings + encoder, heads excluded, a shared tensor counted once: the
  papers' convention), parameters with the pretraining heads, and the bytes of its safetensors on disk;
- held-out masked LM: accuracy and perplexity over every masked token of the validation pairs (NSP view;
  the same positions for every model), with the model's own MLM head. A teacher without one (a
  sentence encoder, teacher.mlm_head: none) has none: its MLM figures are null, not a random head's;
- sentence-pair tasks, as ALBERT's Table 5: a model with a trained sentence-pair head is scored with it
  on both NSP (the NSP view) and SOP (the SOP view); the student's retention of it is chance-corrected,
  (acc - majority) / (teacher - majority), and left out while the teacher is at chance;
- sentence embeddings, for a teacher whose users pool its hidden states (sentence-transformers' mean
  pooling): the Spearman correlation between the teacher's and each student's pairwise cosine
  similarities of held-out sentences (the downstream task's validation sentences);
- CPU latency at batch size 1 (the DistilBERT paper's protocol): one timed pass runs the backbone over a
  fixed list of validation sentences of the downstream task one at a time; the median of `latency_repeats`
  passes is reported, with the torch thread count and the machine's measured fp32 matmul speed;
  on a GPU, also throughput at a large batch (bf16);
- downstream, from the task stages (tasks/task_teacher/, tasks/task_distill/): the teacher
  fine-tuned (its learning rate and checkpoint chosen on validation), each student task-distilled and
  trained on hard labels alone with the same budget and seeds. Test metrics with 95% bootstrap intervals
  (tasks/scoring.py), the gain of distillation over hard labels with a paired bootstrap over examples
  and seeds, and a model that collapsed to one class flagged instead of scored.
Then retention (student / teacher) and speed-up (teacher latency / student latency).

Deployment (tasks/evaluate/variants.py): every model the export stage exported, in each of its variants
(PyTorch fp32, ONNX Runtime fp32, ONNX Runtime int8, PyTorch int8), timed in one interleaved run at batch 1
and batch `throughput_batch_size` on `latency_threads` threads, its disk size, and for a classifier its
validation and test metrics on its task (every variant on the same examples). The ONNX versions in the
registry get these figures as tags, and the champion rule with them.

Output: `report.json` (schema below), `report.md` (a table to read), `plots/*.png`, and `models/<name>.json`
per model (written as each finishes, so an interrupted stage resumes after the last finished model), and
`deployment.json` (the variants' measures, likewise).

report.json (schema 2)
  schema             2
  reference          "teacher": the model retention and speed-up are relative to
  machine            cpu, cores, torch threads, matmul_gflops (fp32 2048x2048, measured at the start)
  teacher            where the teacher came from and what it can teach (the teacher stage's details)
  general_distillation   per student stage, the losses it used and those it dropped (and why)
  pipeline_seconds   the seconds each stage took when it was built ({stage: seconds}, evaluate's up to the
                     report) and their sum: the pipeline's compute time, whichever run built each stage
  protocol           validation pairs, masked tokens, latency settings, GPU, embeddings (sentences,
                     pooling), downstream (tasks with their info, seeds, epochs, learning rates per family,
                     batch size, max_seq_len, evals per epoch, the distillation loss, the bootstrap), and
                     the protocol fingerprint every registry version is tagged with
  baselines          nsp_majority_accuracy, sop_majority_accuracy: always answering the commoner class;
                     mlm_commonest_token_accuracy: always answering the commonest masked token
  models[]           one entry per model, in pipeline order:
    name, registered_name, family, path, source_fingerprint
    parameters, parameters_with_heads, disk_bytes, parameter_ratio
    mlm_accuracy, mlm_perplexity, mlm_loss            (null without an MLM head)
    pair_head          nsp | sop | null;  nsp_accuracy(_ci95), sop_accuracy(_ci95)   (Wilson intervals)
    embedding_spearman null unless the teacher is a pooled sentence encoder
    cpu_latency_ms, cpu_latency_pass_seconds, cpu_latency_passes, gpu_throughput_sequences_per_s
    downstream         {task: {metric, modes: {mode: {test: {metric: mean over seeds}, test_ci95 [low, high]
                       (of the main metric), validation, runs: [{seed, learning_rate, test, validation,
                       best_step, predicted_class_share, collapsed}], collapsed}}, headline (the mode the
                       model is judged by: the teacher's "finetuned", a student's "distilled" when trained),
                       gain (distilled - hard: difference, ci95, prob_a_better, seeds) or null}}
    downstream_score   mean over tasks of the headline test main metric (null if a headline collapsed)
    downstream_validation   the same on validation (what the registry's champion rule compares)
    retention          {metric: student / teacher}: downstream/<task>, downstream_score, mlm_accuracy,
                       mlm_perplexity (teacher / student), nsp and sop chance-corrected; null where undefined
    speedup            {cpu_latency: teacher / this model, gpu_throughput: this model / teacher}
  deployment         protocol (variants, threads, cpu, matmul_gflops, batch sizes, sentences, repeats, order)
                     and rows[]: one per exported model x variant: name, model, task (null: an encoder), kind,
                     variant, disk_bytes, max_abs_diff and argmax_agreement (against PyTorch fp32, from the
                     export), cpu_latency_ms, throughput_sequences_per_s, their passes, metric, test,
                     test_ci95, validation, speedup (the teacher's PyTorch fp32 latency of the same kind /
                     this one's), throughput_ratio, accuracy_delta (test metric - the same model's fp32)
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, BertForPreTraining, BertModel, DistilBertForMaskedLM

from models.albert import count_parameters, load_albert
from models.bert import IGNORE_INDEX
from tasks import engine, scoring
from tasks.artifacts import atomic_write_json, atomic_write_text, sha256_json
from tasks.config import PipelineConfig
from tasks.downstream import data as downstream
from tasks.evaluate import variants
from tasks.pairs import outputs as pairs
from tasks.pairs.outputs import PairsSplit
from tasks.pipeline import MODEL_NAMES, REGISTERED_NAMES, STAGES, task_registered_name
from tasks.scoring import wilson_interval
from tasks.stage import StageContext, StageError, StageReport, read_manifest, saved_models
from tasks.task_distill import outputs as task_distill
from tasks.task_teacher import outputs as task_teacher

log = logging.getLogger(__name__)

REPORT_SCHEMA = 2
MODELS_DIR = "models"
PLOTS_DIR = "plots"
DEPLOYMENT_JSON = "deployment.json"  # the variants' measures, kept to resume
DEPLOYMENT_PLOT = "deployment_accuracy_vs_latency.png"
REFERENCE = "teacher"
# Registry names of the models the stages save (their manifests' "models" entries) -> report names.
REPORT_NAMES = {v: k for k, v in REGISTERED_NAMES.items()}
EMBEDDING_SENTENCES = 300  # held-out sentences whose pairwise similarities the embedding figure compares
# The two views of the pairs schema (tasks/pairs/) under one set of names.
BATCH_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "labels", "pair_label")
VIEWS: dict[str, dict[str, str]] = {view: dict(zip(pairs.view_columns(view), (*BATCH_COLUMNS, "length"), strict=True))
                                    for view in pairs.VIEW_COLUMNS}
PAIR_HEADS = {"bert": "nsp", "albert": "sop", "distilbert": None}


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def load_model(path: Path) -> tuple[nn.Module, str]:
    """A saved checkpoint with its pretraining heads, and its family (bert | distilbert | albert). A
    BERT saved without heads (a headless teacher) loads as the bare BertModel."""
    conf = AutoConfig.from_pretrained(path)
    family = conf.model_type
    if family == "bert" and (conf.architectures or []) == ["BertModel"]:
        return BertModel.from_pretrained(path, use_safetensors=True), family
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


def has_mlm_head(model: nn.Module) -> bool:
    return not isinstance(model, BertModel)


# (mlm logits at the labelled positions, their labels, sentence-pair logits or None) of a padded batch
def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------
# held-out masked LM and sentence-pair tasks
# ------------------------------------------------------------------------------------------------
def load_view(pairs_dir: Path, view: str, max_examples: int | None = None) -> PairsSplit:
    """The validation split's `view` (nsp | sop) under the view-neutral column names of VIEWS."""
    ds = pairs.load_split(pairs_dir, "validation", views=[view], columns=list(VIEWS[view]), max_examples=max_examples)
    return ds.rename_columns(VIEWS[view])


def score_view(model: nn.Module, family: str, ds: PairsSplit, pad_id: int, batch_size: int, rt: engine.Runtime,
               with_mlm: bool) -> dict[str, Any]:
    """Masked LM accuracy / perplexity (with_mlm) and the sentence-pair head's accuracy on one view."""
    collate = engine.PadCollator(BATCH_COLUMNS, {"input_ids": pad_id, "labels": IGNORE_INDEX})
    totals = scoring.score_pretraining(model, scoring.masked_lm_predictor(model, family), ds, collate, batch_size, rt,
                                       pair_label="pair_label", with_mlm=with_mlm)
    out: dict[str, Any] = {"pairs": int(totals.pairs), "majority_accuracy": totals.majority_accuracy}
    if with_mlm:
        out.update(masked_tokens=int(totals.masked), mlm_accuracy=totals.mlm_accuracy, mlm_loss=totals.mlm_loss,
                   mlm_perplexity=totals.mlm_perplexity)
    if PAIR_HEADS[family] is not None:
        out["pair_accuracy"] = totals.pair_accuracy
        out["pair_accuracy_ci95"] = list(wilson_interval(totals.pair_correct, totals.pairs))
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
# sentence embeddings: how closely a student's pooled embeddings follow the teacher's
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sentence_embeddings(model: nn.Module, tok, sentences: list[str], family: str, max_len: int,
                        pooling: str = "mean", batch_size: int = 64) -> np.ndarray:
    """(n, H) pooled last hidden states of the backbone: the mean over real tokens (sentence-transformers'
    mean pooling), or the [CLS] vector for pooling "cls"."""
    net = backbone(model).eval()
    device = next(net.parameters()).device
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i:i + batch_size], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        if family == "distilbert":
            enc.pop("token_type_ids", None)
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = net(**enc).last_hidden_state.float()
        if pooling == "cls":
            out.append(hidden[:, 0])
        else:
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.cat(out).cpu().numpy()


def similarity_agreement(teacher_emb: np.ndarray, student_emb: np.ndarray) -> float:
    """Spearman correlation of the two models' pairwise cosine similarities (every pair of sentences once)."""
    from scipy import stats

    def cosines(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
        sims = x @ x.T
        return sims[np.triu_indices(len(x), k=1)]

    return float(stats.spearmanr(cosines(teacher_emb), cosines(student_emb)).statistic)


# ------------------------------------------------------------------------------------------------
# downstream: the task stages' results, with intervals, collapse flags and the distillation gain
# ------------------------------------------------------------------------------------------------
def _run_summary(run: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    out = {k: run[k] for k in ("seed", "learning_rate", "test", "validation", "best_step", "steps") if k in run}
    if info.get("task_type", "classification") == "classification":
        out["predicted_class_share"] = scoring.predicted_class_share(run["test_predictions"], info["num_labels"])
        out["collapsed"] = scoring.collapsed(run["test_predictions"], info["num_labels"])
    else:
        out["predicted_class_share"], out["collapsed"] = None, False
    return out


def mode_summary(runs: list[dict[str, Any]], info: dict[str, Any], labels: list, bootstrap: int) -> dict[str, Any]:
    """One model x mode on one task, over its seeds: mean test and validation metrics, the test main
    metric's 95% bootstrap interval (over examples and seeds), each run, and the collapse flag."""
    metric, task_type = info["metric"], info.get("task_type", "classification")
    summaries = [_run_summary(r, info) for r in runs]
    mean = {k: float(np.mean([r["test"][k] for r in runs])) for k in runs[0]["test"]}
    return {
        "test": mean,
        "test_ci95": list(scoring.bootstrap_ci_seeds(labels, [r["test_predictions"] for r in runs], metric,
                                                     task_type, n_resamples=bootstrap)),
        "validation": {k: float(np.mean([r["validation"][k] for r in runs])) for k in runs[0]["validation"]},
        "runs": summaries,
        "collapsed": any(r["collapsed"] for r in summaries),
    }


def downstream_of(name: str, cfg: PipelineConfig, ctx: StageContext, tasks: list[str]) -> dict[str, Any]:
    """{task: {...}} of one model (see the module docstring), read from the task stages' outputs."""
    dcfg = cfg.evaluate.downstream
    tt_dir, td_dir = ctx.upstream_dir("task_teacher"), ctx.upstream_dir("task_distill")
    trained = ctx.upstream["task_distill"].manifest.get("details", {})
    out = {}
    for task in tasks:
        saved = task_teacher.load_task_info(tt_dir, task)
        info, labels = saved["info"], saved["labels"]["test"]
        metric, task_type = info["metric"], info.get("task_type", "classification")
        if name == REFERENCE:
            modes = {"finetuned": mode_summary([task_teacher.load_result(tt_dir, task)], info, labels,
                                               dcfg.bootstrap_resamples)}
            headline, gain = "finetuned", None
        else:
            if name not in trained.get("students", []):
                continue
            runs = {m: task_distill.load_runs(td_dir, task, name, m, list(dcfg.seeds)) for m in trained["modes"]}
            modes = {m: mode_summary(r, info, labels, dcfg.bootstrap_resamples) for m, r in runs.items()}
            headline = "distilled" if "distilled" in modes else "hard"
            gain = None
            if {"distilled", "hard"} <= modes.keys():
                gain = scoring.paired_bootstrap(labels, [r["test_predictions"] for r in runs["distilled"]],
                                                [r["test_predictions"] for r in runs["hard"]], metric, task_type,
                                                n_resamples=dcfg.bootstrap_resamples, seeds=list(dcfg.seeds))
        out[task] = {"metric": metric, "task_type": task_type, "modes": modes, "headline": headline, "gain": gain}
    return out


def headline_score(entry: dict[str, Any], split: str) -> float | None:
    """Mean over tasks of the headline mode's main metric on `split`; None when any headline collapsed."""
    values = []
    for res in entry.get("downstream", {}).values():
        mode = res["modes"][res["headline"]]
        if mode["collapsed"]:
            return None
        values.append(mode[split][res["metric"]])
    return float(np.mean(values)) if values else None


# ------------------------------------------------------------------------------------------------
# retention, speed-up and the report
# ------------------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_relative(entries: list[dict[str, Any]], baselines: dict[str, float], pairs: int) -> None:
    """Retention, speed-up and parameter ratio of every entry against the reference (teacher)."""
    ref = next((e for e in entries if e["name"] == REFERENCE), None)
    if ref is None:
        return
    for e in entries:
        retention: dict[str, float | None] = {
            "mlm_accuracy": _ratio(e.get("mlm_accuracy"), ref.get("mlm_accuracy")),
            "mlm_perplexity": _ratio(ref.get("mlm_perplexity"), e.get("mlm_perplexity")),
            "downstream_score": _ratio(e.get("downstream_score"), ref.get("downstream_score")),
        }
        for task, res in e.get("downstream", {}).items():
            ref_res = ref.get("downstream", {}).get(task)
            mine, theirs = res["modes"][res["headline"]], ref_res and ref_res["modes"][ref_res["headline"]]
            ok = theirs is not None and not mine["collapsed"] and not theirs["collapsed"]
            retention[f"downstream/{task}"] = (_ratio(mine["test"][res["metric"]], theirs["test"][res["metric"]])
                                               if ok else None)
        for task in ("nsp", "sop"):
            acc, teacher_acc = e.get(f"{task}_accuracy"), ref.get(f"{task}_accuracy")
            retention[task] = (None if acc is None or teacher_acc is None else
                               scoring.chance_corrected(acc, baselines[f"{task}_majority_accuracy"], teacher_acc, pairs))
        e["retention"] = retention
        e["speedup"] = {"cpu_latency": _ratio(ref.get("cpu_latency_ms"), e.get("cpu_latency_ms")),
                        "gpu_throughput": _ratio(e.get("gpu_throughput_sequences_per_s"),
                                                 ref.get("gpu_throughput_sequences_per_s"))}
        e["parameter_ratio"] = _ratio(e["parameters"], ref["parameters"])


def flat_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """The numbers of one report entry as flat {name: float} (registry tags, MLflow metrics)."""
    out: dict[str, float] = {}
    for key in ("parameters", "parameters_with_heads", "disk_bytes", "mlm_accuracy", "mlm_perplexity",
                "nsp_accuracy", "sop_accuracy", "embedding_spearman", "cpu_latency_ms",
                "gpu_throughput_sequences_per_s", "downstream_score", "downstream_validation", "parameter_ratio"):
        if isinstance(entry.get(key), int | float):
            out[key] = float(entry[key])
    for task, res in entry.get("downstream", {}).items():
        slug = downstream.task_slug(task).replace("-", "_")
        for mode, summary in res["modes"].items():
            for split in ("test", "validation"):
                for metric, value in summary[split].items():
                    out[f"downstream_{slug}_{mode}_{split}_{metric}"] = float(value)
        if res["gain"] is not None:
            out[f"downstream_{slug}_gain_{res['metric']}"] = float(res["gain"]["difference"])
    for group in ("retention", "speedup"):
        for key, value in (entry.get(group) or {}).items():
            if value is not None:
                out[f"{group}_{key.replace('/', '_')}"] = float(value)
    return out


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _score(mode: dict[str, Any] | None, metric: str) -> str:
    """'0.842 [0.820, 0.863]', or the collapse flag in place of a score."""
    if mode is None:
        return "–"
    if mode["collapsed"]:
        share = max(r["predicted_class_share"] for r in mode["runs"])
        return f"collapsed ({share:.0%} one class)"
    low, high = mode["test_ci95"]
    return f"{mode['test'][metric]:.3f} [{low:.3f}, {high:.3f}]"


def ablation_tables(ctx: StageContext) -> dict[str, str]:
    """{stage: its ablations.md} for each upstream training stage that trained ablation rows (the same
    table its MLflow run holds as nested runs)."""
    out = {}
    for stage in ctx.upstream:
        path = ctx.upstream_dir(stage) / "ablations.md"
        if path.is_file():
            out[stage] = path.read_text(encoding="utf-8")
    return out


def report_markdown(report: dict[str, Any]) -> str:
    p, m = report["protocol"], report["machine"]
    lat, d = p["latency"], p["downstream"]
    lines = [
        "# lightbert comparison report", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, fp32 matmul {m['matmul_gflops']:.0f} GFLOP/s "
        f"({m['matmul_threads']} threads, 2048x2048). Pipeline: {report['pipeline_seconds']['total']:.0f} s of "
        "stage time (each stage's build time, whenever it was built).", "",
        f"Reference: the {REFERENCE}. Retention = model / {REFERENCE}; speed-up = {REFERENCE}'s CPU latency / "
        "the model's. Intervals are 95%.", "",
    ]
    t = report.get("teacher") or {}
    if t.get("source"):
        prov = t.get("provenance") or {}
        arch = t.get("architecture") or {}
        shape = (f", {arch['layers']} layers x {arch['hidden_size']}, {arch['parameters'] / 1e6:.1f}M parameters"
                 if arch else "")
        origin = f" ({prov['requirement']}, {prov.get('license', 'license not stated')})" if prov.get("requirement") else ""
        lines += [f"Teacher: {t['source']}{origin}{shape}. It can teach {t.get('can_teach_note') or '?'}.", ""]
    for stage, losses in (report.get("general_distillation") or {}).items():
        if losses.get("dropped"):
            dropped = "; ".join(f"{k}: {v}" for k, v in losses["dropped"].items())
            lines += [f"General distillation ({stage}): losses {losses.get('losses_used')}; dropped: {dropped}.", ""]
    for task in d["tasks"]:
        info = d["data"][task]
        metric = info["metric"]
        lines += [f"## {task}: test {metric}", "",
                  f"{info['counts']['train']:,} train / {info['counts']['validation']:,} validation / "
                  f"{info['counts']['test']:,} test examples"
                  + (f"; always answering the majority class scores {info['test_majority_accuracy']:.3f} accuracy"
                     if info.get("task_type", "classification") == "classification" else "") + ".", "",
                  "| model | parameters | disk | CPU ms | speed-up | task-distilled | hard labels only "
                  "| gain (distilled − hard) | retention |",
                  "|---|---:|---:|---:|---:|---|---|---|---:|"]
        for e in report["models"]:
            res = e["downstream"].get(task)
            if res is None:
                continue
            sp, ret = e.get("speedup") or {}, e.get("retention") or {}
            modes = res["modes"]
            if e["name"] == REFERENCE:
                distilled, hard = _score(modes["finetuned"], metric) + " (fine-tuned)", "–"
            else:
                distilled, hard = _score(modes.get("distilled"), metric), _score(modes.get("hard"), metric)
            gain = res["gain"]
            if gain and any(m["collapsed"] for m in modes.values()):
                gain_s = "– (a mode collapsed)"
            else:
                gain_s = (f"{gain['difference']:+.3f} [{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}]"
                          if gain else "–")
            ratio = e.get("parameter_ratio")
            lines.append(
                f"| {e['name']} | {e['parameters'] / 1e6:.2f}M ({_fmt(ratio, '.2f')}) | {e['disk_bytes'] / 2**20:.1f} MiB "
                f"| {_fmt(e['cpu_latency_ms'], '.2f')} | {_fmt(sp.get('cpu_latency'), '.2f')}x | {distilled} | {hard} "
                f"| {gain_s} | {_fmt(ret.get(f'downstream/{task}'))} |")
        lines.append("")
    lines += ["## Pretraining objectives and embeddings", "",
              "| model | MLM acc | MLM ppl | NSP acc | SOP acc | NSP / SOP retention (chance-corrected) "
              "| embedding Spearman |", "|---|---:|---:|---:|---:|---:|---:|"]
    for e in report["models"]:
        ret = e.get("retention") or {}
        lines.append(f"| {e['name']} | {_fmt(e['mlm_accuracy'])} | {_fmt(e['mlm_perplexity'], '.1f')} "
                     f"| {_fmt(e['nsp_accuracy'])} | {_fmt(e['sop_accuracy'])} | {_fmt(ret.get('nsp'))} / "
                     f"{_fmt(ret.get('sop'))} | {_fmt(e.get('embedding_spearman'))} |")
    b, emb = report["baselines"], p["embeddings"]
    lines += [
        "", "## How it was measured", "",
        f"- Downstream: epochs per family {d['epochs']}, batch {d['batch_size']}, "
        f"max_seq_len {d['max_seq_len']}, seeds {d['seeds']}; a student's distilled and hard-label runs share "
        "their budget and seeds. Learning rates per family "
        f"{d['learning_rates']} (a list is a sweep chosen on validation: the teacher with seed {d['seeds'][0]}, each "
        f"student per seed); the checkpoint is the best of {d['evals_per_epoch']} validation passes per epoch. "
        f"Task-distilled: L = {d['distill']['alpha_ce']:g} T² KL(teacher‖student) + {d['distill']['alpha_hard']:g} "
        f"CE(labels) at T = {d['distill']['temperature']:g}"
        + (f" + {d['distill']['alpha_hidden']:g} Lcos(last hidden)" if d["distill"]["alpha_hidden"] else "")
        + ", from the fine-tuned teacher's cached logits. Hard labels only: CE(labels).",
        f"- Intervals: {d['bootstrap']}",
        "- A model that answers one class for at least 95% of the test examples is shown as collapsed, not "
        "scored, and gets no retention.",
        f"- Masked LM: {p['validation_pairs']:,} validation pairs, {p['masked_tokens']:,} masked tokens (NSP view), "
        "each model's own head (none: –); always answering the commonest masked token scores "
        f"{b['mlm_commonest_token_accuracy']:.3f}, so a model near it has learned nothing from context. "
        "Parameters: embeddings + encoder, heads excluded, shared tensors once.",
        f"- NSP / SOP: each model's own trained sentence-pair head; the majority class scores "
        f"{b['nsp_majority_accuracy']:.3f} (NSP) and {b['sop_majority_accuracy']:.3f} (SOP). Retention is "
        "(acc − majority) / (teacher − majority), left out while the teacher is at chance.",
        (f"- Embedding Spearman: the teacher's {emb['pooling']} pooling, {emb['sentences']} {emb['source']} "
         "sentences; Spearman correlation of every pair's cosine similarity, student against teacher."
         if emb["pooling"] else "- Embedding Spearman: not measured (the teacher is not a pooled sentence encoder)."),
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
    lines += [f"- Protocol fingerprint (registry tag lightbert.protocol): {p['fingerprint']}", ""]
    if report.get("deployment"):
        lines += variants.deployment_markdown(report["deployment"])
    for stage, table in (report.get("ablations") or {}).items():
        lines += [f"## Ablations of the {stage} stage", "", table.rstrip(), ""]
    for task in d["tasks"]:
        lines += [f"### {task}: every run", "", "| model | mode | seed | lr | best step | validation | test "
                  "| largest predicted-class share |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for e in report["models"]:
            res = e["downstream"].get(task)
            for mode, summary in (res["modes"].items() if res else []):
                for r in summary["runs"]:
                    lines.append(f"| {e['name']} | {mode} | {r['seed']} | {r['learning_rate']:g} | {r['best_step']} "
                                 f"| {r['validation'][res['metric']]:.3f} | {r['test'][res['metric']]:.3f} "
                                 f"| {_fmt(r['predicted_class_share'], '.2f')} |")
        lines.append("")
    return "\n".join(lines)


def write_plots(report: dict[str, Any], folder: Path) -> list[str]:
    """The first task's headline test metric against parameters and against CPU latency, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    task = report["protocol"]["downstream"]["tasks"][0]
    written = []
    for fname, key, label in (("accuracy_vs_parameters.png", "parameters", "parameters (millions)"),
                              ("accuracy_vs_cpu_latency.png", "cpu_latency_ms", "CPU latency, batch 1 (ms/sentence)")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        metric = None
        for e in report["models"]:
            res = e["downstream"].get(task)
            if res is None:
                continue
            metric = res["metric"]
            x = e[key] / 1e6 if key == "parameters" else e[key]
            for mode, summary in res["modes"].items():
                if summary["collapsed"]:
                    continue
                y, (low, high) = summary["test"][metric], summary["test_ci95"]
                ax.errorbar([x], [y], yerr=[[y - low], [high - y]], fmt="o" if mode != "hard" else "x", capsize=3)
                ax.annotate(f"{e['name']} ({mode})", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric} (95% interval)")
        ax.set_title(f"{task}: {metric} vs {key.split('_')[0]}")
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
    """[{name, registered_name, path, source_fingerprint, ...}] from the upstream stages' saved models."""
    found: dict[str, dict[str, Any]] = {}
    saved = saved_models(ctx.upstream[s] for s in ("teacher", "distilbert", "albert") if s in ctx.upstream)
    for registered, (record, path) in saved.items():
        name = REPORT_NAMES.get(registered)
        if name is not None:
            found[name] = {"name": name, "registered_name": registered, "path": path,
                           "source_fingerprint": record.fingerprint,
                           # a pretrained teacher loaded without an NSP head has a random one
                           "pair_head_trained": record.manifest.get("details", {}).get("nsp_head_trained", True)
                           if record.name == "teacher" else True}
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


def evaluate_one(spec: dict[str, Any], cfg: PipelineConfig, views: dict[str, PairsSplit], sentences: list[str],
                 embedding: dict[str, Any], rt: engine.Runtime, progress: Callable[[str], None]) -> dict[str, Any]:
    """Everything measured on one model itself (size, MLM, sentence pairs, embeddings, speed)."""
    ecfg = cfg.evaluate
    path = Path(spec["path"])
    model, family = load_model(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    with_mlm = has_mlm_head(model)
    pair_head = PAIR_HEADS[family] if with_mlm and spec.get("pair_head_trained", True) else None
    entry: dict[str, Any] = {"name": spec["name"], "registered_name": spec["registered_name"], "family": family,
                             "path": str(path), "source_fingerprint": spec["source_fingerprint"],
                             "parameters": count_parameters(backbone(model)),
                             "parameters_with_heads": count_parameters(model), "disk_bytes": disk_bytes(path),
                             "pair_head": pair_head, "mlm_accuracy": None, "mlm_perplexity": None, "mlm_loss": None,
                             "nsp_accuracy": None, "nsp_accuracy_ci95": None, "sop_accuracy": None,
                             "sop_accuracy_ci95": None, "embedding_spearman": None}
    model.to(rt.device)
    if with_mlm:
        progress("masked LM and sentence-pair tasks")
        nsp = score_view(model, family, views["nsp"], tok.pad_token_id, ecfg.batch_size, rt, with_mlm=True)
        entry.update({k: nsp[k] for k in ("mlm_accuracy", "mlm_perplexity", "mlm_loss")})
        if pair_head is not None:
            sop = score_view(model, family, views["sop"], tok.pad_token_id, ecfg.batch_size, rt, with_mlm=False)
            entry.update(nsp_accuracy=nsp["pair_accuracy"], nsp_accuracy_ci95=nsp["pair_accuracy_ci95"],
                         sop_accuracy=sop["pair_accuracy"], sop_accuracy_ci95=sop["pair_accuracy_ci95"])
    if embedding["pooling"] and embedding["sentences"]:
        progress("sentence embeddings")
        entry["embeddings"] = sentence_embeddings(model, tok, embedding["texts"], family,
                                                  ecfg.downstream.max_seq_len, embedding["pooling"])
    progress("CPU latency")
    max_len = ecfg.downstream.max_seq_len
    entry.update(cpu_latency(model, encode_sentences(tok, sentences, family, max_len), ecfg.latency_repeats,
                             ecfg.latency_threads))
    entry["gpu_throughput_sequences_per_s"] = None
    if rt.device.type == "cuda":
        progress("GPU throughput")
        entry["gpu_throughput_sequences_per_s"] = throughput(model, tok, sentences, family, ecfg.gpu_batch_size,
                                                             max_len, rt.device)
    return entry


def cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def protocol_fingerprint(cfg: PipelineConfig, tasks: dict[str, dict[str, Any]]) -> str:
    """What makes two evaluations comparable: the tasks (data and split), their metrics, the budget and
    the seeds. The registry's champion alias only moves between versions with the same one."""
    d = cfg.section("evaluate")["downstream"]
    return sha256_json({"tasks": {t: {"data": i["fingerprint"], "metric": i["metric"]} for t, i in tasks.items()},
                        "budget": {k: d[k] for k in ("epochs", "batch_size", "max_seq_len", "warmup_fraction",
                                                     "weight_decay", "dropout", "evals_per_epoch", "learning_rates")},
                        "seeds": d["seeds"]})[:16]


def build_evaluate(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    t0 = time.perf_counter()
    ecfg = cfg.evaluate
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "matmul_threads": torch.get_num_threads(), "matmul_gflops": engine.matmul_gflops()}
    specs = models_to_evaluate(cfg, ctx)
    rt = engine.setup_runtime("auto")
    pairs_dir = ctx.upstream_dir("pairs")
    views = {v: load_view(pairs_dir, v, ecfg.max_eval_examples) for v in VIEWS}
    tt_dir = ctx.upstream_dir("task_teacher")
    tasks = downstream.task_names(cfg)
    infos = {t: task_teacher.load_task_info(tt_dir, t)["info"] for t in tasks}
    first = downstream.load_task(ecfg.downstream.tasks[0], ecfg.downstream, cfg.run.resolved_cache_dir())[0]
    texts = list(first["validation"]["text"])
    sentences = texts[: ecfg.latency_sentences]
    pooling = ctx.upstream["teacher"].manifest.get("details", {}).get("pooling")
    embedding = {"pooling": pooling if pooling in ("mean", "cls") else None,
                 "texts": texts[:EMBEDDING_SENTENCES], "sentences": min(len(texts), EMBEDDING_SENTENCES),
                 "source": f"{tasks[0]} validation"}

    results_dir = ctx.out_dir / MODELS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    entries, embeddings = [], {}
    for spec in specs:
        result_path = results_dir / f"{spec['name']}.json"
        emb_path = results_dir / f"{spec['name']}.embeddings.npy"
        if ctx.resuming and result_path.is_file() and (emb_path.is_file() or not embedding["pooling"]):
            entry = json.loads(result_path.read_text(encoding="utf-8"))  # finished by an interrupted attempt
            if emb_path.is_file():
                embeddings[spec["name"]] = np.load(emb_path)
        else:
            def progress(what: str, name: str = spec["name"]) -> None:
                log.info(f"evaluate: {name}: {what}")

            entry = evaluate_one(spec, cfg, views, sentences, embedding, rt, progress)
            if "embeddings" in entry:
                embeddings[spec["name"]] = entry.pop("embeddings")
                np.save(emb_path, embeddings[spec["name"]])
            atomic_write_json(result_path, entry)
        entry["downstream"] = downstream_of(spec["name"], cfg, ctx, tasks)
        entry["downstream_score"] = headline_score(entry, "test")
        entry["downstream_validation"] = headline_score(entry, "validation")
        if REFERENCE in embeddings and spec["name"] in embeddings and spec["name"] != REFERENCE:
            entry["embedding_spearman"] = similarity_agreement(embeddings[REFERENCE], embeddings[spec["name"]])
        elif spec["name"] == REFERENCE and embeddings:
            entry["embedding_spearman"] = 1.0
        entries.append(entry)
    for emb_path in results_dir.glob("*.npy"):  # only needed to resume
        emb_path.unlink()

    baselines = {"nsp_majority_accuracy": score_view_baseline(views["nsp"]),
                 "sop_majority_accuracy": score_view_baseline(views["sop"]),
                 "mlm_commonest_token_accuracy": commonest_token_share(views["nsp"])}
    add_relative(entries, baselines, len(views["nsp"]))
    deployment = deployment_of(cfg, ctx, sentences, f"{tasks[0]} validation", machine)
    for e in entries:
        ctx.log_metrics({f"{e['name']}_{k}": v for k, v in flat_metrics(e).items()})
    dcfg = cfg.section("evaluate")["downstream"]
    stage_seconds = {}
    for name in STAGES[:-1]:  # every stage before this one, from its manifest beside the upstream ones
        manifest = read_manifest(ctx.upstream_dir("pairs").parent / name) or {}
        stage_seconds[name] = float(manifest.get("timings", {}).get("seconds", 0.0))
    stage_seconds["evaluate"] = round(time.perf_counter() - t0, 3)
    teacher_details = ctx.upstream["teacher"].manifest.get("details", {})
    general = {stage: {k: ctx.upstream[stage].manifest.get("details", {}).get(k) for k in ("losses_used", "dropped")}
               for stage in ("distilbert",) if stage in ctx.upstream}
    report = {
        "schema": REPORT_SCHEMA,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "reference": REFERENCE,
        "machine": machine,
        "teacher": {k: teacher_details.get(k) for k in ("source", "provenance", "architecture", "mlm_head",
                                                          "nsp_head_trained", "pooling", "can_teach", "can_teach_note")},
        "general_distillation": general,
        "pipeline_seconds": {**stage_seconds, "total": sum(stage_seconds.values())},
        "protocol": {
            "validation_pairs": len(views["nsp"]),
            "masked_tokens": count_masked(views["nsp"]),
            "latency": {"batch_size": 1, "sentences": len(sentences), "source": f"{tasks[0]} validation",
                        "repeats": ecfg.latency_repeats, "threads": ecfg.latency_threads,
                        "statistic": "median pass time / sentences", "cpu": machine["cpu"]},
            "gpu": {"device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None,
                    "batch_size": ecfg.gpu_batch_size if rt.device.type == "cuda" else None},
            "embeddings": {k: v for k, v in embedding.items() if k != "texts"},
            "downstream": {"tasks": tasks, "data": infos, "seeds": dcfg["seeds"], "epochs": dcfg["epochs"],
                           "learning_rates": dcfg["learning_rates"], "batch_size": dcfg["batch_size"],
                           "max_seq_len": dcfg["max_seq_len"], "evals_per_epoch": dcfg["evals_per_epoch"],
                           "distill": dcfg["distill"],
                           "bootstrap": f"percentile bootstrap, {ecfg.downstream.bootstrap_resamples} resamples "
                           "of the test examples (and of the seeds, with several); the gain is paired: the same "
                           "resampled examples and seeds for both modes (tasks/scoring.py)"},
            "fingerprint": protocol_fingerprint(cfg, infos),
        },
        "baselines": baselines,
        "models": entries,
        "deployment": deployment,
        "ablations": ablation_tables(ctx),
    }
    atomic_write_json(ctx.out_dir / "report.json", report)
    atomic_write_text(ctx.out_dir / "report.md", report_markdown(report))
    artifacts = ["report.json", "report.md"]
    if ecfg.plots:
        artifacts += write_plots(report, ctx.out_dir / PLOTS_DIR)
        if variants.deployment_plot(deployment, ctx.out_dir / PLOTS_DIR / DEPLOYMENT_PLOT):
            artifacts.append(f"{PLOTS_DIR}/{DEPLOYMENT_PLOT}")

    counts: dict[str, float] = {"models": len(entries), "seconds": round(time.perf_counter() - t0, 3),
                                "matmul_gflops": round(machine["matmul_gflops"], 1)}
    for e in entries:
        counts.update({f"{e['name']}_{k}": v for k, v in flat_metrics(e).items()})
    protocol = {"lightbert.protocol": report["protocol"]["fingerprint"],
                "lightbert.protocol.tasks": ",".join(tasks),
                "lightbert.protocol.metric": ",".join(f"{t}:{i['metric']}" for t, i in infos.items()),
                "lightbert.protocol.seeds": ",".join(map(str, dcfg["seeds"]))}
    registry = [{"name": e["registered_name"], "fingerprint": e["source_fingerprint"], "metrics": flat_metrics(e),
                 "protocol": protocol} for e in entries]
    registry += task_model_entries(ctx, entries, protocol)
    registry += variants.registry_entries(deployment, ctx.upstream["export"], protocol)
    return StageReport(
        counts=counts,
        inputs=[{"stage": n, "fingerprint": r.fingerprint} for n, r in ctx.upstream.items()]
        + [{"downstream": t, "fingerprint": i["fingerprint"], "num_labels": i["num_labels"]} for t, i in infos.items()],
        artifacts=artifacts,
        details={"registry": registry,
                 "summary": {e["name"]: {k: e.get(k) for k in ("downstream_score", "downstream_validation",
                                                               "mlm_accuracy", "cpu_latency_ms", "parameters")}
                             for e in entries}},
    )


def deployment_of(cfg: PipelineConfig, ctx: StageContext, sentences: list[str], source: str,
                  machine: dict[str, Any]) -> dict[str, Any]:
    """Every exported model x variant measured side by side (tasks/evaluate/variants.py); an interrupted
    stage reuses what the previous attempt measured."""
    path = ctx.out_dir / DEPLOYMENT_JSON
    if ctx.resuming and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    ecfg = cfg.evaluate
    log.info("evaluate: every exported model x variant, interleaved")
    task_data = {name: (data, info) for name, data, info in downstream.load_tasks(cfg)}
    deployment = variants.measure_deployment(
        ctx.upstream_dir("export"), sentences, source, task_data, ecfg.latency_threads, ecfg.latency_repeats,
        ecfg.throughput_batch_size, ecfg.downstream.max_seq_len, ecfg.downstream.bootstrap_resamples, machine,
        reference=REFERENCE)
    atomic_write_json(path, deployment)
    return deployment


def task_model_entries(ctx: StageContext, entries: list[dict[str, Any]], protocol: dict[str, str]) -> list[dict]:
    """Registry entries of the task models (the fine-tuned teacher, the task-distilled students): their
    task's headline metrics, validation first (what the champion rule compares)."""
    out = []
    by_name = {e["name"]: e for e in entries}
    for stage in ("task_teacher", "task_distill"):
        record = ctx.upstream[stage]
        for model in record.manifest.get("models", []):
            for name, e in by_name.items():
                for task, res in e["downstream"].items():
                    slug = downstream.task_slug(task)
                    if model["name"] != task_registered_name(name, slug):
                        continue
                    summary = res["modes"][res["headline"]]
                    metrics = {f"test_{k}": v for k, v in summary["test"].items()}
                    metrics.update({f"validation_{k}": v for k, v in summary["validation"].items()})
                    if not summary["collapsed"]:
                        metrics["downstream_validation"] = summary["validation"][res["metric"]]
                        metrics["downstream_score"] = summary["test"][res["metric"]]
                    out.append({"name": model["name"], "fingerprint": record.fingerprint, "metrics": metrics,
                                "protocol": protocol})
    return out


def score_view_baseline(ds: PairsSplit) -> float:
    labels = np.asarray(ds["pair_label"])
    positive = float(labels.sum())
    return max(positive, len(labels) - positive) / max(len(labels), 1)


def commonest_token_share(ds: PairsSplit) -> float:
    """Accuracy of always answering the commonest masked token of these pairs (an upper bound of any
    context-free guess fitted elsewhere): the floor MLM accuracy is read against."""
    tokens = _masked_labels(ds)
    return float(np.bincount(tokens).max() / len(tokens)) if len(tokens) else 0.0


def count_masked(ds: PairsSplit) -> int:
    return len(_masked_labels(ds))


def _masked_labels(ds: PairsSplit) -> np.ndarray:
    labels = np.concatenate([np.zeros(0, dtype=np.int64), *(np.asarray(row) for row in ds["labels"])])
    return labels[labels != IGNORE_INDEX]


