"""distilbert: the student with half the teacher's layers, initialised from them and trained with
Lce + Lmlm + Lcos (build.py)."""

from tasks.distilbert.config import DistilbertConfig, check_cache, check_teacher_layers, distilbert_key
from tasks.stage import StageSpec

STAGE = StageSpec(name="distilbert", build="tasks.distilbert.build:build_distilbert",
                  upstream=("teacher", "cache", "pairs"), section=DistilbertConfig, key_config=distilbert_key,
                  checks=(check_teacher_layers, check_cache),
                  code_modules=("models.distilbert", "models.losses", "models.intermediate", "models.matches",
                                "models.bert", "tasks.engine", "tasks.cache.outputs", "tasks.scoring",
                                "tasks.distilbert.masking"),
                  resumable=True, models={"distilbert": "lightbert-distilbert"}, training=("train",))
