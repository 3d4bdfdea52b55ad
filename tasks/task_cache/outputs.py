"""Reading the task_cache stage's output: per task, checksummed safetensors shards of the fine-tuned
teacher's logits (and last hidden states at every real token) on the train split, in row order, and
`task_cache.json`, the format, every shard's sha256 and size, and per task its examples and shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open

from tasks.artifacts import read_json_or_empty
from tasks.downstream.finetune import TeacherTargets
from tasks.stage import StageError

FORMAT, FORMAT_VERSION = "lightbert-task-cache", 1
MANIFEST_FILE = "task_cache.json"


def load_targets(stage_dir: Path, task: str) -> TeacherTargets:
    """Every train example's cached teacher outputs, in row order."""
    manifest = read_json_or_empty(Path(stage_dir) / MANIFEST_FILE)
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise StageError(f"{stage_dir} is not a finished {FORMAT} v{FORMAT_VERSION} output; rerun task_cache")
    entry = manifest["tasks"].get(task)
    if entry is None:
        raise StageError(f"the task cache has no outputs for task {task!r} (it has {sorted(manifest['tasks'])}); "
                         "rerun task_cache with this task in evaluate.downstream.tasks")
    logits, hidden, offsets = [], [], [np.zeros(1, dtype=np.int64)]
    for rel in entry["shards"]:
        with safe_open(str(Path(stage_dir) / rel), framework="numpy") as f:
            logits.append(f.get_tensor("logits"))
            if entry["hidden_states"]:
                hidden.append(f.get_tensor("hidden"))
                offsets.append(f.get_tensor("hidden_offsets")[1:] + offsets[-1][-1])
    out = TeacherTargets(logits=np.concatenate(logits))
    if entry["hidden_states"]:
        out.hidden, out.hidden_offsets = np.concatenate(hidden), np.concatenate(offsets)
    if len(out.logits) != entry["examples"]:
        raise StageError(f"the task cache of {task} holds {len(out.logits)} examples, its manifest says "
                         f"{entry['examples']}; rerun task_cache")
    return out
