"""Fitting a model to a downstream task: a sequence classifier (or a one-output regressor) trained from
hard labels, or from a fine-tuned teacher's cached outputs (task-specific distillation), with the
checkpoint chosen on validation. The task stages (tasks/task_teacher/, tasks/task_distill/) call it.

Recipe: AdamW (no decay on biases and LayerNorm), linear warmup over warmup_fraction of the steps then
linear decay to 0, gradient clipping at 1.0, `epochs` passes of the model's family (fractional allowed:
steps = ceil(epochs x batches per epoch)) of length-bucketed batches in an order that depends only on the seed, bf16 autocast
on CUDA and fp32 on a CPU. The validation split is scored `evals_per_epoch` times per epoch and at the
end; the weights of the best pass (the task's main metric, higher is better) are the result, so the
checkpoint is chosen on validation and the test split is only ever scored once, with those weights.

The classifier head is new (initialised from the seed): BERT's pooler comes from its pretraining,
ALBERT's from SOP, DistilBERT's pre-classifier is new (as in DistilBERT's own fine-tuning). On a CPU the
same seed gives the same result.

Distillation targets (`TeacherTargets`) are the teacher's logits for every train example (row order of
the train split) and, optionally, its last hidden states (ragged: one (tokens, H) block per example).
Both sides are tokenised by the same tokenizer (every student carries its teacher's), so the tokens align.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from datasets import utils as datasets_utils
from torch import nn
from transformers import (
    AlbertForSequenceClassification,
    AutoConfig,
    AutoTokenizer,
    BertForSequenceClassification,
    DistilBertForSequenceClassification,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from models.albert import load_albert
from models.losses import cosine_loss, task_distillation_loss
from tasks import engine, scoring
from tasks.downstream.config import DownstreamConfig, TaskDistillConfig
from tasks.section import TrainingConfig
from tasks.stage import StageError

MAX_GRAD_NORM = 1.0
EVAL_BATCH_SIZE = 128
SPLITS = ("train", "validation", "test")
ROW = "row"  # the example's index in its split (aligns the teacher's outputs with the batch)
TARGET_COLUMNS = ("labels", "teacher_logits", "teacher_hidden")  # what a batch holds besides model inputs


# ------------------------------------------------------------------------------------------------
# the checkpoint's classifier and the tokenised task
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No per-call progress bars or load reports: a fit runs once per model, task, seed and rate."""
    verbosity, hf_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    ds_bars_off = datasets_utils.are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets_utils.disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_bar:
            hf_logging.enable_progress_bar()
        if not ds_bars_off:
            datasets_utils.enable_progress_bars()


def model_family(model_dir: Path) -> str:
    return AutoConfig.from_pretrained(str(model_dir)).model_type


def load_classifier(model_dir: Path, num_labels: int, dropout: float) -> PreTrainedModel:
    """The *ForSequenceClassification of a saved BERT, DistilBERT or ALBERT (pretraining heads dropped, a
    new head with `dropout` before it). num_labels 1 is a regressor (MSE). Seed torch first: the head is
    random. A checkpoint that already is a classifier with this many labels keeps its head."""
    model_type = model_family(model_dir)
    kwargs: dict[str, Any] = {"num_labels": num_labels, "use_safetensors": True, "trust_remote_code": False,
                              "problem_type": "regression" if num_labels == 1 else "single_label_classification"}
    with quiet():  # "weights not used / newly initialized" is expected for a new head
        if model_type == "bert":
            return BertForSequenceClassification.from_pretrained(str(model_dir), classifier_dropout=dropout, **kwargs)
        if model_type == "distilbert":
            return DistilBertForSequenceClassification.from_pretrained(str(model_dir), seq_classif_dropout=dropout,
                                                                       **kwargs)
        if model_type == "albert":  # restores lightbert's attention/ffn sharing ties
            return load_albert(model_dir, cls=AlbertForSequenceClassification, classifier_dropout_prob=dropout,
                               num_labels=num_labels, problem_type=kwargs["problem_type"])
    raise StageError(f"{model_dir}: model_type {model_type!r} cannot be fine-tuned here; expected a bert, "
                     "distilbert or albert checkpoint")


def takes_token_types(model: nn.Module) -> bool:
    return "token_type_ids" in inspect.signature(model.forward).parameters


def tokenize(data: Dataset, tok, max_len: int, with_types: bool) -> Dataset:
    """input_ids, attention_mask, [token_type_ids,] labels, length (for bucketing) and row."""
    pair = "text_pair" in data.column_names

    def encode(rows: Mapping[str, list], idx: list[int]) -> dict[str, list]:
        enc = tok(rows["text"], rows["text_pair"] if pair else None, truncation=True, max_length=max_len,
                  return_token_type_ids=with_types)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": rows["label"],
               "length": [len(ids) for ids in enc["input_ids"]], ROW: idx}
        if with_types:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    with quiet():
        return data.map(encode, batched=True, batch_size=1000, with_indices=True,
                        remove_columns=data.column_names, keep_in_memory=True)


def tokenize_task(data: DatasetDict, model_dir: Path, max_seq_len: int, with_types: bool | None = None) -> DatasetDict:
    """Every split tokenised for the checkpoint in model_dir; token types unless it is a DistilBERT (which
    takes none), or as `with_types` says."""
    if with_types is None:
        with_types = model_family(model_dir) != "distilbert"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    max_len = min(max_seq_len, AutoConfig.from_pretrained(str(model_dir)).max_position_embeddings)
    return DatasetDict({s: tokenize(data[s], tok, max_len, with_types) for s in SPLITS})


@dataclass
class TeacherTargets:
    """The fine-tuned teacher's outputs on the train split, indexed by train row."""

    logits: np.ndarray  # (n, C) float32
    hidden: np.ndarray | None = None  # (tokens, H) float16, every example's tokens one after the other
    hidden_offsets: np.ndarray | None = None  # (n + 1,) int64


@dataclass
class TaskCollator:
    """Padded model inputs and labels; with targets, the teacher's logits (and hidden states) of the rows."""

    columns: tuple[str, ...]
    pad_token_id: int
    regression: bool
    targets: TeacherTargets | None = None
    pad_to_multiple_of: int = 1

    def __post_init__(self) -> None:
        self._pad = engine.PadCollator(self.columns, {"input_ids": self.pad_token_id}, self.pad_to_multiple_of)

    def __call__(self, rows: Mapping[str, list]) -> dict[str, torch.Tensor]:
        batch = self._pad({k: v for k, v in rows.items() if k != "labels"})
        labels = rows["labels"]
        batch["labels"] = torch.as_tensor(labels, dtype=torch.float32 if self.regression else torch.long)
        if self.targets is not None:
            idx = np.asarray(rows[ROW])
            batch["teacher_logits"] = torch.from_numpy(self.targets.logits[idx].astype(np.float32))
            if self.targets.hidden is not None:
                off = self.targets.hidden_offsets
                width = batch["input_ids"].shape[1]
                out = np.zeros((len(idx), width, self.targets.hidden.shape[1]), dtype=np.float32)
                for i, r in enumerate(idx):
                    block = self.targets.hidden[off[r]:off[r + 1]]
                    out[i, :len(block)] = block
                batch["teacher_hidden"] = torch.from_numpy(out)
        return batch


def input_columns(with_types: bool) -> tuple[str, ...]:
    return ("input_ids", "attention_mask", *(("token_type_ids",) if with_types else ()))


# ------------------------------------------------------------------------------------------------
# losses and predictions
# ------------------------------------------------------------------------------------------------
def make_loss_fn(regression: bool, kd: TaskDistillConfig | None):
    """The engine's loss_fn: hard labels alone (kd None), or the task-distillation loss of models/losses.py."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        inputs = {k: v for k, v in batch.items() if k not in TARGET_COLUMNS}
        want_hidden = kd is not None and kd.alpha_hidden > 0 and "teacher_hidden" in batch
        out = model(**inputs, output_hidden_states=want_hidden)
        teacher_logits = batch.get("teacher_logits") if kd is not None else None
        alpha_ce, alpha_hard, temperature = (kd.alpha_ce, kd.alpha_hard, kd.temperature) if kd else (0.0, 1.0, 1.0)
        loss, terms = task_distillation_loss(out.logits, batch["labels"], teacher_logits, alpha_ce, alpha_hard,
                                             temperature, regression)
        if want_hidden:
            cos = cosine_loss([out.hidden_states[-1]], [batch["teacher_hidden"]], batch["attention_mask"])
            loss = loss + kd.alpha_hidden * cos
            terms["cos_loss"] = cos.detach()
        return loss, terms

    return loss_fn


def eval_batches(model: nn.Module, data: Dataset, collate: TaskCollator, rt: engine.Runtime,
                 batch_size: int = EVAL_BATCH_SIZE) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """(rows, model inputs on the device) of a tokenised split in length-sorted batches, the model in eval
    mode under no_grad (its mode restored after)."""
    order = np.argsort(np.asarray(data["length"]), kind="stable")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield idx, {k: v.to(rt.device) for k, v in collate(data[idx]).items() if k not in TARGET_COLUMNS}
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_logits(model: nn.Module, data: Dataset, collate: TaskCollator, rt: engine.Runtime,
                   batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
    """(n, C) float32 logits of a tokenised split, in row order."""
    out = np.zeros((len(data), model.config.num_labels), dtype=np.float32)
    for idx, batch in eval_batches(model, data, collate, rt, batch_size):
        with rt.autocast():
            out[idx] = model(**batch).logits.float().cpu().numpy()
    return out


def to_predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
    return logits[:, 0].astype(np.float64) if regression else logits.argmax(-1).astype(np.int64)


def split_metrics(info: dict[str, Any], labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    regression = info.get("task_type") == "regression"
    return scoring.task_metrics(info.get("task_type", "classification"), labels, to_predictions(logits, regression),
                                info["num_labels"])


def main_metric(info: dict[str, Any]) -> str:
    return info.get("metric", "accuracy")


# ------------------------------------------------------------------------------------------------
# one fit
# ------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    model: PreTrainedModel  # with the weights of the best validation pass
    learning_rate: float
    seed: int
    metric: str
    validation: dict[str, float]
    test: dict[str, float]
    validation_logits: np.ndarray
    test_logits: np.ndarray
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)  # [{step, <metric>}] per validation pass
    steps: int = 0
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    final_losses: dict[str, float] = field(default_factory=dict)

    def record(self, regression: bool) -> dict[str, Any]:
        """JSON-ready: settings, metrics, the validation curve, and per-example predictions (bootstraps)."""
        return {
            "learning_rate": self.learning_rate, "seed": self.seed, "metric": self.metric,
            "validation": self.validation, "test": self.test, "best_step": self.best_step, "steps": self.steps,
            "history": self.history, "train_seconds": round(self.train_seconds, 3),
            "train_tokens_per_s": round(self.tokens_per_s, 1), "final_losses": self.final_losses,
            "model_type": self.model.config.model_type,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "validation_predictions": to_predictions(self.validation_logits, regression).tolist(),
            "test_predictions": to_predictions(self.test_logits, regression).tolist(),
        }


def fit(model_dir: Path, data: DatasetDict, info: dict[str, Any], dcfg: DownstreamConfig, *, learning_rate: float,
        seed: int, rt: engine.Runtime, targets: TeacherTargets | None = None, kd: TaskDistillConfig | None = None,
        metrics_sink: engine.MetricsSink | None = None, progress: bool = False) -> FitResult:
    """Fine-tune the checkpoint in model_dir on `data` (tokenize_task's output) with hard labels, or with
    the teacher's targets and the kd weights; the weights of the best validation pass are kept."""
    threads = torch.get_num_threads()
    if dcfg.cpu_threads is not None and rt.device.type == "cpu":
        torch.set_num_threads(dcfg.cpu_threads)
    try:
        return _fit(Path(model_dir), data, info, dcfg, learning_rate, seed, rt, targets, kd, metrics_sink, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(model_dir: Path, data: DatasetDict, info: dict[str, Any], dcfg: DownstreamConfig, learning_rate: float,
         seed: int, rt: engine.Runtime, targets: TeacherTargets | None, kd: TaskDistillConfig | None,
         metrics_sink: engine.MetricsSink | None, progress: bool) -> FitResult:
    regression = info.get("task_type") == "regression"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(seed)  # the new classifier head
    model = load_classifier(model_dir, 1 if regression else info["num_labels"], dcfg.dropout)
    names = info.get("label_names") or []
    if not regression and len(names) == info["num_labels"]:  # a deployed classifier answers in the task's words
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
    with_types = takes_token_types(model)
    if with_types != ("token_type_ids" in data["train"].column_names):
        raise StageError(f"{model_dir}: the task was tokenised {'without' if with_types else 'with'} token types "
                         "for another model family; tokenise it for this model (tokenize_task)")
    n_train = len(data["train"])
    if n_train == 0:
        raise StageError(f"downstream task {info['task']}: the train split is empty; lower the validation/test "
                         "fractions or raise max_train_examples")
    if targets is not None and len(targets.logits) != n_train:
        raise StageError(f"the teacher's cached outputs cover {len(targets.logits)} train examples, the task has "
                         f"{n_train}: the task cache is from another version of the task; rerun task_cache")
    pad = 8 if rt.device.type == "cuda" else 1
    collate = TaskCollator(input_columns(with_types), tok.pad_token_id or 0, regression,
                           targets if kd is not None else None, pad)
    eval_collate = TaskCollator(input_columns(with_types), tok.pad_token_id or 0, regression, None, pad)
    steps_per_epoch = math.ceil(n_train / dcfg.batch_size)
    steps = max(1, math.ceil(getattr(dcfg.epochs, model.config.model_type) * steps_per_epoch))
    eval_every = max(1, steps_per_epoch // dcfg.evals_per_epoch)
    train_cfg = TrainingConfig(
        max_steps=steps, batch_size=dcfg.batch_size, effective_batch_size=dcfg.batch_size * rt.world_size,
        learning_rate=learning_rate, warmup_steps=round(dcfg.warmup_fraction * steps),
        weight_decay=dcfg.weight_decay, max_grad_norm=MAX_GRAD_NORM, eval_every=eval_every if eval_every < steps
        else 0, checkpoint_every=0, log_every=min(50, steps), precision=rt.precision)

    metric = main_metric(info)
    val_labels = np.asarray(data["validation"]["labels"])
    best: dict[str, Any] = {"value": -math.inf, "state": None, "step": 0}
    history: list[dict[str, float]] = []

    def choose_checkpoint(m: nn.Module, runtime: engine.Runtime) -> dict[str, float]:
        value = split_metrics(info, val_labels, predict_logits(m, data["validation"], eval_collate, runtime))[metric]
        step = min(steps, (len(history) + 1) * eval_every) if train_cfg.eval_every else steps
        history.append({"step": step, metric: value})
        if value > best["value"] or best["state"] is None:  # ties keep the earlier (less trained) weights
            best.update(value=value, step=step,
                        state={k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()})
        return {f"validation_{metric}": value}

    result = engine.train(model, make_loss_fn(regression, kd), data["train"], train_cfg, collate, seed=seed,
                          runtime=rt, eval_fn=choose_checkpoint, metrics_sink=metrics_sink, progress=progress)
    model.load_state_dict(best["state"])
    val_logits = predict_logits(model, data["validation"], eval_collate, rt)
    test_logits = predict_logits(model, data["test"], eval_collate, rt)
    return FitResult(
        model=model, learning_rate=learning_rate, seed=seed, metric=metric,
        validation=split_metrics(info, val_labels, val_logits),
        test=split_metrics(info, np.asarray(data["test"]["labels"]), test_logits),
        validation_logits=val_logits, test_logits=test_logits, best_step=best["step"], history=history,
        steps=result.steps, train_seconds=result.train_seconds, tokens_per_s=result.tokens_per_s,
        final_losses=result.final_losses)


def sweep(model_dir: Path, data: DatasetDict, info: dict[str, Any], dcfg: DownstreamConfig,
          learning_rates: list[float], *, seed: int, rt: engine.Runtime, targets: TeacherTargets | None = None,
          kd: TaskDistillConfig | None = None, progress: bool = False) -> tuple[FitResult, list[dict[str, Any]]]:
    """One fit per learning rate; the best on the validation metric (the first of ties), and the table."""
    best, table = None, []
    for lr in learning_rates:
        res = fit(model_dir, data, info, dcfg, learning_rate=lr, seed=seed, rt=rt, targets=targets, kd=kd,
                  progress=progress)
        table.append({"learning_rate": lr, f"validation_{res.metric}": res.validation[res.metric],
                      "best_step": res.best_step})
        if best is None or res.validation[res.metric] > best.validation[best.metric]:
            best = res
    assert best is not None
    return best, table


@torch.no_grad()
def hidden_states_of(model: nn.Module, data: Dataset, collate: TaskCollator, rt: engine.Runtime,
                     batch_size: int = EVAL_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The last hidden states of every example's real tokens, (tokens, H) float16 in row order, and the
    (n + 1,) offsets: what a student's optional hidden-state term learns from."""
    lengths = np.asarray(data["length"])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = np.zeros((int(offsets[-1]), model.config.hidden_size), dtype=np.float16)
    for idx, batch in eval_batches(model, data, collate, rt, batch_size):
        with rt.autocast():
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float().cpu().numpy()
        for i, r in enumerate(idx):
            out[offsets[r]:offsets[r + 1]] = hidden[i, :lengths[r]]
    return out, offsets


def save_model(model, model_dir: Path, tokenizer_dir: Path) -> None:
    """save_pretrained (safetensors) with the tokenizer of `tokenizer_dir`, written beside it then moved in."""
    from transformers import AutoTokenizer

    from tasks.artifacts import replace_dir

    tmp = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.cpu().save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
    replace_dir(tmp, model_dir)
