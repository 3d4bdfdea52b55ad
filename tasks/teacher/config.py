"""The teacher stage's section: a pretrained checkpoint (and its MLM head), or a BERT pretrained here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tasks.section import Section, TrainingConfig


class MlmHeadFitConfig(TrainingConfig):
    """Fitting BERT's MLM head on a frozen pretrained backbone that has none (teacher.mlm_head: fit)."""

    max_steps: int = Field(200, ge=1, description="optimizer steps")
    learning_rate: float = Field(1e-3, gt=0.0, description="peak, after linear warmup; then linear decay to 0")
    warmup_steps: int = Field(20, ge=0)
    checkpoint_every: int = Field(0, ge=0, description="steps between resumable checkpoints; 0 = none (the "
                                  "checkpoint would hold the whole frozen backbone)")
    log_every: int = Field(20, ge=1, description="steps between logged training metrics")


class TeacherConfig(Section):
    pretrained: str | None = Field(
        None, description="a BERT checkpoint: the name of an embedded teacher (minilm-l6, data/sources.yaml), a "
        "local folder or a hub id; it may lack the MLM head (see mlm_head); None = pretrain here"
    )
    mlm_head: Literal["fit", "none"] = Field(
        "fit", description="when the pretrained checkpoint has no MLM head: fit = fit BERT's head on the frozen "
        "backbone (mlm_head_fit) so the students get soft labels (Lce) and a trained head to start from; none = "
        "no head: the students learn from hidden states only (Lce is dropped). Default by measurement with "
        "minilm-l6: a 3-layer student after 50 steps reached val MLM accuracy 0.073 (fit, with Lce) and 0.084 "
        "(fit, alpha_ce 0) against 0.046 (none); the fit cost 92 s on 2 cores")
    mlm_head_fit: MlmHeadFitConfig = Field(default_factory=MlmHeadFitConfig,
                                           description="fitting the head (only with mlm_head: fit)")
    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1024, ge=8)
    max_position_embeddings: int = Field(512, ge=16)
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="hidden and attention dropout")
    train: TrainingConfig = Field(default_factory=TrainingConfig, description="pretraining (ignored "
                                  "when pretrained is set)")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TeacherConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        return self


def teacher_key(cfg) -> dict[str, Any]:
    section = cfg.section("teacher")
    if cfg.teacher.pretrained:
        section.pop("train")  # a pretrained teacher is not trained: its training settings change nothing
    else:
        for key in ("mlm_head", "mlm_head_fit"):  # they apply to a pretrained checkpoint only
            section.pop(key)
    return {"teacher": section, "seed": cfg.run.seed}


def check_positions(cfg) -> None:
    """A teacher pretrained here must have positions for the pairs; a pretrained checkpoint brings its
    own positions and layers, and the teacher stage checks them against the configuration."""
    if not cfg.teacher.pretrained and cfg.pairs.max_seq_len > cfg.teacher.max_position_embeddings:
        raise ValueError(
            f"pairs.max_seq_len ({cfg.pairs.max_seq_len}) is above the model's position "
            f"embeddings (teacher.max_position_embeddings = {cfg.teacher.max_position_embeddings}); "
            "lower pairs.max_seq_len or raise teacher.max_position_embeddings"
        )
