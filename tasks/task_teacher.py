"""Task teacher stage: the teacher fine-tuned on each downstream task, its learning rate swept and its
checkpoint chosen on validation. It is what the students learn each task from (tasks/task_cache.py,
tasks/task_distill.py) and the reference the report compares them with.

Output, per task `<slug>/` (slug: the task name made safe for a path):
    task.json        the task's info (tasks/downstream.py) and the validation and test labels
    model/           the chosen classifier (save_pretrained safetensors + the teacher's tokenizer)
    result.json      the chosen learning rate, the sweep table, validation and test metrics, the
                     validation curve and per-example predictions (the report's bootstraps)
While the stage runs, `<slug>/sweep/lr-<rate>/` holds each finished candidate (result and model), so an
interrupted stage resumes after the last finished one; the losers are dropped at the end.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from tasks import downstream, engine, finetune
from tasks.artifacts import atomic_write_json, replace_dir
from tasks.config import PipelineConfig
from tasks.stage import StageContext, StageError, StageReport, StageSpec
from tasks.teacher import saved_teacher_dir

REGISTERED_PREFIX = "lightbert-teacher"
TASK_FILE, RESULT_FILE, MODEL_DIR = "task.json", "result.json", "model"


def task_slug(task: str) -> str:
    """'glue/sst2' -> 'glue-sst2': a folder and registry-name friendly form of a task's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", task).strip("-").lower() or "task"


def task_names(cfg: PipelineConfig) -> list[str]:
    """The configured tasks' names (an entry is a name or a local file's spec with a name)."""
    return [downstream.task_name(t) for t in cfg.evaluate.downstream.tasks]


def load_tasks(cfg: PipelineConfig) -> list[tuple[str, Any, dict[str, Any]]]:
    """[(name, DatasetDict, info)] of every configured task, in order."""
    dcfg = cfg.evaluate.downstream
    out = []
    for entry in dcfg.tasks:
        data, info = downstream.load_task(entry, dcfg, cfg.run.resolved_cache_dir())
        out.append((info["task"], data, info))
    return out


def save_model(model, model_dir: Path, tokenizer_dir: Path) -> None:
    """save_pretrained (safetensors) with the tokenizer of `tokenizer_dir`, written beside it then moved in."""
    from transformers import AutoTokenizer

    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.cpu().save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
    replace_dir(tmp, model_dir)


# ------------------------------------------------------------------------------------------------
# reading the output (the task cache, the students and evaluate read it through these)
# ------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"{path} is missing: the task_teacher stage output is incomplete; rerun it")
    return json.loads(path.read_text(encoding="utf-8"))


def task_dir(stage_dir: Path, task: str) -> Path:
    return Path(stage_dir) / task_slug(task)


def load_task_info(stage_dir: Path, task: str) -> dict[str, Any]:
    """{info, labels: {validation, test}} as the stage wrote them."""
    return read_json(task_dir(stage_dir, task) / TASK_FILE)


def load_result(stage_dir: Path, task: str) -> dict[str, Any]:
    return read_json(task_dir(stage_dir, task) / RESULT_FILE)


def model_dir(stage_dir: Path, task: str) -> Path:
    return task_dir(stage_dir, task) / MODEL_DIR


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
def _candidate_dir(tdir: Path, lr: float) -> Path:
    return tdir / "sweep" / f"lr-{lr:g}"


def finetune_teacher(ctx: StageContext, cfg: PipelineConfig, task: str, data, info: dict[str, Any],
                     teacher_dir: Path, rt: engine.Runtime) -> dict[str, Any]:
    """The sweep for one task; each candidate saved as it finishes; returns the task's result."""
    dcfg = cfg.evaluate.downstream
    tdir = ctx.out_dir / task_slug(task)
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
        print(f"task_teacher: {task}: fine-tuning the teacher at lr {lr:g} (seed {seed})", flush=True)
        res = finetune.fit(teacher_dir, tokenized, info, dcfg, learning_rate=lr, seed=seed, rt=rt,
                           metrics_sink=lambda m, step, lr=lr: ctx.log_metrics(
                               {f"{task_slug(task)}_lr{lr:g}_{k}": v for k, v in m.items()}, step),
                           progress=cfg.run.progress)
        save_model(res.model, cdir / MODEL_DIR, teacher_dir)
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
    teacher_dir = saved_teacher_dir(ctx)
    rt = engine.setup_runtime("auto")
    counts: dict[str, float] = {}
    models, details = [], {"tasks": {}}
    for task, data, info in load_tasks(cfg):
        result = finetune_teacher(ctx, cfg, task, data, info, teacher_dir, rt)
        slug, metric = task_slug(task), result["metric"]
        counts[f"{slug}_validation_{metric}"] = result["validation"][metric]
        counts.update({f"{slug}_test_{k}": v for k, v in result["test"].items()})
        counts[f"{slug}_learning_rate"] = result["learning_rate"]
        details["tasks"][task] = {"learning_rate": result["learning_rate"], "sweep": result["sweep"],
                                  "test": result["test"], "validation": result["validation"],
                                  "data_fingerprint": info["fingerprint"]}
        models.append({"path": f"{slug}/{MODEL_DIR}", "name": f"{REGISTERED_PREFIX}-{slug}",
                       "task": "text-classification"})
    return StageReport(
        counts=counts,
        inputs=[{"stage": n, "fingerprint": r.fingerprint} for n, r in ctx.upstream.items()],
        artifacts=sorted(p.relative_to(ctx.out_dir).as_posix() for p in ctx.out_dir.glob(f"*/{RESULT_FILE}")),
        details=details,
        models=models,
    )


def downstream_key(cfg: PipelineConfig) -> dict[str, Any]:
    """What decides a fine-tune: the tasks and the budget (the students' settings change nothing here)."""
    section = cfg.section("evaluate")["downstream"]
    section.pop("distill")
    return section


def task_teacher_key(cfg: PipelineConfig) -> dict[str, Any]:
    dcfg = downstream_key(cfg)
    dcfg["learning_rates"] = {"bert": dcfg["learning_rates"]["bert"]}
    dcfg["seeds"] = dcfg["seeds"][:1]
    return {"downstream": dcfg}


STAGE = StageSpec(
    name="task_teacher",
    build=build_task_teacher,
    upstream=("teacher",),
    key_config=task_teacher_key,
    code_modules=("tasks.finetune", "tasks.downstream", "tasks.engine", "tasks.scoring", "models.losses"),
    resumable=True,
)
