"""evaluate: every model scored the same way, and the comparison report (build.py)."""

from tasks.evaluate.config import EvaluateConfig, check_model_names, evaluate_key
from tasks.stage import StageSpec

STAGE = StageSpec(name="evaluate", build="tasks.evaluate.build:build_evaluate",
                  upstream=("pairs", "teacher", "distilbert", "albert", "task_teacher", "task_distill", "export"),
                  section=EvaluateConfig, key_config=evaluate_key, checks=(check_model_names,),
                  code_modules=("tasks.evaluate.variants", "tasks.export.outputs", "tasks.export.formats", "tasks.scoring", "tasks.engine", "tasks.task_teacher.outputs",
                                "tasks.task_distill.outputs", "models.albert", "models.bert", "models.distilbert"),
                  resumable=True)
