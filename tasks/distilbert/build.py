"""DistilBERT stage: a student with half the teacher's layers, initialised from the teacher along a layer
mapping and trained with the triple loss (soft labels, masked LM, hidden-state cosine) by tasks/engine.py;
optionally the DistilBERT paper's Table 4 ablations at the same step budget (and rows of ours).

Teacher signal: `cached` (default) reads the teacher's top-k soft labels and hidden states from the cache
stage (CachedPairs); `online` runs the teacher in every step with its full distribution (the baseline the
cached path must agree with where k covers the vocabulary; benchmarks/distill.py compares their speed).
In both modes Lcos compares hidden states where the cache keeps them (cache.hidden_positions: the masked
positions by default, or every real token), so that the two modes stay comparable. Lce is computed at
distilbert.ce_positions (masked, or every real token as HF's distiller); online mode can draw new masks
for every batch (distilbert.masking: dynamic, tasks/distilbert/masking.py).

Output: `model/` (DistilBertForMaskedLM, save_pretrained safetensors, with the teacher's tokenizer),
`training.json`, and with ablations on, `ablations/<row>/result.json`, `ablations.json`, `ablations.md`.
Checkpoints live in `checkpoints/` (and `ablations/<row>/checkpoints/`) while training, so a killed stage
resumes at its last checkpoint, and are dropped once a run is finished.

Ablations: `lightbert run --until distilbert --set distilbert.ablations=true`.

Intermediate matches (distilbert.matches, models/intermediate.py; TinyBERT / TextBrewer): extra terms on
hidden states (cached or online, at the same tokens as Lcos) and attention maps (cached where they fit the
cache budget, cache.attention_layers; else the teacher computes them in the step, through the deepest
matched layer only),
each logged as its own train_<feature>_s<l>_t<l>_loss. A narrower student (distilbert.hidden_size,
num_heads, intermediate_size) starts from random weights; its hidden matches learn projections into the
teacher's width, which are checkpointed with the student but not saved with it (the row's
`projection_parameters` counts them).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BertConfig, DistilBertForMaskedLM

from models.bert import PRETRAINING_INPUTS
from models.distilbert import (
    build_student,
    init_student_from_teacher,
    mlm_head,
    resolve_layer_map,
    same_shape_as_teacher,
    student_config,
    teacher_has_mlm_head,
)
from models.intermediate import (
    Match,
    StudentWithProjections,
    attention_scores,
    bert_attention_scores,
    check_matches,
    first_layers,
    hidden_projections,
    intermediate_terms,
    weighted_sum,
)
from models.losses import LossWeights, cosine_loss, gather_support, mlm_loss, soft_label_loss
from models.losses import combine as combine_terms
from tasks import engine, scoring
from tasks.artifacts import atomic_write_json, atomic_write_text
from tasks.cache.outputs import (
    IGNORE_INDEX,
    CachedPairs,
    attention_name,
    hidden_name,
    read_cache_manifest,
    soft_targets,
)
from tasks.config import PipelineConfig
from tasks.distilbert import STAGE
from tasks.distilbert.config import TABLE4_ROWS, shape_problem
from tasks.distilbert.masking import DynamicMasker, token_probabilities
from tasks.pairs import outputs as pairs_output
from tasks.stage import StageContext, StageError, StageReport
from tasks.teacher.outputs import SavedTeacher, load_saved

MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
ABLATIONS = "ablations"
RESULT = "training.json"
STUDENT_INPUTS = ("input_ids", "attention_mask", "labels")  # no token types: DistilBERT has none
TEACHER_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "labels")  # the online teacher's view
# Ablation rows as changes to the configured student: the DistilBERT paper's Table 4 (one loss removed at a
# time, random init), then ours (config.OUR_ROWS). Every row but no_inter is the paper's objective, so it
# leaves the configured intermediate matches out (the paper has none): with matches configured, the
# registered student against the triple row is the matches on/off comparison, and no_inter is triple.
_NO_MATCHES = {"matches": ()}
ROWS: dict[str, dict[str, Any]] = {
    "triple": {"init": "teacher", **_NO_MATCHES},
    "no_ce": {"init": "teacher", "ce": 0.0, **_NO_MATCHES},
    "no_cos": {"init": "teacher", "cos": 0.0, **_NO_MATCHES},
    "no_mlm": {"init": "teacher", "mlm": 0.0, **_NO_MATCHES},
    "random_init": {"init": "random", **_NO_MATCHES},
    "no_cos_no_mlm": {"init": "teacher", "cos": 0.0, "mlm": 0.0, **_NO_MATCHES},
    "random_init_mlm_only": {"init": "random", "ce": 0.0, "cos": 0.0, **_NO_MATCHES},
    "no_inter": dict(_NO_MATCHES),  # ours: the configured student (its init too) without its intermediate matches
    "layer_map_hf": {"init": "teacher", "layer_map": "hf", **_NO_MATCHES},
    "layer_map_even": {"init": "teacher", "layer_map": "even", **_NO_MATCHES},
}
ROW_TITLES = {
    "triple": "triple loss (Lce + Lmlm + Lcos), teacher init",
    "no_ce": "without Lce",
    "no_cos": "without Lcos",
    "no_mlm": "without Lmlm",
    "random_init": "triple loss, random init",
    "no_cos_no_mlm": "without Lcos and Lmlm (Lce only)",
    "random_init_mlm_only": "random init, Lmlm only (no teacher)",
    "no_inter": "without the intermediate matches (ours)",
    "layer_map_hf": "triple loss, layer map hf (first and last teacher layers)",
    "layer_map_even": "triple loss, layer map even (every second, ending at the last)",
}
# The paper's Table 4: change in GLUE macro-score to the triple loss with teacher init (Sanh et al. 2019).
PAPER_TABLE4_DELTA = {"triple": 0.0, "no_ce": -2.96, "no_cos": -1.46, "no_mlm": -0.31, "random_init": -3.69}


@dataclass(frozen=True)
class StudentRun:
    """One student to train: the configured one, or an ablation row."""

    init: str  # teacher | random
    weights: LossWeights
    cos_layers: str  # last | mapped
    mode: str  # cached | online
    matches: tuple[Match, ...] = ()  # intermediate terms (models/intermediate.py)
    layer_map: tuple[int, ...] = ()  # 1-based teacher layers; () = the stage's (Inputs.layer_map)
    ce_positions: str = "masked"  # masked | all
    masking: str = "fixed"  # fixed | dynamic

    @property
    def needs_teacher(self) -> bool:
        return self.weights.ce > 0 or self.weights.cos > 0 or bool(self.matches)

    def describe(self) -> dict[str, Any]:
        w = self.weights
        return {"init": self.init, "alpha_ce": w.ce, "alpha_mlm": w.mlm, "alpha_cos": w.cos,
                "temperature": w.temperature, "cos_layers": self.cos_layers, "mode": self.mode,
                "matches": [vars(m) for m in self.matches], "layer_map": list(self.layer_map),
                "ce_positions": self.ce_positions, "masking": self.masking}


def configured_run(cfg: PipelineConfig, layer_map: list[int] | tuple[int, ...] = ()) -> StudentRun:
    d = cfg.distilbert
    return StudentRun(d.init, LossWeights(d.alpha_ce, d.alpha_mlm, d.alpha_cos, d.temperature), d.cos_layers, d.mode,
                      matches=d.match_list(), layer_map=tuple(layer_map), ce_positions=d.ce_positions,
                      masking=d.masking)


def without_missing_terms(run: StudentRun, teacher: SavedTeacher) -> tuple[StudentRun, dict[str, str]]:
    """(the run the teacher can serve, {dropped term: why}): a teacher without an MLM head has no soft
    labels, so Lce is dropped (alpha_ce = 0); hidden-state distillation always works."""
    if teacher.has_mlm_head or run.weights.ce == 0:
        return run, {}
    return (replace(run, weights=replace(run.weights, ce=0.0)),
            {"ce": f"teacher has no MLM head (teacher.mlm_head: {teacher.mlm_head})"})


def losses_used(run: StudentRun) -> list[str]:
    w = run.weights
    return [name for name, weight in (("ce", w.ce), ("mlm", w.mlm), ("cos", w.cos)) if weight > 0] + [
        m.name.removesuffix("_loss") for m in run.matches if m.weight > 0]


def ablation_run(base: StudentRun, row: str, n_teacher: int) -> StudentRun:
    """The configured student (the stage's resolved layer map in base.layer_map) with the row's changes."""
    change = dict(ROWS[row])
    init = change.pop("init", base.init)
    matches = change.pop("matches", base.matches)
    kind = change.pop("layer_map", None)
    layer_map = base.layer_map if kind is None else tuple(resolve_layer_map(n_teacher, len(base.layer_map), kind))
    return replace(base, init=init, layer_map=layer_map, matches=matches, weights=replace(base.weights, **change))


# ------------------------------------------------------------------------------------------------
# the loss: the student's forward, the teacher's signal (cached or online), the three terms
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def online_teacher(teacher, batch: dict[str, torch.Tensor], layers: list[int], positions: str,
                   hidden_positions: str, temperature: float, attention_layers: tuple[int, ...] = ()) -> dict[str, Any]:
    """The teacher in the same step: its full distribution at temperature T at the loss positions (none
    from a teacher without an MLM head) and the hidden states of `layers` at the cache's hidden positions
    (what the cache would hold with k = the vocabulary, unquantised); with attention_layers, those layers'
    attention scores (B, heads, T, T)."""
    backbone = teacher.bert if hasattr(teacher, "bert") else teacher
    out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"], output_hidden_states=bool(layers) or bool(attention_layers),
                   return_dict=True)
    where = position_mask(batch, positions)
    probs = None
    if teacher_has_mlm_head(teacher):
        logits = teacher.cls.predictions(out.last_hidden_state[where]).float()
        probs = torch.softmax(logits / temperature, dim=-1)
    hidden_where = position_mask(batch, lcos_positions(hidden_positions))
    hidden = {layer: out.hidden_states[layer][hidden_where] for layer in layers}
    scores = {layer: bert_attention_scores(backbone, out.hidden_states, layer) for layer in attention_layers}
    return {"where": where, "ids": None, "probs": probs, "hidden_where": hidden_where, "hidden": hidden,
            "attention": scores}


def distilbert_attention_scores(student: DistilBertForMaskedLM, hidden_states, layer: int) -> torch.Tensor:
    """Attention scores of student layer `layer` (1-based) from its input, hidden_states[layer - 1]."""
    attn = student.distilbert.transformer.layer[layer - 1].attention
    return attention_scores(hidden_states[layer - 1], attn.q_lin, attn.k_lin, student.config.n_heads)


def cached_teacher(batch: dict[str, torch.Tensor], layers: list[int], temperature: float,
                   attention_layers: tuple[int, ...] = ()) -> dict[str, Any]:
    """The same from a CachedPairsCollator batch: top-k soft labels softened over their support, hidden
    rows where the cache keeps them, and the cached attention scores of attention_layers."""
    return {"where": batch["teacher_position_mask"], "ids": batch["teacher_topk_ids"],
            "probs": soft_targets(batch["teacher_topk_probs"], temperature),
            "hidden_where": batch["teacher_hidden_mask"],
            "hidden": {layer: batch[f"teacher_{hidden_name(layer)}"] for layer in layers},
            "attention": {layer: batch[f"teacher_{attention_name(layer)}"] for layer in attention_layers}}


@torch.no_grad()
def teacher_attention(teacher, batch: dict[str, torch.Tensor], layers: list[int]) -> dict[int, torch.Tensor]:
    """The attention scores of teacher `layers` for a batch, from a forward through the deepest of them
    only (the cached mode's fallback when the cache holds no attention maps: cache.attention_layers)."""
    backbone = teacher.bert if hasattr(teacher, "bert") else teacher
    with first_layers(backbone, max(layers)):
        out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], output_hidden_states=True, return_dict=True)
    return {layer: bert_attention_scores(backbone, out.hidden_states, layer) for layer in layers}


def position_mask(batch: dict[str, torch.Tensor], positions: str) -> torch.Tensor:
    real = batch["attention_mask"].bool()
    return real & (batch["labels"] != IGNORE_INDEX) if positions == "masked" else real


def lcos_positions(hidden_positions: str) -> str:
    """Where Lcos compares hidden states: where the cache keeps them (cache.hidden_positions), in online
    mode too so that the two modes compare the same tokens; the masked ones when the cache keeps none."""
    return "all" if hidden_positions == "all" else "masked"


def restrict_to_masked(sig: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Soft labels cached at every real token (cache.positions: all), kept at the masked positions only
    (distilbert.ce_positions: masked)."""
    keep = batch["labels"][sig["where"]] != IGNORE_INDEX
    return {**sig, "where": sig["where"] & (batch["labels"] != IGNORE_INDEX), "ids": sig["ids"][keep],
            "probs": sig["probs"][keep]}


def make_loss_fn(run: StudentRun, cos_pairs: list[tuple[int, int]], positions: str = "masked", teacher=None,
                 hidden_positions: str = "masked", masker: DynamicMasker | None = None,
                 cached_attention: tuple[int, ...] = ()):
    """The engine's loss_fn(student, batch) -> (loss, {term: value}). cos_pairs: (student layer,
    teacher layer), 1-based (0 = embeddings); the student's logits are computed only at the loss positions;
    positions / hidden_positions: the cache's (cache.positions, cache.hidden_positions; Lcos uses the hidden
    ones online too); Lce is at run.ce_positions. masker: re-masks every batch first (masking: dynamic).
    cached_attention: in cached mode, the attention layers the batches bring from the cache; the teacher
    (which must then be given) computes the others in the step."""
    w = run.weights
    teacher_layers = [t for _, t in cos_pairs] if w.cos > 0 else []
    teacher_layers = sorted({*teacher_layers, *(m.teacher_layer for m in run.matches if m.feature == "hidden")})
    attention_layers = tuple(sorted({m.teacher_layer for m in run.matches if m.feature == "attention"}))
    all_layers = w.cos > 0 and len(cos_pairs) > 1
    from_cache = tuple(a for a in attention_layers if a in cached_attention)
    in_step = [a for a in attention_layers if a not in cached_attention]
    if run.mode == "cached" and in_step and teacher is None:
        raise ValueError(f"attention layers {in_step} are not in the cache: the loss needs the teacher for them")
    if run.mode == "cached" and w.ce > 0 and run.ce_positions == "all" and positions != "all":
        raise StageError("distilbert.ce_positions is all but the cache holds soft labels at the masked positions "
                         "only: set cache.positions: all, or distilbert.ce_positions: masked, or distilbert.mode: online")

    def loss_fn(model: DistilBertForMaskedLM | StudentWithProjections, batch: dict[str, torch.Tensor]):
        student, projections = ((model.student, model.projections) if isinstance(model, StudentWithProjections)
                                else (model, {}))
        if masker is not None:
            batch = masker(batch)
        attention = batch["attention_mask"]
        out = student.distilbert(input_ids=batch["input_ids"], attention_mask=attention,
                                 output_hidden_states=all_layers or bool(run.matches), return_dict=True)
        sig = None
        if run.needs_teacher and run.mode == "online":
            sig = online_teacher(teacher, batch, teacher_layers, run.ce_positions, hidden_positions, w.temperature,
                                 attention_layers)
        elif run.needs_teacher:
            sig = cached_teacher(batch, teacher_layers, w.temperature, from_cache)
            if in_step:
                sig["attention"].update(teacher_attention(teacher, batch, in_step))
            if w.ce > 0 and run.ce_positions == "masked" and positions == "all":
                sig = restrict_to_masked(sig, batch)
        # the soft labels' positions when Lce is on; else the masked ones (all Lmlm needs)
        where = sig["where"] if sig is not None and w.ce > 0 else position_mask(batch, "masked")
        logits = mlm_head(student, out.last_hidden_state[where])
        terms: dict[str, torch.Tensor] = {}
        if w.ce > 0:
            support = logits if sig["ids"] is None else gather_support(logits, sig["ids"])
            terms["ce_loss"] = soft_label_loss(support, sig["probs"], w.temperature)
        if w.mlm > 0:
            terms["mlm_loss"] = mlm_loss(logits, batch["labels"][where])
        if w.cos > 0:
            hs = out.hidden_states if all_layers else {cos_pairs[0][0]: out.last_hidden_state}
            terms["cos_loss"] = cosine_loss([hs[s][sig["hidden_where"]] for s, _ in cos_pairs],
                                            [sig["hidden"][t] for _, t in cos_pairs])
        loss = combine_terms(terms, w) if terms else 0.0
        if run.matches:
            student_scores = {m.student_layer: distilbert_attention_scores(student, out.hidden_states, m.student_layer)
                              for m in run.matches if m.feature == "attention"}
            inter = intermediate_terms(run.matches, out.hidden_states, student_scores, sig["hidden_where"],
                                       sig["hidden"], sig.get("attention", {}), attention, projections)
            loss = loss + weighted_sum(run.matches, inter)
            terms.update(inter)
        return loss, {name: value.detach() for name, value in terms.items()}

    return loss_fn


def cos_layer_pairs(cos_layers: str, layer_map: list[int], n_teacher: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs of Lcos, 1-based: the last ones (DistilBERT's code), or every
    student layer and its mapped teacher layer."""
    if cos_layers == "last":
        return [(len(layer_map), n_teacher)]
    return [(i + 1, t) for i, t in enumerate(layer_map)]


# ------------------------------------------------------------------------------------------------
# training one student
# ------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What every student run of the stage shares."""

    teacher: Any  # BertForPreTraining, eval mode (a BertModel when it has no MLM head)
    teacher_config: BertConfig
    layer_map: list[int]
    pairs_train: Any
    val_ds: Any
    cache_dir: Path
    pad_id: int
    positions: str
    hidden_positions: str
    masker: DynamicMasker | None = None  # distilbert.masking: dynamic


def dynamic_masker(cfg: PipelineConfig, tok, pairs_train, vocab_size: int) -> DynamicMasker:
    """HF's distiller's masking: the train split's token counts smoothed by distilbert.mlm_smoothing, and
    the pairs stage's masking ratios (pairs.mask_prob, mask_token_prob, random_token_prob)."""
    specials = sorted(set(tok.all_special_ids))
    probs = token_probabilities(pairs_train.token_counts(), vocab_size, specials, cfg.distilbert.mlm_smoothing)
    random_ids = torch.tensor(sorted(set(range(vocab_size)) - set(specials)), dtype=torch.long)
    p = cfg.pairs
    return DynamicMasker(probs, tok.mask_token_id, random_ids, p.mask_prob, p.mask_token_prob, p.random_token_prob)


def train_student(cfg: PipelineConfig, ctx: StageContext, run: StudentRun, inp: Inputs, run_dir: Path,
                  metrics_prefix: str = "") -> tuple[DistilBertForMaskedLM, dict[str, Any]]:
    """Train one student into run_dir (checkpoints while it runs) and evaluate it; returns (model, result)."""
    d = cfg.distilbert
    layer_map = list(run.layer_map or inp.layer_map)
    pairs = cos_layer_pairs(run.cos_layers, layer_map, inp.teacher_config.num_hidden_layers)
    rt = engine.setup_runtime(d.train.precision)
    multiple = 8 if rt.device.type == "cuda" else 1
    teacher = None
    cached_attention: tuple[int, ...] = ()
    if run.needs_teacher and run.mode == "cached":
        attention = sorted({m.teacher_layer for m in run.matches if m.feature == "attention"})
        data = cached_train_data(inp, sorted({*([t for _, t in pairs] if run.weights.cos > 0 else []),
                                              *(m.teacher_layer for m in run.matches if m.feature == "hidden")}),
                                 run.weights.ce > 0, attention)
        collate = data.collator(inp.pad_id, multiple)
        cached_attention = tuple(data.attention_layers)
        if set(attention) - set(cached_attention):  # not cached (over the budget): the teacher computes them
            teacher = inp.teacher.to(rt.device)
    else:
        data = inp.pairs_train
        columns = TEACHER_INPUTS if run.needs_teacher else STUDENT_INPUTS
        collate = engine.PadCollator(columns, {"input_ids": inp.pad_id, "labels": IGNORE_INDEX}, multiple)
        if run.needs_teacher:
            teacher = inp.teacher.to(rt.device)
    torch.manual_seed(ctx.seed)
    student = build_student(inp.teacher_config, len(layer_map), d.dropout, **d.width())
    if run.init == "teacher":
        init_student_from_teacher(inp.teacher, student, layer_map)
    model: DistilBertForMaskedLM | StudentWithProjections = student
    if run.matches:  # the projections of the hidden matches train with the student (none at equal widths)
        model = StudentWithProjections(student, hidden_projections(run.matches, student.config.dim,
                                                                   inp.teacher_config.hidden_size))
    eval_collate = engine.PadCollator(STUDENT_INPUTS, {"input_ids": inp.pad_id, "labels": IGNORE_INDEX}, multiple)
    eval_batch = 2 * d.train.batch_size

    def sink(metrics: dict[str, float], step: int | None) -> None:
        ctx.log_metrics({f"{metrics_prefix}{k}": v for k, v in metrics.items()}, step)

    loss_fn = make_loss_fn(run, pairs, inp.positions, teacher, inp.hidden_positions,
                           inp.masker if run.masking == "dynamic" else None, cached_attention)

    def evaluate(m, rt):
        m = m.student if isinstance(m, StudentWithProjections) else m
        return scoring.masked_lm_metrics(scoring.score_pretraining(
            m, scoring.masked_lm_predictor(m, "distilbert"), inp.val_ds, eval_collate, eval_batch, rt, pair_label=None))

    result = engine.train(
        model, loss_fn, data, d.train, collate, seed=ctx.seed,
        checkpoint_dir=run_dir / CHECKPOINTS, runtime=rt, metrics_sink=sink, progress=cfg.run.progress,
        eval_fn=evaluate)
    if teacher is not None:
        inp.teacher.cpu()
    summary = {
        **run.describe(), **engine.run_summary(result),
        "resumed_from_step": result.resumed_from_step, "device": str(rt.device), "precision": rt.precision,
        "cos_pairs": pairs, **engine.rounded(result.final_losses), **engine.rounded(result.eval_metrics),
    }
    wanted = sorted({m.teacher_layer for m in run.matches if m.feature == "attention"})
    if wanted:
        in_step = [a for a in wanted if a not in cached_attention]
        parts = ([f"cache: teacher layers {list(cached_attention)}"] if cached_attention else []) + (
            [f"teacher layers {in_step} by the teacher in every step (not in the cache)"] if in_step else [])
        summary["attention_from"] = "online: the teacher in every step" if run.mode == "online" else "; ".join(parts)
    if isinstance(model, StudentWithProjections):  # trained, then left out of the saved student
        summary["projection_parameters"] = sum(p.numel() for p in model.projections.parameters())
    return student.cpu(), summary


def cached_train_data(inp: Inputs, layers: list[int], with_soft_labels: bool = False,
                      attention: list[int] = ()) -> CachedPairs:
    try:
        data = CachedPairs(inp.cache_dir, inp.pairs_train, "train", "nsp", attention=attention)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise StageError(f"the teacher cache cannot feed the student: {exc}") from exc
    if with_soft_labels and not data.has_soft_labels:
        raise StageError("distilbert.alpha_ce > 0 needs the teacher's soft labels, but the cache holds hidden "
                         "states only; rerun the cache stage")
    if layers and data.hidden_positions == "none":
        raise StageError("distilbert.alpha_cos > 0 needs the teacher's hidden states for Lcos, but the cache keeps "
                         "none (cache.hidden_positions: none): set cache.hidden_positions: masked (or all), or "
                         "distilbert.alpha_cos: 0, or distilbert.mode: online")
    missing = [layer for layer in layers if layer not in data.layers]
    if missing:
        raise StageError(
            f"distilbert needs teacher hidden layer(s) {missing} for Lcos (distilbert.cos_layers) or its hidden "
            f"matches (distilbert.matches) but the cache holds {data.layers}: set cache.hidden_layers: mapped (the "
            f"layers of distilbert.layer_map) or a list with {sorted(set(data.layers) | set(missing))}, or "
            "distilbert.cos_layers: last, or distilbert.mode: online")
    return data


def _read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
def build_distilbert(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    t0 = time.perf_counter()
    d = cfg.distilbert
    saved = load_saved(ctx.upstream_dir("teacher"))
    teacher_dir = saved.model_dir
    teacher = saved.load_model()
    tconf = teacher.config
    try:
        layer_map = resolve_layer_map(tconf.num_hidden_layers, d.num_layers, d.layer_map)
    except ValueError as exc:
        raise StageError(str(exc)) from exc
    check_student_shape(cfg, tconf, len(layer_map))
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    pairs_dir = ctx.upstream_dir("pairs")
    cache_dir = ctx.upstream_dir("cache")
    cache_manifest = read_cache_manifest(cache_dir)
    pairs_train = pairs_output.load_split(pairs_dir, "train")
    inp = Inputs(teacher, tconf, layer_map, pairs_train,
                 pairs_output.load_split(pairs_dir, "validation", columns=[*PRETRAINING_INPUTS, "length"]),
                 cache_dir, tok.pad_token_id, cache_manifest["positions"], cache_manifest["hidden_positions"],
                 dynamic_masker(cfg, tok, pairs_train, tconf.vocab_size) if d.masking == "dynamic" else None)

    main, dropped = without_missing_terms(configured_run(cfg, layer_map), saved)
    if sum(vars(main.weights)[k] for k in ("ce", "mlm", "cos")) == 0 and not main.matches:
        raise StageError("distilbert has nothing to train on: alpha_mlm and alpha_cos are 0 and Lce is dropped "
                         f"({dropped['ce']}); set distilbert.alpha_cos or alpha_mlm above 0, or teacher.mlm_head: fit")
    summary = _read_result(ctx.out_dir) if ctx.resuming and (ctx.out_dir / MODEL_DIR).is_dir() else None
    if summary is None:
        student, summary = train_student(cfg, ctx, main, inp, ctx.out_dir)
        if not engine.is_main_process():  # another rank of a torchrun launch (tasks/train.py): rank 0 writes
            return StageReport()
        save_student(student, tok, ctx.out_dir / MODEL_DIR)
        engine.finish_run(ctx.out_dir / CHECKPOINTS, ctx.out_dir / RESULT, summary)
    student = DistilBertForMaskedLM.from_pretrained(ctx.out_dir / MODEL_DIR)

    rows, skipped_rows = train_ablations(cfg, ctx, main, summary, inp, saved)

    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    teacher_counts = ctx.upstream["teacher"].manifest.get("counts", {})
    teacher_acc = teacher_counts.get("val_mlm_accuracy")
    counts: dict[str, float] = {
        "parameters": n_student, "teacher_parameters": n_teacher, "parameter_ratio": round(n_student / n_teacher, 4),
        "student_layers": len(layer_map), "teacher_layers": tconf.num_hidden_layers,
        **{k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)
           and k not in ("resumed_from_step", *main.describe())},
        "examples_validation": len(inp.val_ds),
    }
    if teacher_acc is not None:
        counts["teacher_val_mlm_accuracy"] = teacher_acc
        counts["quality_ratio"] = round(summary["val_mlm_accuracy"] / teacher_acc, 4) if teacher_acc else 0.0
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    details: dict[str, Any] = {
        "layer_map": layer_map, "layer_map_meaning": "student layer i (1-based) <- teacher layer layer_map[i-1]",
        "student": main.describe(), "cos_pairs": summary["cos_pairs"],
        "losses_used": losses_used(main), "dropped": dropped, "configured_alpha_ce": d.alpha_ce,
        "teacher_mlm_head": saved.mlm_head,
        "student_head": "initialised from the teacher's MLM head" if saved.has_mlm_head and main.init == "teacher"
        else "fresh transform and bias, decoder tied to the word embeddings" + (
            " (the teacher has no MLM head)" if main.init == "teacher" else ""),
        "teacher_signal": ((f"cache: top-{cache_manifest['top_k']} soft labels at the {cache_manifest['positions']} "
                            f"positions, hidden layers {cache_manifest['layers']} at the "
                            f"{cache_manifest['hidden_positions']} positions")
                           if cache_manifest.get("has_soft_labels", True)
                           else f"cache: hidden layers {cache_manifest['layers']} only (no soft labels)")
        if main.mode == "cached" else "online: the teacher in every step"
        + (" (its full distribution)" if saved.has_mlm_head else " (hidden states only)"),
        **({"attention_from": summary["attention_from"]} if "attention_from" in summary else {}),
        "resumed_from_step": summary.get("resumed_from_step"), "device": summary.get("device"),
        "precision": summary.get("precision"), "examples_train": len(inp.pairs_train),
    }
    artifacts = [RESULT, *sorted(p.relative_to(ctx.out_dir).as_posix() for p in (ctx.out_dir / MODEL_DIR).iterdir()
                                 if p.is_file() and p.suffix != ".safetensors")]
    if rows:
        details["ablations"] = rows
        artifacts += [f"{ABLATIONS}.json", f"{ABLATIONS}.md"]
    if skipped_rows:
        details["ablations_skipped"] = skipped_rows
    return StageReport(
        counts=counts,
        inputs=[{"stage": n, "fingerprint": r.fingerprint} for n, r in ctx.upstream.items()],
        artifacts=artifacts,
        details=details,
        models=[{"path": MODEL_DIR, "name": STAGE.models["distilbert"]}],
    )


def check_student_shape(cfg: PipelineConfig, tconf: BertConfig, n_student: int) -> None:
    """The configured student's shape and matches fit this teacher (a pretrained one is known only here)."""
    d = cfg.distilbert
    sconf = student_config(tconf, n_student, **d.width())
    teacher_shape = (tconf.hidden_size, tconf.num_attention_heads, tconf.intermediate_size)
    problem = shape_problem(d, (sconf.dim, sconf.n_heads, sconf.hidden_dim), teacher_shape)
    try:
        if problem:
            raise ValueError(problem)
        check_matches(d.match_list(), n_student, tconf.num_hidden_layers, sconf.n_heads, tconf.num_attention_heads)
    except ValueError as exc:
        raise StageError(str(exc)) from exc


def save_student(student: DistilBertForMaskedLM, tok, model_dir: Path) -> None:
    """save_pretrained (safetensors) with the teacher's tokenizer, which for DistilBERT feeds no token types."""
    tok.model_input_names = ["input_ids", "attention_mask"]
    engine.save_trained(student, model_dir, tok)


@dataclass(frozen=True)
class AblationRow:
    """One requested row as the teacher can serve it."""

    name: str
    run: StudentRun | None  # None: no loss term left, not trained
    notes: tuple[str, ...]  # what differs from the row's intent, and why
    same_as: str | None  # "the configured student", or an earlier row that is the same student


def plan_ablations(names: list[str], requested: StudentRun, main: StudentRun, saved: SavedTeacher,
                   n_teacher: int) -> list[AblationRow]:
    """Each row: the configured student as requested (`requested`, before without_missing_terms) with the
    row's change, less the terms the teacher cannot serve (a note says which); a row that comes out the
    same as the configured student (`main`) or an earlier row says so instead of training a duplicate."""
    planned: list[AblationRow] = []
    for name in names:
        run, dropped = without_missing_terms(ablation_run(requested, name, n_teacher), saved)
        notes = [f"L{term} unavailable: {why}" for term, why in dropped.items()]
        if not losses_used(run):
            planned.append(AblationRow(name, None, (*notes, "no loss term left: not trained"), None))
            continue
        twin = "the configured student" if run == main else \
            next((r.name for r in planned if r.run == run and r.same_as is None), None)
        if twin is not None and (name != "triple" or run != main):
            notes.append(f"the same student as {twin}: its result is reused")
        planned.append(AblationRow(name, run, tuple(notes), twin))
    return planned


def train_ablations(cfg: PipelineConfig, ctx: StageContext, main: StudentRun, main_summary: dict[str, Any],
                    inp: Inputs, saved: SavedTeacher) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Train each requested row (plan_ablations) at the configured step budget into ablations/<row>/ and
    write ablations.json and ablations.md. Returns (rows, {skipped row: why})."""
    names = cfg.distilbert.ablation_rows()
    if not names:
        return [], {}
    plan = plan_ablations(names, configured_run(cfg, main.layer_map), main, saved, inp.teacher_config.num_hidden_layers)
    rows: list[dict[str, Any]] = []
    skipped = {r.name: "; ".join(r.notes) for r in plan if r.run is None}
    narrow = not same_shape_as_teacher(
        inp.teacher_config, student_config(inp.teacher_config, len(inp.layer_map), **cfg.distilbert.width()))
    for planned in (r for r in plan if r.run is not None):
        name = planned.name
        if narrow and planned.run.init == "teacher":
            skipped[name] = "teacher init needs the teacher's width, heads and FFN size (distilbert.hidden_size ...)"
            continue
        run_dir = ctx.out_dir / ABLATIONS / name
        run_dir.mkdir(parents=True, exist_ok=True)
        if planned.same_as is not None:
            earlier = main_summary if planned.run == main else _read_result(ctx.out_dir / ABLATIONS / planned.same_as)
            summary = {**earlier, "same_as": planned.same_as}
            atomic_write_json(run_dir / RESULT, summary)
        else:
            summary = _read_result(run_dir) if ctx.resuming else None
            if summary is None:
                _, summary = train_student(cfg, ctx, planned.run, inp, run_dir, metrics_prefix=f"ablation/{name}/")
                engine.finish_run(run_dir / CHECKPOINTS, run_dir / RESULT, summary)
        row = {"row": name, "title": ROW_TITLES[name], "source": "paper Table 4" if name in TABLE4_ROWS else "ours",
               **({"paper_glue_delta": PAPER_TABLE4_DELTA[name]} if name in PAPER_TABLE4_DELTA else {}),
               **summary, **({"note": "; ".join(planned.notes)} if planned.notes else {})}
        rows.append(row)
        ctx.log_metrics({f"ablation/{name}/{k}": row[k] for k in ("val_mlm_accuracy", "val_mlm_perplexity")}, None)
    atomic_write_json(ctx.out_dir / f"{ABLATIONS}.json", rows)
    atomic_write_text(ctx.out_dir / f"{ABLATIONS}.md",
                      ablation_table(rows, main_summary, cfg.distilbert.train.max_steps, skipped))
    return rows, skipped


def _matches_cell(matches: list[dict[str, Any]]) -> str:
    """'none', or each match as `hidden mse t4->s2 x1` (teacher layer -> student layer, weight)."""
    return ", ".join(f"{m['feature']} {m['loss'] if m['feature'] == 'hidden' else m['attention']} "
                     f"t{m['teacher_layer']}->s{m['student_layer']} x{m['weight']:g}" for m in matches) or "none"


def _with_interval(r: dict[str, Any]) -> str:
    n = int(r.get("val_mlm_tokens", 0))
    if not n:
        return f"{r['val_mlm_accuracy']:.4f}"
    lo, hi = scoring.wilson_interval(round(r["val_mlm_accuracy"] * n), n)
    return f"{r['val_mlm_accuracy']:.4f} [{lo:.4f}, {hi:.4f}]"


def _difference(r: dict[str, Any], ref: dict[str, Any]) -> str:
    d = r["val_mlm_accuracy"] - ref["val_mlm_accuracy"]
    if r is ref:
        return f"{d:+.4f} (reference)"
    n, m = int(r.get("val_mlm_tokens", 0)), int(ref.get("val_mlm_tokens", 0))
    if not (n and m) or r.get("same_as") or (r.get("row") == "student" and ref.get("same_as")):
        return f"{d:+.4f}"  # the same student as the reference or another row: nothing to test
    p, q = r["val_mlm_accuracy"], ref["val_mlm_accuracy"]
    half = 1.96 * (p * (1 - p) / n + q * (1 - q) / m) ** 0.5
    return f"{d:+.4f} [{d - half:+.4f}, {d + half:+.4f}]"


def ablation_table(rows: list[dict[str, Any]], main: dict[str, Any], steps: int,
                   skipped: dict[str, str] | None = None) -> str:
    """Markdown: held-out MLM accuracy per row, its difference to the triple row (the paper's reference;
    the configured student when no triple row was asked for), and beside it the paper's Table 4 change in
    GLUE macro-score (another metric, at BERT-base scale: a reference for the direction and order of the
    effects, not a figure to match). With intermediate matches configured, the registered student's
    difference to the triple row is the matches on/off comparison."""
    student = {"row": "student", "title": "configured student (registered)", "source": "", **main}
    ref = next((r for r in rows if r["row"] == "triple"), student)
    which = "the triple row" if ref is not student else "the stage's configured student"
    lines = [f"Held-out MLM accuracy (validation pairs) after {steps} steps each, with its 95% Wilson interval "
             f"over the masked tokens; the difference is to {which}, with a 95% interval that treats the two "
             "rows' errors as independent (conservative: every row is scored on the same tokens). Paper: Sanh "
             "et al. 2019, Table 4, change in GLUE macro-score (points) to the triple loss; rows marked ours are "
             "not in the paper.", "",
             "| row | source | init | layer map | a_ce | a_mlm | a_cos | intermediate matches | val MLM accuracy | "
             "difference | paper: GLUE difference | val perplexity | note |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in [student, *rows]:
        paper = f"{r['paper_glue_delta']:+.2f}" if "paper_glue_delta" in r else ""
        layer_map = ", ".join(str(x) for x in r.get("layer_map", []))
        lines.append(f"| {r['title']} | {r['source']} | {r['init']} | {layer_map} | {r['alpha_ce']:g} | "
                     f"{r['alpha_mlm']:g} | {r['alpha_cos']:g} | {_matches_cell(r.get('matches', []))} | "
                     f"{_with_interval(r)} | "
                     f"{_difference(r, ref)} | {paper} | {r['val_mlm_perplexity']:.1f} | "
                     f"{r.get('note', '')} |")
    for name, why in (skipped or {}).items():
        paper = f"{PAPER_TABLE4_DELTA[name]:+.2f}" if name in PAPER_TABLE4_DELTA else ""
        lines.append(f"| {ROW_TITLES[name]} | {'paper Table 4' if name in TABLE4_ROWS else 'ours'} | | | | | | | "
                     f"not trained | | {paper} | | {why} |")
    return "\n".join(lines) + "\n"
