"""Binary classification metrics without extra dependencies."""

from __future__ import annotations

import numpy as np

__all__ = ["roc_auc", "roc_curve", "threshold_metrics"]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with midranks for ties); NaN if one class."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # midranks: equal scores share the mean of their positions
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    midranks = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(midranks, counts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates over all thresholds, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    hits = labels[order]
    tpr = np.concatenate([[0.0], np.cumsum(hits) / max(hits.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(~hits) / max((~hits).sum(), 1)])
    return fpr, tpr


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Sensitivity, specificity, balanced accuracy and F1 at one threshold."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) >= threshold
    tp = float((predicted & labels).sum())
    tn = float((~predicted & ~labels).sum())
    fp = float((predicted & ~labels).sum())
    fn = float((~predicted & labels).sum())
    sensitivity = tp / (tp + fn) if tp + fn else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * sensitivity / (precision + sensitivity) if precision + sensitivity else 0.0
    return {
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "f1": f1,
    }
