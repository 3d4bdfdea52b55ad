"""teacher: a pretrained BERT (with its MLM head fitted when it has none) or one pretrained here (build.py);
read back with outputs.load_saved."""

from tasks.stage import StageSpec
from tasks.teacher.config import TeacherConfig, check_positions, teacher_key

STAGE = StageSpec(name="teacher", build="tasks.teacher.build:build_teacher", upstream=("tokenizer", "pairs"),
                  section=TeacherConfig, key_config=teacher_key, checks=(check_positions,),
                  code_modules=("tasks.engine", "models.bert"), resumable=True,
                  models={"teacher": "lightbert-teacher"}, training=("train", "mlm_head_fit"))
