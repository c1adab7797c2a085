"""Bootstrap confidence intervals that respect near-duplicate groups.

Resampling single images would treat rotated copies of one original as
independent evidence and make intervals too narrow; whole groups are
resampled instead (the cluster bootstrap), and percentile intervals reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.card import ConfidenceIntervals, Interval

METHOD = "percentile bootstrap, resampling near-duplicate groups"


def _weighted_scores(
    weights: np.ndarray, labels: np.ndarray, predicted: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy (R,), macro-F1 (R,) and recall (R, K) for R rows of per-image weights."""
    correct = (labels == predicted).astype(float)
    total = weights.sum(axis=1)
    accuracy = (weights @ correct) / total
    recalls, f1s = [], []
    for k in range(n_classes):
        true_positive = weights @ (correct * (labels == k))
        actual = weights @ (labels == k).astype(float)
        claimed = weights @ (predicted == k).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(actual > 0, true_positive / actual, np.nan)
            precision = np.where(claimed > 0, true_positive / claimed, 0.0)
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        recalls.append(recall)
        f1s.append(np.nan_to_num(f1))
    return accuracy, np.mean(f1s, axis=0), np.stack(recalls, axis=1)


def bootstrap_intervals(
    labels: np.ndarray,
    probabilities: np.ndarray,
    groups: np.ndarray,
    class_names: Sequence[str],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> ConfidenceIntervals:
    """Percentile intervals for accuracy, macro-F1 and per-class recall, resampling groups."""
    labels = np.asarray(labels, np.int64)
    predicted = probabilities.argmax(axis=1)
    unique, group_index = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(unique), size=(resamples, len(unique)))
    group_weights = np.stack([np.bincount(row, minlength=len(unique)) for row in drawn]).astype(float)
    image_weights = group_weights[:, group_index]  # each image counts as often as its group was drawn

    point = _weighted_scores(np.ones((1, len(labels))), labels, predicted, len(class_names))
    samples = _weighted_scores(image_weights, labels, predicted, len(class_names))
    tail = (1 - level) / 2 * 100

    def interval(estimate: float, draws: np.ndarray) -> Interval:
        low, high = np.nanpercentile(draws, [tail, 100 - tail])
        return Interval(estimate=float(estimate), low=float(low), high=float(high))

    return ConfidenceIntervals(
        method=METHOD,
        accuracy=interval(point[0][0], samples[0]),
        macro_f1=interval(point[1][0], samples[1]),
        recall={name: interval(point[2][0, k], samples[2][:, k]) for k, name in enumerate(class_names)},
        resamples=resamples,
        level=level,
    )
