"""Task cache stage: the fine-tuned teacher run once over each task's train split, its outputs kept for
the students (tasks/task_distill/): the logits of every example and, when distill.alpha_hidden > 0,
the last hidden states of every real token.

Format (the MLM cache's family, tasks/cache/outputs.py): per task `<slug>/shard-NNNNN.safetensors`, each
holding the train rows [start, stop):
    rows            (n,) int64       the rows of the task's train split
    logits          (n, C) float32   the teacher's logits at T = 1 (the temperature is the student's)
    hidden          (tokens, H) float16, hidden_offsets (n + 1,) int64    (only with hidden states)
and `task_cache.json`: the format, every shard's sha256 and size, and per task the examples, labels,
teacher model and data fingerprint. Shards are written atomically and recorded in `progress.json` as
each finishes; an interrupted attempt keeps every shard that matches its record and computes the rest.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from tasks import engine
from tasks.artifacts import atomic_write_json, matches_record, read_json_or_empty
from tasks.cache.outputs import write_shard
from tasks.config import PipelineConfig
from tasks.downstream import data as downstream
from tasks.downstream import finetune
from tasks.stage import StageContext, StageError, StageReport
from tasks.task_cache.outputs import FORMAT, FORMAT_VERSION, MANIFEST_FILE
from tasks.task_teacher import outputs as task_teacher

log = logging.getLogger(__name__)

PROGRESS = "progress.json"


def shard_rel(task: str, index: int) -> str:
    return f"{downstream.task_slug(task)}/shard-{index:05d}.safetensors"


def teacher_shard(model, data, collate: finetune.TaskCollator, rt: engine.Runtime, rows: np.ndarray,
                  with_hidden: bool) -> dict[str, np.ndarray]:
    """The teacher's tensors for train rows `rows` (one shard)."""
    part = data.select(rows.tolist())
    logits = finetune.predict_logits(model, part, collate, rt)
    tensors = {"rows": rows.astype(np.int64), "logits": np.ascontiguousarray(logits, dtype=np.float32)}
    if with_hidden:
        hidden, offsets = finetune.hidden_states_of(model, part, collate, rt)
        tensors.update(hidden=np.ascontiguousarray(hidden), hidden_offsets=offsets)
    return tensors


def cache_task(ctx: StageContext, cfg: PipelineConfig, task: str, data, rt: engine.Runtime,
               shards: dict[str, dict[str, Any]], fingerprint: str) -> dict[str, Any]:
    """Compute (or keep) every shard of one task; `shards` gains their records. Returns the task's entry."""
    up = ctx.upstream_dir("task_teacher")
    info = task_teacher.load_task_info(up, task)["info"]
    mdir = task_teacher.model_dir(up, task)
    regression = info.get("task_type") == "regression"
    if fingerprint != info["fingerprint"]:
        raise StageError(f"task {task}: its data differs from the data the teacher was fine-tuned on; rerun "
                         "the task_teacher stage")
    with finetune.quiet():
        model = finetune.load_classifier(mdir, 1 if regression else info["num_labels"], 0.0).to(rt.device)
    train = finetune.tokenize_task(data, mdir, cfg.evaluate.downstream.max_seq_len)["train"]
    collate = finetune.TaskCollator(finetune.input_columns(True), 0, regression)
    with_hidden = cfg.evaluate.downstream.distill.alpha_hidden > 0
    per_shard = cfg.evaluate.downstream.distill.cache_examples_per_shard
    n = len(train)
    for index in range(math.ceil(n / per_shard)):
        rel = shard_rel(task, index)
        path = ctx.out_dir / rel
        if rel in shards:
            continue  # kept from an interrupted attempt
        rows = np.arange(index * per_shard, min(n, (index + 1) * per_shard))
        tensors = teacher_shard(model, train, collate, rt, rows, with_hidden)
        shards[rel] = write_shard(path, tensors, {"task": task, "rows": f"{rows[0]}:{rows[-1] + 1}"})
        atomic_write_json(ctx.out_dir / PROGRESS, {"shards": shards})  # right after: the unit of resuming
    return {"examples": n, "num_labels": info["num_labels"], "task_type": info.get("task_type", "classification"),
            "data_fingerprint": info["fingerprint"], "hidden_states": with_hidden,
            "shards": [shard_rel(task, i) for i in range(math.ceil(n / per_shard))]}


def build_task_cache(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    rt = engine.setup_runtime("auto")
    recorded = read_json_or_empty(ctx.out_dir / PROGRESS).get("shards", {}) if ctx.resuming else {}
    shards = {rel: rec for rel, rec in recorded.items() if matches_record(ctx.out_dir / rel, rec)}
    for path in [p for p in ctx.out_dir.rglob("*") if p.is_file()]:  # half-written or damaged leftovers
        rel = path.relative_to(ctx.out_dir).as_posix()
        if rel not in shards and rel != PROGRESS:
            path.unlink()
    kept = len(shards)
    tasks = {}
    with torch.inference_mode():
        for task, data, info in downstream.load_tasks(cfg):
            log.info(f"task_cache: {task}: the teacher's outputs on the train split")
            tasks[task] = cache_task(ctx, cfg, task, data, rt, shards, info["fingerprint"])
    atomic_write_json(ctx.out_dir / MANIFEST_FILE, {"format": FORMAT, "version": FORMAT_VERSION, "tasks": tasks,
                                                    "shard_files": shards})
    (ctx.out_dir / PROGRESS).unlink(missing_ok=True)
    counts: dict[str, float] = {"shards": len(shards), "shards_kept": kept,
                                "bytes": sum(r["size"] for r in shards.values())}
    for task, entry in tasks.items():
        counts[f"{downstream.task_slug(task)}_examples"] = entry["examples"]
    return StageReport(counts=counts, inputs=[{"stage": n, "fingerprint": r.fingerprint}
                                              for n, r in ctx.upstream.items()],
                       artifacts=[MANIFEST_FILE], details={"tasks": tasks, "resumed_shards": kept})
