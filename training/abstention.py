"""Abstention: below a confidence threshold the service answers `uncertain`.

The threshold is chosen on the VALIDATION split: the lowest one (so the most
images keep an answer) at which every cancer class's false-negative rate among
the answered images is at most the target. Images under the threshold go to a
pathologist, so the misses that count are the confident ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Classes that mean "no disease" in the layouts we know (LC25000 lung and colon,
# the 4-class brain-MRI set); every other class is a disease class whose misses matter.
KNOWN_NEGATIVE_CLASSES = frozenset({"lung_n", "colon_n", "notumor", "no_tumor", "normal", "benign"})


def cancer_classes(class_names: Sequence[str], negative: Sequence[str] | None = None) -> list[str]:
    """The disease classes: all but the negative ones (given, or recognised by name)."""
    negatives = set(negative) if negative is not None else KNOWN_NEGATIVE_CLASSES
    unknown = set(negative or ()) - set(class_names)
    if unknown:
        raise ValueError(f"negative classes {sorted(unknown)} are not among {list(class_names)}")
    return [name for name in class_names if name not in negatives]


@dataclass(frozen=True)
class SelectiveResult:
    """What a threshold does to one split."""

    threshold: float
    coverage: float  # share of images answered (confidence >= threshold)
    false_negative_rate: dict[str, float]  # per cancer class, among its answered images

    def worst_fnr(self) -> float:
        return max(self.false_negative_rate.values(), default=0.0)


def selective_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    class_names: Sequence[str],
    cancer: Sequence[str],
) -> SelectiveResult:
    """Coverage and each cancer class's FNR among images answered at `threshold`."""
    answered = probabilities.max(axis=1) >= threshold
    predicted = probabilities.argmax(axis=1)
    rates: dict[str, float] = {}
    for name in cancer:
        k = class_names.index(name)
        of_class = answered & (labels == k)
        rates[name] = float((predicted[of_class] != k).mean()) if of_class.any() else 0.0
    return SelectiveResult(float(threshold), float(answered.mean()) if len(labels) else 0.0, rates)


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold and how it did on validation."""

    validation: SelectiveResult
    target_met: bool

    @property
    def threshold(self) -> float:
        return self.validation.threshold


def choose_threshold(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    cancer: Sequence[str],
    fnr_target: float,
    minimum: float = 0.5,
) -> ThresholdChoice:
    """The lowest threshold >= `minimum` whose cancer-class FNRs on these labels are <= `fnr_target`.

    When no threshold that still answers something meets the target, the one
    with the lowest worst-class FNR is returned with ``target_met=False``.
    """
    confidence = probabilities.max(axis=1)
    candidates = np.unique(np.concatenate([[minimum], confidence[confidence >= minimum]]))
    results = [selective_metrics(labels, probabilities, t, class_names, cancer) for t in candidates]
    for result in results:  # ascending thresholds: the first that meets the target answers the most
        if result.worst_fnr() <= fnr_target:
            return ThresholdChoice(result, target_met=True)
    answering = [r for r in results if r.coverage > 0] or results
    best = min(answering, key=lambda r: (r.worst_fnr(), r.threshold))
    logger.warning(
        "no threshold meets the FNR target %.3f on validation; using %.3f (worst FNR %.3f)",
        fnr_target,
        best.threshold,
        best.worst_fnr(),
    )
    return ThresholdChoice(best, target_met=False)


def risk_coverage(
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    cancer: Sequence[str],
    points: int = 21,
) -> list[dict[str, float]]:
    """Error rate and worst cancer-class FNR among answered images as coverage falls.

    One point per confidence quantile (coverage 100%, 95%, ... 0% when `points` is 21),
    each at the threshold that answers that share: the curve a reader uses to pick
    an operating point, and to see the chosen one on.
    """
    confidence = probabilities.max(axis=1)
    predicted = probabilities.argmax(axis=1)
    curve = []
    for share in np.linspace(1.0, 0.0, points):
        threshold = float(np.quantile(confidence, 1.0 - share)) if share < 1 else 0.0
        answered = confidence >= threshold
        result = selective_metrics(labels, probabilities, threshold, class_names, cancer)
        error = float((predicted[answered] != labels[answered]).mean()) if answered.any() else 0.0
        curve.append({"threshold": threshold, "coverage": result.coverage, "error_rate": error,
                      "worst_cancer_fnr": result.worst_fnr()})
    return curve
