"""GLUE metrics in numpy: MCC, accuracy, binary F1, Pearson and Spearman."""

from __future__ import annotations

import numpy as np

from pipeline.core.tasks import TaskSpec


def compute_metrics(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Predictions are logits (N, C) or class ids (N,) for classification, scores (N,) or (N, 1) for regression."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels).reshape(-1)
    if task.is_regression:
        scores = predictions.reshape(len(predictions), -1)
        if scores.shape[1] != 1:
            raise ValueError(f"regression predictions must be (N,) or (N, 1), got {predictions.shape}")
        return _check_and_score(task.metric, scores[:, 0].astype(np.float64), labels.astype(np.float64))
    if predictions.ndim == 2:
        classes = predictions.argmax(axis=1)
    elif predictions.ndim == 1 and np.issubdtype(predictions.dtype, np.integer):
        classes = predictions
    else:
        raise ValueError(f"classification predictions must be logits (N, C) or int ids (N,), got {predictions.shape}")
    return _check_and_score(task.metric, classes.astype(np.int64), labels.astype(np.int64))


def _check_and_score(metric: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no examples to score")
    if metric == "mcc":
        return {"mcc": matthews_corrcoef(preds, labels)}
    if metric == "accuracy":
        return {"accuracy": accuracy(preds, labels)}
    if metric == "f1_accuracy":
        return {"f1": binary_f1(preds, labels), "accuracy": accuracy(preds, labels)}
    if metric == "pearson_spearman":
        return {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels)}
    raise ValueError(f"unknown metric {metric!r}")


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Multiclass MCC (Gorodkin) from the confusion matrix; equals the binary formula for 2 classes.

    0.0 when a side is constant (the denominator vanishes), as sklearn does, so a collapsed
    model scores 0 rather than NaN during model selection.
    """
    n_classes = int(max(preds.max(), labels.max())) + 1
    confusion = np.zeros((n_classes, n_classes), dtype=np.float64)  # rows: true, cols: predicted
    np.add.at(confusion, (labels, preds), 1.0)
    t = confusion.sum(axis=1)  # times each class truly occurred
    p = confusion.sum(axis=0)  # times each class was predicted
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt(s * s - p @ p) * np.sqrt(s * s - t @ t)
    return 0.0 if denominator == 0 else float((c * s - t @ p) / denominator)


def binary_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class 1; 0.0 when it is never predicted and never true."""
    tp = float(np.sum((preds == 1) & (labels == 1)))
    fp = float(np.sum((preds == 1) & (labels != 1)))
    fn = float(np.sum((preds != 1) & (labels == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; 0.0 when either side is constant (r is undefined there; NaN would break model selection)."""
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return 0.0 if denominator == 0 else float(np.clip(np.sum(dx * dy) / denominator, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of the ranks, tied values sharing their average rank."""
    return pearson(_average_ranks(x), _average_ranks(y))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; a run of equal values gets the mean of the ranks it spans."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    run_of = np.cumsum(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) - 1
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = run_rank[run_of]
    return ranks
