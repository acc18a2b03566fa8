"""pipeline/core/metrics.py against hand-computed values and naive formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core.metrics import _average_ranks, compute_metrics, matthews_corrcoef, pearson, spearman
from pipeline.core.tasks import get_task


def _logits(classes: list[int], num_classes: int = 2) -> np.ndarray:
    out = np.zeros((len(classes), num_classes), dtype=np.float32)
    out[np.arange(len(classes)), classes] = 1.0
    return out


def _naive_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _naive_ranks(x: list[float]) -> list[float]:
    # rank = 1 + number strictly smaller + (number of equal others) / 2 : the average rank of a tie.
    return [1 + sum(o < v for o in x) + (sum(o == v for o in x) - 1) / 2 for v in x]


def test_mcc_hand_value() -> None:
    # labels 1 1 1 0 0 0, preds 1 1 0 0 0 1 -> TP=2 TN=2 FP=1 FN=1: (4-1)/sqrt(3*3*3*3) = 1/3
    out = compute_metrics(get_task("cola"), _logits([1, 1, 0, 0, 0, 1]), np.array([1, 1, 1, 0, 0, 0]))
    assert out == {"mcc": pytest.approx(1 / 3)}


def test_mcc_binary_formula_on_random_data() -> None:
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    tp = np.sum((preds == 1) & (labels == 1))
    tn = np.sum((preds == 0) & (labels == 0))
    fp = np.sum((preds == 1) & (labels == 0))
    fn = np.sum((preds == 0) & (labels == 1))
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(preds, labels) == pytest.approx(expected)


def test_mcc_extremes() -> None:
    labels = np.array([0, 1, 0, 1, 1])
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
    assert matthews_corrcoef(np.ones(5, dtype=int), labels) == 0.0  # constant prediction: undefined -> 0


def test_accuracy_argmax_of_logits() -> None:
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.5, 0.2]])
    assert compute_metrics(get_task("mnli"), logits, np.array([1, 0, 1, 2])) == {"accuracy": 0.5}
    assert compute_metrics(get_task("sst2"), np.array([1, 0, 1]), np.array([1, 1, 1])) == {
        "accuracy": pytest.approx(2 / 3)}


def test_f1_accuracy_hand_value() -> None:
    # labels 1 1 1 1 0 0, preds 1 1 0 0 1 0: TP=2 FP=1 FN=2 -> P=2/3, R=1/2, F1=4/7; accuracy 3/6
    out = compute_metrics(get_task("mrpc"), _logits([1, 1, 0, 0, 1, 0]), np.array([1, 1, 1, 1, 0, 0]))
    assert out == {"f1": pytest.approx(4 / 7), "accuracy": pytest.approx(0.5)}
    none_positive = compute_metrics(get_task("qqp"), _logits([0, 0]), np.array([1, 0]))
    assert none_positive == {"f1": 0.0, "accuracy": 0.5}


def test_pearson_spearman_hand_values() -> None:
    task = get_task("stsb")
    out = compute_metrics(task, np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([2.0, 4.0, 6.0, 9.0]))
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] == pytest.approx(_naive_pearson([1, 2, 3, 4], [2, 4, 6, 9]))
    assert set(out) == {"pearson", "spearman"}
    # x = 1 2 3, y = 3 1 2: ranks d = (-2, 1, 1), sum d^2 = 6 -> rho = 1 - 6*6/(3*8) = -0.5
    out = compute_metrics(task, np.array([1.0, 2.0, 3.0]), np.array([3.0, 1.0, 2.0]))
    assert out["spearman"] == pytest.approx(-0.5) and out["pearson"] == pytest.approx(-0.5)


def test_average_ranks_with_ties() -> None:
    values = np.array([10.0, 20.0, 10.0, 30.0, 20.0, 20.0])
    assert _average_ranks(values).tolist() == [1.5, 4.0, 1.5, 6.0, 4.0, 4.0]


def test_spearman_with_ties_matches_naive() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 60).astype(float)  # many ties
    y = (x + rng.integers(0, 3, 60)).astype(float)
    expected = _naive_pearson(_naive_ranks(x.tolist()), _naive_ranks(y.tolist()))
    assert spearman(x, y) == pytest.approx(expected)
    assert pearson(x, y) == pytest.approx(_naive_pearson(x.tolist(), y.tolist()))


def test_constant_regression_prediction_scores_zero() -> None:
    out = compute_metrics(get_task("stsb"), np.full(4, 2.5), np.array([0.0, 1.0, 2.0, 3.0]))
    assert out == {"pearson": 0.0, "spearman": 0.0}


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="predictions but"):
        compute_metrics(get_task("sst2"), _logits([1, 0]), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, 1\)"):
        compute_metrics(get_task("stsb"), np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="logits"):
        compute_metrics(get_task("sst2"), np.array([0.2, 0.9]), np.array([0, 1]))
