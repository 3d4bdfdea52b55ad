"""albert: factorised embeddings, cross-layer sharing and SOP, from scratch and distilled (build.py)."""

from tasks.albert.config import AlbertSectionConfig, albert_key, check_cache, check_teacher_init
from tasks.stage import StageSpec

STAGE = StageSpec(name="albert", build="tasks.albert.build:build_albert", upstream=("teacher", "cache", "pairs"),
                  section=AlbertSectionConfig, key_config=albert_key, checks=(check_cache, check_teacher_init),
                  code_modules=("tasks.engine", "tasks.cache.outputs", "tasks.scoring", "models.albert",
                                "models.bert", "models.losses", "models.albert_init"),
                  resumable=True, training=("train",),
                  models={"albert-scratch": "lightbert-albert-scratch", "albert-distilled": "lightbert-albert-distilled",
                          "albert-teacher": "lightbert-albert-teacher"})
