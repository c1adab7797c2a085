"""The magnification check: is a tile at the scale the model learned, when nobody said its pixel size?

A model learns tissue at one magnification; a tile scanned at twice it shows
every structure twice as large, a tile at half of it four fields of view in
one, and the model answers both confidently and often wrongly. The quality
gate's measures (colour, focus) and the out-of-distribution score barely move.

The check estimates the tile's magnification relative to the training tiles
from the features the served graph computes anyway (the out-of-distribution
score's spatially averaged layers, :mod:`models.ood`): a ridge regression of
the log magnification on ``log(1 + features)``, fitted on training tiles shown
at random magnifications from 0.4x to 2.5x
(:func:`training.trust.fit_magnification`). Its limits are the estimates'
1% and 99% quantiles on validation tiles at the training magnification,
widened by the estimator's median error on validation tiles at random
magnifications (a new scanner's magnification differs a little from the
training sites'; the bare quantiles flagged 9% of fresh sites' tiles at 1x,
widened 2%, while tiles at 2x and 0.5x stay flagged). At serving it is one
dot product per tile on features already there: no second pass, no pixels.

Like the gate and the score it is fitted on the model's own training data
only, and stored in the card (:class:`MagnificationCheck`).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MAGNIFICATION_METHOD = (
    "ridge regression of log magnification on log(1 + the out-of-distribution features), fitted on training tiles "
    "shown at random magnifications (0.4x-2.5x: centre crops enlarged, same-class mosaics shrunk); limits: the 1% "
    "and 99% quantiles of the estimates on validation tiles at the training magnification, widened by the "
    "estimator's median validation error"
)

Share = float


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MagnificationCondition(_Strict):
    """One row of the report's magnification table: test tiles at `factor` times the training magnification."""

    factor: float = Field(gt=0.0)
    with_mpp: bool  # the pixel size was given, and the tiles resampled to the model's
    n_images: int = Field(gt=0)
    right_or_uncertain: Share = Field(ge=0.0, le=1.0)
    answered: Share = Field(ge=0.0, le=1.0)
    right_when_answered: Share | None = Field(default=None, ge=0.0, le=1.0)
    flagged: Share = Field(ge=0.0, le=1.0)  # `magnification` among the reasons


class MagnificationCheck(_Strict):
    """The fitted estimator and its limits, as stored in the model card."""

    method: str = MAGNIFICATION_METHOD
    fitted_on: str = "train"
    weights: list[float] = Field(min_length=1)  # one per feature (the out-of-distribution layers, in order)
    intercept: float
    low: float = Field(gt=0.0)  # an estimate below this is flagged `magnification`
    high: float = Field(gt=0.0)  # and above this
    validation_acceptance: Share = Field(ge=0.0, le=1.0)  # validation tiles at 1x inside the limits
    validation_error: float = Field(ge=0.0)  # median |log2 estimate / truth| over validation tiles at 0.4x-2.5x
    evaluation: list[MagnificationCondition] | None = None  # test tiles at 0.5x-2x, with and without mpp

    def estimate(self, features: np.ndarray) -> np.ndarray:
        """Estimated magnification relative to the training tiles (1: the same) of features (batch, D)."""
        return np.exp(log_features(features) @ np.asarray(self.weights, dtype=np.float32) + self.intercept)

    def flags(self, estimate: float) -> bool:
        return not self.low <= estimate <= self.high


def log_features(features: np.ndarray) -> np.ndarray:
    """What the regression reads: log(1 + the spatially averaged ReLU features)."""
    return np.log1p(np.maximum(features, 0.0))
