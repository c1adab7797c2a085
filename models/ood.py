"""The out-of-distribution score: how far a tile's features lie from the training classes.

Lee et al. (2018, "A simple unified framework for detecting out-of-distribution
samples and adversarial attacks"): for each of a few layers
(:data:`models.architectures.OOD_FEATURE_LAYERS`, shallow to deep), the
spatially averaged feature vector's Mahalanobis distance to the nearest class
mean, with one covariance shared by all classes. The deepest layer alone only
knows what separates the training classes (a class the model never saw can land
right on a known class there); shallower layers still see texture and colour.
Each layer's distance is divided by its median on in-distribution tiles, and
the score is the largest of these ratios, so no layer's scale dominates and no
outlier data is needed to weigh them.

Everything is fitted on the TRAINING split only (:func:`training.trust.fit_ood`),
without outlier images, so it flags inputs nobody anticipated. The per-layer
scales and the threshold come from cross-fitted training scores (each tile
scored by a detector fitted without it), checked on the validation and test
splits; all of it is stored in the model card.

The parameters live beside the model in the store (:data:`OOD_FILE`): per layer
the Cholesky factor ``L`` of the precision matrix (``P = L L^T``) and the class
means projected by it, so a batch's squared distances are one matrix product
and a subtraction, ``|f L - m_c L|^2``. The features come from the same traced
graph as the probabilities (:mod:`models.inference`): no second forward pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

OOD_FILE = "ood.npz"
OOD_METHOD = (
    "feature-ensemble Mahalanobis (Lee et al., 2018): per layer, the distance of the spatially averaged features "
    "to the nearest class mean under one shared Ledoit-Wolf covariance fitted on the training split, divided by "
    "its median cross-fitted training distance; the score is the largest ratio"
)


class OodSetResult(BaseModel):
    """Detection on one generated out-of-distribution set (training report)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    n_images: int = Field(gt=0)
    detection_rate: float = Field(ge=0.0, le=1.0)  # flagged by the gate or the score
    gate_rate: float = Field(ge=0.0, le=1.0)  # flagged by the quality gate alone
    score_auroc: float = Field(ge=0.0, le=1.0)  # score alone, against in-distribution test tiles
    fpr_at_95_tpr: float = Field(ge=0.0, le=1.0)  # in-distribution test tiles above the score that finds 95%


class OutOfDistribution(BaseModel):
    """The out-of-distribution detector of a model, as recorded in its card."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = OOD_METHOD
    fitted_on: str = "train"
    feature_layers: list[str] = Field(min_length=1)
    feature_dims: list[int] = Field(min_length=1)
    threshold: float = Field(gt=0.0)  # a tile scoring above it is out of distribution
    target_acceptance: float = Field(gt=0.0, le=1.0)  # share of in-distribution tiles the threshold is to keep
    threshold_chosen_on: str = "5-fold cross-fitted training scores (each tile scored by a detector fitted without it)"
    validation_acceptance: float = Field(ge=0.0, le=1.0)
    test_acceptance: float = Field(ge=0.0, le=1.0)  # by the score alone
    test_acceptance_with_gate: float | None = Field(default=None, ge=0.0, le=1.0)  # neither gate nor score flags
    validation_score_quantiles: dict[str, float]
    parameters_file: str = OOD_FILE
    parameters_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    evaluation: list[OodSetResult] | None = None


@dataclass(frozen=True)
class LayerScorer:
    """One layer's Mahalanobis distance to the nearest class mean."""

    projection: np.ndarray  # (D, D): Cholesky factor of the shared precision matrix
    projected_means: np.ndarray  # (classes, D): class means times projection

    def __call__(self, features: np.ndarray) -> np.ndarray:
        projected = features @ self.projection
        squared = ((projected[:, None, :] - self.projected_means[None, :, :]) ** 2).sum(axis=2)
        return np.sqrt(squared.min(axis=1))


@dataclass(frozen=True)
class FeatureScorer:
    """The score of features (batch, sum of layer sizes): the largest per-layer distance ratio."""

    layers: tuple[LayerScorer, ...]
    scales: np.ndarray  # (layers,): each layer's median in-distribution (cross-fitted) distance

    @property
    def sizes(self) -> list[int]:
        return [layer.projection.shape[0] for layer in self.layers]

    def layer_distances(self, features: np.ndarray) -> np.ndarray:
        """(batch, layers) Mahalanobis distances, unscaled."""
        features = np.asarray(features, dtype=np.float32)
        if features.shape[1] != sum(self.sizes):
            raise ValueError(f"expected {sum(self.sizes)} features, got {features.shape[1]}")
        parts = np.split(features, np.cumsum(self.sizes)[:-1], axis=1)
        return np.stack([layer(part) for layer, part in zip(self.layers, parts, strict=True)], axis=1)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (self.layer_distances(features) / self.scales).max(axis=1)

    def save(self, path: Path) -> str:
        """Write the parameters to `path` (npz); return their sha256."""
        arrays: dict[str, np.ndarray] = {"scales": self.scales}
        for index, layer in enumerate(self.layers):
            arrays[f"projection_{index}"] = layer.projection
            arrays[f"projected_means_{index}"] = layer.projected_means
        with path.open("wb") as handle:
            np.savez(handle, **arrays)
        return file_sha256(path)

    @classmethod
    def load(cls, path: Path, sha256: str) -> FeatureScorer:
        """Read parameters written by :meth:`save`, refusing a file whose hash the card does not name."""
        if file_sha256(path) != sha256:
            raise ValueError(f"{path.name} does not match the sha256 in the model card")
        with np.load(path, allow_pickle=False) as arrays:
            scales = arrays["scales"].astype(np.float32)
            layers = tuple(
                LayerScorer(
                    arrays[f"projection_{i}"].astype(np.float32), arrays[f"projected_means_{i}"].astype(np.float32)
                )
                for i in range(len(scales))
            )
        return cls(layers, scales)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
