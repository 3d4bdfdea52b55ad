"""tasks/scoring.py: each metric against values worked out by hand, the bootstrap intervals' behaviour, the
paired comparison over examples and seeds, collapse detection and the chance-corrected score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks import scoring
from tasks.albert import build as albert
from tasks.scoring import (
    bootstrap_ci,
    bootstrap_ci_seeds,
    chance_corrected,
    collapsed,
    metric_value,
    paired_bootstrap,
    predicted_class_share,
    task_metrics,
    wilson_interval,
)

# A binary confusion matrix, TP 4, FN 1, FP 2, TN 3 (label 1 is positive):
BIN_LABELS = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
BIN_PREDS = [1, 1, 1, 1, 0, 1, 1, 0, 0, 0]


def test_binary_classification_metrics_by_hand() -> None:
    m = task_metrics("classification", BIN_LABELS, BIN_PREDS, num_labels=2)
    assert list(m) == ["accuracy", "macro_f1", "f1", "mcc"]
    assert m["accuracy"] == pytest.approx(7 / 10)  # (TP + TN) / n
    assert m["f1"] == pytest.approx(8 / 11)  # 2TP / (2TP + FP + FN) = 8 / 11
    # negative class: 2TN / (2TN + FN + FP) = 6 / 9; macro = mean of the two
    assert m["macro_f1"] == pytest.approx((8 / 11 + 6 / 9) / 2)
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(6 * 5 * 5 * 4)
    assert m["mcc"] == pytest.approx(10 / math.sqrt(600))
    # num_labels inferred from the ids seen: the same four metrics
    assert task_metrics("classification", BIN_LABELS, BIN_PREDS) == m


def test_multiclass_macro_f1_by_hand() -> None:
    labels, preds = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    m = task_metrics("classification", labels, preds, num_labels=3)
    assert list(m) == ["accuracy", "macro_f1"]  # f1 / mcc only for binary tasks
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 0: TP 1 FP 1 FN 1 -> 2/4; class 1: TP 2 FP 1 FN 0 -> 4/5; class 2: TP 1 FP 0 FN 1 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="f1 is the positive class's F1 of a binary task"):
        metric_value("f1", "classification", labels, preds)


def test_regression_metrics_by_hand() -> None:
    # x = 1..4, y = 1, 3, 2, 4: deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5):
    # cov sum 4, each variance sum 5 -> r = 4 / 5; the ranks are the values -> Spearman also 0.8
    m = task_metrics("regression", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert list(m) == ["pearson", "spearman", "mse"]
    assert m["pearson"] == pytest.approx(0.8) and m["spearman"] == pytest.approx(0.8)
    assert m["mse"] == pytest.approx(0.5)  # (0 + 1 + 1 + 0) / 4
    # y = x^2: monotone (Spearman 1) but not linear: y deviations (-6.5, -3.5, 1.5, 8.5), cov sum 25,
    # variance sums 5 and 129 -> r = 25 / sqrt(645)
    m = task_metrics("regression", [1, 2, 3, 4], [1, 4, 9, 16])
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] == pytest.approx(25 / math.sqrt(645))
    assert math.isnan(task_metrics("regression", [1, 2, 3], [2, 2, 2])["pearson"])  # a constant prediction


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="'pearson' is not a classification metric; use one of accuracy"):
        metric_value("pearson", "classification", [0, 1], [0, 1])
    with pytest.raises(ValueError, match="task_type must be one of classification, regression"):
        task_metrics("ranking", [0, 1], [0, 1])
    with pytest.raises(ValueError, match="same length"):
        task_metrics("classification", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="class ids"):
        task_metrics("classification", [0, 1], [0.2, 0.9])
    with pytest.raises(ValueError, match="one prediction array per fine-tuning seed"):
        paired_bootstrap([0, 1], [[0, 1]], [], "accuracy", "classification")


def pattern(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n binary labels and predictions that are right on 4 examples of every 5 (accuracy exactly 0.8)."""
    labels = np.arange(n) % 2
    preds = np.where(np.arange(n) % 5 == 0, 1 - labels, labels)
    return labels, preds


def test_bootstrap_ci_holds_the_estimate_and_narrows_with_more_examples() -> None:
    widths = {}
    for n in (50, 2000):
        labels, preds = pattern(n)
        low, high = bootstrap_ci(labels, preds, "accuracy", "classification", n_resamples=500, seed=0)
        assert low < 0.8 < high
        widths[n] = high - low
    assert widths[2000] < widths[50] / 3  # about sqrt(40) ~ 6x narrower
    # The same seed gives the same interval; the regression metrics work too.
    labels, preds = pattern(200)
    assert bootstrap_ci(labels, preds, "mcc", "classification", 200, 5) == bootstrap_ci(
        labels, preds, "mcc", "classification", 200, 5)
    x = np.linspace(0, 1, 200)
    y = x + np.random.default_rng(0).normal(0, 0.1, 200)
    low, high = bootstrap_ci(x, y, "pearson", "regression", n_resamples=300)
    assert low < metric_value("pearson", "regression", x, y) < high <= 1.0


def noisy(labels: np.ndarray, right: float, rng: np.random.Generator) -> np.ndarray:
    """Predictions right with probability `right`."""
    return np.where(rng.random(len(labels)) < right, labels, 1 - labels)


def test_paired_bootstrap_separates_a_better_model_from_an_equal_one() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    good = [noisy(labels, 0.9, rng) for _ in range(3)]
    poor = [noisy(labels, 0.6, rng) for _ in range(3)]
    res = paired_bootstrap(labels, good, poor, "accuracy", "classification", n_resamples=300, seeds=[1, 2, 3])
    observed = np.mean([(g == labels).mean() - (p == labels).mean() for g, p in zip(good, poor, strict=True)])
    assert res["difference"] == pytest.approx(observed)
    assert 0 < res["ci95"][0] < res["difference"] < res["ci95"][1] and res["prob_a_better"] > 0.99
    assert res["n_resamples"] == 300 and res["seeds"] == [1, 2, 3] and res["confidence"] == 0.95

    same = paired_bootstrap(labels, good, good, "accuracy", "classification", n_resamples=100)
    assert same["difference"] == 0 and same["ci95"][0] <= 0 <= same["ci95"][1] and same["seeds"] == [0, 1, 2]
    other = [noisy(labels, 0.9, rng) for _ in range(3)]  # as good, other mistakes
    tie = paired_bootstrap(labels, good, other, "accuracy", "classification", n_resamples=300)
    assert tie["ci95"][0] < 0 < tie["ci95"][1] and 0.05 < tie["prob_a_better"] < 0.95

    # mse: lower is better, so the model with the smaller errors is the better one
    x = np.linspace(0, 1, 200)
    close = [x + rng.normal(0, 0.05, 200) for _ in range(2)]
    far = [x + rng.normal(0, 0.5, 200) for _ in range(2)]
    res = paired_bootstrap(x, close, far, "mse", "regression", n_resamples=200)
    assert res["difference"] < 0 and res["ci95"][1] < 0 and res["prob_a_better"] > 0.99


def test_paired_bootstrap_resamples_the_seeds_too() -> None:
    """A model whose seeds disagree (one run good, one poor) gets a wider interval than a steady one with
    the same mean: the seeds' spread is part of the uncertainty."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    base = [noisy(labels, 0.6, rng) for _ in range(2)]
    steady = [noisy(labels, 0.7, rng) for _ in range(2)]
    varied = [noisy(labels, 0.9, rng), noisy(labels, 0.5, rng)]
    width = {name: np.diff(paired_bootstrap(labels, preds, base, "accuracy", "classification",
                                            n_resamples=300)["ci95"])[0]
             for name, preds in (("steady", steady), ("varied", varied))}
    assert width["varied"] > 2 * width["steady"]


def test_bootstrap_ci_seeds_holds_the_seed_mean_and_widens_with_seed_spread() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    steady = [noisy(labels, 0.7, rng) for _ in range(3)]
    varied = [noisy(labels, 0.9, rng), noisy(labels, 0.7, rng), noisy(labels, 0.5, rng)]
    width = {}
    for name, preds in (("steady", steady), ("varied", varied)):
        mean = np.mean([(p == labels).mean() for p in preds])
        low, high = bootstrap_ci_seeds(labels, preds, "accuracy", "classification", n_resamples=300)
        assert low < mean < high
        width[name] = high - low
    assert width["varied"] > 2 * width["steady"]
    # one seed: the examples-only interval
    assert bootstrap_ci_seeds(labels, steady[:1], "accuracy", "classification", 200, 3) == bootstrap_ci(
        labels, steady[0], "accuracy", "classification", 200, 3)


def test_collapse_detection() -> None:
    assert predicted_class_share([0, 0, 1, 2], 3) == pytest.approx(0.5)
    almost_one_class = [0] * 98 + [1, 1]
    assert predicted_class_share(almost_one_class, 2) == pytest.approx(0.98)
    assert collapsed(almost_one_class, 2) and not collapsed(almost_one_class, 2, threshold=0.99)
    assert not collapsed([0, 1] * 50, 2) and collapsed([2] * 10, 3)


def test_chance_corrected_and_wilson() -> None:
    assert chance_corrected(0.8, 0.5, 0.9) == pytest.approx((0.8 - 0.5) / (0.9 - 0.5))
    assert chance_corrected(0.5, 0.5, 0.9) == 0.0
    assert chance_corrected(0.8, 0.5, 0.505) is None  # less than CHANCE_MARGIN above the majority rate
    assert chance_corrected(0.8, 0.6, 0.55) is None  # the teacher below the majority class
    # 55 of 100 right: the Wilson interval (about 0.45 to 0.64) holds 0.5, so the teacher is at chance;
    # 5500 of 10000 (about 0.540 to 0.560) does not.
    assert chance_corrected(0.52, 0.5, 0.55, n=100) is None
    assert chance_corrected(0.52, 0.5, 0.55, n=10_000) == pytest.approx(0.02 / 0.05)
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half-width 1.96 / 1.0384 * sqrt(0.0025 + 0.000096) = 0.0962
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert albert.wilson_interval is scoring.wilson_interval  # still importable from its old home
