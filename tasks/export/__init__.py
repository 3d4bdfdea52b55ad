"""export: every saved model (the teacher, the students, the task classifiers) as ONNX fp32, ONNX int8 and
PyTorch dynamic int8, each checked against PyTorch on held-out sentences (build.py); read back with outputs."""

from tasks.export.config import ExportConfig, export_key
from tasks.stage import StageSpec

STAGE = StageSpec(name="export", build="tasks.export.build:build_export",
                  upstream=("teacher", "distilbert", "albert", "task_teacher", "task_distill"),
                  section=ExportConfig, key_config=export_key,
                  code_modules=("tasks.export.formats", "tasks.export.outputs", "models.deploy", "models.albert",
                                "tasks.downstream.data"),
                  resumable=True, models={"{model}-onnx-fp32": "lightbert-{model}-onnx-fp32",
                                          "{model}-onnx-int8": "lightbert-{model}-onnx-int8"})
