"""THE answer rule: what one tile's model outputs, quality gate and out-of-distribution score answer.

Stated once, here, and called by every path that answers: `/predict`,
`/predict_batch` and `/explain`, whole slides, the slide CLI and cohorts, and
the evaluation scripts. The thresholds are resolved once per model and
operator (:meth:`Thresholds.resolve`: the card's, each replaced by the
operator's setting when one is given), so the same pixels get the same answer
on every path.

* :class:`TileEvidence`: what one pass says about a tile (calibrated
  probabilities, the gate's report, the score, the estimated magnification);
* :func:`answer`: evidence + thresholds -> :class:`Prediction` (the rule);
* :class:`TileClassifier`: images -> evidence (traced model, gate and score in
  one batch) -> answers; what the service's batcher, slides and evaluation run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, Field

from models.card import ModelCard
from models.quality import QualityReport, assess_batch

if TYPE_CHECKING:  # TensorFlow loads only where a model runs, never where a schema is read
    from models.inference import Predictor
    from models.store import StoredModel

LOW_CONFIDENCE = "low_confidence"
OUT_OF_DISTRIBUTION = "out_of_distribution"
MAGNIFICATION = "magnification"


class Rescaling(BaseModel):
    """What was done with the pixel size sent with an upload (`mpp`)."""

    mpp: float = Field(description="the upload's microns per pixel, as sent")
    model_mpp: float | None = Field(
        description="the model's training pixel size (its card's dataset.microns_per_pixel); null when the card "
        "declares none"
    )
    rescaled: bool = Field(
        description="the upload was resampled to the model's pixel size (centre-cropped to the training field of "
        "view when larger, mirrored at its edges when smaller); false when the model declares no pixel size: the "
        "upload was then resized whole, as without `mpp`"
    )
    scale: float | None = Field(
        default=None, description="the factor the upload was resampled by: mpp / model_mpp (0.5: halved)"
    )

    @classmethod
    def of(cls, card: ModelCard, mpp: float) -> Rescaling:
        model_mpp = card.dataset.microns_per_pixel
        rescaled = bool(model_mpp and card.dataset.tile_size)
        return cls(mpp=mpp, model_mpp=model_mpp, rescaled=rescaled,
                   scale=round(mpp / model_mpp, 4) if rescaled and model_mpp else None)


class Prediction(BaseModel):
    """One image's classification (the body of `POST /predict`)."""

    predicted_class: str = Field(
        description="the most probable class; NOT an answer when `uncertain` is true (see `reasons`)"
    )
    confidence: float = Field(ge=0.0, le=1.0, description="calibrated probability of predicted_class")
    probabilities: dict[str, float] = Field(description="calibrated probability of every class; sums to 1")
    uncertain: bool = Field(
        description="refer to a pathologist: the confidence is below the abstain threshold, the tile failed the "
        "quality gate, or it does not look like the training data (`reasons` says which)"
    )
    reasons: list[str] = Field(
        default_factory=list,
        description="why the answer is uncertain: low_confidence, out_of_distribution, the quality checks "
        "that failed (background, stain, saturation, blur, noise), and magnification (the tile looks scanned at "
        "another magnification than the training tiles); empty when it is not",
    )
    out_of_distribution: bool | None = Field(
        default=None,
        description="the tile's features are further from every training class than the threshold allows; null "
        "when the service runs with HISTO_OOD_GATE=off",
    )
    ood_score: float | None = Field(
        default=None, description="out-of-distribution score (above `ood_threshold`: out of distribution)"
    )
    ood_threshold: float | None = Field(
        default=None, description="the out-of-distribution threshold in force (the card's, or HISTO_OOD_THRESHOLD)"
    )
    quality: QualityReport | None = Field(
        default=None, description="the tissue and quality gate's measures and failed checks"
    )
    magnification: float | None = Field(
        default=None, description="the tile's magnification as the model's features estimate it, relative to the "
        "training tiles (2: structures twice as large); outside the card's limits the reason `magnification` is "
        "given; null when the model has no magnification check or the trust checks are off",
    )
    rescaling: Rescaling | None = Field(
        default=None, description="what was done with the `mpp` sent; null when none was sent"
    )
    model: str = Field(description="the model that answered, as name:version")


class ExplainedPrediction(Prediction):
    """The body of `POST /explain`: the prediction plus a Grad-CAM heat map."""

    explained_class: str = Field(description="the class whose evidence the heat map shows")
    overlay_png: str = Field(
        description="base64 PNG: the upload (long side at most 2048 px) with the heat map drawn over it"
    )
    heat_map: list[list[float]] | None = Field(
        default=None, description="the raw Grad-CAM map in [0, 1] at the feature-map resolution, if asked for"
    )


@dataclass(frozen=True)
class Thresholds:
    """The thresholds an answer is judged by."""

    abstain: float  # a confidence below this is `low_confidence`
    out_of_distribution: float  # a score above this is `out_of_distribution`
    magnification: tuple[float, float] | None = None  # an estimate outside is `magnification`; None: no check

    @classmethod
    def resolve(cls, card: ModelCard, abstain: float | None = None,
                out_of_distribution: float | None = None) -> Thresholds:
        """The card's thresholds, each replaced by the operator's (HISTO_ABSTAIN_THRESHOLD,
        HISTO_OOD_THRESHOLD) when one is set; the magnification limits are the card's."""
        check = card.magnification
        return cls(
            abstain=card.abstain_threshold if abstain is None else abstain,
            out_of_distribution=card.out_of_distribution.threshold if out_of_distribution is None
            else out_of_distribution,
            magnification=(check.low, check.high) if check else None,
        )


@dataclass(frozen=True)
class TileEvidence:
    """What one pass of the served graph, the gate and the score say about one tile."""

    probabilities: np.ndarray  # (classes,), calibrated
    ood_score: float  # NaN when the trust checks are off
    quality: QualityReport | None  # None when the trust checks are off
    magnification: float = math.nan  # estimated; NaN when the trust checks are off or the card has no check


def is_out_of_distribution(scores: np.ndarray | float, threshold: float) -> np.ndarray | bool:
    """Whether a score (or each of an array of them) is out of distribution: above the threshold."""
    return scores > threshold


def trust_reasons(evidence: TileEvidence, threshold: float) -> list[str]:
    """Why the trust checks flag a tile (out_of_distribution, then the gate's failed checks); empty if not."""
    if evidence.quality is None:
        return []
    flagged = is_out_of_distribution(evidence.ood_score, threshold)
    return [OUT_OF_DISTRIBUTION] * bool(flagged) + evidence.quality.failed_checks


def magnification_flagged(estimate: float, limits: tuple[float, float] | None) -> bool:
    """Whether an estimated magnification lies outside the limits (never, without an estimate or limits)."""
    return limits is not None and not math.isnan(estimate) and not limits[0] <= estimate <= limits[1]


def answer(evidence: TileEvidence, class_names: Sequence[str], thresholds: Thresholds, model_tag: str) -> Prediction:
    """The rule: the most probable class, `uncertain` with its reasons when the confidence is under the
    abstain threshold, the score over the out-of-distribution threshold, a gate check failed, or the
    estimated magnification is outside the card's limits."""
    probabilities = evidence.probabilities
    if probabilities.shape != (len(class_names),):
        raise ValueError(f"expected {len(class_names)} probabilities, got shape {probabilities.shape}")
    best = int(np.argmax(probabilities))
    confidence = float(probabilities[best])
    reasons = [LOW_CONFIDENCE] if confidence < thresholds.abstain else []
    reasons += trust_reasons(evidence, thresholds.out_of_distribution)
    reasons += [MAGNIFICATION] * magnification_flagged(evidence.magnification, thresholds.magnification)
    trust: dict[str, object] = {}
    if evidence.quality is not None and not math.isnan(evidence.ood_score):
        trust = {
            "out_of_distribution": bool(is_out_of_distribution(evidence.ood_score, thresholds.out_of_distribution)),
            "ood_score": round(evidence.ood_score, 4),
            "ood_threshold": round(thresholds.out_of_distribution, 4),
            "quality": evidence.quality,
        }
    if not math.isnan(evidence.magnification):
        trust["magnification"] = round(evidence.magnification, 3)
    return Prediction(
        predicted_class=class_names[best],
        confidence=confidence,
        probabilities={name: float(p) for name, p in zip(class_names, probabilities, strict=True)},
        uncertain=bool(reasons),
        reasons=reasons,
        model=model_tag,
        **trust,
    )


class TileClassifier:
    """A stored model's traced graph, gate and score, answering by :func:`answer`.

    `trust_checks=False` taps no feature layer (the graph is then exactly the plain classifier) and
    answers on confidence alone (HISTO_OOD_GATE=off, for benchmarks).
    """

    def __init__(self, stored: StoredModel, thresholds: Thresholds | None = None, trust_checks: bool = True) -> None:
        from models.inference import Predictor

        card = stored.card
        self.stored = stored
        self.thresholds = thresholds or Thresholds.resolve(card)
        self.trust_checks = trust_checks
        feature_layers = card.out_of_distribution.feature_layers if trust_checks else ()
        self.predictor: Predictor = Predictor(stored.model, card.input_size, card.calibration_temperature,
                                              feature_layers)

    @property
    def input_size(self) -> int:
        return self.stored.card.input_size

    @property
    def class_names(self) -> list[str]:
        return self.stored.card.class_names

    def evidence(self, images: np.ndarray) -> list[TileEvidence]:
        """One pass over a batch of uint8 images (N, S, S, 3): the model, then the gate and the score,
        both vectorised over the batch (per tile, numpy's call overhead would cost more than their
        arithmetic)."""
        outputs = self.predictor.outputs(images)
        if not self.trust_checks:
            return [TileEvidence(p, math.nan, None) for p in outputs.probabilities]
        card = self.stored.card
        qualities = assess_batch(images, card.quality_gate)
        scores = self.stored.ood_scorer(outputs.features)
        magnifications = (card.magnification.estimate(outputs.features) if card.magnification
                          else np.full(len(images), math.nan))
        return [TileEvidence(p, float(s), q, float(m)) for p, s, q, m
                in zip(outputs.probabilities, scores, qualities, magnifications, strict=True)]

    def answer(self, evidence: TileEvidence) -> Prediction:
        return answer(evidence, self.class_names, self.thresholds, self.stored.tag)

    def classify(self, images: np.ndarray, batch_size: int = 64) -> list[Prediction]:
        """The answer for every image, `batch_size` at a time."""
        return [self.answer(row) for start in range(0, len(images), batch_size)
                for row in self.evidence(images[start : start + batch_size])]
