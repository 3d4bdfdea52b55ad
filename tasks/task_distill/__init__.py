"""task_distill: each student fine-tuned on each task from the fine-tuned teacher's outputs, and on hard
labels alone with the same budget and seeds (build.py); read back with outputs."""

from tasks.downstream.config import task_distill_key
from tasks.stage import StageSpec

STAGE = StageSpec(name="task_distill", build="tasks.task_distill.build:build_task_distill",
                  upstream=("distilbert", "albert", "task_teacher", "task_cache"), key_config=task_distill_key,
                  code_modules=("tasks.downstream.finetune", "tasks.downstream.data", "tasks.engine", "tasks.scoring",
                                "models.losses", "tasks.task_cache.outputs", "tasks.task_teacher.outputs",
                                "tasks.task_distill.outputs"),
                  resumable=True, models={"{student}-{task}": "lightbert-{student}-{task}"})
