"""Tiles at another magnification than the model's: how they are made, and how the model does on them.

A tile at `factor` times the training magnification shows 1/factor of the
field, each structure `factor` times larger, on as many pixels as the tile
(:func:`magnified`): above 1, the tile's centre crop enlarged (a 40x scan of a
20x model's tissue); below 1, a mosaic of tiles of the same class, shrunk (a
10x scan: four fields of view in one). Its pixel size is the training pixel
size divided by `factor`.

Training fits the magnification check on training tiles made this way
(:func:`training.trust.fit_magnification`), and the report's magnification
section (:func:`evaluate`) measures, at each of :data:`FACTORS`, the share of
tiles answered right or flagged, the share answered, the accuracy of the
answers and the share flagged `magnification`, with the pixel size sent
(resampled to the model's, :mod:`models.resampling`) and without it.

    python -m training.magnification --model lung_histopathology:latest --per-class 30

prints that table for fresh tiles of the synthetic generator (the acceptance
check of the default model).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from models.magnification import MagnificationCondition
from models.prediction import MAGNIFICATION, Prediction, Thresholds, TileClassifier
from models.resampling import ModelScale, resample

logger = logging.getLogger(__name__)

# 0.5x, 0.71x, 1x, 1.41x, 2x: half-octave steps of magnification (a quarter to four times the area).
FACTORS = (0.5, 2**-0.5, 1.0, 2**0.5, 2.0)


def partners_needed(factor: float) -> int:
    """How many other tiles of the class a tile at `factor` needs: a mosaic fills the wider field."""
    if factor >= 1:
        return 0
    return math.ceil(1 / factor - 1e-9) ** 2 - 1


def magnified(tile: Image.Image, factor: float, partners: Sequence[Image.Image] = ()) -> Image.Image:
    """`tile` as a scanner at `factor` times its magnification would show it, on as many pixels: the
    centre 1/factor of it enlarged (factor >= 1), or the centre of a mosaic of it and `partners`
    (tiles of the same class and size; :func:`partners_needed`) shrunk (factor < 1)."""
    width, height = tile.size
    if factor >= 1:
        crop_w, crop_h = width / factor, height / factor
        box = ((width - crop_w) / 2, (height - crop_h) / 2, (width + crop_w) / 2, (height + crop_h) / 2)
        return tile.resize(tile.size, Image.Resampling.BICUBIC, box=box)
    across = math.ceil(1 / factor - 1e-9)
    if len(partners) < across**2 - 1:
        raise ValueError(f"a tile at {factor:g}x needs {across**2 - 1} partner tiles, got {len(partners)}")
    mosaic = Image.new("RGB", (width * across, height * across))
    for index, part in enumerate([tile, *partners[: across**2 - 1]]):
        mosaic.paste(part.resize(tile.size) if part.size != tile.size else part,
                     ((index % across) * width, (index // across) * height))
    view_w, view_h = width / factor, height / factor
    left, top = (mosaic.width - view_w) / 2, (mosaic.height - view_h) / 2
    return mosaic.resize(tile.size, Image.Resampling.BICUBIC, box=(left, top, left + view_w, top + view_h),
                         reducing_gap=3.0)


def magnified_set(tiles: Sequence[Image.Image], labels: np.ndarray, factors: Sequence[float],
                  rng: np.random.Generator) -> list[Image.Image]:
    """Each tile at its factor, its mosaic partners drawn from the other tiles of its class."""
    by_class = {label: np.flatnonzero(labels == label) for label in np.unique(labels)}
    made = []
    for index, (tile, factor) in enumerate(zip(tiles, factors, strict=True)):
        others = by_class[labels[index]][by_class[labels[index]] != index]
        wanted = partners_needed(factor)
        chosen = rng.choice(others, size=wanted, replace=len(others) < wanted) if wanted else []
        made.append(magnified(tile, factor, [tiles[i] for i in chosen]))
    return made


@dataclass(frozen=True)
class Outcome:
    """What the answer rule made of one tile."""

    right: bool  # the predicted class is the label
    uncertain: bool
    flagged: bool  # `magnification` among the reasons


def outcomes(predictions: Sequence[Prediction], labels: np.ndarray, class_names: Sequence[str]) -> list[Outcome]:
    return [Outcome(p.predicted_class == class_names[label], p.uncertain, MAGNIFICATION in p.reasons)
            for p, label in zip(predictions, labels, strict=True)]


def condition(factor: float, with_mpp: bool, results: Sequence[Outcome]) -> MagnificationCondition:
    """One row of the table: right or uncertain, answered, right when answered, flagged `magnification`."""
    answered = [r for r in results if not r.uncertain]
    return MagnificationCondition(
        factor=round(factor, 4),
        with_mpp=with_mpp,
        n_images=len(results),
        right_or_uncertain=float(np.mean([r.right or r.uncertain for r in results])),
        answered=len(answered) / len(results),
        right_when_answered=float(np.mean([r.right for r in answered])) if answered else None,
        flagged=float(np.mean([r.flagged for r in results])),
    )


def evaluate(classifier: TileClassifier, load: Callable[[], tuple[list[Image.Image], np.ndarray]],
             factors: Sequence[float] = FACTORS, seed: int = 0, chunk: int = 64) -> list[MagnificationCondition]:
    """The table: every factor, without the pixel size and (when the card declares one) with it.

    `load()` gives square tiles that each show the training field of view (at any number of pixels) and
    their labels; each condition builds its tiles from them and classifies them through `classifier`,
    after :func:`models.resampling.resample` as the service and the slides do.
    """
    tiles, labels = load()
    target = ModelScale.of(classifier.stored.card)
    names = classifier.class_names
    rows = []
    for factor in factors:
        rng = np.random.default_rng([seed, round(1000 * factor)])
        uploads = magnified_set(tiles, labels, [factor] * len(tiles), rng)
        tile_mpp = target.field_microns / tiles[0].width if target.field_microns else None
        sent = [None] + ([tile_mpp / factor] if tile_mpp else [])
        for mpp in sent:
            predictions: list[Prediction] = []
            for start in range(0, len(uploads), chunk):
                images = np.stack([resample(upload, target, mpp) for upload in uploads[start : start + chunk]])
                predictions += classifier.classify(images)
            rows.append(condition(factor, mpp is not None, outcomes(predictions, labels, names)))
    return rows


def check_cost(classifier: TileClassifier, images: np.ndarray, repeats: int = 200) -> tuple[float, float, float]:
    """Median seconds per image, on one batch: the trust checks (the gate and the out-of-distribution score)
    without and with the magnification estimate, and the estimate alone (on the model's features of `images`)."""
    from models.quality import assess_batch

    card, scorer = classifier.stored.card, classifier.stored.ood_scorer
    features = classifier.predictor.outputs(images).features
    check = card.magnification
    timings: dict[str, list[float]] = {"without": [], "with": [], "alone": []}
    for _ in range(repeats):
        for name in timings:  # interleaved, so a busy moment costs each alike
            started = time.perf_counter()
            if name != "alone":
                assess_batch(images, card.quality_gate)
                scorer(features)
            if name != "without" and check is not None:
                check.estimate(features)
            timings[name].append(time.perf_counter() - started)
    return tuple(float(np.median(timings[name])) / len(images) for name in timings)  # type: ignore[return-value]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def table(rows: Sequence[MagnificationCondition]) -> str:
    """The rows as a Markdown table."""
    lines = ["| shown at | mpp sent | tiles | right or uncertain | answered | right when answered | flagged "
             "magnification |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.factor:.2f}x | {'yes' if row.with_mpp else 'no'} | {row.n_images} | "
                     f"{_percent(row.right_or_uncertain)} | {_percent(row.answered)} | "
                     f"{_percent(row.right_when_answered)} | {_percent(row.flagged)} |")
    return "\n".join(lines)


def fresh_synthetic_tiles(class_names: Sequence[str], per_class: int, seed: int, size: int = 768
                          ) -> tuple[list[Image.Image], np.ndarray]:
    """Tiles of the synthetic generator as `make data` draws them (its default difficulty and sites) under
    another dataset seed, so no training run drew them; labelled with their true class (no label noise)."""
    from synthetic.tiles import plan_tiles
    from synthetic.tissue import render_recipe, tile_seed
    from synthetic.variation import Difficulty

    difficulty = Difficulty()
    tiles, labels = [], []
    for recipe, _, index in plan_tiles(tuple(class_names), per_class, seed, difficulty):
        tiles.append(render_recipe(recipe, size, tile_seed(seed, recipe.class_name, index), difficulty))
        labels.append(class_names.index(recipe.class_name))
    return tiles, np.array(labels)


def main(argv: list[str] | None = None) -> None:
    from models.store import DEFAULT_MODEL_TAG, load_model
    from synthetic.tissue import LUNG_CLASSES

    parser = argparse.ArgumentParser(prog="python -m training.magnification", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL_TAG, help="model tag (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=30, help="fresh tiles per class (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=2026, help="dataset seed of the fresh tiles; training used 0 "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stored = load_model(args.model)
    card = stored.card
    if set(card.class_names) != set(LUNG_CLASSES):
        parser.error(f"{args.model} was not trained on the synthetic lung classes {LUNG_CLASSES}")
    tile_size = card.dataset.tile_size or 768
    if card.dataset.microns_per_pixel is None:
        logger.warning("%s declares no pixel size: only the rows without mpp are measured", stored.tag)
    tiles, labels = fresh_synthetic_tiles(card.class_names, args.per_class, args.seed, tile_size)
    rows = evaluate(TileClassifier(stored), lambda: (tiles, labels))
    # The table is this command's result.
    sys.stdout.write(f"{stored.tag}, {args.per_class} fresh synthetic tiles per class, seed {args.seed}\n\n")
    sys.stdout.write(table(rows) + "\n")
    if card.magnification is not None:
        unchecked = replace(Thresholds.resolve(card), magnification=None)
        [before] = evaluate(TileClassifier(stored, unchecked), lambda: (tiles, labels), factors=(1.0,))[:1]
        sys.stdout.write(f"\nat 1x without the magnification check: {_percent(before.answered)} answered, "
                         f"{_percent(before.right_or_uncertain)} right or uncertain\n")
        tiles, _ = fresh_synthetic_tiles(card.class_names, 11, args.seed + 1, tile_size)
        batch = np.stack([resample(tile, ModelScale.of(card)) for tile in tiles[:32]])
        without, with_check, alone = check_cost(TileClassifier(stored), batch)
        sys.stdout.write(f"trust checks per image in a batch of {len(batch)} (median of 200): gate and score "
                         f"{1e6 * without:.1f} us, with the magnification estimate {1e6 * with_check:.1f} us; "
                         f"the estimate alone {1e6 * alone:.2f} us\n")


if __name__ == "__main__":
    main()
