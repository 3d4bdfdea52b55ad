"""Teacher stage: pretrain a BERT (masked LM + next sentence prediction) on the pairs, or take a
pretrained checkpoint as is; either way evaluate it on the validation pairs and save it with its tokenizer.

Output: `model/` (save_pretrained, safetensors, with the tokenizer of the tokenizer stage). Training
checkpoints live in `checkpoints/` while the stage runs, so an interrupted stage resumes at its last
checkpoint, and are dropped when it finishes.

Several GPUs: `torchrun --nproc_per_node 8 -m tasks.teacher --workdir W --preset gpu` (see main()).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer, BertForPreTraining, PreTrainedTokenizerBase

from models.bert import (
    IGNORE_INDEX,
    PRETRAINING_INPUTS,
    bert_config,
    build_bert_for_pretraining,
    pretraining_forward,
    pretraining_loss,
)
from tasks import engine
from tasks.config import PipelineConfig
from tasks.stage import StageContext, StageError, StageReport, StageSpec

MODEL_DIR = "model"
REGISTERED_NAME = "lightbert-teacher"  # in MLflow's model registry
CHECKPOINTS = "checkpoints"


def load_pairs(pairs_dir: Path, split: str) -> Dataset:
    path = pairs_dir / split
    if not path.is_dir():
        raise StageError(f"{path} is missing: the pairs stage output is incomplete; rerun the pairs stage")
    return load_from_disk(str(path)).select_columns([*PRETRAINING_INPUTS, "length"])


def pretraining_collator(tok: PreTrainedTokenizerBase, pad_to_multiple_of: int = 1) -> engine.PadCollator:
    return engine.PadCollator(PRETRAINING_INPUTS, {"input_ids": tok.pad_token_id, "labels": IGNORE_INDEX},
                              pad_to_multiple_of)


def most_frequent_label(ds: Dataset) -> int:
    """The label token a predictor that ignores its input would always answer (fit on `ds`)."""
    flat = pc.list_flatten(ds.data.table.column("labels"))
    counts = pc.value_counts(flat.filter(pc.not_equal(flat, IGNORE_INDEX)))
    if len(counts) == 0:
        return -1
    top = int(np.argmax(counts.field("counts").to_numpy()))
    return int(counts.field("values")[top].as_py())


# (mlm_logits (n, V), mlm_labels (n,), nsp_logits (B, 2) or None) of a padded batch
MaskedLMPredict = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def evaluate_masked_lm(model: torch.nn.Module, predict: MaskedLMPredict, ds: Dataset, collate: engine.PadCollator,
                       batch_size: int, rt: engine.Runtime, baseline_token: int | None = None) -> dict[str, float]:
    """Held-out MLM accuracy and perplexity (exp of the mean cross-entropy over all masked tokens), NSP
    accuracy when `predict` gives NSP logits; with baseline_token, the accuracy of always answering it.
    Any masked LM: the teacher (evaluate_pretraining) and the students pass their own `predict`."""
    totals = dict.fromkeys(("masked", "correct", "ce", "pairs", "nsp_correct", "baseline"), 0.0)
    lengths = np.asarray(ds["length"])
    was_training = model.training
    model.eval()
    has_nsp = False
    with torch.no_grad(), rt.autocast():
        for idx in engine.length_bucketed_batches(lengths, batch_size, seed=0, epoch=0):
            batch = {k: v.to(rt.device) for k, v in collate(ds[idx]).items()}
            logits, labels, nsp_logits = predict(batch)
            totals["masked"] += labels.numel()
            totals["correct"] += (logits.argmax(-1) == labels).sum().item()
            totals["ce"] += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            if baseline_token is not None:
                totals["baseline"] += (labels == baseline_token).sum().item()
            totals["pairs"] += len(idx)
            if nsp_logits is not None:
                has_nsp = True
                totals["nsp_correct"] += (nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum().item()
    model.train(was_training)
    masked = max(totals["masked"], 1.0)
    metrics = {
        "val_mlm_accuracy": totals["correct"] / masked,
        "val_mlm_perplexity": float(np.exp(totals["ce"] / masked)),
        "val_mlm_loss": totals["ce"] / masked,
    }
    if has_nsp:
        metrics["val_nsp_accuracy"] = totals["nsp_correct"] / max(totals["pairs"], 1.0)
    if baseline_token is not None:
        metrics["baseline_mlm_accuracy"] = totals["baseline"] / masked
    return metrics


def evaluate_pretraining(model: BertForPreTraining, ds: Dataset, collate: engine.PadCollator, batch_size: int,
                         rt: engine.Runtime, baseline_token: int | None = None) -> dict[str, float]:
    """The teacher's held-out MLM and NSP metrics (evaluate_masked_lm with BERT's pretraining forward)."""

    def predict(batch: dict[str, torch.Tensor]):
        out = pretraining_forward(model, batch)
        return out.mlm_logits, out.mlm_labels, out.nsp_logits

    return evaluate_masked_lm(model, predict, ds, collate, batch_size, rt, baseline_token)


def load_pretrained_teacher(source: str) -> tuple[BertForPreTraining, dict[str, Any]]:
    """A local folder or hub id; safetensors only and never remote code. A checkpoint with only an MLM
    head (BertForMaskedLM) loads too; its NSP head is then untrained, which details say."""
    try:
        model, info = BertForPreTraining.from_pretrained(
            source, use_safetensors=True, trust_remote_code=False, output_loading_info=True,
            attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise StageError(
            f"could not load teacher.pretrained = {source!r}: {exc}. Point it at a folder (or hub id) "
            "holding a BERT checkpoint in safetensors format, or unset it to pretrain a teacher here"
        ) from exc
    missing = info.get("missing_keys", [])
    if any(k.startswith("cls.predictions") for k in missing):
        raise StageError(f"teacher.pretrained = {source!r} has no masked-LM head ({len(missing)} weights "
                         "missing); the distillation needs one. Use a checkpoint saved from BertForMaskedLM "
                         "or BertForPreTraining")
    return model, {"nsp_head_trained": not any(k.startswith("cls.seq_relationship") for k in missing)}


def copy_tokenizer(tok_dir: Path, out: Path) -> None:
    for path in tok_dir.iterdir():
        if path.is_file() and path.name != "manifest.json":
            shutil.copy2(path, out / path.name)


def build_teacher(cfg: PipelineConfig, ctx: StageContext) -> StageReport:
    t0 = time.perf_counter()
    tcfg = cfg.teacher
    tok_dir, pairs_dir = ctx.upstream_dir("tokenizer"), ctx.upstream_dir("pairs")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    train_ds, val_ds = load_pairs(pairs_dir, "train"), load_pairs(pairs_dir, "validation")
    collate = pretraining_collator(tok, 8 if torch.cuda.is_available() else 1)
    eval_batch = 2 * tcfg.train.batch_size
    baseline_token = most_frequent_label(train_ds)
    counts: dict[str, float] = {}
    details: dict[str, Any] = {"baseline": f"always predict token {baseline_token} "
                               f"({tok.convert_ids_to_tokens(baseline_token) if baseline_token >= 0 else '-'}), "
                               "the most frequent masked token of the train pairs"}

    if tcfg.pretrained:
        model, info = load_pretrained_teacher(tcfg.pretrained)
        if model.config.vocab_size < len(tok):
            raise StageError(f"teacher.pretrained has {model.config.vocab_size} token embeddings but the "
                             f"tokenizer stage's tokenizer has {len(tok)} tokens: they do not belong together")
        rt = engine.setup_runtime(tcfg.train.precision)
        model.to(rt.device)
        metrics = evaluate_pretraining(model, val_ds, collate, eval_batch, rt, baseline_token)
        counts.update(steps=0, tokens_seen=0, train_tokens_per_s=0.0)
        details.update(info, source=f"pretrained checkpoint {tcfg.pretrained} (not trained here)")
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
        counts.update(steps=result.steps, tokens_seen=result.tokens_seen,
                      train_tokens_per_s=round(result.tokens_per_s, 1), train_seconds=round(result.train_seconds, 2),
                      **{k: round(v, 5) for k, v in result.final_losses.items()})
        details.update(source="pretrained here on the pairs train split (MLM + NSP)",
                       resumed_from_step=result.resumed_from_step, precision=result.runtime.precision,
                       device=str(result.runtime.device), world_size=result.runtime.world_size,
                       examples_train=len(train_ds))

    model_dir = ctx.out_dir / MODEL_DIR
    model.cpu().save_pretrained(model_dir, safe_serialization=True)
    copy_tokenizer(tok_dir, model_dir)
    shutil.rmtree(ctx.out_dir / CHECKPOINTS, ignore_errors=True)  # the stage is done: nothing to resume
    counts.update({k: round(v, 5) for k, v in metrics.items()})
    counts["parameters"] = sum(p.numel() for p in model.parameters())
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
        models=[{"path": MODEL_DIR, "name": REGISTERED_NAME}],
    )


def saved_teacher_dir(ctx: StageContext) -> Path:
    """The teacher stage's saved model and tokenizer, for the stages downstream of it."""
    path = ctx.upstream_dir("teacher") / MODEL_DIR
    if not (path / "config.json").is_file():
        raise StageError(f"{path} holds no saved teacher: rerun the teacher stage")
    return path


def teacher_key(cfg: PipelineConfig) -> dict[str, Any]:
    section = cfg.section("teacher")
    if cfg.teacher.pretrained:
        section.pop("train")  # a pretrained teacher is not trained: its training settings change nothing
    return {"teacher": section, "seed": cfg.run.seed}


STAGE = StageSpec(
    name="teacher",
    build=build_teacher,
    upstream=("tokenizer", "pairs"),
    key_config=teacher_key,
    code_modules=("tasks.engine", "models.bert"),
    resumable=True,
)


# ------------------------------------------------------------------------------------------------
# several GPUs: `torchrun ... -m tasks.teacher ...` is `torchrun ... -m tasks.launch teacher ...`
# ------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    from tasks.launch import main

    main(stage="teacher")
