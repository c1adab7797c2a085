"""Deterministic procedural H&E-like lung tissue tiles in the LC25000 layout, written as a dataset.

The real LC25000 images cannot be downloaded here, so tests, CI and `make model`
train on tiles drawn by :mod:`synthetic.tissue` (how each class looks, the
difficulty knobs and the sites) and written here as a dataset.

What each tile got is written to ``tiles.csv`` beside the class folders
(path, label, true class, site, kind, the other tissue and its share,
whether the label is noisy, JPEG quality, blur, illumination), and the knobs
with the realised rates to ``generation.json``. :data:`EASY` turns all of it
off. The tiles' pixel size goes to ``dataset.json`` (training copies it into
the model card): a 768-pixel tile is drawn at :data:`MICRONS_PER_PIXEL`, as
LC25000's tiles are about 20x, and a smaller tile shows the same field on
fewer, larger pixels.

With ``augmented_copies=K`` every drawn tile is also written K more times,
rotated and/or mirrored and JPEG re-encoded, the way LC25000 grew 250
originals per class into 5,000 images. Such a dataset leaks under an
image-level split, which is what the grouping in :mod:`training.grouping`
exists to prevent.

CLI::

    python -m synthetic.tiles --out data/synthetic --per-class 300 --seed 0
"""


from __future__ import annotations

import argparse
import csv
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from synthetic.tissue import (
    BORDER,
    CARCINOMAS,
    CLEAN,
    LUNG_CLASSES,
    NORMAL,
    POORLY_DIFFERENTIATED,
    Recipe,
    microns_per_pixel,
    render_with_appearance,
    tile_seed,
)
from synthetic.variation import EASY, EOSIN_OD, HEMATOXYLIN_OD, Difficulty, make_sites

logger = logging.getLogger(__name__)

LC25000_SUBDIR = "lung_image_sets"

# The seven non-identity orientations of a square (rotations and mirrorings).
ORIENTATIONS: tuple[Image.Transpose, ...] = (
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


TILES_FILE = "tiles.csv"  # one row per written file: what it shows, its label and its site
GENERATION_FILE = "generation.json"  # the knobs and the realised rates
DATASET_FILE = "dataset.json"  # the tiles' pixel size, as training reads it (training.data.DATASET_FILE)
TILE_COLUMNS = (
    "path", "label", "true_class", "site", "kind", "other_class", "other_share", "noisy_label",
    "jpeg_quality", "blur_radius", "illumination",
)


@dataclass(frozen=True)
class TileJob:
    recipe: Recipe
    label: str  # the folder it is filed under: the true class, unless its label is noisy
    index: int  # of the drawn (original) tile within its true class: its seed
    number: int  # its position within its folder (file names count on from it)
    size: int
    seed: int
    folder: Path
    jpeg_quality: int
    difficulty: Difficulty
    augmented_copies: int = 0


def plan_tiles(
    classes: tuple[str, ...], per_class: int, seed: int, difficulty: Difficulty
) -> list[tuple[Recipe, str, int]]:
    """(recipe, label, index) for every drawn tile, decided from the seed alone, class by class."""
    sites = make_sites(seed, difficulty)
    planned = []
    for class_name in classes:
        for index in range(per_class):
            rng = np.random.default_rng([tile_seed(seed, class_name, index), 1])
            site = sites[index % len(sites)]  # balanced: every class has the same share of every site
            recipe = Recipe(class_name, site=site)
            others = [c for c in CARCINOMAS if c != class_name and c in classes]
            if class_name in CARCINOMAS and others and rng.random() < difficulty.poorly_differentiated:
                recipe = Recipe(class_name, POORLY_DIFFERENTIATED, others[0], float(rng.uniform(*difficulty.drift)),
                                site)
            elif rng.random() < difficulty.border:
                partners = [NORMAL] if class_name in CARCINOMAS else [c for c in CARCINOMAS if c in classes]
                if partners and all(p in classes for p in partners):
                    other = partners[int(rng.integers(len(partners)))]
                    recipe = Recipe(class_name, BORDER, other, float(rng.uniform(*difficulty.border_share)), site)
            label = class_name
            if rng.random() < difficulty.label_noise:
                wrong = [c for c in classes if c != class_name]
                label = wrong[int(rng.integers(len(wrong)))]
            planned.append((recipe, label, index))
    return planned


def _write_tile(job: TileJob) -> list[dict[str, object]]:
    """Render one original tile and write it, plus its augmented copies; one tiles.csv row each."""
    tile_rng_seed = tile_seed(job.seed, job.recipe.class_name, job.index)
    image, look = render_with_appearance(job.recipe, job.size, tile_rng_seed, job.difficulty)
    rng = np.random.default_rng(tile_rng_seed + 1)
    copies = [image] + [
        image.transpose(ORIENTATIONS[rng.integers(len(ORIENTATIONS))]) for _ in range(job.augmented_copies)
    ]
    rows = []
    for offset, copy in enumerate(copies):
        # LC25000 names files like lungaca1.jpeg; keep that flavour (copies numbered on).
        number = job.number * (job.augmented_copies + 1) + offset + 1
        path = job.folder / f"{job.label.replace('_', '')}{number}.jpeg"
        copy.save(path, format="JPEG", quality=job.jpeg_quality)
        rows.append({
            "path": f"{job.folder.name}/{path.name}", "label": job.label, "true_class": job.recipe.class_name,
            "site": job.recipe.site.name, "kind": job.recipe.kind, "other_class": job.recipe.other_class or "",
            "other_share": round(job.recipe.other_share, 4), "noisy_label": int(job.label != job.recipe.class_name),
            "jpeg_quality": job.jpeg_quality, "blur_radius": round(look.blur_radius, 3),
            "illumination": round(look.illumination, 4),
        })
    return rows


def generate_dataset(
    out: Path,
    per_class: int,
    size: int = 768,
    seed: int = 0,
    classes: tuple[str, ...] = LUNG_CLASSES,
    workers: int | None = None,
    augmented_copies: int = 0,
    difficulty: Difficulty | None = None,
) -> Path:
    """Write `per_class` original tiles per class (the default :class:`Difficulty` unless given),
    each with `augmented_copies` rotated/mirrored copies, under ``out/lung_image_sets/<class>/``,
    with ``tiles.csv`` and ``generation.json`` beside the class folders.

    Returns the folder that holds the class sub-folders (what training takes).
    """
    if augmented_copies < 0:
        raise ValueError("augmented_copies must be >= 0")
    difficulty = difficulty or Difficulty()
    root = Path(out) / LC25000_SUBDIR
    for class_name in classes:
        (root / class_name).mkdir(parents=True, exist_ok=True)
    numbers: dict[str, int] = dict.fromkeys(classes, 0)
    jobs = []
    for recipe, label, index in plan_tiles(classes, per_class, seed, difficulty):
        quality_rng = np.random.default_rng([tile_seed(seed, recipe.class_name, index), 2])
        quality = int(quality_rng.integers(difficulty.jpeg_quality[0], difficulty.jpeg_quality[1] + 1))
        jobs.append(TileJob(recipe, label, index, numbers[label], size, seed, root / label, quality, difficulty,
                            augmented_copies))
        numbers[label] += 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rows = [row for written in pool.map(_write_tile, jobs, chunksize=8) for row in written]
    with (root / TILES_FILE).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, TILE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["path"]))
    summary = _generation_summary(difficulty, seed, per_class, size, augmented_copies, rows)
    (root / GENERATION_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    (root / DATASET_FILE).write_text(json.dumps({"microns_per_pixel": microns_per_pixel(size)}) + "\n")
    logger.info(
        "wrote %d tiles (%d originals per class, %d copies each, %dpx, %d sites; %s) to %s",
        len(rows), per_class, augmented_copies, size, difficulty.sites, summary["realised"], root,
    )
    return root


def _generation_summary(
    difficulty: Difficulty, seed: int, per_class: int, size: int, augmented_copies: int, rows: list[dict]
) -> dict[str, object]:
    originals = rows[:: augmented_copies + 1] if augmented_copies else rows
    total = len(originals)
    kinds = {kind: sum(r["kind"] == kind for r in originals) for kind in (CLEAN, POORLY_DIFFERENTIATED, BORDER)}
    return {
        "seed": seed,
        "per_class": per_class,
        "size": size,
        "augmented_copies": augmented_copies,
        "difficulty": asdict(difficulty),
        "sites": [
            {"name": site.name, "hematoxylin_od": (HEMATOXYLIN_OD + site.hematoxylin_shift).round(4).tolist(),
             "eosin_od": (EOSIN_OD + site.eosin_shift).round(4).tolist(), "blur": round(site.blur, 3),
             "colour_gain": site.colour_gain.round(4).tolist(), "magnification": round(site.magnification, 4),
             "noise": round(site.noise, 3)}
            for site in make_sites(seed, difficulty)
        ],
        "realised": {
            "tiles": total,
            "label_noise_rate": round(sum(r["noisy_label"] for r in originals) / max(1, total), 4),
            **{f"{kind}_tiles": count for kind, count in kinds.items()},
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m synthetic.tiles",
        description="Generate synthetic H&E-like lung tiles in the LC25000 layout.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder; tiles go to OUT/lung_image_sets/<class>/"
    )
    parser.add_argument("--per-class", type=int, default=300, help="original tiles per class (default: 300)")
    parser.add_argument(
        "--size", type=int, default=768, help="tile width and height in pixels (default: 768, as LC25000)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed; the same seed gives byte-identical files (default: 0)"
    )
    parser.add_argument("--workers", type=int, default=None, help="processes to render with (default: all cores)")
    parser.add_argument(
        "--augmented-copies",
        type=int,
        default=0,
        help="rotated/mirrored copies written per tile, as LC25000 has (default: 0)",
    )
    default = Difficulty()
    parser.add_argument("--easy", action="store_true", help="clean tiles from one site: no ambiguity, noise or shift")
    for knob, what in (
        ("poorly_differentiated", "share of carcinoma tiles drifting towards the other carcinoma"),
        ("border", "share of tiles mixing tumour and normal tissue"),
        ("label_noise", "share of tiles filed under a wrong class"),
        ("sites", "simulated sites"),
        ("site_shift", "how far sites differ (0: alike)"),
        ("illumination", "strongest uneven-illumination dimming"),
    ):
        value = getattr(default, knob)
        parser.add_argument(f"--{knob.replace('_', '-')}", type=type(value), default=value,
                            help=f"{what} (default: {value})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    difficulty = EASY if args.easy else Difficulty(
        poorly_differentiated=args.poorly_differentiated, border=args.border, label_noise=args.label_noise,
        sites=args.sites, site_shift=args.site_shift, illumination=args.illumination,
    )
    root = generate_dataset(
        args.out, args.per_class, args.size, args.seed, workers=args.workers, augmented_copies=args.augmented_copies,
        difficulty=difficulty,
    )
    logger.info("dataset ready: %s", root)


if __name__ == "__main__":
    main()
