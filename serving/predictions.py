"""The prediction a client receives, built from one row of model output and the trust checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from models.quality import QualityReport

LOW_CONFIDENCE = "low_confidence"
OUT_OF_DISTRIBUTION = "out_of_distribution"


@dataclass(frozen=True)
class TrustEvidence:
    """What the quality gate and the out-of-distribution score said about one tile."""

    quality: QualityReport
    ood_score: float
    ood_threshold: float

    @property
    def out_of_distribution(self) -> bool:
        return self.ood_score > self.ood_threshold


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
        description="why the answer is uncertain: low_confidence, out_of_distribution, and the quality checks "
        "that failed (background, stain, saturation, blur, noise); empty when it is not",
    )
    out_of_distribution: bool | None = Field(
        default=None,
        description="the tile's features are further from every training class than the model card's threshold "
        "allows; null when the service runs with HISTO_OOD_GATE=off",
    )
    ood_score: float | None = Field(
        default=None, description="out-of-distribution score (above `ood_threshold`: out of distribution)"
    )
    ood_threshold: float | None = Field(default=None, description="the model card's out-of-distribution threshold")
    quality: QualityReport | None = Field(
        default=None, description="the tissue and quality gate's measures and failed checks"
    )
    model: str = Field(description="the model that answered, as name:version")


def to_prediction(
    probabilities: np.ndarray,
    class_names: Sequence[str],
    abstain_threshold: float,
    model_tag: str,
    evidence: TrustEvidence | None = None,
) -> Prediction:
    """Turn one row of calibrated probabilities (and the tile's trust evidence) into a :class:`Prediction`."""
    if probabilities.shape != (len(class_names),):
        raise ValueError(f"expected {len(class_names)} probabilities, got shape {probabilities.shape}")
    best = int(np.argmax(probabilities))
    confidence = float(probabilities[best])
    reasons = [LOW_CONFIDENCE] if confidence < abstain_threshold else []
    trust: dict[str, object] = {}
    if evidence is not None:
        reasons += [OUT_OF_DISTRIBUTION] if evidence.out_of_distribution else []
        reasons += evidence.quality.failed_checks
        trust = {
            "out_of_distribution": evidence.out_of_distribution,
            "ood_score": round(evidence.ood_score, 4),
            "ood_threshold": round(evidence.ood_threshold, 4),
            "quality": evidence.quality,
        }
    return Prediction(
        predicted_class=class_names[best],
        confidence=confidence,
        probabilities={name: float(p) for name, p in zip(class_names, probabilities, strict=True)},
        uncertain=bool(reasons),
        reasons=reasons,
        model=model_tag,
        **trust,
    )


class ExplainedPrediction(Prediction):
    """The body of `POST /explain`: the prediction plus a Grad-CAM heat map."""

    explained_class: str = Field(description="the class whose evidence the heat map shows")
    overlay_png: str = Field(
        description="base64 PNG: the upload (long side at most 2048 px) with the heat map drawn over it"
    )
    heat_map: list[list[float]] | None = Field(
        default=None, description="the raw Grad-CAM map in [0, 1] at the feature-map resolution, if asked for"
    )
