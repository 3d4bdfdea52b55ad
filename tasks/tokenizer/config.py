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
    limit_alphabet: int | None = Field(
        None, ge=1, description="characters kept in the initial alphabet, the most frequent first; None = every "
        "character the corpus uses, so also every one seen min_frequency times (a CJK corpus has thousands: a cap "
        "of 1000 left 6.4% of a Chinese corpus's tokens [UNK]; the English corpora here use under 1000, so None "
        "changes nothing for them)")
    max_unk_rate: float = Field(0.005, ge=0.0, le=1.0, description="an [UNK] rate above this on either split "
                                "is a warning in the run summary")


def tokenizer_key(cfg) -> dict:
    """A pretrained teacher brings its own tokenizer, so it decides the output too."""
    return {"tokenizer": cfg.section("tokenizer"), "teacher_pretrained": cfg.teacher.pretrained}
