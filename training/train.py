"""Train a classifier on a class-folder dataset and save it into the model store.

Early stopping, the learning-rate schedule and the best checkpoint come from
the EARLY_STOPPING split; the calibration temperature and the abstain
threshold from the VALIDATION split, which model selection never saw; the
test split is touched once, after training, for the report and the card.

    python -m training.train --data data/synthetic/lung_image_sets --arch cnn
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import bentoml
import keras
import numpy as np
import PIL
import pydantic
import tensorflow as tf
from PIL import Image

from models.architectures import (
    ARCHITECTURES,
    OOD_FEATURE_LAYERS,
    apply_phase,
    build_model,
    fine_tune_schedule,
    tap_layers,
)
from models.card import (
    Abstention,
    Calibration,
    DatasetInfo,
    ModelCard,
    SiteShift,
    TestMetrics,
    TrainingConfig,
)
from models.inference import Predictor, logits_model
from models.magnification import MagnificationCheck
from models.ood import OOD_FILE, FeatureScorer, OutOfDistribution
from models.prediction import TileClassifier
from models.quality import QualityGate
from models.store import DEFAULT_MODEL_NAME, REPORT_MARKDOWN, StoredModel, save_model
from training import data
from training.abstention import cancer_classes, choose_threshold, risk_coverage, selective_metrics
from training.bootstrap import bootstrap_intervals
from training.calibration import calibrated_probabilities, choose_temperature, negative_log_likelihood
from training.data import AUTO, SPLIT_BY
from training.evaluate import compute_metrics, expected_calibration_error
from training.magnification import evaluate as evaluate_magnification
from training.ood_sets import OodSet, evaluate_set, near_ood_sets
from training.options import add_options, option, settings_from_args
from training.report import TestPredictions, text_report, write_report
from training.sites import evaluate_site_shift
from training.trust import (
    DEFAULT_OOD_ACCEPTANCE,
    MAGNIFICATION_FIT_SIDE,
    fit_magnification,
    fit_ood,
    fit_quality_gate,
    flagged,
    magnified_features,
)

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = {"cnn": 128, "efficientnetb0": 224}
WARM_UP_EPOCHS = 5  # epochs before early stopping watches the early-stopping split's loss
DEFAULT_TASK = "lung histopathology tile classification (LC25000 layout)"


def _weights(text: str) -> str | None:
    return None if text == "none" else text


@dataclass
class TrainSettings:
    """Everything a training run needs; the CLI's options are these fields (training.options)."""

    data: Path = option(help="folder of class sub-folders (or the LC25000 top folder)")
    arch: str = option("cnn", "architecture; cnn is the compact CPU model", choices=ARCHITECTURES)
    input_size: int | None = option(
        None, "model input size in pixels", shown="128 for cnn, 224 for efficientnetb0"
    )
    epochs: int = option(15, "maximum epochs; early stopping usually ends sooner")
    batch_size: int = option(32, "training batch size")
    learning_rate: float = option(2e-3, "initial Adam learning rate")
    patience: int = option(4, "early-stopping patience on the early-stopping split's loss, in epochs")
    seed: int = option(0, "seed for the split, initialisation and augmentation")
    validation_fraction: float = option(
        0.15, "share of each class held out to fit the temperature and choose the abstain threshold"
    )
    early_stopping_fraction: float = option(
        0.1, "share of each class held out for model selection (early stopping, learning rate, checkpoint)"
    )
    test_fraction: float = option(0.15, "share of each class held out for the test report")
    weights: str | None = option(
        None, "initial backbone weights for efficientnetb0; imagenet needs internet",
        choices=("none", "imagenet"), parse=_weights, shown="none",
    )
    name: str = option(DEFAULT_MODEL_NAME, "model name in the BentoML store")
    task: str = option(DEFAULT_TASK, "task description written into the model card")
    split_by: str = option(
        "group", "split whole near-duplicate groups, or single images (leaks; for comparison only)",
        choices=SPLIT_BY,
    )
    fnr_target: float = option(
        0.05, "highest false-negative rate allowed for each cancer class among answered validation images; "
        "sets the abstain threshold",
    )
    min_confidence: float = option(0.5, "the abstain threshold is never below this")
    negative_classes: list[str] | None = option(
        None, "a class that means no disease (repeatable)", flag="--negative-class", metavar="CLASS",
        shown="recognised by name, e.g. lung_n, notumor",
    )
    ood_acceptance: float = option(
        DEFAULT_OOD_ACCEPTANCE, "share of in-distribution tiles the out-of-distribution threshold is to keep"
    )
    holdout_site: str = option(
        AUTO, "a site (from the dataset's tiles.csv) held out whole and evaluated as unseen; auto: the last of "
        "three or more declared sites; none: train on every site",
    )
    holdout_class: str | None = option(
        None, "leave this class out of training and report how often the OOD detector flags it (an experiment)",
        metavar="CLASS",
    )
    microns_per_pixel: float | None = option(
        None, "the training images' pixel size in microns: uploads sent with their `mpp` are resampled to it and "
        "whole slides tiled at it; overrides the dataset's dataset.json",
        shown="the dataset's dataset.json, else unknown",
    )
    bootstrap_resamples: int = option(2000, "bootstrap resamples for the test metrics' confidence intervals")
    out: Path = option(Path("artifacts"), "folder for run artefacts: split manifest, checkpoint, report")
    verbose: int = field(default_factory=lambda: 1 if sys.stderr.isatty() else 2)

    @property
    def size(self) -> int:
        return self.input_size or DEFAULT_INPUT_SIZE[self.arch]


def framework_versions() -> dict[str, str]:
    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "bentoml": bentoml.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "pydantic": pydantic.__version__,
        "python": sys.version.split()[0],
    }


def _callbacks(settings: TrainSettings, run_dir: Path) -> list[keras.callbacks.Callback]:
    # On small datasets the first epochs' validation loss is meaningless (BatchNorm's
    # moving statistics lag the weights) and can be the lowest of the run; early
    # stopping then restores an epoch that predicts one class. Watch only after a warm-up.
    warm_up = min(WARM_UP_EPOCHS, max(0, settings.epochs - settings.patience))
    return [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=settings.patience, restore_best_weights=True, start_from_epoch=warm_up
        ),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=max(1, settings.patience // 2)),
        keras.callbacks.ModelCheckpoint(run_dir / "best.keras", monitor="val_loss", save_best_only=True),
    ]


def _fit(
    model: keras.Model,
    settings: TrainSettings,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    run_dir: Path,
) -> int:
    """Fit (phase by phase for transfer models); return the epochs trained."""
    # Phased fine-tuning protects pretrained weights; a randomly initialised backbone trains whole.
    transfer = settings.arch == "efficientnetb0" and settings.weights is not None
    phases = fine_tune_schedule(settings.learning_rate) if transfer else (None,)
    epochs_done = 0
    for phase in phases:
        rate = settings.learning_rate
        budget = settings.epochs
        if phase is not None:
            apply_phase(model, phase)
            rate = phase.learning_rate
            budget = max(1, round(settings.epochs * phase.epoch_fraction))
            logger.info("fine-tuning phase %s: lr=%g, up to %d epochs", phase.name, rate, budget)
        model.compile(
            optimizer=keras.optimizers.Adam(rate),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
        )
        history = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs_done + budget,
            initial_epoch=epochs_done,
            callbacks=_callbacks(settings, run_dir),
            verbose=settings.verbose,
        )
        epochs_done += len(history.history["loss"])
    return epochs_done


@dataclass(frozen=True)
class Evaluation:
    """Everything learned from the validation and test splits after fitting."""

    metrics: TestMetrics
    calibration: Calibration
    abstention: Abstention
    test: TestPredictions
    site_shift: SiteShift | None


def evaluate(
    model: keras.Model,
    images: dict[str, np.ndarray],
    manifest: data.SplitManifest,
    settings: TrainSettings,
) -> Evaluation:
    """Calibrate and choose the abstain threshold on validation, then measure on test."""
    classes = manifest.class_names
    to_logits = logits_model(model)
    logits = {split: to_logits.predict(images[split], batch_size=64, verbose=0) for split in ("validation", "test")}
    labels = {split: manifest.labels(split) for split in ("validation", "test")}

    choice_of_t = choose_temperature(logits["validation"], labels["validation"], seed=settings.seed)
    temperature = choice_of_t.applied
    test = TestPredictions(
        labels=labels["test"],
        uncalibrated=calibrated_probabilities(logits["test"], 1.0),
        calibrated=calibrated_probabilities(logits["test"], temperature),
    )
    calibration = Calibration(
        temperature=temperature,
        validation_errors=int((logits["validation"].argmax(axis=1) != labels["validation"]).sum()),
        fitted_temperature=choice_of_t.fitted,
        cross_validated_nll=choice_of_t.cross_validated_nll,
        uncalibrated_nll=choice_of_t.uncalibrated_nll,
        gain_standard_error=choice_of_t.gain_standard_error,
        test_ece_fitted=expected_calibration_error(
            test.labels, calibrated_probabilities(logits["test"], choice_of_t.fitted)
        ),
        test_nll_fitted=negative_log_likelihood(logits["test"], test.labels, choice_of_t.fitted),
        test_ece_before=expected_calibration_error(test.labels, test.uncalibrated),
        test_ece_after=expected_calibration_error(test.labels, test.calibrated),
        test_nll_before=negative_log_likelihood(logits["test"], test.labels, 1.0),
        test_nll_after=negative_log_likelihood(logits["test"], test.labels, temperature),
    )

    cancer = cancer_classes(classes, settings.negative_classes)
    validation_probabilities = calibrated_probabilities(logits["validation"], temperature)
    choice = choose_threshold(
        labels["validation"], validation_probabilities, classes, cancer, settings.fnr_target, settings.min_confidence
    )
    on_test = selective_metrics(test.labels, test.calibrated, choice.threshold, classes, cancer)
    abstention = Abstention(
        threshold=choice.threshold,
        fnr_target=settings.fnr_target,
        cancer_classes=cancer,
        target_met_on_validation=choice.target_met,
        validation_coverage=choice.validation.coverage,
        validation_false_negative_rate=choice.validation.false_negative_rate,
        test_coverage=on_test.coverage,
        test_false_negative_rate=on_test.false_negative_rate,
        risk_coverage=risk_coverage(test.labels, test.calibrated, classes, cancer),
    )

    metrics = compute_metrics(test.labels, test.calibrated, classes)
    intervals = bootstrap_intervals(
        test.labels, test.calibrated, manifest.groups("test"), classes, settings.bootstrap_resamples, seed=settings.seed
    )
    metrics = metrics.model_copy(update={"confidence_intervals": intervals})

    def classify(paths: list[Path]) -> np.ndarray:
        return calibrated_probabilities(to_logits.predict(data.load_images(paths, settings.size), verbose=0),
                                        temperature)

    site_shift = evaluate_site_shift(
        manifest, test.calibrated, classify, cancer, min(settings.bootstrap_resamples, 1000), settings.seed
    )
    if site_shift:
        logger.info("held-out site(s) %s: accuracy %.3f, %.3f below the in-site test",
                    site_shift.held_out.site, site_shift.held_out.accuracy, site_shift.accuracy_drop)
    return Evaluation(metrics, calibration, abstention, test, site_shift)


def prepare_split(settings: TrainSettings) -> data.SplitManifest:
    """The dataset's leakage-aware split for these settings."""
    root = data.resolve_dataset_root(settings.data)
    manifest = data.split_dataset(
        root,
        settings.seed,
        settings.validation_fraction,
        settings.test_fraction,
        split_by=settings.split_by,
        early_stopping_fraction=settings.early_stopping_fraction,
        exclude=(settings.holdout_class,) if settings.holdout_class else (),
        holdout_sites=() if settings.holdout_site == "none" else (settings.holdout_site,),
    )
    logger.info(
        "classes %s, split sizes %s, %d near-duplicate groups (largest %d), %d groups across splits",
        manifest.class_names,
        manifest.sizes(),
        manifest.n_groups(),
        manifest.largest_group(),
        manifest.groups_across_splits(),
    )
    return manifest


@dataclass(frozen=True)
class Trust:
    """The quality gate and the OOD detector fitted after training, with their evaluation."""

    quality_gate: QualityGate
    out_of_distribution: OutOfDistribution
    parameters_path: Path  # the scorer's parameters, stored beside the model
    magnification: MagnificationCheck
    scorer: FeatureScorer


def fit_trust(
    model: keras.Model,
    images: dict[str, np.ndarray],
    manifest: data.SplitManifest,
    settings: TrainSettings,
    temperature: float,
    run_dir: Path,
) -> Trust:
    """Fit the gate and the OOD score on the training split; choose the threshold on validation;
    measure both on test tiles and on generated near-OOD sets (plus the held-out class, if any)."""
    layer_names = OOD_FEATURE_LAYERS[settings.arch]
    predictor = Predictor(model, settings.size, temperature, layer_names)
    features = {split: predictor.outputs_in_batches(images[split]).features for split in data.SPLITS}
    tapped = tap_layers(model, layer_names).outputs[:-1]
    gate = fit_quality_gate(images["train"], images["validation"], images["test"])
    scorer, ood = fit_ood(
        (features["train"], manifest.labels("train")),
        features["validation"],
        features["test"],
        {name: int(tensor.shape[-1]) for name, tensor in zip(layer_names, tapped, strict=True)},
        len(manifest.class_names),
        run_dir,
        settings.ood_acceptance,
    )
    test_scores = scorer(features["test"])
    sets = near_ood_sets(images["test"], seed=settings.seed)
    if settings.holdout_class:
        held_out = data.load_images(data.discover_classes(manifest.root)[settings.holdout_class], settings.size)
        sets.append(OodSet(f"held_out:{settings.holdout_class}", "a class the model never saw", held_out))
    results = [
        evaluate_set(s, scorer(predictor.outputs_in_batches(s.images).features), test_scores, gate, ood.threshold)
        for s in sets
    ]
    accepted = float(np.mean(~flagged(images["test"], test_scores, gate, ood.threshold)))
    for result in results:
        logger.info("OOD set %-24s detected %5.1f%% (gate %5.1f%%), score AUROC %.3f, FPR@95%%TPR %.3f",
                    result.name, 100 * result.detection_rate, 100 * result.gate_rate, result.score_auroc,
                    result.fpr_at_95_tpr)
    logger.info("in-distribution test tiles accepted by gate and score: %.1f%%", 100 * accepted)
    ood = ood.model_copy(update={"evaluation": results, "test_acceptance_with_gate": accepted})
    magnification = fit_magnification(
        magnified_features(predictor, manifest.paths("train"), manifest.labels("train"), settings.seed),
        len(manifest.paths("train")),
        magnified_features(predictor, manifest.paths("validation"), manifest.labels("validation"), settings.seed),
        len(manifest.paths("validation")),
        settings.seed,
    )
    return Trust(gate, ood, run_dir / OOD_FILE, magnification, scorer)


@dataclass(frozen=True)
class FittedRun:
    model: keras.Model
    evaluation: Evaluation
    trust: Trust
    epochs_trained: int
    train_seconds: float


def fit_and_evaluate(settings: TrainSettings, manifest: data.SplitManifest, run_dir: Path) -> FittedRun:
    """Decode the split, build and fit the architecture, then calibrate and evaluate it."""
    keras.utils.set_random_seed(settings.seed)
    # Same seed, same data, same machine -> the same model (TensorFlow's parallel
    # reductions are otherwise free to change the order of float additions).
    tf.config.experimental.enable_op_determinism()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    images = {split: data.load_images(manifest.paths(split), settings.size) for split in data.SPLITS}
    labels = {split: manifest.labels(split) for split in data.SPLITS}
    logger.info("decoded %d images in %.1fs", sum(len(v) for v in images.values()), time.perf_counter() - started)

    model = build_model(settings.arch, len(manifest.class_names), settings.size, settings.weights)
    train_ds = data.make_dataset(images["train"], labels["train"], settings.batch_size, True, settings.seed)
    # Model selection watches its own split: the validation split stays unseen for calibration.
    val_ds = data.make_dataset(images["early_stopping"], labels["early_stopping"], settings.batch_size, False)
    epochs_trained = _fit(model, settings, train_ds, val_ds, run_dir)
    train_seconds = time.perf_counter() - started

    evaluation = evaluate(model, images, manifest, settings)
    trust = fit_trust(model, images, manifest, settings, evaluation.calibration.temperature, run_dir)
    logger.info(
        "%s test results (calibrated, T=%.3f)\n%s",
        settings.arch,
        evaluation.calibration.temperature,
        text_report(evaluation.metrics, manifest.class_names),
    )
    return FittedRun(model, evaluation, trust, epochs_trained, train_seconds)


def microns_per_pixel(settings: TrainSettings, root: Path) -> tuple[float | None, str | None]:
    """The training images' pixel size and where it was declared: the option, else the dataset's file."""
    declared = data.read_microns_per_pixel(root)
    if settings.microns_per_pixel is not None:
        if declared is not None and declared != settings.microns_per_pixel:
            logger.warning("--microns-per-pixel %g overrides the %g of %s", settings.microns_per_pixel, declared,
                           data.DATASET_FILE)
        return settings.microns_per_pixel, "trainer"
    return declared, (data.DATASET_FILE if declared is not None else None)


def magnification_table(card: ModelCard, run: FittedRun, manifest: data.SplitManifest,
                        settings: TrainSettings) -> ModelCard:
    """The card with the report's magnification section: the test split at 0.5x-2x, with and without mpp."""
    def load() -> tuple[list[Image.Image], np.ndarray]:
        side = MAGNIFICATION_FIT_SIDE * settings.size
        return ([Image.fromarray(a) for a in data.load_images(manifest.paths("test"), side)],
                manifest.labels("test"))

    stored = StoredModel("(in training)", run.model, card, settings.out, run.trust.scorer)
    rows = evaluate_magnification(TileClassifier(stored), load, seed=settings.seed)
    check = card.magnification.model_copy(update={"evaluation": rows}) if card.magnification else None
    return card.model_copy(update={"magnification": check})


def train(settings: TrainSettings) -> str:
    """Run the whole pipeline: split, fit, calibrate, evaluate on test, save. Returns the tag."""
    manifest = prepare_split(settings)
    run_dir = settings.out / f"{settings.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "split_manifest.json"
    manifest.save(manifest_path)
    run = fit_and_evaluate(settings, manifest, run_dir)
    model, evaluation = run.model, run.evaluation
    mpp, mpp_from = microns_per_pixel(settings, manifest.root)

    card = ModelCard(
        task=settings.task,
        class_names=manifest.class_names,
        input_size=settings.size,
        architecture=settings.arch,
        parameter_count=int(model.count_params()),
        training=TrainingConfig(
            epochs_max=settings.epochs,
            epochs_trained=run.epochs_trained,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
            augmentation=data.AUGMENTATIONS,
            early_stopping_monitor="the early-stopping split's loss",
            weights=settings.weights,
            train_seconds=round(run.train_seconds, 1),
        ),
        dataset=DatasetInfo(
            source=manifest.root.name,
            fingerprint=manifest.fingerprint(),
            class_counts=manifest.class_counts(),
            n_images=len(manifest.examples),
            split_policy=manifest.policy,
            split_seed=settings.seed,
            split_sizes=manifest.sizes(),
            n_groups=manifest.n_groups(),
            largest_group=manifest.largest_group(),
            groups_across_splits=manifest.groups_across_splits(),
            tile_size=data.common_side(manifest.paths("train")),
            microns_per_pixel=mpp,
            microns_per_pixel_from=mpp_from,
        ),
        metrics=evaluation.metrics,
        calibration=evaluation.calibration,
        abstention=evaluation.abstention,
        quality_gate=run.trust.quality_gate,
        out_of_distribution=run.trust.out_of_distribution,
        magnification=run.trust.magnification,
        site_shift=evaluation.site_shift,
        framework_versions=framework_versions(),
        created_at=datetime.now(UTC),
    )
    card = magnification_table(card, run, manifest, settings)
    report = write_report(card, evaluation.test, run_dir)
    logger.info("report written to %s", run_dir / REPORT_MARKDOWN)
    extra_files = {**report, manifest_path.name: manifest_path, OOD_FILE: run.trust.parameters_path}
    return save_model(model, card, settings.name, extra_files=extra_files)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a tissue classifier and save it into the BentoML model store.",
    )
    add_options(parser, TrainSettings)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tag = train(settings_from_args(TrainSettings, args))
    # The tag is the command's result: stdout, so scripts can capture it.
    sys.stdout.write(f"{tag}\n")


if __name__ == "__main__":
    main()
