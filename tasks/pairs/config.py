"""The pairs stage's section: sequence length, masking and the NSP / SOP views."""

from __future__ import annotations

from pydantic import Field, model_validator

from tasks.section import Section


class PairsConfig(Section):
    max_seq_len: int = Field(128, ge=16)
    short_seq_prob: float = Field(0.1, ge=0.0, le=1.0)
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    mask_token_prob: float = Field(0.8, ge=0.0, le=1.0, description="of the chosen: -> [MASK]")
    random_token_prob: float = Field(0.1, ge=0.0, le=1.0, description="of the chosen: -> random token")
    max_predictions_per_seq: int | None = Field(
        None, ge=1, description="cap on masked positions; None = ceil(max_seq_len * mask_prob)"
    )
    whole_word_mask: bool = False
    dupe_factor: int = Field(5, ge=1, description="copies of the data with different masks")
    nsp_random_prob: float = Field(0.5, gt=0.0, lt=1.0, description="share of NSP pairs with a random B")
    sop_swap_prob: float = Field(0.5, gt=0.0, lt=1.0, description="share of SOP pairs swapped")
    chunk_documents: int = Field(
        1000, ge=2, description="documents per shard: the unit of work and of memory (a worker holds one chunk), "
        "and the pool random next sentences are drawn from")

    @model_validator(mode="after")
    def _probabilities(self) -> PairsConfig:
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError(
                "mask_token_prob + random_token_prob must be at most 1 (the rest stays unchanged); "
                "BERT uses 0.8 and 0.1"
            )
        return self

    def resolved_max_predictions(self) -> int:
        import math

        return self.max_predictions_per_seq or math.ceil(self.max_seq_len * self.mask_prob)


def pairs_key(cfg) -> dict:
    return {"pairs": cfg.section("pairs"), "seed": cfg.run.seed}
