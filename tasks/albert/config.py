"""The albert stage's section: factorised embeddings, cross-layer sharing, SOP; from scratch and distilled."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tasks.section import Section, TrainingConfig


class AlbertSectionConfig(Section):
    variants: list[Literal["scratch", "distilled", "teacher"]] = Field(
        default_factory=lambda: ["scratch", "distilled"],
        description="scratch: MLM + SOP on the pairs; distilled: the teacher's soft labels (cache) + MLM + SOP "
        "+ hidden-state cosine (needs 'sop' in cache.views); teacher: initialised from the teacher (SVD "
        "embeddings, a copied layer: models/albert_init.py), then MLM + SOP as scratch. All at the same budget "
        "and seed: [scratch, distilled, teacher] compares them side by side")
    init_layer: int | None = Field(None, ge=1, description="teacher variant: the teacher layer (1-based) copied "
                                   "into the shared layer; None = the middle one, (L + 1) // 2")
    embedding_size: int = Field(128, ge=8, description="E, the factorised embedding size (ALBERT: 128)")
    sharing: Literal["all", "attention", "ffn", "none"] = Field(
        "all", description="cross-layer parameter sharing: all (ALBERT), attention or ffn blocks only, none")
    hidden_size: int | None = Field(None, ge=8, description="None = the teacher's")
    num_layers: int | None = Field(None, ge=1, description="None = the teacher's")
    num_heads: int | None = Field(None, ge=1, description="None = the teacher's")
    intermediate_size: int | None = Field(None, ge=8, description="None = the teacher's")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="ALBERT v2 trains without dropout (paper, sec. 4.8)")
    alpha_ce: float = Field(5.0, ge=0.0, description="distilled: weight of the soft-label KL loss (x T^2)")
    alpha_mlm: float = Field(2.0, ge=0.0, description="distilled: weight of the masked-LM loss on true tokens")
    alpha_sop: float = Field(2.0, ge=0.0, description="distilled: weight of the SOP loss (= alpha_mlm: from "
                             "scratch MLM and SOP weigh the same)")
    alpha_cos: float = Field(1.0, ge=0.0, description="distilled: weight of the last-layer cosine loss (through "
                             "a learned projection when the hidden sizes differ)")
    temperature: float = Field(2.0, gt=0.0, description="distilled: softmax temperature of the soft-label loss")
    train: TrainingConfig = Field(default_factory=TrainingConfig, description="each variant's training")

    @model_validator(mode="after")
    def _consistent(self) -> AlbertSectionConfig:
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants needs at least one of scratch, distilled and no repeats (got {self.variants})")
        if self.hidden_size is not None and self.num_heads is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if "teacher" in self.variants and self.hidden_size is not None and self.embedding_size > self.hidden_size:
            raise ValueError(f"embedding_size ({self.embedding_size}) is above hidden_size ({self.hidden_size}): the "
                             "teacher variant's SVD factorisation needs E <= H")
        if "distilled" in self.variants and self.alpha_ce + self.alpha_mlm + self.alpha_sop + self.alpha_cos == 0:
            raise ValueError("alpha_ce, alpha_mlm, alpha_sop and alpha_cos are all 0: nothing to train on")
        return self


def albert_key(cfg) -> dict[str, Any]:
    section = cfg.section("albert")
    if "distilled" not in cfg.albert.variants:  # the distillation weights change nothing then
        for key in ("alpha_ce", "alpha_mlm", "alpha_sop", "alpha_cos", "temperature"):
            section.pop(key)
    if "teacher" not in cfg.albert.variants or section["init_layer"] is None:  # keys of earlier runs stay valid
        section.pop("init_layer")
    return {"albert": section, "seed": cfg.run.seed}


def check_cache(cfg) -> None:
    """ALBERT-distilled learns from the teacher's outputs on the SOP view of the train split, and its
    Lcos matches the teacher's last layer."""
    a, c = cfg.albert, cfg.cache
    if "distilled" not in a.variants:
        return
    if "sop" not in c.views or "train" not in c.splits:
        raise ValueError(
            f"albert.variants includes 'distilled', which learns from the teacher's soft labels for the SOP view "
            f"of the train split, but cache.views is {c.views} and cache.splits is {c.splits}: add sop and train "
            "(--set cache.views=[nsp,sop]) or drop 'distilled' from albert.variants")
    if c.hidden_positions == "none":
        raise ValueError("albert.variants includes 'distilled', whose Lcos matches the teacher's last hidden layer, "
                         "but cache.hidden_positions is none: set it to masked or all")
    layers = c.hidden_layers
    if isinstance(layers, list) and not cfg.teacher.pretrained and cfg.teacher.num_layers not in layers:
        raise ValueError(f"cache.hidden_layers {layers} leaves out the teacher's last layer ({cfg.teacher.num_layers}), "
                         "which albert-distilled's Lcos matches: add it, or set cache.hidden_layers: last")


def check_teacher_init(cfg) -> None:
    """The teacher variant copies the teacher's weights: the ALBERT needs its hidden size, heads and FFN size."""
    a, t = cfg.albert, cfg.teacher
    if "teacher" not in a.variants or t.pretrained:  # a pretrained teacher's shape is checked by the stage
        return
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_heads", "num_heads"),
                         ("intermediate_size", "intermediate_size")):
        value = getattr(a, ours)
        if value is not None and value != getattr(t, theirs):
            raise ValueError(f"albert.variants includes 'teacher', which copies the teacher's layer, but albert.{ours} "
                             f"({value}) is not the teacher's ({getattr(t, theirs)}): leave albert.{ours} unset or "
                             "drop 'teacher' from albert.variants")
    if a.embedding_size > t.hidden_size:
        raise ValueError(f"albert.embedding_size ({a.embedding_size}) is above the teacher's hidden size "
                         f"({t.hidden_size}): the teacher variant factorises the teacher's embeddings at rank E <= H")
    if a.init_layer is not None and a.init_layer > t.num_layers:
        raise ValueError(f"albert.init_layer ({a.init_layer}) is above the teacher's {t.num_layers} layers: use 1.."
                         f"{t.num_layers}, or leave it unset (the middle layer)")
