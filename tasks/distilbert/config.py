"""The distilbert stage's section: the student with half the teacher's layers, initialised from it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tasks.section import Section, TrainingConfig

# The DistilBERT paper's Table 4 (Sanh et al. 2019): one loss removed at a time, and random init; then ours.
TABLE4_ROWS = ("triple", "no_ce", "no_cos", "no_mlm", "random_init")
OUR_ROWS = ("no_cos_no_mlm", "random_init_mlm_only", "layer_map_hf", "layer_map_even")
ABLATION_ROWS = (*TABLE4_ROWS, *OUR_ROWS)


class DistilbertConfig(Section):
    num_layers: int | None = Field(None, ge=1, description="student layers; None = half the teacher's "
                                   "(or len(layer_map))")
    layer_map: Literal["even", "hf"] | list[int] = Field(
        "even", description="teacher layer (1-based) each student layer is initialised from, increasing; even = "
        "every second layer ending at the last: [2, 4, ..., L]; hf = HF's DistilBERT map ([1, 3, 5, 8, 10, 12] "
        "for 12 -> 6: first and last kept, models/distilbert.py)")
    init: Literal["teacher", "random"] = Field("teacher", description="teacher: embeddings, mapped layers and "
                                               "MLM head copied from the teacher; random: fresh weights")
    alpha_ce: float = Field(5.0, ge=0.0, description="weight of the soft-label KL loss (x T^2)")
    alpha_mlm: float = Field(2.0, ge=0.0, description="weight of the masked-LM cross-entropy on true tokens")
    alpha_cos: float = Field(1.0, ge=0.0, description="weight of the hidden-state cosine loss")
    temperature: float = Field(2.0, gt=0.0, description="softmax temperature of the soft-label loss")
    cos_layers: Literal["last", "mapped"] = Field(
        "last", description="last: student's last layer vs teacher's last (DistilBERT's code); mapped: every "
        "student layer vs its mapped teacher layer (needs cache.hidden_layers: mapped in cached mode)")
    mode: Literal["cached", "online"] = Field(
        "cached", description="cached: the teacher's top-k and hidden states from the cache stage; online: "
        "the teacher runs in every step (full distribution; the baseline)")
    ce_positions: Literal["masked", "all"] = Field(
        "masked", description="where Lce is computed: masked = the masked positions (ours); all = every real "
        "token (HF's distiller without --restrict_ce_to_mask; cached mode needs cache.positions: all)")
    masking: Literal["fixed", "dynamic"] = Field(
        "fixed", description="fixed: the pairs stage's masks (what the cache holds); dynamic: new masks for every "
        "batch, frequency-smoothed as HF's distiller (mode: online only)")
    mlm_smoothing: float = Field(0.7, ge=0.0, description="masking: dynamic picks a token with probability "
                                 "proportional to its train-split count ** -mlm_smoothing (0 = uniform)")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="None = the teacher's")
    train: TrainingConfig = Field(default_factory=TrainingConfig)
    ablations: bool | list[Literal[ABLATION_ROWS]] = Field(  # type: ignore[valid-type]
        False, description=f"also train ablation rows at the same step budget: true = the paper's Table 4 "
        f"{list(TABLE4_ROWS)}, or a list of {list(ABLATION_ROWS)} (the last {len(OUR_ROWS)} are ours)")

    @model_validator(mode="after")
    def _layer_map(self) -> DistilbertConfig:
        m = self.layer_map
        if isinstance(m, list):
            if not m or min(m) < 1 or any(b <= a for a, b in zip(m, m[1:], strict=False)):
                raise ValueError(f"layer_map must be increasing teacher layer numbers from 1 (got {m}); "
                                 "e.g. [2, 4] for a 4-layer teacher")
            if self.num_layers is not None and len(m) != self.num_layers:
                raise ValueError(f"layer_map {m} has {len(m)} entries but num_layers is {self.num_layers}; "
                                 "give one teacher layer per student layer or leave num_layers unset")
        if self.alpha_ce + self.alpha_mlm + self.alpha_cos == 0:
            raise ValueError("alpha_ce, alpha_mlm and alpha_cos are all 0: nothing to train on")
        return self

    def ablation_rows(self) -> list[str]:
        if self.ablations is True:
            return list(TABLE4_ROWS)
        return list(self.ablations or [])


def distilbert_key(cfg) -> dict[str, Any]:
    return {"distilbert": cfg.section("distilbert"), "seed": cfg.run.seed}


def check_teacher_layers(cfg) -> None:
    """The layer map and the depth fit the teacher (a pretrained one is checked by the stage)."""
    d, t = cfg.distilbert, cfg.teacher
    if t.pretrained:
        return
    if isinstance(d.layer_map, list) and max(d.layer_map) > t.num_layers:
        raise ValueError(f"distilbert.layer_map {d.layer_map} names a layer above the teacher's {t.num_layers} "
                         f"(teacher.num_layers); use numbers from 1 to {t.num_layers}")
    if d.num_layers is not None and d.num_layers > t.num_layers:
        raise ValueError(f"distilbert.num_layers ({d.num_layers}) is more than the teacher's "
                         f"{t.num_layers} layers (teacher.num_layers)")


def check_cache(cfg) -> None:
    """In cached mode the student reads the cache's train split of the NSP view, and Lcos on the mapped
    layers needs those layers cached."""
    d, c = cfg.distilbert, cfg.cache
    if d.mode != "cached":
        return
    if d.masking == "dynamic":
        raise ValueError("distilbert.masking is dynamic, which draws new masks in every step, but distilbert.mode is "
                         "cached, whose teacher outputs are for the pairs stage's fixed masks: set distilbert.mode: "
                         "online, or distilbert.masking: fixed")
    if d.ce_positions == "all" and d.alpha_ce > 0 and c.positions != "all":
        raise ValueError("distilbert.ce_positions is all, which needs the teacher's soft labels at every real token, "
                         "but cache.positions is masked (the cache keeps them at the masked positions only): set "
                         "cache.positions: all (about 1 / pairs.mask_prob times the soft labels), or "
                         "distilbert.ce_positions: masked, or distilbert.mode: online")
    if "train" not in c.splits or "nsp" not in c.views:
        raise ValueError(f"distilbert.mode is cached, which reads the teacher's outputs for the train split of the "
                         f"nsp view, but cache.splits is {c.splits} and cache.views is {c.views}: include train "
                         "and nsp, or set distilbert.mode: online")
    if d.alpha_cos > 0 and c.hidden_positions == "none":
        raise ValueError("distilbert.alpha_cos > 0 in cached mode needs the teacher's hidden states, but "
                         "cache.hidden_positions is none: set it to masked (or all), or distilbert.alpha_cos: 0, "
                         "or distilbert.mode: online")
    student_layers = len(d.layer_map) if isinstance(d.layer_map, list) else d.num_layers
    if student_layers is None and not cfg.teacher.pretrained:
        student_layers = max(1, cfg.teacher.num_layers // 2)
    # one student layer maps to the teacher's last, which "last" holds; the stage checks a pretrained teacher
    if d.cos_layers == "mapped" and d.alpha_cos > 0 and c.hidden_layers == "last" and (student_layers or 1) > 1:
        raise ValueError("distilbert.cos_layers is mapped, which needs the teacher's mapped layers in the cache, but "
                         "cache.hidden_layers is last: set cache.hidden_layers: mapped, or distilbert.cos_layers: "
                         "last, or distilbert.mode: online")
