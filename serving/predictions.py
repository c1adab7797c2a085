"""The prediction a client receives, built from one row of model output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field


class Prediction(BaseModel):
    """One image's classification (the body of `POST /predict`)."""

    predicted_class: str = Field(description="the most probable class")
    confidence: float = Field(ge=0.0, le=1.0, description="calibrated probability of predicted_class")
    probabilities: dict[str, float] = Field(description="calibrated probability of every class; sums to 1")
    uncertain: bool = Field(description="confidence is below the abstain threshold: refer to a pathologist")
    model: str = Field(description="the model that answered, as name:version")


def to_prediction(
    probabilities: np.ndarray, class_names: Sequence[str], abstain_threshold: float, model_tag: str
) -> Prediction:
    """Turn one row of calibrated probabilities into a :class:`Prediction`."""
    if probabilities.shape != (len(class_names),):
        raise ValueError(f"expected {len(class_names)} probabilities, got shape {probabilities.shape}")
    best = int(np.argmax(probabilities))
    confidence = float(probabilities[best])
    return Prediction(
        predicted_class=class_names[best],
        confidence=confidence,
        probabilities={name: float(p) for name, p in zip(class_names, probabilities, strict=True)},
        uncertain=confidence < abstain_threshold,
        model=model_tag,
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
