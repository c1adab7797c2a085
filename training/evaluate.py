"""Clinical evaluation: per-class recall and false-negative rate, AUC, calibration.

Metrics are computed with NumPy from the true labels and predicted
probabilities; :mod:`training.report` writes them out.
"""

from __future__ import annotations

import numpy as np

from models.card import ClassMetrics, TestMetrics
from training.calibration import reliability_bins


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def binary_roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney U statistic (ties count one half).

    Returns None when only one class is present (AUC is undefined).
    """
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    start = 0
    for end in range(1, len(scores) + 1):
        if end == len(scores) or sorted_scores[end] != sorted_scores[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold, from (0, 0) to (1, 1)."""
    positive = positive.astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, hits = scores[order], positive[order]
    last_of_tie = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(scores) - 1]
    true_positives = np.cumsum(hits)[last_of_tie]
    false_positives = np.cumsum(~hits)[last_of_tie]
    tpr = np.r_[0.0, true_positives / max(int(positive.sum()), 1)]
    fpr = np.r_[0.0, false_positives / max(int((~positive).sum()), 1)]
    return fpr, tpr


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """ECE: the count-weighted gap between confidence and accuracy over confidence bins."""
    binned = reliability_bins(np.asarray(y_true), probabilities, bins)
    filled = binned.count > 0
    weights = binned.count[filled] / binned.count.sum()
    return float(np.sum(weights * np.abs(binned.accuracy[filled] - binned.confidence[filled])))


def _safe_ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def compute_metrics(y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> TestMetrics:
    """All test metrics the model card carries."""
    n = len(class_names)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, n)
    per_class: dict[str, ClassMetrics] = {}
    aucs: list[float] = []
    for k, name in enumerate(class_names):
        tp = matrix[k, k]
        fn = matrix[k].sum() - tp
        fp = matrix[:, k].sum() - tp
        precision = _safe_ratio(tp, tp + fp)
        recall = _safe_ratio(tp, tp + fn)
        auc = binary_roc_auc(y_true == k, probabilities[:, k])
        if auc is not None:
            aucs.append(auc)
        per_class[name] = ClassMetrics(
            precision=precision,
            recall=recall,
            f1=_safe_ratio(2 * precision * recall, precision + recall),
            false_negative_rate=_safe_ratio(fn, tp + fn),
            support=int(tp + fn),
            roc_auc=auc,
        )
    return TestMetrics(
        n_images=len(y_true),
        accuracy=float((y_pred == y_true).mean()),
        macro_f1=float(np.mean([m.f1 for m in per_class.values()])),
        macro_roc_auc=float(np.mean(aucs)) if aucs else None,
        per_class=per_class,
        confusion_matrix=matrix.tolist(),
        expected_calibration_error=expected_calibration_error(y_true, probabilities),
    )
