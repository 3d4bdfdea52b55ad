"""Teacher stage: pretrain a BERT (masked LM + next sentence prediction) on the pairs, or take a
pretrained checkpoint (an embedded one such as minilm-l6, a folder or a hub id); either way evaluate it
on the validation pairs and save it with its tokenizer.

A pretrained checkpoint may be a bare `BertModel` (a sentence encoder, the backbone of a fine-tuned
model): it has no MLM head. `teacher.mlm_head: fit` then fits BERT's head on the frozen backbone;
`none` keeps it headless, and the students learn from its hidden states only (no soft labels). The
manifest's details say which (`mlm_head`, `nsp_head_trained`, `pooling`, `can_teach`), and the stages
downstream read them through `load_saved`.

Output: `model/` (save_pretrained, safetensors, with the tokenizer of the tokenizer stage): a
BertForPreTraining when there is an MLM head, else the bare BertModel, so that nothing downstream can
take a random head for a trained one. Training checkpoints live in `checkpoints/` while the stage runs,
so an interrupted stage resumes at its last checkpoint, and are dropped when it finishes.

Several GPUs: `torchrun --nproc_per_node 8 -m tasks.teacher --workdir W --preset gpu` (see main()).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BertConfig, BertForPreTraining, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from models.bert import (
    IGNORE_INDEX,
    PRETRAINING_INPUTS,
    FrozenBackboneHead,
    bert_config,
    build_bert_for_pretraining,
    mlm_head_fit_loss,
    pretraining_forward,
    pretraining_loss,
)
from tasks import engine, scoring
from tasks.config import PipelineConfig
from tasks.pairs import outputs as pairs
from tasks.pairs.outputs import PairsSplit
from tasks.sources import resolve_teacher_source
from tasks.stage import StageContext, StageError, StageReport
from tasks.teacher import STAGE
from tasks.teacher.outputs import MODEL_DIR

CHECKPOINTS = "checkpoints"
POOLING_CONFIG = "1_Pooling/config.json"  # sentence-transformers' pooling of the last hidden states
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens": "weightedmean",
                 "pooling_mode_lasttoken": "lasttoken"}
MLM_HEADS = ("pretrained", "fitted", "none")  # details["mlm_head"]


def pretraining_collator(tok: PreTrainedTokenizerBase, pad_to_multiple_of: int = 1) -> engine.PadCollator:
    return engine.PadCollator(PRETRAINING_INPUTS, {"input_ids": tok.pad_token_id, "labels": IGNORE_INDEX},
                              pad_to_multiple_of)


def evaluate_pretraining(model: BertForPreTraining, ds: PairsSplit, collate: engine.PadCollator, batch_size: int,
                         rt: engine.Runtime, baseline_token: int | None = None) -> dict[str, float]:
    """The teacher's held-out MLM and NSP metrics (scoring.score_pretraining with BERT's pretraining forward)."""

    def predict(batch: dict[str, torch.Tensor]):
        out = pretraining_forward(model, batch)
        return out.mlm_logits, out.mlm_labels, out.nsp_logits

    return scoring.masked_lm_metrics(scoring.score_pretraining(model, predict, ds, collate, batch_size, rt,
                                                       pair_label="next_sentence_label", baseline_token=baseline_token),
                                     with_baseline=baseline_token is not None)


def load_pretrained_teacher(source: str) -> tuple[BertForPreTraining, dict[str, Any]]:
    """A local folder or hub id; safetensors only and never remote code. A BertForPreTraining,
    BertForMaskedLM (its NSP head is then untrained) or bare BertModel (no heads at all) checkpoint;
    info says which heads came with it: {"mlm_head_loaded", "nsp_head_trained"}."""
    try:
        # transformers' load report would call a headless checkpoint "corrupted": the missing heads are
        # read from `info` below and stated in the manifest instead.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = BertForPreTraining.from_pretrained(
                source, use_safetensors=True, trust_remote_code=False, output_loading_info=True,
                attn_implementation="sdpa")
        finally:
            hf_logging.set_verbosity(verbosity)
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: weights of another shape
        raise StageError(
            f"could not load teacher.pretrained = {source!r}: {exc}. Point it at a folder (or hub id) "
            "holding a BERT checkpoint (BertModel, BertForMaskedLM or BertForPreTraining) in safetensors "
            "format, or unset it to pretrain a teacher here"
        ) from exc
    missing = set(info.get("missing_keys", []))
    backbone = sorted(k for k in missing if k.startswith("bert.") and not k.startswith("bert.pooler."))
    if backbone:
        raise StageError(f"teacher.pretrained = {source!r} is not a BERT checkpoint: {len(backbone)} encoder "
                         f"weights are missing (e.g. {backbone[0]}). Give a checkpoint saved from BertModel, "
                         "BertForMaskedLM or BertForPreTraining")
    return model, {"mlm_head_loaded": "cls.predictions.transform.dense.weight" not in missing,
                   "nsp_head_trained": not any(k.startswith(("cls.seq_relationship", "bert.pooler")) for k in missing)}


def read_pooling(location: str) -> str | None:
    """The sentence-transformers pooling beside a checkpoint (1_Pooling/config.json), e.g. "mean"; None
    when the checkpoint has no such file (a hub id is not looked up)."""
    path = Path(location) / POOLING_CONFIG
    if not path.is_file():
        return None
    conf = json.loads(path.read_text(encoding="utf-8"))
    modes = [name for key, name in POOLING_MODES.items() if conf.get(key)]
    return "+".join(modes) if modes else None


def architecture(config: BertConfig, parameters: int) -> dict[str, int]:
    return {"layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "heads": config.num_attention_heads, "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings,
            "parameters": parameters}


def what_it_teaches(mlm_head: str, nsp_head_trained: bool) -> tuple[list[str], str]:
    """(can_teach, a one-line explanation) for the manifest."""
    if mlm_head == "none":
        return ["hidden_states"], ("hidden states only (Lcos, hidden-state losses): the checkpoint has no MLM head "
                                   "(teacher.mlm_head: none), so no soft labels (Lce) and no MLM metrics")
    teaches = ["hidden_states", "soft_labels", *(["nsp"] if nsp_head_trained else [])]
    head = "a fitted MLM head on the frozen backbone" if mlm_head == "fitted" else "its own MLM head"
    return teaches, (f"hidden states (Lcos) and soft labels (Lce) from {head}"
                     + ("; its NSP head is trained" if nsp_head_trained else "; no trained NSP head"))


def fit_mlm_head(model: BertForPreTraining, cfg: PipelineConfig, ctx: StageContext, train_ds: PairsSplit,
                 collate: engine.PadCollator, evaluate: Callable[[BertForPreTraining, engine.Runtime], dict]
                 ) -> engine.TrainResult:
    """Fit BERT's prediction head (transform + LayerNorm + bias; decoder tied to the word embeddings) on
    the frozen backbone, on the pairs train split, with the engine (teacher.mlm_head_fit)."""
    torch.manual_seed(ctx.seed)
    head = model.cls.predictions
    with torch.no_grad():  # the missing weights, initialised as BERT's own (whatever the loader left there)
        head.transform.dense.weight.normal_(0.0, model.config.initializer_range)
        head.transform.dense.bias.zero_()
        head.transform.LayerNorm.reset_parameters()
        head.bias.zero_()
    return engine.train(
        FrozenBackboneHead(model), mlm_head_fit_loss, train_ds, cfg.teacher.mlm_head_fit, collate, seed=ctx.seed,
        checkpoint_dir=ctx.out_dir / CHECKPOINTS, eval_fn=lambda fit, rt: evaluate(fit.model, rt),
        metrics_sink=lambda m, step: ctx.log_metrics({f"mlm_head_fit_{k}": v for k, v in m.items()}, step),
        progress=cfg.run.progress)


def build_teacher(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    t0 = time.perf_counter()
    tcfg = cfg.teacher
    tok_dir, pairs_dir = ctx.upstream_dir("tokenizer"), ctx.upstream_dir("pairs")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    train_ds, val_ds = (pairs.load_split(pairs_dir, split, columns=[*PRETRAINING_INPUTS, "length"])
                         for split in ("train", "validation"))
    collate = pretraining_collator(tok, 8 if torch.cuda.is_available() else 1)
    eval_batch = 2 * tcfg.train.batch_size
    baseline_token = scoring.most_frequent_label(train_ds)
    counts: dict[str, float] = {}
    details: dict[str, Any] = {"baseline": f"always predict token {baseline_token} "
                               f"({tok.convert_ids_to_tokens(baseline_token) if baseline_token >= 0 else '-'}), "
                               "the most frequent masked token of the train pairs"}

    def evaluate(m: BertForPreTraining, rt: engine.Runtime) -> dict[str, float]:
        return evaluate_pretraining(m, val_ds, collate, eval_batch, rt, baseline_token)

    if tcfg.pretrained:
        src = resolve_teacher_source(tcfg.pretrained, cfg.run.resolved_cache_dir())
        model, info = load_pretrained_teacher(src.location)
        if model.config.vocab_size < len(tok):
            raise StageError(f"teacher.pretrained has {model.config.vocab_size} token embeddings but the "
                             f"tokenizer stage's tokenizer has {len(tok)} tokens: they do not belong together")
        if cfg.pairs.max_seq_len > model.config.max_position_embeddings:
            raise StageError(f"pairs.max_seq_len ({cfg.pairs.max_seq_len}) is above teacher.pretrained's "
                             f"{model.config.max_position_embeddings} position embeddings; lower pairs.max_seq_len")
        mlm_head = "pretrained" if info["mlm_head_loaded"] else "fitted" if tcfg.mlm_head == "fit" else "none"
        nsp_trained = info["nsp_head_trained"]
        rt = engine.setup_runtime(tcfg.train.precision)
        model.to(rt.device)
        counts.update(steps=0, tokens_seen=0, train_tokens_per_s=0.0)
        if mlm_head == "fitted":
            fit = fit_mlm_head(model, cfg, ctx, train_ds, collate, evaluate)
            rt = fit.runtime
            metrics = fit.eval_metrics  # held out: the validation pairs
            counts.update(mlm_head_fit_steps=fit.steps, mlm_head_fit_seconds=round(fit.train_seconds, 2),
                          mlm_head_fit_tokens_per_s=round(fit.tokens_per_s, 1),
                          **{f"mlm_head_fit_{k}": round(v, 5) for k, v in fit.final_losses.items()})
        elif mlm_head == "pretrained":
            metrics = evaluate(model, rt)
        else:
            metrics = {}  # no head: MLM metrics would be a random head's
        if not nsp_trained:
            metrics.pop("val_nsp_accuracy", None)  # a random NSP head's score says nothing
        can_teach, note = what_it_teaches(mlm_head, nsp_trained)
        details.update(source=f"pretrained checkpoint {tcfg.pretrained} (not trained here)", provenance=src.provenance,
                       mlm_head=mlm_head, nsp_head_trained=nsp_trained, pooling=read_pooling(src.location),
                       can_teach=can_teach, can_teach_note=note,
                       architecture=architecture(model.config, sum(p.numel() for p in model.bert.parameters())))
        if mlm_head == "none":
            details["metrics_skipped"] = "MLM/NSP validation metrics: the teacher has no MLM head"
        if not rt.is_main:
            return StageReport()
    else:
        config = bert_config(len(tok), tcfg.hidden_size, tcfg.num_layers, tcfg.num_heads, tcfg.intermediate_size,
                             tcfg.max_position_embeddings, pad_token_id=tok.pad_token_id, dropout=tcfg.dropout)
        torch.manual_seed(ctx.seed)
        model = build_bert_for_pretraining(config)
        checkpoints = ctx.out_dir / CHECKPOINTS
        result = engine.train(
            model, pretraining_loss, train_ds, tcfg.train, collate, seed=ctx.seed, checkpoint_dir=checkpoints,
            eval_fn=lambda m, rt: evaluate_pretraining(m, val_ds, collate, eval_batch, rt, baseline_token),
            metrics_sink=ctx.log_metrics, progress=cfg.run.progress)
        if not result.runtime.is_main:  # other ranks of a torchrun launch: rank 0 writes the output
            return StageReport()
        metrics = result.eval_metrics  # the engine evaluated the final weights
        counts.update(**engine.run_summary(result), **engine.rounded(result.final_losses))
        can_teach, note = what_it_teaches("pretrained", True)
        details.update(source="pretrained here on the pairs train split (MLM + NSP)",
                       resumed_from_step=result.resumed_from_step, precision=result.runtime.precision,
                       device=str(result.runtime.device), world_size=result.runtime.world_size,
                       examples_train=len(train_ds), provenance={"kind": "trained here"}, mlm_head="pretrained",
                       nsp_head_trained=True, pooling=None, can_teach=can_teach, can_teach_note=note,
                       architecture=architecture(model.config, sum(p.numel() for p in model.bert.parameters())))

    model_dir = ctx.out_dir / MODEL_DIR
    saved = model.bert if details["mlm_head"] == "none" else model  # never save a random MLM head
    engine.save_trained(saved, model_dir, tok_dir)
    engine.finish_run(ctx.out_dir / CHECKPOINTS)
    counts.update(engine.rounded(metrics))
    counts["parameters"] = sum(p.numel() for p in saved.parameters())
    counts["examples_validation"] = len(val_ds)
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    if tcfg.pretrained:  # a trained teacher's final metrics went to the sink from the engine
        ctx.log_metrics(metrics, 0)
    return StageReport(
        counts=counts,
        inputs=[{"stage": n, "fingerprint": r.fingerprint} for n, r in ctx.upstream.items()],
        artifacts=sorted(p.relative_to(ctx.out_dir).as_posix() for p in model_dir.iterdir() if p.is_file()
                         and p.suffix != ".safetensors"),
        details=details,
        # a headless teacher is an encoder: registering it as fill-mask would give it a random head
        models=[{"path": MODEL_DIR, "name": STAGE.models["teacher"],
                 **({"task": "feature-extraction"} if details["mlm_head"] == "none" else {})}],
    )
