"""Synthetic whole slides with ground truth, to check the slide analysis against a known map.

A slide is a grid of 768-pixel cells (LC25000's tile size). Tissue comes in
rectangular regions of one class each, drawn cell by cell with the tile
generator (:mod:`synthetic.tiles`: the default :class:`Difficulty`'s
stain, blur, illumination and site variation, one site per slide, every cell
JPEG round-tripped as a scanner's compression would), surrounded by
background glass. The ground truth is the label of every cell; it is written
beside the slide as ``<slide>.truth.json``.

The slide is a tiled, pyramidal TIFF (levels 1, 1/4 and 1/16, as a scanner's
SVS has, with its microns per pixel declared) written band by band, so a
20,000-pixel slide never needs its level 0 in memory. ``--compression none``
makes a slide of a gigabyte or more (the memory benchmark's).

Cells are drawn as clean tissue of their region's class: the tile dataset's
ambiguity knobs (poorly differentiated drift, border tiles, label noise)
describe how tiles are filed, not what a region of a slide is.

    python -m synthetic.slides generate --out data/slides/synthetic.tiff --size 20000 --seed 0
    python -m synthetic.slides score --truth data/slides/synthetic.tiff.truth.json \\
        --geojson out/analysis.geojson
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from synthetic.tissue import LUNG_CLASSES, MICRONS_PER_PIXEL, Recipe, render_recipe
from synthetic.variation import Difficulty, Site, make_sites

logger = logging.getLogger(__name__)

CELL = 768  # level-0 pixels of one drawn cell
TIFF_TILE = 256  # the TIFF's own tiles (CELL is a whole number of them)
LEVEL_FACTORS = (1, 4, 16)  # pyramid levels, as a 40x SVS has them (40x, 10x, 2.5x)
UNCERTAIN = "uncertain"  # an analysed tile given no class, in the score's counts and confusion
GLASS = "glass"
GLASS_RGB = (242, 242, 244)  # bright, faintly blue, as empty glass scans
TRUTH_SUFFIX = ".truth.json"
DEFAULT_MICRONS_PER_PIXEL = MICRONS_PER_PIXEL  # of a 768-pixel cell, as the tile generator draws it


@dataclass(frozen=True)
class SlideTruth:
    """The label of every cell of a synthetic slide (a class name or ``glass``), row by row."""

    classes: list[str]
    cell_size: int
    microns_per_pixel: float
    cells: list[list[str]]

    @property
    def width(self) -> int:
        return len(self.cells[0]) * self.cell_size

    @property
    def height(self) -> int:
        return len(self.cells) * self.cell_size

    def label_of(self, x: int, y: int, size: int) -> tuple[str, float]:
        """The label covering most of the level-0 box at (x, y) of side `size`, and its share of the box."""
        areas: dict[str, int] = {}
        for row in range(y // self.cell_size, min(len(self.cells), math.ceil((y + size) / self.cell_size))):
            for col in range(x // self.cell_size, min(len(self.cells[0]), math.ceil((x + size) / self.cell_size))):
                left, top = col * self.cell_size, row * self.cell_size
                overlap = (max(0, min(x + size, left + self.cell_size) - max(x, left))
                           * max(0, min(y + size, top + self.cell_size) - max(y, top)))
                label = self.cells[row][col]
                areas[label] = areas.get(label, 0) + overlap
        label = max(areas, key=areas.__getitem__)
        return label, areas[label] / (size * size)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: Path) -> SlideTruth:
        return cls(**json.loads(path.read_text()))


def truth_path(slide: Path) -> Path:
    return slide.with_name(slide.name + TRUTH_SUFFIX)


def plan_regions(rows: int, cols: int, classes: Iterable[str], seed: int, block: int = 4,
                 glass_share: float = 0.2) -> list[list[str]]:
    """Cell labels: a margin of glass, then blocks of `block` x `block` cells, each one class or glass.
    Every class gets at least one block (the first ones, shuffled), when there is room."""
    rng = np.random.default_rng(zlib.crc32(f"{seed}:regions".encode()))
    classes = list(classes)
    cells = [[GLASS] * cols for _ in range(rows)]
    blocks = [(r, c) for r in range(1, rows - 1, block) for c in range(1, cols - 1, block)]
    firsts = list(rng.permutation(classes))
    for number, (top, left) in enumerate(blocks):
        if number < len(firsts):
            label = str(firsts[number])
        else:
            label = GLASS if rng.random() < glass_share else str(classes[int(rng.integers(len(classes)))])
        for r in range(top, min(top + block, rows - 1)):
            for c in range(left, min(left + block, cols - 1)):
                cells[r][c] = label
    return cells


@dataclass(frozen=True)
class _CellJob:
    label: str
    seed: int
    site: Site
    difficulty: Difficulty


def _draw_cell(job: _CellJob) -> np.ndarray:
    """One cell's pixels: glass with sensor noise, or a tile of tissue JPEG round-tripped at a drawn quality."""
    rng = np.random.default_rng(job.seed)
    if job.label == GLASS:
        noise = rng.normal(0.0, 1.5, (CELL, CELL, 3))
        return np.clip(np.asarray(GLASS_RGB, np.float32) + noise, 0, 255).astype(np.uint8)
    tile = render_recipe(Recipe(job.label, site=job.site), CELL, job.seed, job.difficulty)
    low, high = job.difficulty.jpeg_quality
    buffer = io.BytesIO()
    tile.save(buffer, format="JPEG", quality=int(rng.integers(low, high + 1)))
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def _tiles_of(band: np.ndarray) -> Iterator[np.ndarray]:
    """The band's TIFF tiles, row-major (what tifffile takes for a tiled page)."""
    for top in range(0, band.shape[0], TIFF_TILE):
        for left in range(0, band.shape[1], TIFF_TILE):
            yield band[top : top + TIFF_TILE, left : left + TIFF_TILE]


def generate_slide(out: Path, size: int = 20_000, seed: int = 0, difficulty: Difficulty | None = None,
                   compression: str | None = "zlib", microns_per_pixel: float = DEFAULT_MICRONS_PER_PIXEL,
                   classes: tuple[str, ...] = LUNG_CLASSES, workers: int | None = None) -> SlideTruth:
    """Write a pyramidal TIFF of at least `size` x `size` pixels (whole cells) to `out`, and its truth beside it."""
    import tifffile

    difficulty = difficulty or Difficulty()
    cells_across = max(3, math.ceil(size / CELL))
    truth = SlideTruth(list(classes), CELL, microns_per_pixel, plan_regions(cells_across, cells_across, classes, seed))
    site = make_sites(seed, replace(difficulty, sites=1))[0]  # one slide, one lab
    width = height = cells_across * CELL
    reduced = [np.empty((height // f, width // f, 3), np.uint8) for f in LEVEL_FACTORS[1:]]
    per_cm = 1e4 / microns_per_pixel

    def level0_tiles(pool: ProcessPoolExecutor) -> Iterator[np.ndarray]:
        for row, labels in enumerate(truth.cells):
            jobs = [_CellJob(label, zlib.crc32(f"{seed}:slide:{row}:{col}".encode()), site, difficulty)
                    for col, label in enumerate(labels)]
            band = np.concatenate(list(pool.map(_draw_cell, jobs)), axis=1)
            image = Image.fromarray(band)
            for array, factor in zip(reduced, LEVEL_FACTORS[1:], strict=True):
                array[row * CELL // factor : (row + 1) * CELL // factor] = np.asarray(image.reduce(factor))
            logger.info("row %d of %d drawn", row + 1, cells_across)
            yield from _tiles_of(band)

    out.parent.mkdir(parents=True, exist_ok=True)
    options = {"tile": (TIFF_TILE, TIFF_TILE), "photometric": "rgb", "compression": compression,
               "resolutionunit": "CENTIMETER"}
    with ProcessPoolExecutor(max_workers=workers) as pool, tifffile.TiffWriter(out, bigtiff=True) as tif:
        tif.write(level0_tiles(pool), shape=(height, width, 3), dtype=np.uint8, resolution=(per_cm, per_cm),
                  subfiletype=0, **options)
        for array, factor in zip(reduced, LEVEL_FACTORS[1:], strict=True):
            # Reduced-resolution pages in the main chain: OpenSlide's generic TIFF levels.
            tif.write(array, resolution=(per_cm / factor, per_cm / factor), subfiletype=1, **options)
    truth.save(truth_path(out))
    logger.info("wrote %s: %d x %d px, %.2f GB", out, width, height, out.stat().st_size / 1e9)
    return truth


COVERAGE_STEP = 8  # level-0 pixels per pixel of the rasters the tissue coverage is measured on


def tissue_coverage(truth: SlideTruth, analysis_geojson: dict) -> dict[str, float | None]:
    """Shares of the true tissue's area (its class cells) inside the analysed tiles and inside the answered
    (not uncertain) ones, measured on rasters of COVERAGE_STEP px; None for a slide without tissue."""
    cell = np.isin(np.asarray(truth.cells), truth.classes)

    def cell_of(length: int) -> np.ndarray:  # the cell under the centre of each raster pixel
        centres = np.arange(math.ceil(length / COVERAGE_STEP)) * COVERAGE_STEP + COVERAGE_STEP / 2
        return np.minimum(centres // truth.cell_size, length // truth.cell_size - 1).astype(int)

    tissue = cell[np.ix_(cell_of(truth.height), cell_of(truth.width))]
    analysed, answered = np.zeros_like(tissue), np.zeros_like(tissue)
    for feature in analysis_geojson["features"]:
        ring = feature["geometry"]["coordinates"][0]
        left, top, right, bottom = (round(value / COVERAGE_STEP) for value in (
            min(p[0] for p in ring), min(p[1] for p in ring), max(p[0] for p in ring), max(p[1] for p in ring)))
        analysed[top:bottom, left:right] = True
        if _given_class(feature) is not None:
            answered[top:bottom, left:right] = True
    total = int(tissue.sum())
    if not total:
        return {"tissue_coverage": None, "tissue_answered": None}
    return {"tissue_coverage": round(int((tissue & analysed).sum()) / total, 4),
            "tissue_answered": round(int((tissue & answered).sum()) / total, 4)}


def _given_class(feature: dict) -> str | None:
    """The class an analysed tile was given, or None when it was left uncertain (the analysis GeoJSON's
    `uncertain` and `predicted_class` properties)."""
    properties = feature["properties"]
    return None if properties["uncertain"] else properties["predicted_class"]


def score(truth: SlideTruth, analysis_geojson: dict, tile_size: int, pure: float = 0.99) -> dict[str, object]:
    """How an analysis' tiles (its GeoJSON) agree with the truth, on the analysis' own tile grid (over the
    whole slide, the last column and row past its edge as the analysis has them).

    * tissue tiles: grid tiles whose majority label is a class. Correct when analysed and given that
      class; an uncertain or skipped one counts against it;
    * glass tiles: grid tiles at least `pure` glass. Skipped unless analysed;
    * coverage: the true tissue's area inside analysed and answered tiles (:func:`tissue_coverage`).
    """
    analysed: dict[tuple[int, int], str] = {}
    for feature in analysis_geojson["features"]:
        ring = feature["geometry"]["coordinates"][0]
        x, y = min(p[0] for p in ring), min(p[1] for p in ring)
        analysed[(int(x), int(y))] = _given_class(feature) or UNCERTAIN
    tissue = correct = uncertain = missed = glass = glass_analysed = 0
    confusion: dict[str, dict[str, int]] = {name: {} for name in truth.classes}
    for y in range(0, truth.height, tile_size):
        for x in range(0, truth.width, tile_size):
            label, share = truth.label_of(x, y, tile_size)
            answer = analysed.get((x, y))
            if label == GLASS:
                if share >= pure:
                    glass += 1
                    glass_analysed += answer is not None
                continue
            tissue += 1
            if answer is None:
                missed += 1
                continue
            uncertain += answer == UNCERTAIN
            correct += answer == label
            confusion[label][answer] = confusion[label].get(answer, 0) + 1
    answered = tissue - missed - uncertain
    return {
        "tissue_tiles": tissue,
        "tissue_tiles_correct": correct,
        "tissue_tiles_uncertain": uncertain,
        "tissue_tiles_not_analysed": missed,
        "share_correct": round(correct / tissue, 4) if tissue else None,
        "accuracy_of_answered": round(correct / answered, 4) if answered else None,
        "glass_tiles": glass,
        "glass_tiles_skipped_share": round(1 - glass_analysed / glass, 4) if glass else None,
        **tissue_coverage(truth, analysis_geojson),
        "confusion": confusion,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m synthetic.slides", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    make = verbs.add_parser("generate", help="write a synthetic slide and its truth")
    make.add_argument("--out", type=Path, required=True, help="the slide's path (.tiff); the truth goes beside it")
    make.add_argument("--size", type=int, default=20_000, help="minimum side in pixels (default: %(default)s)")
    make.add_argument("--seed", type=int, default=0, help="regions, tissue and site (default: %(default)s)")
    make.add_argument("--compression", choices=("zlib", "none"), default="zlib",
                      help="none: about 3 bytes a pixel on disk (default: %(default)s)")
    make.add_argument("--microns-per-pixel", type=float, default=DEFAULT_MICRONS_PER_PIXEL,
                      help="declared at level 0 (default: %(default)s)")
    make.add_argument("--workers", type=int, default=None, help="processes drawing cells (default: all cores)")
    check = verbs.add_parser("score", help="compare an analysis' GeoJSON with a slide's truth (JSON to stdout)")
    check.add_argument("--truth", type=Path, required=True)
    check.add_argument("--geojson", type=Path, required=True)
    check.add_argument("--tile-size", type=int, default=CELL, help="the analysis' tile size (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.verb == "generate":
        generate_slide(args.out, args.size, args.seed, compression=None if args.compression == "none" else "zlib",
                       microns_per_pixel=args.microns_per_pixel, workers=args.workers)
    else:
        result = score(SlideTruth.load(args.truth), json.loads(args.geojson.read_text()), args.tile_size)
        sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
