"""The tokenizer stage's section: the WordPiece vocabulary trained on the corpus (unless a pretrained
teacher brings its own)."""

from __future__ import annotations

from pydantic import Field

from tasks.section import Section


class TokenizerConfig(Section):
    vocab_size: int = Field(8000, ge=64)
    lowercase: bool = True
    strip_accents: bool | None = Field(None, description="None: strip when lowercasing, as BERT does")
    split_cjk_chars: bool = Field(True, description="each CJK character its own token, as BERT-Chinese")
    min_frequency: int = Field(2, ge=1)
    limit_alphabet: int = Field(1000, ge=1)


def tokenizer_key(cfg) -> dict:
    """A pretrained teacher brings its own tokenizer, so it decides the output too."""
    return {"tokenizer": cfg.section("tokenizer"), "teacher_pretrained": cfg.teacher.pretrained}
