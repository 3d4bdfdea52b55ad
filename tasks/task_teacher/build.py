"""Task teacher stage: the teacher fine-tuned on each downstream task, its learning rate swept and its
checkpoint chosen on validation. It is what the students learn each task from (tasks/task_cache/,
tasks/task_distill/) and the reference the report compares them with.

Output, per task `<slug>/` (slug: the task name made safe for a path):
    task.json        the task's info (tasks/downstream/data.py) and the validation and test labels
    model/           the chosen classifier (save_pretrained safetensors + the teacher's tokenizer)
    result.json      the chosen learning rate, the sweep table, validation and test metrics, the
                     validation curve and per-example predictions (the report's bootstraps)
While the stage runs, `<slug>/sweep/lr-<rate>/` holds each finished candidate (result and model), so an
interrupted stage resumes after the last finished one; the losers are dropped at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from tasks import engine
from tasks.artifacts import atomic_write_json, replace_dir
from tasks.config import PipelineConfig
from tasks.downstream import data as downstream
from tasks.downstream import finetune
from tasks.stage import StageContext, StageReport
from tasks.task_teacher import STAGE
from tasks.task_teacher.outputs import MODEL_DIR, RESULT_FILE, TASK_FILE
from tasks.teacher.outputs import load_saved

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
def _candidate_dir(tdir: Path, lr: float) -> Path:
    return tdir / "sweep" / f"lr-{lr:g}"


def finetune_teacher(ctx: StageContext, cfg: PipelineConfig, task: str, data, info: dict[str, Any],
                     teacher_dir: Path, rt: engine.Runtime) -> dict[str, Any]:
    """The sweep for one task; each candidate saved as it finishes; returns the task's result."""
    dcfg = cfg.evaluate.downstream
    tdir = ctx.out_dir / downstream.task_slug(task)
    tdir.mkdir(parents=True, exist_ok=True)
    regression = info.get("task_type") == "regression"
    atomic_write_json(tdir / TASK_FILE, {"info": info, "labels": {s: list(data[s]["label"])
                                                                   for s in ("validation", "test")}})
    tokenized = finetune.tokenize_task(data, teacher_dir, dcfg.max_seq_len)
    seed = dcfg.seeds[0]
    candidates = []
    for lr in dcfg.learning_rates.bert:
        cdir = _candidate_dir(tdir, lr)
        if ctx.resuming and (cdir / RESULT_FILE).is_file() and (cdir / MODEL_DIR / "config.json").is_file():
            candidates.append(json.loads((cdir / RESULT_FILE).read_text(encoding="utf-8")))
            continue
        log.info(f"task_teacher: {task}: fine-tuning the teacher at lr {lr:g} (seed {seed})")
        res = finetune.fit(teacher_dir, tokenized, info, dcfg, learning_rate=lr, seed=seed, rt=rt,
                           metrics_sink=lambda m, step, lr=lr: ctx.log_metrics(
                               {f"{downstream.task_slug(task)}_lr{lr:g}_{k}": v for k, v in m.items()}, step),
                           progress=cfg.run.progress)
        finetune.save_model(res.model, cdir / MODEL_DIR, teacher_dir)
        record = res.record(regression)
        atomic_write_json(cdir / RESULT_FILE, record)  # last: its presence marks the candidate finished
        candidates.append(record)
    metric = finetune.main_metric(info)
    best = max(candidates, key=lambda r: r["validation"][metric])  # first of ties: the order of the list
    replace_dir(_candidate_dir(tdir, best["learning_rate"]) / MODEL_DIR, tdir / MODEL_DIR)
    shutil.rmtree(tdir / "sweep", ignore_errors=True)
    result = {**best, "task": task, "chosen_by": f"validation {metric}",
              "sweep": [{"learning_rate": r["learning_rate"], f"validation_{metric}": r["validation"][metric],
                         "best_step": r["best_step"], "steps": r["steps"]} for r in candidates]}
    atomic_write_json(tdir / RESULT_FILE, result)
    return result


def build_task_teacher(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    teacher_dir = load_saved(ctx.upstream_dir("teacher")).model_dir
    rt = engine.setup_runtime("auto")
    counts: dict[str, float] = {}
    models, details = [], {"tasks": {}}
    for task, data, info in downstream.load_tasks(cfg):
        result = finetune_teacher(ctx, cfg, task, data, info, teacher_dir, rt)
        slug, metric = downstream.task_slug(task), result["metric"]
        counts[f"{slug}_validation_{metric}"] = result["validation"][metric]
        counts.update({f"{slug}_test_{k}": v for k, v in result["test"].items()})
        counts[f"{slug}_learning_rate"] = result["learning_rate"]
        details["tasks"][task] = {"learning_rate": result["learning_rate"], "sweep": result["sweep"],
                                  "test": result["test"], "validation": result["validation"],
                                  "data_fingerprint": info["fingerprint"]}
        models.append({"path": f"{slug}/{MODEL_DIR}", "name": STAGE.models["teacher-{task}"].format(task=slug),
                       "task": "text-classification"})
    return StageReport(
        counts=counts,
        inputs=[{"stage": n, "fingerprint": r.fingerprint} for n, r in ctx.upstream.items()],
        artifacts=sorted(p.relative_to(ctx.out_dir).as_posix() for p in ctx.out_dir.glob(f"*/{RESULT_FILE}")),
        details=details,
        models=models,
    )


