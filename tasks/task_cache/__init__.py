"""task_cache: the fine-tuned teacher's logits (and last hidden states) on each task's train split, for
the students (build.py); read back with outputs.load_targets."""

from tasks.downstream.config import task_cache_key
from tasks.stage import StageSpec

STAGE = StageSpec(name="task_cache", build="tasks.task_cache.build:build_task_cache", upstream=("task_teacher",),
                  key_config=task_cache_key,
                  code_modules=("tasks.downstream.finetune", "tasks.cache.outputs", "tasks.task_cache.outputs"),
                  resumable=True)
