"""The tissue and quality gate: cheap, explainable checks that run before the model.

Whole-slide pipelines find tissue the same way (HistoQC, TIAToolbox): a tile is
measured on the decoded model input, in well under a millisecond, and each
measure is compared with limits fitted on the model's TRAINING images
(:func:`training.trust.fit_quality_gate`), stored in the model card:

* ``background_fraction``: share of pixels with almost no optical density
  (bright, unstained glass). Blank slides and tiles of mostly glass fail.
* ``stain_fraction``: share of the tissue pixels whose colour the training
  stains explain. Colour deconvolution in optical-density (OD) space
  (Beer-Lambert: OD = -log(I / I0)) as Macenko et al. (2009) fit it: the
  training pixels' OD directions span a plane (for H&E, the hematoxylin and
  eosin vectors), and a pixel is stain-like when its OD direction lies close
  to that plane, within the angular range of the training stains along it,
  and not darker than any training pixel. Photographs, DAB
  (immunohistochemistry) brown, fundus orange, grey-scale or black images
  fail it for an H&E model; for a grey-scale training set (e.g. MRI) the
  "plane" is the grey axis and colour images fail.
* ``stain_distance``: how far the tile's average stain colour (its mean OD
  direction) lies from the training tiles' average stain colours, as a
  Mahalanobis distance over their spread: a tile stained another way as a
  whole (IHC, a shifted stain, a natural photograph) is far even when single
  pixels could pass.
* ``saturation``: mean colour saturation of the tissue pixels: a grey-scale
  image fed to a model trained on stained colour tiles fails it.
* ``focus``: variance of the 4-neighbour Laplacian of the grey image: too low
  is out of focus or flat, too high is noise or an artefact no training tile
  had.

Nothing here is lung-specific: every limit comes from the training data.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# A pixel is tissue when its summed optical density reaches this (about 90% transmission per channel).
TISSUE_OD = 0.3
# Pixels looked at per tile: colour measures on a grid of at most 16x16 (256 samples pin a fraction to
# a few percent), focus on one of at most 32x32. The gate runs on every request beside a ~1.3 ms decode:
# per tile at full 128x128 it cost 0.75 ms and 20% of the service's throughput; on these grids, batched,
# about 0.05 ms. Limits are fitted on the same grids, so the measures mean the same in training and serving.
STAIN_GRID = 16
FOCUS_GRID = 32
CHECKS = ("background", "stain", "saturation", "blur", "noise")

# Optical density of every uint8 level, looked up instead of computing a log per pixel.
_OD_LUT = (-np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)).astype(np.float32)

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StainModel(_Strict):
    """The training stains in optical-density space (fitted by training.trust)."""

    basis: list[list[float]] = Field(min_length=2, max_length=2)  # two unit OD vectors spanning the stain plane
    max_off_plane_degrees: float = Field(gt=0.0, le=90.0)  # a pixel further off the plane is not stain
    in_plane_degrees: tuple[float, float]  # allowed angle along the plane, from basis[0] towards basis[1]
    max_optical_density: float = Field(gt=0.0)  # darker pixels than this are not stain (black, ink)
    mean_direction: list[float] = Field(min_length=3, max_length=3)  # training tiles' mean stain colour
    direction_precision: list[list[float]]  # inverse covariance of the tiles' mean stain colours (3x3)


class Range(_Strict):
    """Closed interval a measure must lie in; None means unbounded on that side."""

    low: float | None = None
    high: float | None = None

    def contains(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


class QualityGate(_Strict):
    """Limits of the gate, fitted on the training split, with how often they pass."""

    method: str = "tissue/stain/focus limits from training-split quantiles, widened by a margin"
    fitted_on: str = "train"
    input_size: int = Field(gt=0)  # measures are taken on the decoded model input, at this size
    stain: StainModel
    background_fraction: Range
    stain_fraction: Range
    stain_distance: Range
    saturation: Range
    focus: Range
    train_pass_rate: Fraction
    validation_pass_rate: Fraction
    test_pass_rate: Fraction | None = None


class QualityReport(BaseModel):
    """What the gate measured on one tile and which checks failed (part of every prediction)."""

    passed: bool = Field(description="every check passed")
    failed_checks: list[str] = Field(
        description="checks that failed: background (mostly glass), stain (colours the model was not trained on), "
        "saturation (grey-scale, or more vivid than stained tissue), blur (too little detail), "
        "noise (more fine detail than any training tile)"
    )
    background_fraction: float = Field(description="share of near-white (unstained) pixels")
    stain_fraction: float = Field(description="share of tissue pixels whose colour the training stains explain")
    stain_distance: float | None = Field(
        description="distance of the tile's mean stain colour from the training tiles' (Mahalanobis, in their "
        "spreads); null when the tile has no tissue pixels at all"
    )
    saturation: float = Field(description="mean colour saturation of the tissue pixels (0: grey)")
    focus: float = Field(description="variance of the Laplacian of the grey image (sharpness)")


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel optical density, shape (..., 3), float32."""
    return _OD_LUT[rgb]


def stain_grid(images: np.ndarray) -> np.ndarray:
    """Tiles (..., S, S, 3) sampled on an at most STAIN_GRID x STAIN_GRID grid, as (..., N, 3) uint8."""
    step = max(1, min(images.shape[-3], images.shape[-2]) // STAIN_GRID)
    grid = images[..., ::step, ::step, :]
    return grid.reshape(*grid.shape[:-3], -1, 3)


def stain_angles(density: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(off-plane angle, in-plane angle) in degrees of OD vectors (..., 3) against a (2, 3) plane basis."""
    unit = density / np.maximum(_channel_norm(density), 1e-6)[..., None]
    along = unit @ basis.T  # (..., 2)
    normal = np.cross(basis[0], basis[1])
    normal /= np.linalg.norm(normal)
    off_plane = np.degrees(np.arcsin(np.clip(np.abs(unit @ normal), 0.0, 1.0)))
    in_plane = np.degrees(np.arctan2(along[..., 1], along[..., 0]))
    return off_plane, in_plane


def stain_like(density: np.ndarray, stain: StainModel) -> np.ndarray:
    """Boolean per OD vector (..., 3): does the training stain model explain it?"""
    off_plane, in_plane = stain_angles(density, np.asarray(stain.basis, dtype=np.float32))
    low, high = stain.in_plane_degrees
    return (
        (off_plane <= stain.max_off_plane_degrees)
        & (in_plane >= low)
        & (in_plane <= high)
        & (_channel_norm(density) <= stain.max_optical_density)
    )


def _channel_norm(rgb: np.ndarray) -> np.ndarray:
    """The Euclidean norm over the last (3-channel) axis. Spelled out: numpy's reductions over an axis of
    3 pay their per-row overhead for every pixel, several times the arithmetic."""
    return np.sqrt(rgb[..., 0] * rgb[..., 0] + rgb[..., 1] * rgb[..., 1] + rgb[..., 2] * rgb[..., 2])


def mean_stain_direction(density: np.ndarray) -> np.ndarray:
    """The unit vector of the summed OD of tissue pixels (M, 3): the tile's average stain colour."""
    total = density.sum(axis=0)
    return total / max(float(np.linalg.norm(total)), 1e-6)


def focus_measure(images: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian of the grey image (0-255 scale) of tiles (B, S, S, 3),
    on an at most FOCUS_GRID x FOCUS_GRID grid."""
    step = max(1, min(images.shape[1], images.shape[2]) // FOCUS_GRID)
    grid = images[:, ::step, ::step].astype(np.int16)
    grey = grid[..., 0] + grid[..., 1] + grid[..., 2]  # 3x the grey level; integers are faster
    centre = grey[:, 1:-1, 1:-1]
    laplacian = grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] + grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] - 4 * centre
    return laplacian.reshape(len(images), -1).astype(np.float32).var(axis=1) / 9.0


MEASURES = ("background_fraction", "stain_fraction", "stain_distance", "saturation", "focus")


def measure_batch(images: np.ndarray, stain: StainModel) -> dict[str, np.ndarray]:
    """Every gate measure (see :data:`MEASURES`) of RGB uint8 tiles (B, S, S, 3), one value per tile.

    Vectorised over the batch: per tile, numpy's per-call overhead would cost more than the arithmetic.
    A tile without tissue pixels explains no stain: stain_fraction 0, stain_distance infinite, saturation 0.
    """
    pixels = stain_grid(images)  # (B, N, 3)
    density = optical_density(pixels)
    tissue = density[..., 0] + density[..., 1] + density[..., 2] >= TISSUE_OD  # (B, N)
    counts = tissue.sum(axis=1)
    has_tissue = counts > 0
    per_tissue = np.maximum(counts, 1)
    stained = (stain_like(density, stain) & tissue).sum(axis=1) / per_tissue
    total = (density * tissue[..., None]).sum(axis=1)  # (B, 3): summed OD of the tissue pixels
    direction = total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-6)
    offset = direction - np.asarray(stain.mean_direction, dtype=np.float32)
    precision = np.asarray(stain.direction_precision, dtype=np.float32)
    distance = np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", offset, precision, offset), 0.0))
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    top = np.maximum(np.maximum(red, green), blue)
    spread = top - np.minimum(np.minimum(red, green), blue)  # uint8: max >= min, no wrap-around
    saturation = (spread / np.maximum(top, 1).astype(np.float32) * tissue).sum(axis=1) / per_tissue
    return {
        "background_fraction": 1.0 - counts / tissue.shape[1],
        "stain_fraction": np.where(has_tissue, stained, 0.0),
        "stain_distance": np.where(has_tissue, distance, np.inf),
        "saturation": np.where(has_tissue, saturation, 0.0),
        "focus": focus_measure(images),
    }


def measure(image: np.ndarray, stain: StainModel) -> dict[str, float]:
    """Every gate measure of one RGB uint8 tile (S, S, 3)."""
    return {name: float(values[0]) for name, values in measure_batch(image[None], stain).items()}


def failed_checks_batch(columns: dict[str, np.ndarray], gate: QualityGate) -> np.ndarray:
    """Boolean (B, len(CHECKS)): which checks each tile's measures (:func:`measure_batch`) fail: a measure
    outside its range, focus below `focus.low` (blur) or above `focus.high` (noise)."""

    def outside(values: np.ndarray, limits: Range) -> np.ndarray:
        low = -np.inf if limits.low is None else limits.low
        high = np.inf if limits.high is None else limits.high
        return ~((values >= low) & (values <= high))

    focus = columns["focus"]
    no_limit = np.zeros(len(focus), dtype=bool)
    return np.stack([
        outside(columns["background_fraction"], gate.background_fraction),
        outside(columns["stain_fraction"], gate.stain_fraction)
        | outside(columns["stain_distance"], gate.stain_distance),
        outside(columns["saturation"], gate.saturation),
        no_limit if gate.focus.low is None else focus < gate.focus.low,
        no_limit if gate.focus.high is None else focus > gate.focus.high,
    ], axis=1)


def assess_batch(images: np.ndarray, gate: QualityGate) -> list[QualityReport]:
    """Measure decoded model inputs (B, S, S, 3) and check each against the gate's limits.

    The checks and the rounding run on whole columns; each report is then built from plain values
    without validation (they are floats and check names by construction), as per tile they cost more
    than the measures."""
    columns = measure_batch(images, gate.stain)
    failed = failed_checks_batch(columns, gate)
    shown = {name: [round(value, 4) if math.isfinite(value) else None for value in values.tolist()]
             for name, values in columns.items()}
    return [
        QualityReport.model_construct(
            passed=not failed[index].any(),
            failed_checks=[check for check, hit in zip(CHECKS, failed[index].tolist(), strict=True) if hit],
            **{name: values[index] for name, values in shown.items()},
        )
        for index in range(len(images))
    ]


def assess(image: np.ndarray, gate: QualityGate) -> QualityReport:
    """Measure one decoded model input (S, S, 3) and check it against the gate's limits."""
    return assess_batch(image[None], gate)[0]
