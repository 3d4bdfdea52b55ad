"""task_teacher: the teacher fine-tuned on each downstream task, learning rate and checkpoint chosen on
validation (build.py); read back with outputs."""

from tasks.downstream.config import task_teacher_key
from tasks.stage import StageSpec

STAGE = StageSpec(name="task_teacher", build="tasks.task_teacher.build:build_task_teacher", upstream=("teacher",),
                  key_config=task_teacher_key,
                  code_modules=("tasks.downstream.finetune", "tasks.downstream.data", "tasks.engine", "tasks.scoring",
                                "models.losses", "tasks.task_teacher.outputs"),
                  resumable=True, models={"teacher-{task}": "lightbert-teacher-{task}"})
