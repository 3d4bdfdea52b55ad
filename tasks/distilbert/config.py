"""The distilbert stage's section: the student with half the teacher's layers, initialised from it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from models.matches import Match, check_matches
from tasks.section import Section, TrainingConfig

# The DistilBERT paper's Table 4 (Sanh et al. 2019): one loss removed at a time, and random init; then ours.
TABLE4_ROWS = ("triple", "no_ce", "no_cos", "no_mlm", "random_init")
# no_inter: the configured student without its intermediate matches (distilbert.matches)
OUR_ROWS = ("no_cos_no_mlm", "random_init_mlm_only", "layer_map_hf", "layer_map_even", "no_inter")
ABLATION_ROWS = (*TABLE4_ROWS, *OUR_ROWS)


class MatchConfig(Section):
    """One intermediate-layer term (models/intermediate.py): weight * loss(student feature, teacher feature)."""

    teacher_layer: int = Field(ge=0, description="1-based teacher layer as layer_map (0 = embeddings, hidden only)")
    student_layer: int = Field(ge=0, description="1-based student layer (0 = embeddings, hidden only)")
    feature: Literal["hidden", "attention"] = Field(
        "hidden", description="hidden: the layer's output states at the cache's hidden positions (cached or "
        "online); attention: its attention maps of every head (from the cache where cache.attention_layers "
        "keeps them, else by the teacher in the step)")
    loss: Literal["mse", "cos"] = Field("mse", description="hidden: mse (TinyBERT) or cos (1 - cosine); "
                                        "attention: mse only")
    weight: float = Field(1.0, ge=0.0, description="weight of this term in the student's loss")
    attention: Literal["scores", "probs"] = Field(
        "scores", description="attention: MSE on the unnormalised scores q.k/sqrt(d) (TinyBERT) or on the "
        "probabilities over the real keys")

    @model_validator(mode="after")
    def _attention(self) -> MatchConfig:
        if self.feature == "attention" and self.loss != "mse":
            raise ValueError("an attention match is compared by MSE only: set loss: mse")
        if self.feature == "attention" and 0 in (self.teacher_layer, self.student_layer):
            raise ValueError("layer 0 is the embeddings, which have no attention: give attention matches layers from 1")
        return self

    def to_match(self) -> Match:
        return Match(self.teacher_layer, self.student_layer, self.feature, self.loss, self.weight, self.attention)


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
    hidden_size: int | None = Field(None, ge=8, description="student width; None = the teacher's. Another "
                                    "width needs init: random (the teacher's layers do not fit)")
    num_heads: int | None = Field(None, ge=1, description="student attention heads; None = the teacher's")
    intermediate_size: int | None = Field(None, ge=8, description="student FFN size; None = the teacher's")
    matches: list[MatchConfig] = Field(
        default_factory=list, description="intermediate-layer terms (TinyBERT / TextBrewer), each "
        "{teacher_layer, student_layer, feature: hidden|attention, loss: mse|cos, weight, attention: "
        "scores|probs}; hidden features through a learned projection when the widths differ. Empty = none")
    train: TrainingConfig = Field(default_factory=TrainingConfig)
    ablations: bool | list[Literal[ABLATION_ROWS]] = Field(  # type: ignore[valid-type]
        False, description=f"also train ablation rows at the same step budget: true = the paper's Table 4 "
        f"{list(TABLE4_ROWS)}, or a list of {list(ABLATION_ROWS)} (the last {len(OUR_ROWS)} are ours); every row "
        "but no_inter is the paper's objective and leaves distilbert.matches out")

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
        if self.alpha_ce + self.alpha_mlm + self.alpha_cos == 0 and not any(m.weight > 0 for m in self.matches):
            raise ValueError("alpha_ce, alpha_mlm and alpha_cos are all 0 and no match has a weight: nothing to "
                             "train on")
        if self.hidden_size is not None and self.num_heads is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        return self

    def match_list(self) -> tuple[Match, ...]:
        """The matches as models.intermediate.Match (hashable, for the stage's runs)."""
        return tuple(m.to_match() for m in self.matches)

    def width(self) -> dict[str, int | None]:
        """The student's shape overrides (models.distilbert.student_config's keywords)."""
        return {"hidden_size": self.hidden_size, "num_heads": self.num_heads,
                "intermediate_size": self.intermediate_size}

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
    shape = student_shape(d, t.hidden_size, t.num_heads, t.intermediate_size)
    problem = shape_problem(d, shape, (t.hidden_size, t.num_heads, t.intermediate_size))
    if problem:
        raise ValueError(problem)
    n_student = len(d.layer_map) if d.layer_map else (d.num_layers or max(1, t.num_layers // 2))
    check_matches(d.match_list(), n_student, t.num_layers, shape[1], t.num_heads)


def student_shape(d: DistilbertConfig, hidden: int, heads: int, ffn: int) -> tuple[int, int, int]:
    """(width, heads, FFN size) of the student of a teacher of that shape."""
    return d.hidden_size or hidden, d.num_heads or heads, d.intermediate_size or ffn


def shape_problem(d: DistilbertConfig, student: tuple[int, int, int], teacher: tuple[int, int, int]) -> str | None:
    """Why a student of shape `student` cannot train as configured against a teacher of shape `teacher`
    (None when it can): teacher init needs the teacher's shape, Lcos the teacher's width."""
    if student[0] % student[1]:
        return (f"the student's width {student[0]} is not a multiple of its {student[1]} heads: set "
                "distilbert.hidden_size and distilbert.num_heads so that the heads divide the width")
    if student != teacher and d.init == "teacher":
        return (f"distilbert.init is teacher, which copies the teacher's layers, but the student's (width, heads, "
                f"FFN) {student} differ from the teacher's {teacher}: set distilbert.init: random, or leave "
                "distilbert.hidden_size / num_heads / intermediate_size unset (= the teacher's)")
    if student[0] != teacher[0] and d.alpha_cos > 0:
        return (f"distilbert.alpha_cos > 0 compares hidden states of the student's width {student[0]} with the "
                f"teacher's {teacher[0]}: set distilbert.alpha_cos: 0 and add a hidden match "
                "(distilbert.matches: [{teacher_layer: L, student_layer: l, feature: hidden, loss: cos}]), which "
                "learns the projection between the widths")
    return None


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
    hidden = sorted({m.teacher_layer for m in d.matches if m.feature == "hidden"})
    if hidden and c.hidden_positions == "none":
        raise ValueError("distilbert.matches has hidden matches, which read the teacher's hidden states from the "
                         "cache in cached mode, but cache.hidden_positions is none: set it to masked (or all), or "
                         "distilbert.mode: online")
    if hidden and not cfg.teacher.pretrained:
        cached = cached_layers(c.hidden_layers, cfg.teacher.num_layers, d)
        missing = [layer for layer in hidden if layer not in cached]
        if missing:
            raise ValueError(f"distilbert.matches needs teacher hidden layer(s) {missing} but cache.hidden_layers "
                             f"({c.hidden_layers}) keeps {cached}: set cache.hidden_layers: "
                             f"{sorted(set(cached) | set(hidden))}, or distilbert.mode: online")
    if d.cos_layers == "mapped" and d.alpha_cos > 0 and c.hidden_layers == "last" and (student_layers or 1) > 1:
        raise ValueError("distilbert.cos_layers is mapped, which needs the teacher's mapped layers in the cache, but "
                         "cache.hidden_layers is last: set cache.hidden_layers: mapped, or distilbert.cos_layers: "
                         "last, or distilbert.mode: online")


def cached_layers(hidden_layers, n_teacher: int, d: DistilbertConfig) -> list[int]:
    """The teacher layers a cache.hidden_layers setting keeps for a teacher of n_teacher layers."""
    if hidden_layers == "last":
        return [n_teacher]
    if hidden_layers == "mapped":
        from models.distilbert import resolve_layer_map  # imports torch: only when a match needs it

        return sorted({*resolve_layer_map(n_teacher, d.num_layers, d.layer_map), n_teacher})
    return list(hidden_layers)
