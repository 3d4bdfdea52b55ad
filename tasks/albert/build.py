"""ALBERT stage: train an ALBERT (factorised embeddings, cross-layer sharing, sentence-order prediction)
two or three ways, each with the shared training engine, and evaluate each on the validation pairs' SOP view.

- scratch: masked LM + SOP on the pairs' SOP view (`sop_input_ids`, `sop_labels`, `sentence_order_label`).
- distilled: a student of the teacher, from the teacher cache built over the same SOP view:
      L = a_ce * Lce + a_mlm * Lmlm + a_sop * Lsop + a_cos * Lcos
  Lce on the teacher's cached top-k support at temperature T, Lmlm on the true tokens (models/losses.py,
  as DistilBERT), Lsop on the order label, and Lcos between the student's last hidden states and the
  teacher's last layer, at the positions the cache keeps them (cache.hidden_positions); when the hidden
  sizes differ the student's side goes through a learned nn.Linear(H_student, H_teacher), trained with the
  student and dropped at save. A teacher without an MLM head (teacher.mlm_head: none) has no soft labels:
  Lce is dropped and the result says so.
- teacher: initialised from the teacher (models/albert_init.py: the word embeddings from a truncated SVD of
  the teacher's, the shared layer copied from teacher layer albert.init_layer, positions, token types and
  the pooler copied or projected), then trained as scratch (MLM + SOP), so that it differs from scratch
  only by its start. It uses the teacher's activation (gelu) where the others use ALBERT's gelu_new.

Both variants start from the same initial weights and see the same batch order (same seed), so their
difference is the teacher. Output per variant: `<variant>/model/` (save_pretrained safetensors + the
teacher's tokenizer; loads with AutoModelForMaskedLM, or models.albert.load_albert with the ties) and
`<variant>/result.json`. Checkpoints live in `<variant>/checkpoints/` while a variant trains, so a killed
stage resumes there (a finished variant is not trained again) and are dropped when it is saved.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AlbertConfig, AlbertForPreTraining, AutoTokenizer, BertConfig

from models.albert import (
    SOP_INPUTS,
    albert_config,
    albert_forward,
    albert_pretraining_loss,
    build_albert_for_pretraining,
    count_parameters,
)
from models.albert_init import check_albert_fits_teacher, default_init_layer, init_albert_from_teacher
from models.bert import IGNORE_INDEX
from models.losses import cosine_loss, gather_support, soft_label_loss
from tasks import engine, scoring
from tasks.albert import STAGE
from tasks.albert.config import AlbertSectionConfig
from tasks.cache.outputs import (
    CachedPairs,
    CachedPairsCollator,
    hidden_name,
    read_cache_manifest,
    soft_targets,
)
from tasks.config import PipelineConfig
from tasks.pairs import outputs as pairs
from tasks.pairs.outputs import PairsSplit
from tasks.scoring import wilson_interval
from tasks.stage import StageContext, StageError, StageReport
from tasks.teacher.outputs import load_saved

VARIANTS = ("scratch", "distilled", "teacher")
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
RESULT = "result.json"
LENGTH = "sop_length"


# ------------------------------------------------------------------------------------------------
# data and evaluation
# ------------------------------------------------------------------------------------------------
def sop_collator(pad_token_id: int, pad_to_multiple_of: int = 1) -> engine.PadCollator:
    return engine.PadCollator(SOP_INPUTS, {"sop_input_ids": pad_token_id, "sop_labels": IGNORE_INDEX},
                              pad_to_multiple_of)


@dataclass
class RealTokenCount:
    """Adds `attention_mask` (= the SOP view's sop_attention_mask) to a collated batch: the engine counts
    the real tokens of its tokens/s from that name, and would count padding without it."""

    collate: Callable[[Mapping[str, list]], dict[str, torch.Tensor]]

    def __call__(self, rows: Mapping[str, list]) -> dict[str, torch.Tensor]:
        batch = self.collate(rows)
        batch["attention_mask"] = batch["sop_attention_mask"]
        return batch


def evaluate_albert(model: AlbertForPreTraining, ds: PairsSplit, collate: engine.PadCollator, batch_size: int,
                    rt: engine.Runtime) -> dict[str, float]:
    """Held-out MLM accuracy / loss / perplexity over every masked token and SOP accuracy over every
    example of the SOP view, with the SOP accuracy's 95% Wilson interval and the accuracy of always
    answering the more frequent order (scoring.score_pretraining with ALBERT's forward)."""

    def predict(batch: dict[str, torch.Tensor]):
        out = albert_forward(model, batch)
        return out.mlm_logits, out.mlm_labels, out.sop_logits

    totals = scoring.score_pretraining(model, predict, ds, collate, batch_size, rt, pair_label="sentence_order_label",
                                       length_column=LENGTH)
    low, high = wilson_interval(totals.pair_correct, totals.pairs)
    return {
        "val_mlm_accuracy": totals.mlm_accuracy,
        "val_mlm_loss": totals.mlm_loss,
        "val_mlm_perplexity": totals.mlm_perplexity,
        "val_sop_accuracy": totals.pair_accuracy,
        "val_sop_ci_low": low,
        "val_sop_ci_high": high,
        "val_sop_majority_accuracy": totals.majority_accuracy,  # the chance level to beat
    }


# ------------------------------------------------------------------------------------------------
# the distilled variant: student + projection, and its loss
# ------------------------------------------------------------------------------------------------
class DistillationStudent(nn.Module):
    """The ALBERT student and the projection of its hidden states into the teacher's hidden size
    (identity when they match). The engine trains and checkpoints both; only `albert` is saved."""

    def __init__(self, albert: AlbertForPreTraining, teacher_hidden_size: int):
        super().__init__()
        self.albert = albert
        h = albert.config.hidden_size
        self.projection = nn.Identity() if h == teacher_hidden_size else nn.Linear(h, teacher_hidden_size)

    @property
    def config(self) -> AlbertConfig:  # the engine reads the shape (layers, hidden) for its FLOPs estimate
        return self.albert.config


def distillation_loss_fn(acfg: AlbertSectionConfig, teacher_layer: int, soft_labels: bool = True):
    """The engine's loss_fn for the distilled variant on a CachedPairsCollator batch of the SOP view;
    soft_labels=False (a teacher without an MLM head): no Lce term."""
    hidden_key = f"teacher_{hidden_name(teacher_layer)}"

    def loss_fn(student: DistillationStudent, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        soft = batch["teacher_position_mask"]
        out = albert_forward(student.albert, batch, extra_positions=soft if soft_labels else None)
        student_rows = out.last_hidden_state[batch["teacher_hidden_mask"]]  # aligned with the cached rows
        cos = cosine_loss([student.projection(student_rows)], [batch[hidden_key]])
        loss = acfg.alpha_mlm * out.mlm_loss + acfg.alpha_sop * out.sop_loss + acfg.alpha_cos * cos
        terms = {"mlm_loss": out.mlm_loss.detach(), "sop_loss": out.sop_loss.detach(), "cos_loss": cos.detach()}
        if soft_labels:
            student_at_soft = out.mlm_logits[soft[out.positions]]  # rows aligned with the cached top-k rows
            ce = soft_label_loss(gather_support(student_at_soft, batch["teacher_topk_ids"]),
                                 soft_targets(batch["teacher_topk_probs"], acfg.temperature), acfg.temperature)
            loss = loss + acfg.alpha_ce * ce
            terms["ce_loss"] = ce.detach()
        return loss, terms

    return loss_fn


def distilled_losses(acfg: AlbertSectionConfig, soft_labels: bool) -> tuple[list[str], dict[str, str]]:
    """(the loss terms the distilled variant uses, {dropped term: why})."""
    weights = {"ce": acfg.alpha_ce if soft_labels else 0.0, "mlm": acfg.alpha_mlm, "sop": acfg.alpha_sop,
               "cos": acfg.alpha_cos}
    dropped = {} if soft_labels or acfg.alpha_ce == 0 else {"ce": "teacher has no MLM head (teacher.mlm_head: none)"}
    return [name for name, w in weights.items() if w > 0], dropped


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------
def student_config(acfg: AlbertSectionConfig, teacher: BertConfig, tok) -> AlbertConfig:
    """The ALBERT shape: the section's sizes, the teacher's where a size is unset."""
    hidden = acfg.hidden_size or teacher.hidden_size
    heads = acfg.num_heads or teacher.num_attention_heads
    if hidden % heads:
        raise StageError(f"the ALBERT hidden size {hidden} is not a multiple of its {heads} heads; set "
                         "albert.hidden_size and albert.num_heads so that heads divide the hidden size")
    return albert_config(
        vocab_size=len(tok), embedding_size=acfg.embedding_size, hidden_size=hidden,
        num_layers=acfg.num_layers or teacher.num_hidden_layers, num_heads=heads,
        intermediate_size=acfg.intermediate_size or teacher.intermediate_size,
        max_position_embeddings=teacher.max_position_embeddings, sharing=acfg.sharing,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        dropout=acfg.dropout)


def check_distillation_inputs(cfg: PipelineConfig, cache_dir: Path, teacher: BertConfig, vocab: int) -> int:
    """The cache holds what the distilled variant needs; returns the teacher layer to match (the last)."""
    if "sop" not in cfg.cache.views:
        raise StageError(
            f"albert.variants includes 'distilled', which learns from the teacher's soft labels for the SOP view "
            f"(sop_input_ids), but cache.views is {cfg.cache.views}: add it (--set cache.views=[nsp,sop]) or "
            "drop 'distilled' from albert.variants")
    manifest = read_cache_manifest(cache_dir)
    if "train" not in manifest["splits"] or "sop" not in manifest["splits"]["train"]:
        raise StageError("the teacher cache holds no train/sop part: cache.splits must include train and "
                         "cache.views must include sop; rerun the cache stage")
    if manifest["hidden_positions"] == "none":
        raise StageError("albert's distilled variant matches the teacher's last hidden layer (Lcos), but the cache "
                         "keeps no hidden states (cache.hidden_positions: none): set it to masked or all")
    if teacher.num_hidden_layers not in manifest["layers"]:
        raise StageError(f"the teacher cache holds hidden layers {manifest['layers']} but not the teacher's last "
                         f"({teacher.num_hidden_layers}), which Lcos matches; set cache.hidden_layers to 'last' "
                         "or include it")
    if teacher.vocab_size != vocab:
        raise StageError(f"the teacher has {teacher.vocab_size} tokens, the tokenizer {vocab}: the soft labels "
                         "would name other tokens than the student's")
    return teacher.num_hidden_layers


def teacher_init_config(config: AlbertConfig, teacher: BertConfig) -> AlbertConfig:
    """The teacher variant's shape: the stage's, with the teacher's activation (its copied layer's)."""
    config = copy.deepcopy(config)
    config.hidden_act = teacher.hidden_act if isinstance(teacher.hidden_act, str) else "gelu"
    return config


def init_from_teacher(albert: AlbertForPreTraining, saved, layer: int | None) -> dict[str, Any]:
    """Copy the saved teacher into the teacher variant (models/albert_init.py); StageError when it cannot."""
    model = saved.load_model()
    layer = layer or default_init_layer(model.config.num_hidden_layers)
    try:
        return init_albert_from_teacher(model, albert, layer)
    except ValueError as exc:
        raise StageError(f"albert's teacher variant: {exc}") from exc


def train_variant(variant: str, cfg: PipelineConfig, ctx: StageContext, config: AlbertConfig, tok,
                  teacher: BertConfig, val_ds: PairsSplit, collate: engine.PadCollator,
                  soft_labels: bool = True, saved=None) -> dict[str, Any]:
    """Train, evaluate and save one variant; returns its result (also written to <variant>/result.json).
    saved: the SavedTeacher, which the teacher variant is initialised from."""
    acfg = cfg.albert
    vdir = ctx.out_dir / variant
    pad_multiple = 8 if torch.cuda.is_available() else 1
    pairs_dir = ctx.upstream_dir("pairs")
    torch.manual_seed(ctx.seed)  # every variant starts from the same weights (the teacher one: then overwritten)
    init_info = None
    if variant == "teacher":
        albert = build_albert_for_pretraining(teacher_init_config(config, teacher))
        init_info = init_from_teacher(albert, saved, acfg.init_layer)
    else:
        albert = build_albert_for_pretraining(config)
    if variant in ("scratch", "teacher"):
        model: nn.Module = albert
        train_data: Any = pairs.load_split(pairs_dir, "train").select_columns([*SOP_INPUTS, LENGTH])
        train_collate: Any = collate
        loss_fn = albert_pretraining_loss
    else:
        cache_dir = ctx.upstream_dir("cache")
        layer = check_distillation_inputs(cfg, cache_dir, teacher, len(tok))
        model = DistillationStudent(albert, teacher.hidden_size)
        try:
            train_data = CachedPairs(cache_dir, pairs.load_split(pairs_dir, "train"), "train", view="sop")
        except (KeyError, ValueError) as exc:
            raise StageError(f"the teacher cache does not fit the pairs: {exc}; rerun the cache stage") from exc
        train_collate = CachedPairsCollator(tok.pad_token_id, "sop", (layer,), pad_multiple)
        loss_fn = distillation_loss_fn(acfg, layer, soft_labels)

    eval_batch = 2 * acfg.train.batch_size

    def evaluate(m: nn.Module, rt: engine.Runtime) -> dict[str, float]:
        return evaluate_albert(m if isinstance(m, AlbertForPreTraining) else m.albert, val_ds, collate, eval_batch, rt)

    def sink(metrics: dict[str, float], step: int | None) -> None:
        ctx.log_metrics({f"{variant}_{k}": v for k, v in metrics.items()}, step)

    result = engine.train(model, loss_fn, train_data, acfg.train, RealTokenCount(train_collate), seed=ctx.seed,
                          checkpoint_dir=vdir / CHECKPOINTS, eval_fn=evaluate, metrics_sink=sink,
                          length_column=LENGTH, progress=cfg.run.progress)
    if not result.runtime.is_main:
        return {}
    model_dir = vdir / MODEL_DIR
    engine.save_trained(albert, model_dir, tok)  # the projection is not saved
    counts = {"parameters": count_parameters(albert), **engine.run_summary(result),
              **engine.rounded(result.final_losses), **engine.rounded(result.eval_metrics)}
    if variant == "distilled" and isinstance(model, DistillationStudent) and isinstance(model.projection, nn.Linear):
        counts["projection_parameters"] = count_parameters(model.projection)
    out = {"variant": variant, "counts": counts, "resumed_from_step": result.resumed_from_step,
           "device": str(result.runtime.device), "precision": result.runtime.precision,
           "examples_train": len(train_data)}
    if variant == "distilled":
        out["losses_used"], out["dropped"] = distilled_losses(acfg, soft_labels)
    if init_info is not None:
        out["init"] = init_info
        counts["init_svd_relative_error"] = init_info["svd_relative_error"]
    engine.finish_run(vdir / CHECKPOINTS, vdir / RESULT, out)
    return out


def check_teacher_variant(acfg: AlbertSectionConfig, config: AlbertConfig, teacher: BertConfig) -> None:
    """The teacher variant's ALBERT can take the teacher's weights (a pretrained teacher is known only here)."""
    try:
        check_albert_fits_teacher(teacher_init_config(config, teacher), teacher)
    except ValueError as exc:
        raise StageError(f"albert's teacher variant: {exc}") from exc
    if acfg.init_layer is not None and acfg.init_layer > teacher.num_hidden_layers:
        raise StageError(f"albert.init_layer ({acfg.init_layer}) is above the teacher's {teacher.num_hidden_layers} "
                         "layers: lower it or leave it unset (the middle layer)")


def build_albert(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    t0 = time.perf_counter()
    acfg = cfg.albert
    saved = load_saved(ctx.upstream_dir("teacher"))
    teacher = saved.config
    tok = AutoTokenizer.from_pretrained(str(saved.model_dir))
    config = student_config(acfg, teacher, tok)
    if "distilled" in acfg.variants:  # fail before any training, not after the scratch variant
        check_distillation_inputs(cfg, ctx.upstream_dir("cache"), teacher, len(tok))
        used, _ = distilled_losses(acfg, saved.has_mlm_head)
        if not used:
            raise StageError("albert's distilled variant has nothing to train on: every weight but alpha_ce is 0 "
                             "and the teacher has no MLM head; raise albert.alpha_mlm, alpha_sop or alpha_cos")
    if "teacher" in acfg.variants:  # fail before any training, not after the other variants
        check_teacher_variant(acfg, config, teacher)
    collate = sop_collator(tok.pad_token_id, 8 if torch.cuda.is_available() else 1)
    val_ds = pairs.load_split(ctx.upstream_dir("pairs"), "validation").select_columns([*SOP_INPUTS, LENGTH])

    counts: dict[str, float] = {}
    details: dict[str, Any] = {"shape": {k: getattr(config, k) for k in (
        "vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "num_hidden_groups")}, "sharing": acfg.sharing}
    for variant in acfg.variants:
        result_path = ctx.out_dir / variant / RESULT
        if result_path.is_file() and (ctx.out_dir / variant / MODEL_DIR / "model.safetensors").is_file():
            result = json.loads(result_path.read_text(encoding="utf-8"))  # finished by an interrupted attempt
            result["kept_from_interrupted_attempt"] = True
        else:
            result = train_variant(variant, cfg, ctx, config, tok, teacher, val_ds, collate, saved.has_mlm_head,
                                   saved)
            if not result:  # another rank of a torchrun launch: it trains every variant, rank 0 writes
                continue
        counts.update({f"{variant}_{k}": v for k, v in result["counts"].items()})
        details[variant] = {k: v for k, v in result.items() if k != "counts"}
    if not engine.is_main_process():
        return StageReport()
    counts["examples_validation"] = len(val_ds)
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    return StageReport(
        counts=counts,
        inputs=[{"stage": n, "fingerprint": r.fingerprint} for n, r in ctx.upstream.items()],
        artifacts=sorted(p.relative_to(ctx.out_dir).as_posix() for v in acfg.variants
                         for p in [ctx.out_dir / v / RESULT, *(ctx.out_dir / v / MODEL_DIR).iterdir()]
                         if p.is_file() and p.suffix != ".safetensors"),
        details=details,
        models=[{"path": f"{v}/{MODEL_DIR}", "name": STAGE.models[f"albert-{v}"]} for v in acfg.variants],
    )


