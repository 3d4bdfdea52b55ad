"""Reading the teacher stage's output: the saved checkpoint and tokenizer under model/, and what the
teacher can teach (its MLM head, its NSP head, its pooling), from the stage's manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import BertConfig, BertForPreTraining, BertModel

from tasks.stage import StageError, read_manifest

MODEL_DIR = "model"


@dataclass
class SavedTeacher:
    """The teacher stage's output as the stages downstream need it."""

    model_dir: Path  # save_pretrained checkpoint + tokenizer
    mlm_head: str  # pretrained | fitted | none
    nsp_head_trained: bool
    pooling: str | None  # sentence-transformers pooling of the checkpoint, e.g. "mean"
    provenance: dict[str, Any] = field(default_factory=dict)
    config: BertConfig | None = None

    @property
    def has_mlm_head(self) -> bool:
        return self.mlm_head != "none"

    def load_model(self) -> BertForPreTraining | BertModel:
        """The saved teacher in eval mode: a BertForPreTraining, or a bare BertModel when it has no MLM head."""
        cls = BertForPreTraining if self.has_mlm_head else BertModel
        try:
            model = cls.from_pretrained(self.model_dir, use_safetensors=True, attn_implementation="sdpa")
        except (OSError, ValueError) as exc:
            raise StageError(f"could not load the teacher from {self.model_dir}: {exc}; rerun the teacher stage") from exc
        return model.eval()


def load_saved(stage_dir: Path) -> SavedTeacher:
    """The teacher stage's output; what it can teach comes from its manifest (a folder without one, as a
    user's hand-made teacher, is judged from the checkpoint's architectures)."""
    model_dir = Path(stage_dir) / MODEL_DIR
    if not (model_dir / "config.json").is_file():
        raise StageError(f"{model_dir} holds no saved teacher: rerun the teacher stage")
    config = BertConfig.from_pretrained(model_dir)
    details = (read_manifest(Path(stage_dir)) or {}).get("details", {})
    headless = (config.architectures or ["BertForPreTraining"]) == ["BertModel"]
    mlm_head = details.get("mlm_head") or ("none" if headless else "pretrained")
    nsp = details.get("nsp_head_trained", (config.architectures or []) == ["BertForPreTraining"])
    return SavedTeacher(model_dir, mlm_head, bool(nsp), details.get("pooling"), details.get("provenance", {}), config)
