"""Compare architectures on ONE leakage-aware split, in one table.

Every architecture is trained with the same settings on the same split (its
own default input size), calibrated and evaluated the way `training.train`
does, and timed in-process (traced function on random uint8 tiles, best of
a few batch sizes). Nothing is saved to the model store.

    python -m training.compare --data data/synthetic/lung_image_sets --arch cnn efficientnetb0
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from models.architectures import ARCHITECTURES
from models.inference import Predictor
from training.data import SplitManifest
from training.train import TrainSettings, fit_and_evaluate, prepare_split

logger = logging.getLogger(__name__)

THROUGHPUT_BATCH_SIZES = (1, 8, 32)
THROUGHPUT_SECONDS = 2.0  # per batch size


@dataclass(frozen=True)
class ComparisonRow:
    architecture: str
    input_size: int
    parameters: int
    epochs_trained: int
    train_seconds: float
    accuracy: float
    macro_f1: float
    cancer_fnr: dict[str, float]  # per cancer class, without abstention
    ece_after: float
    images_per_second: float  # in-process, best batch size
    best_batch_size: int


def in_process_throughput(predictor: Predictor) -> tuple[float, int]:
    """Images/s of the traced model at its best batch size (random tiles: speed does not depend on content)."""
    rng = np.random.default_rng(0)
    best = (0.0, 1)
    for batch_size in THROUGHPUT_BATCH_SIZES:
        images = rng.integers(0, 256, (batch_size, predictor.input_size, predictor.input_size, 3), dtype=np.uint8)
        predictor(images)  # trace and warm up
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < THROUGHPUT_SECONDS:
            predictor(images)
            calls += 1
        rate = calls * batch_size / (time.perf_counter() - started)
        best = max(best, (rate, batch_size))
    return best


def compare(base: TrainSettings, manifest: SplitManifest, architectures: list[str]) -> list[ComparisonRow]:
    """Train, evaluate and time each architecture on `manifest`'s split."""
    rows = []
    for arch in architectures:
        settings = replace(base, arch=arch)  # input_size None: each architecture's default
        run = fit_and_evaluate(settings, manifest, base.out / f"compare-{arch}")
        evaluation = run.evaluation
        metrics = evaluation.metrics
        predictor = Predictor(run.model, settings.size, evaluation.calibration.temperature)
        rate, batch_size = in_process_throughput(predictor)
        rows.append(
            ComparisonRow(
                architecture=arch,
                input_size=settings.size,
                parameters=int(run.model.count_params()),
                epochs_trained=run.epochs_trained,
                train_seconds=round(run.train_seconds, 1),
                accuracy=metrics.accuracy,
                macro_f1=metrics.macro_f1,
                cancer_fnr={c: metrics.per_class[c].false_negative_rate for c in evaluation.abstention.cancer_classes},
                ece_after=evaluation.calibration.test_ece_after,
                images_per_second=round(rate, 1),
                best_batch_size=batch_size,
            )
        )
    return rows


def markdown_table(rows: list[ComparisonRow], split_policy: str, test_images: int) -> str:
    cancer = list(rows[0].cancer_fnr) if rows else []
    header = (
        "| architecture | input | parameters | epochs | train s | accuracy | macro-F1 | "
        + " | ".join(f"FNR {c}" for c in cancer)
        + " | ECE (calibrated) | in-process images/s (batch) |"
    )
    lines = [
        f"Test split: {test_images} images; {split_policy}.",
        "",
        header,
        "|" + "---|" * (9 + len(cancer)),
    ]
    for r in rows:
        lines.append(
            f"| {r.architecture} | {r.input_size} | {r.parameters:,} | {r.epochs_trained} | {r.train_seconds:.0f} | "
            f"{r.accuracy:.3f} | {r.macro_f1:.3f} | "
            + " | ".join(f"{r.cancer_fnr[c]:.3f}" for c in cancer)
            + f" | {r.ece_after:.3f} | {r.images_per_second:.0f} ({r.best_batch_size}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of class sub-folders")
    parser.add_argument(
        "--arch", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES), help="architectures to compare"
    )
    parser.add_argument("--epochs", type=int, default=15, help="maximum epochs per architecture (default: 15)")
    parser.add_argument(
        "--input-size", type=int, default=None, help="one input size for all (default: each architecture's own)"
    )
    parser.add_argument("--seed", type=int, default=0, help="split and initialisation seed (default: 0)")
    parser.add_argument(
        "--out", type=Path, default=Path("artifacts/compare"), help="folder for the table (Markdown and JSON)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = TrainSettings(
        data=args.data, input_size=args.input_size, epochs=args.epochs, seed=args.seed, out=args.out, verbose=2
    )
    manifest = prepare_split(base)
    rows = compare(base, manifest, args.arch)
    table = markdown_table(rows, manifest.policy, manifest.sizes()["test"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.md").write_text(table)
    (args.out / "comparison.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    logger.info("architecture comparison (also in %s):\n%s", args.out / "comparison.md", table)


if __name__ == "__main__":
    main()
