"""The intermediate-layer matches of models/intermediate.py as plain data, and their checks: no torch here,
so that reading and validating a configuration (tasks/distilbert/config.py) stays light."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FEATURES = ("hidden", "attention")
HIDDEN_LOSSES = ("mse", "cos")
ATTENTION_TARGETS = ("scores", "probs")


@dataclass(frozen=True)
class Match:
    """One intermediate term: weight * loss(student feature at student_layer, teacher feature at teacher_layer)."""

    teacher_layer: int
    student_layer: int
    feature: str = "hidden"  # hidden | attention
    loss: str = "mse"  # hidden: mse | cos; attention: mse
    weight: float = 1.0
    attention: str = "scores"  # attention: scores (TinyBERT) | probs

    @property
    def name(self) -> str:
        """The loss term's name, as logged (train_<name>)."""
        return f"{self.feature}_s{self.student_layer}_t{self.teacher_layer}_loss"


def check_matches(matches: Sequence[Match], n_student: int, n_teacher: int, student_heads: int | None = None,
                  teacher_heads: int | None = None, field: str = "distilbert.matches") -> None:
    """Raise ValueError naming the match and the fix when a match does not fit the two models."""
    names = [m.name for m in matches]
    if len(set(names)) != len(names):
        raise ValueError(f"{field} repeats a (feature, student_layer, teacher_layer): {names}; give each once "
                         "(raise its weight instead)")
    for i, m in enumerate(matches):
        where = f"{field}[{i}] ({m.feature}, student_layer {m.student_layer}, teacher_layer {m.teacher_layer})"
        if m.feature not in FEATURES:
            raise ValueError(f"{where}: feature must be one of {', '.join(FEATURES)}")
        low = 1 if m.feature == "attention" else 0
        if not low <= m.student_layer <= n_student:
            raise ValueError(f"{where}: student_layer must be {low}..{n_student} (the student has {n_student} layers"
                             + ("; 0 = embeddings has no attention" if m.feature == "attention" else
                                ", 0 = its embeddings") + ")")
        if not low <= m.teacher_layer <= n_teacher:
            raise ValueError(f"{where}: teacher_layer must be {low}..{n_teacher} (the teacher has {n_teacher} layers"
                             + ("; 0 = embeddings has no attention" if m.feature == "attention" else
                                ", 0 = its embeddings") + ")")
        if m.feature == "attention":
            if m.loss != "mse":
                raise ValueError(f"{where}: attention maps are compared by MSE only; set loss: mse")
            if m.attention not in ATTENTION_TARGETS:
                raise ValueError(f"{where}: attention must be scores or probs")
            if student_heads is not None and teacher_heads is not None and student_heads != teacher_heads:
                raise ValueError(f"{where}: the student has {student_heads} heads and the teacher {teacher_heads}; "
                                 "attention maps are compared head by head: set distilbert.num_heads to "
                                 f"{teacher_heads} or drop the attention match")
        elif m.loss not in HIDDEN_LOSSES:
            raise ValueError(f"{where}: loss must be mse or cos")
