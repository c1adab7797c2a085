"""Train a classifier on a class-folder dataset and save it into the model store.

Early stopping and the learning-rate schedule watch the VALIDATION split only;
the test split is touched once, after training, for the report and the card.

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

from models.architectures import ARCHITECTURES, apply_phase, build_model, fine_tune_schedule
from models.card import DatasetInfo, ModelCard, TrainingConfig
from models.inference import Predictor
from models.store import DEFAULT_MODEL_NAME, save_model
from training import data
from training.evaluate import compute_metrics, text_report, write_report

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = {"cnn": 128, "efficientnetb0": 224}
DEFAULT_TASK = "lung histopathology tile classification (LC25000 layout)"


@dataclass
class TrainSettings:
    """Everything a training run needs; the CLI fills it from its options."""

    data: Path
    arch: str = "cnn"
    input_size: int | None = None
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 2e-3
    patience: int = 4
    seed: int = 0
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    weights: str | None = None
    name: str = DEFAULT_MODEL_NAME
    task: str = DEFAULT_TASK
    abstain_threshold: float = 0.5
    out: Path = Path("artifacts")
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
    return [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience, restore_best_weights=True),
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
    phases = fine_tune_schedule(settings.learning_rate) if settings.arch == "efficientnetb0" else (None,)
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


def train(settings: TrainSettings) -> str:
    """Run the whole pipeline: split, fit, evaluate on test, save. Returns the tag."""
    keras.utils.set_random_seed(settings.seed)
    root = data.resolve_dataset_root(settings.data)
    manifest = data.split_dataset(root, settings.seed, settings.validation_fraction, settings.test_fraction)
    run_dir = settings.out / f"{settings.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "split_manifest.json"
    manifest.save(manifest_path)
    logger.info("classes %s, split sizes %s", manifest.class_names, manifest.sizes())

    started = time.perf_counter()
    images = {split: data.load_images(manifest.paths(split), settings.size) for split in data.SPLITS}
    labels = {split: manifest.labels(split) for split in data.SPLITS}
    logger.info("decoded %d images in %.1fs", sum(len(v) for v in images.values()), time.perf_counter() - started)

    model = build_model(settings.arch, len(manifest.class_names), settings.size, settings.weights)
    train_ds = data.make_dataset(images["train"], labels["train"], settings.batch_size, True, settings.seed)
    val_ds = data.make_dataset(images["validation"], labels["validation"], settings.batch_size, False)
    epochs_trained = _fit(model, settings, train_ds, val_ds, run_dir)
    train_seconds = time.perf_counter() - started

    predictor = Predictor(model, settings.size)
    probabilities = predictor(images["test"])
    metrics = compute_metrics(labels["test"], probabilities, manifest.class_names)
    logger.info("test results\n%s", text_report(metrics, manifest.class_names))
    report = write_report(metrics, manifest.class_names, run_dir)

    card = ModelCard(
        task=settings.task,
        class_names=manifest.class_names,
        input_size=settings.size,
        architecture=settings.arch,
        parameter_count=int(model.count_params()),
        training=TrainingConfig(
            epochs_max=settings.epochs,
            epochs_trained=epochs_trained,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
            augmentation=data.AUGMENTATIONS,
            early_stopping_monitor="val_loss",
            weights=settings.weights,
            train_seconds=round(train_seconds, 1),
        ),
        dataset=DatasetInfo(
            source=root.name,
            fingerprint=manifest.fingerprint(),
            class_counts=manifest.class_counts(),
            n_images=len(manifest.examples),
            split_policy=data.SPLIT_POLICY,
            split_seed=settings.seed,
            split_sizes=manifest.sizes(),
        ),
        metrics=metrics,
        abstain_threshold=settings.abstain_threshold,
        framework_versions=framework_versions(),
        created_at=datetime.now(UTC),
    )
    extra = {**report.as_dict(), manifest_path.name: manifest_path}
    return save_model(model, card, settings.name, extra_files=extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train a tissue classifier and save it into the BentoML model store.",
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="folder of class sub-folders (or the LC25000 top folder)"
    )
    parser.add_argument(
        "--arch", choices=ARCHITECTURES, default="cnn", help="architecture (default: cnn, the compact CPU model)"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="model input size in pixels (default: 128 for cnn, 224 for efficientnetb0)",
    )
    parser.add_argument(
        "--epochs", type=int, default=15, help="maximum epochs; early stopping usually ends sooner (default: 15)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default: 32)")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="initial Adam learning rate (default: 2e-3)")
    parser.add_argument(
        "--patience", type=int, default=4, help="early-stopping patience on validation loss, in epochs (default: 4)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the split, initialisation and augmentation (default: 0)"
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.15,
        help="share of each class held out for validation (default: 0.15)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.15,
        help="share of each class held out for the test report (default: 0.15)",
    )
    parser.add_argument(
        "--weights",
        choices=["none", "imagenet"],
        default="none",
        help="initial backbone weights for efficientnetb0; imagenet needs internet (default: none)",
    )
    parser.add_argument(
        "--name", default=DEFAULT_MODEL_NAME, help=f"model name in the BentoML store (default: {DEFAULT_MODEL_NAME})"
    )
    parser.add_argument("--task", default=DEFAULT_TASK, help="task description written into the model card")
    parser.add_argument(
        "--abstain-threshold",
        type=float,
        default=0.5,
        help="confidence below which answers are flagged uncertain (default: 0.5)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("artifacts"),
        help="folder for run artefacts: split manifest, checkpoint, report (default: artifacts)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = TrainSettings(
        data=args.data,
        arch=args.arch,
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        patience=args.patience,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        weights=None if args.weights == "none" else args.weights,
        name=args.name,
        task=args.task,
        abstain_threshold=args.abstain_threshold,
        out=args.out,
    )
    tag = train(settings)
    # The tag is the command's result: stdout, so scripts can capture it.
    sys.stdout.write(f"{tag}\n")


if __name__ == "__main__":
    main()
