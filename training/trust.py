"""Fit what tells the service whether to trust an answer: the quality gate, the OOD score, the magnification check.

Both are fitted on in-distribution data only (the training split), never on
outlier images, so they flag inputs nobody anticipated; both record in the
model card how often they pass validation and test tiles. Nothing here is
specific to lung tissue: a grey-scale MRI dataset gets a grey "stain" plane
and its own limits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import RidgeCV

from models.magnification import MagnificationCheck, log_features
from models.ood import OOD_FILE, FeatureScorer, LayerScorer, OutOfDistribution
from models.prediction import TileEvidence, trust_reasons
from models.quality import (
    TISSUE_OD,
    QualityGate,
    Range,
    StainModel,
    assess_batch,
    mean_stain_direction,
    measure_batch,
    optical_density,
    stain_angles,
    stain_grid,
)
from models.resampling import ModelScale, resample

if TYPE_CHECKING:  # TensorFlow loads where a model runs
    from models.inference import Predictor

logger = logging.getLogger(__name__)

DEFAULT_OOD_ACCEPTANCE = 0.995  # share of in-distribution tiles the OOD threshold is to keep (see fit_ood)
# The gate is for inputs unlike the training data, not for the training data's own tails: every tile
# limit starts at the training tiles' 0.1% or 99.9% quantile and moves further out.
# Fractions move by one 1%-99% spread of their training values (a few hundred tiles do not show the tail);
# positive scales by a factor (ratios are what matters for saturation, distance and sharpness).
TAIL = 0.001
FOCUS_FACTOR = 2.0  # blur below half the least sharp training tile, noise above twice the sharpest
SATURATION_FACTOR = 2.0  # grey-scale below half the least saturated training tile
STAIN_DISTANCE_FACTOR = 1.25
# Pixel-level stain limits: the training pixels' 0.5% / 99.5% quantiles, widened by this share.
PIXEL_QUANTILE = 0.005
LIMIT_MARGIN = 0.25
MIN_ANGLE_DEGREES = 3.0  # angular slack even when every training pixel has one colour (grey-scale data)


def _spread(values: np.ndarray) -> float:
    low, high = np.quantile(values, [0.01, 0.99])
    return float(high - low)


def _low(values: np.ndarray) -> float:
    return float(np.quantile(values, TAIL))


def _high(values: np.ndarray) -> float:
    return float(np.quantile(values, 1 - TAIL))


def fit_stain_model(images: np.ndarray) -> StainModel:
    """The training stains in OD space: Macenko's plane, its angular range, the tiles' mean colours."""
    tissue = []
    tile_directions = []
    for grid in stain_grid(images):
        density = optical_density(grid)
        density = density[density.sum(axis=1) >= TISSUE_OD]
        if len(density):
            tissue.append(density)
            tile_directions.append(mean_stain_direction(density))
    if not tissue:
        raise ValueError("the training images have no tissue pixels to fit a stain model on")
    pixels = np.concatenate(tissue)
    unit = pixels / np.maximum(np.linalg.norm(pixels, axis=1, keepdims=True), 1e-6)
    _, vectors = np.linalg.eigh(unit.T @ unit)
    basis = vectors[:, ::-1].T[:2].copy()  # the two directions that carry most optical density
    basis *= np.sign(basis.sum(axis=1, keepdims=True) + 1e-12)  # point into positive density
    off_plane, in_plane = stain_angles(pixels, basis)
    low, high = np.quantile(in_plane, [PIXEL_QUANTILE, 1 - PIXEL_QUANTILE])
    widen = max(MIN_ANGLE_DEGREES, LIMIT_MARGIN * (high - low))
    directions = np.stack(tile_directions)
    # A small ridge: a grey-scale dataset's mean colours barely vary, and their covariance is singular.
    covariance = np.cov(directions.T) + 1e-5 * np.eye(3)
    return StainModel(
        basis=basis.round(6).tolist(),
        max_off_plane_degrees=min(
            90.0, max(MIN_ANGLE_DEGREES, float(np.quantile(off_plane, 1 - PIXEL_QUANTILE)) * (1 + LIMIT_MARGIN))
        ),
        in_plane_degrees=(float(low - widen), float(high + widen)),
        max_optical_density=float(np.quantile(np.linalg.norm(pixels, axis=1), 0.999)) * (1 + LIMIT_MARGIN),
        mean_direction=directions.mean(axis=0).round(6).tolist(),
        direction_precision=np.linalg.inv(covariance).round(4).tolist(),
    )


def gate_failures(images: np.ndarray, gate: QualityGate) -> list[list[str]]:
    """The failed checks of each image."""
    return [report.failed_checks for report in assess_batch(images, gate)]


def pass_rate(images: np.ndarray, gate: QualityGate) -> float:
    return float(np.mean([not failed for failed in gate_failures(images, gate)])) if len(images) else 1.0


def fit_quality_gate(train: np.ndarray, validation: np.ndarray, test: np.ndarray | None = None) -> QualityGate:
    """Fit the gate's limits on training images (N, S, S, 3) and measure its pass rates."""
    stain = fit_stain_model(train)
    column = measure_batch(train, stain)
    finite_distance = column["stain_distance"][np.isfinite(column["stain_distance"])]
    provisional = QualityGate(
        input_size=int(train.shape[1]),
        stain=stain,
        background_fraction=Range(
            high=min(0.95, _high(column["background_fraction"]) + _spread(column["background_fraction"]))
        ),
        stain_fraction=Range(low=max(0.0, _low(column["stain_fraction"]) - _spread(column["stain_fraction"]))),
        stain_distance=Range(high=_high(finite_distance) * STAIN_DISTANCE_FACTOR if len(finite_distance) else None),
        saturation=Range(
            low=_low(column["saturation"]) / SATURATION_FACTOR,
            high=min(1.0, _high(column["saturation"]) + _spread(column["saturation"])),
        ),
        focus=Range(low=_low(column["focus"]) / FOCUS_FACTOR, high=_high(column["focus"]) * FOCUS_FACTOR),
        train_pass_rate=1.0,
        validation_pass_rate=1.0,
    )
    return provisional.model_copy(
        update={
            "train_pass_rate": pass_rate(train, provisional),
            "validation_pass_rate": pass_rate(validation, provisional),
            "test_pass_rate": None if test is None else pass_rate(test, provisional),
        }
    )


def fit_layer(features: np.ndarray, labels: np.ndarray, n_classes: int) -> LayerScorer:
    """Class means and one shared, shrunk covariance of one layer's training features (N, D)."""
    features = features.astype(np.float64)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(n_classes)])
    centred = features - means[labels]
    # Ledoit-Wolf shrinkage: a few hundred tiles cannot estimate a D x D covariance on their own.
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    precision = np.linalg.inv(covariance)
    projection = np.linalg.cholesky((precision + precision.T) / 2)
    return LayerScorer(projection.astype(np.float32), (means @ projection).astype(np.float32))


CROSS_FIT_FOLDS = 5


def cross_fitted_distances(features: np.ndarray, labels: np.ndarray, sizes: list[int], n_classes: int,
                           folds: int = CROSS_FIT_FOLDS, seed: int = 0) -> np.ndarray:
    """(N, layers) distances of each training tile under per-layer scorers fitted WITHOUT it (k-fold).

    A scorer is closer to the tiles it was fitted on than to new ones (measured on the
    tiny test model: median 6.3 on its own training tiles, 8.8 on fresh tiles, 8.4
    cross-fitted), so its own training distances would set the threshold far too low.
    """
    fold_of = np.random.default_rng(seed).permutation(len(labels)) % folds
    parts = np.split(features, np.cumsum(sizes)[:-1], axis=1)
    distances = np.zeros((len(labels), len(sizes)), np.float32)
    for fold in range(folds):
        held = fold_of == fold
        for index, part in enumerate(parts):
            distances[held, index] = fit_layer(part[~held], labels[~held], n_classes)(part[held].astype(np.float32))
    return distances


def fit_scorer(
    train: tuple[np.ndarray, np.ndarray], sizes: list[int], n_classes: int
) -> tuple[FeatureScorer, np.ndarray]:
    """Per-layer scorers on all training features, each scaled by its median cross-fitted distance;
    also returns the cross-fitted scores, on which the threshold is chosen."""
    features, labels = train
    parts = np.split(features, np.cumsum(sizes)[:-1], axis=1)
    calibration = cross_fitted_distances(features, labels, sizes, n_classes)
    scales = np.median(calibration, axis=0)
    scorer = FeatureScorer(tuple(fit_layer(part, labels, n_classes) for part in parts), scales.astype(np.float32))
    return scorer, (calibration / scales).max(axis=1)


def choose_threshold(calibration_scores: np.ndarray, acceptance: float) -> float:
    """The score that keeps `acceptance` of the in-distribution calibration scores (interpolated quantile)."""
    return float(np.quantile(calibration_scores, acceptance))


def fit_ood(
    train: tuple[np.ndarray, np.ndarray],
    validation_features: np.ndarray,
    test_features: np.ndarray,
    layers: dict[str, int],
    n_classes: int,
    folder: Path,
    acceptance: float = DEFAULT_OOD_ACCEPTANCE,
) -> tuple[FeatureScorer, OutOfDistribution]:
    """Fit the scorer on training (features, labels) of `layers` ({name: size}); choose the threshold that keeps
    `acceptance` of the cross-fitted training scores; check it on validation and test; write the parameters.

    Why cross-fitted training scores and not the validation split alone: a 99th percentile needs
    hundreds of scores, and the validation split of a small dataset has a few dozen (on the tiny
    test model, a validation-chosen threshold flagged 9% of fresh tiles, a cross-fitted one 1%).
    The validation split is the check: its acceptance is recorded beside the target.
    """
    scorer, calibration_scores = fit_scorer(train, list(layers.values()), n_classes)
    threshold = choose_threshold(calibration_scores, acceptance)
    validation_scores = scorer(validation_features)
    quantiles = np.quantile(validation_scores, [0.5, 0.9, 0.99, 1.0])
    digest = scorer.save(folder / OOD_FILE)
    card = OutOfDistribution(
        feature_layers=list(layers),
        feature_dims=list(layers.values()),
        threshold=threshold,
        target_acceptance=acceptance,
        validation_acceptance=float(np.mean(validation_scores <= threshold)),
        test_acceptance=float(np.mean(scorer(test_features) <= threshold)),
        validation_score_quantiles={
            name: round(float(value), 4) for name, value in zip(("50", "90", "99", "max"), quantiles, strict=True)
        },
        parameters_sha256=digest,
    )
    logger.info(
        "OOD threshold %.3f keeps %.1f%% of validation and %.1f%% of test tiles",
        threshold, 100 * card.validation_acceptance, 100 * card.test_acceptance,
    )
    return scorer, card


def flagged(images: np.ndarray, scores: np.ndarray, gate: QualityGate, threshold: float) -> np.ndarray:
    """Per image: would the answer rule flag it on trust (a failed gate check, or the score over the
    threshold)? For a model not yet in the store: the gate and scores are fitted, the threshold chosen."""
    reports = assess_batch(images, gate)
    no_probabilities = np.empty(0)  # trust reasons do not look at the classes
    return np.array([bool(trust_reasons(TileEvidence(no_probabilities, float(score), report), threshold))
                     for score, report in zip(scores, reports, strict=True)], dtype=bool)



# Magnifications the check is fitted on, log-uniform: wider than the report's 0.5x-2x, so the regression
# is not at its ends there.
MAGNIFICATION_FIT_RANGE = (0.4, 2.5)
# The limits start at these quantiles of the validation tiles' estimates at 1x and move out by the estimator's
# median error: a new site's scanner differs a little from the training sites' (measured on fresh synthetic
# sites, the bare quantiles flagged 9% of their tiles at 1x; widened, 2%, while 2x and 0.5x stay over 90%).
MAGNIFICATION_ACCEPTANCE = (0.01, 0.99)
# Tiles are decoded at this many times the input size: a 2.5x centre crop of one still has more pixels
# than the input, as a crop of the full-size file would.
MAGNIFICATION_FIT_SIDE = 3
RIDGE_ALPHAS = np.logspace(-2, 4, 13)


FeaturesAt = Callable[[np.ndarray], np.ndarray]  # magnification of each tile of a split -> their features
FIT_CHUNK = 96  # tiles decoded at a time (mosaic partners come from the same chunk)


def magnified_features(predictor: Predictor, paths: list[Path], labels: np.ndarray, seed: int = 0) -> FeaturesAt:
    """The features of these tiles shown at given magnifications, resized whole as an upload without `mpp`."""
    from training.data import load_images
    from training.magnification import magnified_set

    target = ModelScale(predictor.input_size, None)
    side = MAGNIFICATION_FIT_SIDE * predictor.input_size

    def at(factors: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(seed)
        parts = []
        for start in range(0, len(paths), FIT_CHUNK):
            chunk = slice(start, start + FIT_CHUNK)
            tiles = [Image.fromarray(array) for array in load_images(paths[chunk], side)]
            shown = magnified_set(tiles, labels[chunk], factors[chunk], rng)
            parts.append(predictor.outputs_in_batches(np.stack([resample(tile, target) for tile in shown])).features)
        return np.concatenate(parts)

    return at


def fit_magnification(train: FeaturesAt, n_train: int, validation: FeaturesAt, n_validation: int,
                      seed: int = 0) -> MagnificationCheck:
    """Fit the magnification check (see models.magnification) on the training tiles at random
    magnifications; its error on the validation tiles at random ones, its limits on them at 1x."""
    rng = np.random.default_rng(seed)
    low, high = np.log(MAGNIFICATION_FIT_RANGE)
    train_factors = np.exp(rng.uniform(low, high, n_train))
    x = log_features(train(train_factors))
    mean, spread = x.mean(axis=0), x.std(axis=0) + 1e-6
    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit((x - mean) / spread, np.log(train_factors))
    # The standardisation folded in (one dot product at serving), at the precision the card stores.
    weights = np.array([float(f"{w:.6g}") for w in ridge.coef_ / spread])
    intercept = float(f"{ridge.intercept_ - weights @ mean:.6g}")

    def estimate(features: FeaturesAt, factors: np.ndarray) -> np.ndarray:
        return np.exp(log_features(features(factors)) @ weights + intercept)

    shown = np.exp(rng.uniform(low, high, n_validation))
    error = float(np.median(np.abs(np.log2(estimate(validation, shown) / shown))))  # in octaves
    at_one = estimate(validation, np.ones(n_validation))
    limits = np.quantile(at_one, MAGNIFICATION_ACCEPTANCE) * 2.0 ** np.array([-error, error])
    logger.info("magnification check: ridge alpha %g, limits %.2f-%.2f, median validation error %.2f octaves",
                ridge.alpha_, limits[0], limits[1], error)
    return MagnificationCheck(
        weights=weights.tolist(), intercept=intercept, low=round(float(limits[0]), 4),
        high=round(float(limits[1]), 4),
        validation_acceptance=float(np.mean((at_one >= limits[0]) & (at_one <= limits[1]))),
        validation_error=round(error, 4),
    )
