"""Reading the task_distill stage's output: per task `<slug>/<student>/<mode>/seed-<seed>.json`, one
fine-tuning run each (its metrics, curve and per-example test predictions), and the distilled student
of the first seed under `<slug>/<student>/distilled/model/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.downstream.data import task_slug
from tasks.stage import StageError

MODEL_DIR = "model"


def run_path(tdir: Path, student: str, mode: str, seed: int) -> Path:
    return tdir / student / mode / f"seed-{seed}.json"


def load_runs(stage_dir: Path, task: str, student: str, mode: str, seeds: list[int]) -> list[dict[str, Any]]:
    """The finished runs of one student, mode and task, in seed order (the report reads them here)."""
    tdir = Path(stage_dir) / task_slug(task)
    out = []
    for seed in seeds:
        path = run_path(tdir, student, mode, seed)
        if not path.is_file():
            raise StageError(f"{path} is missing: the task_distill stage output is incomplete; rerun it")
        out.append(json.loads(path.read_text(encoding="utf-8")))
    return out
