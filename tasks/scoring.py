"""Scoring in one shared place: the metrics of a downstream task, their bootstrap intervals, the paired
comparison of two models over examples and fine-tuning seeds, and the checks for a collapsed model.

Metrics come from scikit-learn and scipy; this module only chooses them and resamples.

    classification  accuracy, macro_f1 (F1 averaged over the classes present in labels or predictions);
                    binary tasks also f1 (of the positive class, label 1) and mcc (Matthews correlation).
                    Predictions are class ids.
    regression      pearson, spearman (correlations; nan when either side is constant) and mse. Predictions
                    are floats. Every metric is higher-is-better except mse.

Public API:
    METRICS {task_type: metric names}; reported_metrics(task_type, num_labels) -> the names reported;
    metric_value(metric, task_type, labels, predictions) -> float
    task_metrics(task_type, labels, predictions, num_labels=None) -> {metric: value}
    bootstrap_ci(labels, predictions, metric, task_type, n_resamples=1000, seed=0, confidence=0.95) -> (low, high)
    bootstrap_ci_seeds(labels, predictions, metric, task_type, n_resamples=1000, seed=0, confidence=0.95)
        -> (low, high)
    paired_bootstrap(labels, preds_a, preds_b, metric, task_type, n_resamples=1000, seed=0, confidence=0.95,
                     seeds=None) -> {difference, ci95, confidence, prob_a_better, n_resamples, seeds}
    predicted_class_share(predictions, num_labels) -> float; collapsed(predictions, num_labels, threshold=0.95)
    chance_corrected(accuracy, majority, teacher_accuracy, n=None) -> float | None
    wilson_interval(successes, n, confidence=0.95) -> (low, high)
    score_pretraining(model, predict, ds, collate, batch_size, rt, pair_label=...) -> PretrainingTotals: masked
        LM accuracy / loss / perplexity and pair-head (NSP, SOP) accuracy of any model over a held-out split;
        most_frequent_label(ds) -> the commonest masked token (the input-blind baseline)

Protocol of the intervals (so two reports are comparable):
- bootstrap_ci: percentile bootstrap over examples (labels and predictions resampled together), through
  scipy.stats.bootstrap(method="percentile", paired=True), n_resamples resamples drawn from
  numpy.random.default_rng(seed). The interval is the (1 - confidence) / 2 and (1 + confidence) / 2
  percentiles of the resampled metric (resamples where the metric is undefined, nan, are left out).
- bootstrap_ci_seeds: one model fine-tuned with k seeds, scored by the mean over seeds (one seed: bootstrap_ci).
  Otherwise each resample draws k seeds and n examples with replacement (default_rng(seed)) and takes the
  mean over the drawn seeds of the metric on the drawn examples; the interval is the percentiles of those
  means, as above.
- paired_bootstrap: two models A and B scored on the same examples after fine-tuning with the same seeds.
  Each resample draws n examples and k seeds with replacement (default_rng(seed)), the same draw for A and
  B, and takes mean over the drawn seeds of metric(A) minus the same for B. Both sources of variance, the
  test sample and the fine-tuning seed, are in the interval. difference is the observed one (all examples,
  mean over seeds); prob_a_better is the share of resamples in which A beats B in the metric's direction
  (lower mse is better); ci95 is the percentile interval at `confidence` (0.95 unless told).
- chance_corrected: (acc - majority) / (teacher - majority), the share of the teacher's gain over always
  answering the majority class that a student keeps. None when the teacher is not clearly above chance:
  its 95% Wilson interval over n test examples includes the majority rate or, without n, it is less than
  CHANCE_MARGIN (0.01) above it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

TaskType = Literal["classification", "regression"]
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "f1", "mcc"),
    "regression": ("pearson", "spearman", "mse"),
}
LOWER_IS_BETTER = frozenset({"mse"})
BINARY_ONLY = frozenset({"f1"})
CHANCE_MARGIN = 0.01  # a teacher less than this above the majority rate is at chance (when n is unknown)


def reported_metrics(task_type: str, num_labels: int | None = None) -> list[str]:
    """The metrics task_metrics returns for this kind of task: f1 and mcc only for binary classification."""
    _check_type(task_type)
    if task_type == "regression":
        return list(METRICS["regression"])
    return list(METRICS["classification"] if num_labels == 2 else ("accuracy", "macro_f1"))


def _check_type(task_type: str) -> None:
    if task_type not in METRICS:
        raise ValueError(f"task_type must be one of {', '.join(METRICS)} (got {task_type!r})")


def _arrays(task_type: str, labels: Any, predictions: Any) -> tuple[np.ndarray, np.ndarray]:
    _check_type(task_type)
    dtype = np.int64 if task_type == "classification" else np.float64
    y, p = np.asarray(labels), np.asarray(predictions)
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"labels and predictions must be 1-d and of the same length (got shapes {y.shape} and "
                         f"{p.shape})")
    if len(y) == 0:
        raise ValueError("no examples to score: labels and predictions are empty")
    if task_type == "classification" and (p.dtype.kind == "f" and not np.all(p == np.round(p))):
        raise ValueError("classification predictions must be class ids (e.g. logits.argmax(-1)), not scores")
    return y.astype(dtype), p.astype(dtype)


def _value(metric: str, y: np.ndarray, p: np.ndarray) -> float:
    """One metric of arrays already checked by _arrays."""
    with warnings.catch_warnings():  # undefined cases (one class, constant input) return 0 or nan by design
        warnings.simplefilter("ignore")
        if metric == "accuracy":
            return float(accuracy_score(y, p))
        if metric == "macro_f1":
            return float(f1_score(y, p, average="macro", zero_division=0))
        if metric == "f1":
            return float(f1_score(y, p, average="binary", pos_label=1, labels=[0, 1], zero_division=0))
        if metric == "mcc":
            return float(matthews_corrcoef(y, p))
        if metric == "pearson":
            return float(stats.pearsonr(y, p).statistic) if len(y) > 1 else float("nan")
        if metric == "spearman":
            return float(stats.spearmanr(y, p).statistic) if len(y) > 1 else float("nan")
        if metric == "mse":
            return float(mean_squared_error(y, p))
    raise AssertionError(metric)  # pragma: no cover - names are checked before


def _check_metric(metric: str, task_type: str) -> None:
    _check_type(task_type)
    if metric not in METRICS[task_type]:
        raise ValueError(f"metric {metric!r} is not a {task_type} metric; use one of {', '.join(METRICS[task_type])}")


def metric_value(metric: str, task_type: str, labels: Any, predictions: Any) -> float:
    """One metric (a name of METRICS[task_type]) of predictions against labels."""
    _check_metric(metric, task_type)
    y, p = _arrays(task_type, labels, predictions)
    if metric in BINARY_ONLY and (y.max(initial=0) > 1 or p.max(initial=0) > 1 or y.min() < 0 or p.min() < 0):
        raise ValueError("f1 is the positive class's F1 of a binary task (labels 0 and 1); use macro_f1")
    return _value(metric, y, p)


def task_metrics(task_type: str, labels: Any, predictions: Any, num_labels: int | None = None) -> dict[str, float]:
    """Every reported metric of the task (see reported_metrics). num_labels None: the largest class id seen
    in labels or predictions, plus one."""
    y, p = _arrays(task_type, labels, predictions)
    if task_type == "classification" and num_labels is None:
        num_labels = int(max(y.max(), p.max())) + 1
    return {m: _value(m, y, p) for m in reported_metrics(task_type, num_labels)}


def bootstrap_ci(labels: Any, predictions: Any, metric: str, task_type: str, n_resamples: int = 1000,
                 seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the metric over examples (see the module docstring)."""
    _check_metric(metric, task_type)
    y, p = _arrays(task_type, labels, predictions)
    with warnings.catch_warnings():  # a degenerate distribution (e.g. every answer right) is a valid answer
        warnings.simplefilter("ignore")
        res = stats.bootstrap((y, p), lambda a, b: _value(metric, a, b), paired=True, vectorized=False,
                              n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                              rng=np.random.default_rng(seed))
        dist = res.bootstrap_distribution
        if np.isnan(dist).any():  # scipy's percentiles would be nan
            return _percentiles(dist, confidence)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _per_seed(task_type: str, labels: Any, predictions: Sequence[Any], what: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions as a seeds x examples array), every seed's predictions checked against labels."""
    if len(predictions) == 0:
        raise ValueError(f"{what} needs one prediction array per fine-tuning seed (got none)")
    y = _arrays(task_type, labels, predictions[0])[0]
    return y, np.stack([_arrays(task_type, labels, p)[1] for p in predictions])


def _joint_resamples(k: int, n: int, n_resamples: int, seed: int):
    """(seed rows, example columns) of each resample: k of k seeds and n of n examples, with replacement."""
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        yield rng.integers(0, k, k), rng.integers(0, n, n)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    low, high = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def bootstrap_ci_seeds(labels: Any, predictions: Sequence[Any], metric: str, task_type: str,
                       n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the seed-averaged metric: predictions[i] is seed i's on the examples of labels.
    One seed: bootstrap_ci. Several: examples and seeds resampled jointly (see the module docstring)."""
    if len(predictions) == 1:
        return bootstrap_ci(labels, predictions[0], metric, task_type, n_resamples, seed, confidence)
    _check_metric(metric, task_type)
    y, p = _per_seed(task_type, labels, predictions, "bootstrap_ci_seeds")
    k, n = p.shape
    means = [np.mean([_value(metric, y[cols], p[s, cols]) for s in rows])
             for rows, cols in _joint_resamples(k, n, n_resamples, seed)]
    return _percentiles(np.asarray(means, dtype=np.float64), confidence)


def paired_bootstrap(labels: Any, preds_a: Sequence[Any], preds_b: Sequence[Any], metric: str, task_type: str,
                     n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                     seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """A minus B in the metric, resampling examples and fine-tuning seeds jointly (see the module docstring).
    preds_a[i] and preds_b[i] are the predictions of fine-tuning seed i (seeds[i] when given) on the same
    examples as labels. Returns difference, ci95 [low, high], confidence, prob_a_better, n_resamples, seeds."""
    _check_metric(metric, task_type)
    if len(preds_a) != len(preds_b) or not len(preds_a):
        raise ValueError(f"preds_a and preds_b need one prediction array per fine-tuning seed, the same seeds for "
                         f"both (got {len(preds_a)} and {len(preds_b)})")
    if seeds is not None and len(seeds) != len(preds_a):
        raise ValueError(f"seeds names {len(seeds)} seeds but there are {len(preds_a)} prediction arrays")
    y, a = _per_seed(task_type, labels, preds_a, "paired_bootstrap")
    b = _per_seed(task_type, labels, preds_b, "paired_bootstrap")[1]
    k, n = a.shape

    def mean_difference(rows: np.ndarray, cols: np.ndarray) -> float:
        ya = y[cols]
        return float(np.mean([_value(metric, ya, a[s, cols]) - _value(metric, ya, b[s, cols]) for s in rows]))

    observed = mean_difference(np.arange(k), np.arange(n))
    diffs = np.array([mean_difference(rows, cols) for rows, cols in _joint_resamples(k, n, n_resamples, seed)])
    low, high = _percentiles(diffs, confidence)
    diffs = diffs[~np.isnan(diffs)]
    better = diffs < 0 if metric in LOWER_IS_BETTER else diffs > 0
    return {"difference": observed, "ci95": [low, high], "confidence": confidence,
            "prob_a_better": float(better.mean()) if len(diffs) else float("nan"),
            "n_resamples": n_resamples, "seeds": list(seeds) if seeds is not None else list(range(k))}


def predicted_class_share(predictions: Any, num_labels: int) -> float:
    """The largest share of the predictions that went to one class (1.0: every answer the same class)."""
    p = np.asarray(predictions, dtype=np.int64)
    if len(p) == 0:
        raise ValueError("no predictions to count")
    return float(np.bincount(p, minlength=num_labels).max() / len(p))


def collapsed(predictions: Any, num_labels: int, threshold: float = 0.95) -> bool:
    """True when at least `threshold` of the predictions are one class: the model (nearly) always gives the
    same answer. On a task whose majority class is itself above the threshold, raise the threshold."""
    return predicted_class_share(predictions, num_labels) >= threshold


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound near 0 and 1, unlike the normal approximation), from
    scipy.stats.binomtest; counts are rounded to whole numbers. (0, 1) when n is 0."""
    n_int = int(round(n))
    if n_int <= 0:
        return 0.0, 1.0
    k = min(max(int(round(successes)), 0), n_int)
    ci = stats.binomtest(k, n_int).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def chance_corrected(accuracy: float, majority: float, teacher_accuracy: float, n: int | None = None) -> float | None:
    """(accuracy - majority) / (teacher_accuracy - majority): the share of the teacher's gain over the majority
    class kept. None when the teacher is at chance (see the module docstring; n = test examples)."""
    if n:
        low, _ = wilson_interval(teacher_accuracy * n, n)
        at_chance = low <= majority
    else:
        at_chance = teacher_accuracy - majority < CHANCE_MARGIN
    return None if at_chance else (accuracy - majority) / (teacher_accuracy - majority)



# ------------------------------------------------------------------------------------------------
# masked LM and sentence-pair heads, over a held-out split (the teacher, the students, the report)
# ------------------------------------------------------------------------------------------------
# (mlm_logits (n, V), mlm_labels (n,), pair_logits (B, 2) or None) of a padded batch: every scorer below
# takes the model's own `predict`, so one loop scores BERT, DistilBERT and ALBERT the same way.
MaskedLMPredict = Callable[[dict[str, Any]], tuple[Any, Any, Any]]


def masked_lm_predictor(model, family: str) -> MaskedLMPredict:
    """A `predict` for score_pretraining: the masked LM head of a BERT, DistilBERT or ALBERT (`family`)
    run only at the labelled positions, and the model's sentence-pair head (NSP, SOP; DistilBERT has none)."""
    from models.bert import IGNORE_INDEX
    from models.distilbert import mlm_head

    def predict(batch: dict[str, Any]):
        where = batch["labels"] != IGNORE_INDEX
        if family == "distilbert":
            hidden = model.distilbert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      return_dict=True).last_hidden_state
            return mlm_head(model, hidden[where]), batch["labels"][where], None
        out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"], return_dict=True)
        hidden = out.last_hidden_state[where]
        if family == "bert":
            return (model.cls.predictions(hidden), batch["labels"][where],
                    model.cls.seq_relationship(out.pooler_output))
        return model.predictions(hidden), batch["labels"][where], model.sop_classifier(out.pooler_output)

    return predict


@dataclass
class PretrainingTotals:
    """Sums over a split: masked tokens, correct ones and their summed cross-entropy; pairs, correct
    pair-head answers and positive pair labels; masked tokens equal to a baseline token."""

    masked: float = 0.0
    correct: float = 0.0
    ce: float = 0.0
    pairs: float = 0.0
    pair_correct: float = 0.0
    positive: float = 0.0
    baseline: float = 0.0
    has_pair_head: bool = False

    @property
    def mlm_accuracy(self) -> float:
        return self.correct / max(self.masked, 1.0)

    @property
    def mlm_loss(self) -> float:
        return self.ce / max(self.masked, 1.0)

    @property
    def mlm_perplexity(self) -> float:
        return float(np.exp(self.mlm_loss))

    @property
    def pair_accuracy(self) -> float:
        return self.pair_correct / max(self.pairs, 1.0)

    @property
    def majority_accuracy(self) -> float:
        """What always answering the more frequent pair label scores: the chance level to beat (a small
        validation split is rarely exactly half swapped)."""
        return max(self.positive, self.pairs - self.positive) / max(self.pairs, 1.0)

    @property
    def baseline_accuracy(self) -> float:
        return self.baseline / max(self.masked, 1.0)


def score_pretraining(model, predict: MaskedLMPredict, ds, collate, batch_size: int, rt, *,
                      pair_label: str | None, length_column: str = "length", with_mlm: bool = True,
                      baseline_token: int | None = None) -> PretrainingTotals:
    """Masked LM accuracy, loss and perplexity over every masked token of `ds` (with_mlm) and the pair
    head's accuracy over every example (when `predict` gives pair logits; pair_label: the batch's column
    of pair labels, None for a model without a pair head). Under torchrun every rank must call it: each
    scores every world_size-th batch and the sums are all-reduced. Batches are length-bucketed
    in a fixed order; the model is left in the mode it was in. With baseline_token: how often the masked
    token is that token (the accuracy of a predictor that ignores its input)."""
    import torch
    import torch.nn.functional as F

    from models.bert import IGNORE_INDEX
    from tasks import engine

    totals = PretrainingTotals()
    was_training = model.training
    model.eval()
    batches = engine.length_bucketed_batches(np.asarray(ds[length_column]), batch_size, seed=0, epoch=0)
    with torch.no_grad(), rt.autocast():
        for idx in batches[rt.rank::rt.world_size]:  # under torchrun each rank scores its share
            batch = {k: v.to(rt.device) for k, v in collate(ds[idx]).items()}
            if not with_mlm:
                batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)  # no vocabulary projection
            logits, labels, pair_logits = predict(batch)
            if with_mlm:
                totals.masked += labels.numel()
                totals.correct += (logits.argmax(-1) == labels).sum().item()
                totals.ce += F.cross_entropy(logits.float(), labels, reduction="sum").item()
                if baseline_token is not None:
                    totals.baseline += (labels == baseline_token).sum().item()
            totals.pairs += len(idx)
            if pair_label is not None:
                totals.positive += batch[pair_label].sum().item()
            if pair_logits is not None:
                totals.has_pair_head = True
                totals.pair_correct += (pair_logits.argmax(-1) == batch[pair_label]).sum().item()
    model.train(was_training)
    if rt.distributed:
        totals = _all_reduced(totals, rt.device)
    return totals


def _all_reduced(totals: PretrainingTotals, device) -> PretrainingTotals:
    """The sums of every rank's share (the same on every rank)."""
    import torch
    import torch.distributed as dist

    names = ("masked", "correct", "ce", "pairs", "pair_correct", "positive", "baseline", "has_pair_head")
    values = torch.tensor([float(getattr(totals, n)) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    summed = dict(zip(names, values.tolist(), strict=True))
    return PretrainingTotals(**{n: summed[n] for n in names[:-1]}, has_pair_head=summed["has_pair_head"] > 0)


def most_frequent_label(ds, view: str = "nsp") -> int:
    """The masked-LM label a predictor that ignores its input would always answer (fit on `ds`, a pairs
    split: tasks.pairs.outputs.PairsSplit)."""
    counts = ds.label_counts(view)
    return int(np.argmax(counts)) if counts.sum() else -1


def masked_lm_metrics(totals: PretrainingTotals, pair_task: str = "nsp", with_baseline: bool = False) -> dict[str, float]:
    """The validation metrics the training stages log: val_mlm_accuracy / perplexity / loss and the
    masked tokens they are over (val_mlm_tokens, for an interval), the pair
    head's val_<pair_task>_accuracy when the model has one, and the commonest-token baseline."""
    metrics = {"val_mlm_accuracy": totals.mlm_accuracy, "val_mlm_perplexity": totals.mlm_perplexity,
               "val_mlm_loss": totals.mlm_loss, "val_mlm_tokens": totals.masked}
    if totals.has_pair_head:
        metrics[f"val_{pair_task}_accuracy"] = totals.pair_accuracy
    if with_baseline:
        metrics["baseline_mlm_accuracy"] = totals.baseline_accuracy
    return metrics
