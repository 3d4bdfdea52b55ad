"""Reading the task_teacher stage's output: per task `<slug>/`, task.json (the task's info and its
validation and test labels), result.json (the chosen learning rate, the sweep, the metrics and the
per-example predictions) and model/ (the chosen classifier with the teacher's tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.downstream.data import task_slug
from tasks.stage import StageError

TASK_FILE, RESULT_FILE, MODEL_DIR = "task.json", "result.json", "model"


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
