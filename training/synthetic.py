"""Deterministic procedural H&E-like lung tissue tiles in the LC25000 layout.

The real LC25000 images cannot be downloaded here, so tests, CI and `make model`
train on tiles drawn by this module. The three classes differ by tissue
*architecture*, as the real ones do:

* ``lung_n``   normal lung: thin pink alveolar septa around large empty air
  spaces, a few small flat nuclei lying along the septa;
* ``lung_aca`` adenocarcinoma: gland-like rings of crowded, enlarged nuclei
  around lumens, set in pink stroma;
* ``lung_scc`` squamous cell carcinoma: solid nests of large polygonal cells
  with pink cytoplasm and one big nucleus each, plus keratin pearls.

Each tile is rendered as two stain-density maps (hematoxylin, eosin), turned
into RGB with the Beer-Lambert law and a per-image stain matrix, and finally
matched per channel to a randomly drawn colour mean and spread (Reinhard-style
stain variation). Stain, brightness, contrast, scale, blur and noise are drawn
from the SAME ranges for every class, so colour statistics alone do not reveal
the class: a model has to look at morphology.

With ``augmented_copies=K`` every drawn tile is also written K more times,
rotated and/or mirrored and JPEG re-encoded, the way LC25000 grew 250
originals per class into 5,000 images. Such a dataset leaks under an
image-level split, which is what the grouping in :mod:`training.grouping`
exists to prevent.

CLI::

    python -m training.synthetic --out data/synthetic --per-class 300 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)

LUNG_CLASSES: tuple[str, ...] = ("lung_aca", "lung_n", "lung_scc")
LC25000_SUBDIR = "lung_image_sets"

# Tissue is drawn at half the output resolution and upsampled: LC25000 tiles
# are themselves resized from larger captures, and this halves generation time.
_RENDER_DIVISOR = 2

# Optical density of one unit of each stain per RGB channel (Ruifrok & Johnston).
_HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
_EOSIN_OD = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class Appearance:
    """Per-image imaging parameters, drawn from class-independent ranges."""

    scale: float  # multiplies every tissue length (magnification jitter)
    hematoxylin_od: np.ndarray
    eosin_od: np.ndarray
    target_mean: np.ndarray  # per-channel mean the tile is matched to
    target_std: np.ndarray  # per-channel spread the tile is matched to
    blur_radius: float
    noise_sigma: float
    jpeg_quality: int


def draw_appearance(rng: np.random.Generator) -> Appearance:
    """Draw imaging parameters; identical distribution for every class."""

    def jitter(vector: np.ndarray) -> np.ndarray:
        return np.clip(vector + rng.normal(0.0, 0.05, size=3), 0.02, None)

    return Appearance(
        scale=float(rng.uniform(0.8, 1.25)),
        hematoxylin_od=jitter(_HEMATOXYLIN_OD),
        eosin_od=jitter(_EOSIN_OD),
        target_mean=rng.uniform([180.0, 125.0, 170.0], [230.0, 185.0, 225.0]),
        target_std=rng.uniform(20.0, 50.0, size=3),
        blur_radius=float(rng.uniform(0.0, 1.2)),
        noise_sigma=float(rng.uniform(1.0, 7.0)),
        jpeg_quality=int(rng.integers(85, 96)),
    )


# --------------------------------------------------------------------------- #
# Geometry helpers
# --------------------------------------------------------------------------- #


def _jittered_grid(rng: np.random.Generator, size: int, spacing: float, jitter: float = 0.45) -> np.ndarray:
    """Sites on a grid of the given spacing, each jittered inside its cell.

    Returns shape (rows, cols, 2) of (x, y); the grid extends two cells past
    every edge so that cells at the tile's border have neighbours.
    """
    cells = int(np.ceil(size / spacing)) + 4
    grid = (np.stack(np.meshgrid(np.arange(cells), np.arange(cells)), -1) - 2.0) * spacing
    offsets = rng.uniform(-jitter, jitter, size=grid.shape) * spacing
    return grid + spacing / 2 + offsets


def _voronoi_gap(size: int, grid: np.ndarray) -> np.ndarray:
    """Distance gap between the nearest and second-nearest site per pixel.

    The gap is ~0 on cell borders, which draws septa and cell membranes.
    """
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32)
    distances, _ = cKDTree(grid.reshape(-1, 2)).query(pixels, k=2)
    return (distances[:, 1] - distances[:, 0]).reshape(size, size).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, feature: float) -> np.ndarray:
    """Low-frequency noise in [0, 1] with blobs of roughly `feature` pixels."""
    coarse = max(2, int(size / feature))
    small = Image.fromarray((rng.random((coarse, coarse)) * 255).astype(np.uint8))
    big = small.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(big, np.float32) / 255.0


def _ellipses(
    size: int,
    centres: np.ndarray,
    radii: np.ndarray,
    angles: np.ndarray | None = None,
) -> np.ndarray:
    """Float mask in [0, 1] with filled (optionally rotated) ellipses."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for k, ((cx, cy), (rx, ry)) in enumerate(zip(centres, radii, strict=True)):
        if angles is None:
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
            continue
        theta = angles[k]
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        xs = cx + rx * np.cos(t) * np.cos(theta) - ry * np.sin(t) * np.sin(theta)
        ys = cy + rx * np.cos(t) * np.sin(theta) + ry * np.sin(t) * np.cos(theta)
        draw.polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=255)
    return np.asarray(canvas, np.float32) / 255.0


def _fibres(rng: np.random.Generator, size: int) -> np.ndarray:
    """Wavy collagen-like streak texture in [0, 1] for stroma."""
    direction = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    along = xx * np.cos(direction) + yy * np.sin(direction)
    warp = _smooth_noise(rng, size, size / 4) * 25.0
    return 0.5 + 0.5 * np.sin((along + warp) / rng.uniform(2.5, 4.5))


# --------------------------------------------------------------------------- #
# Tissue renderers: each returns (hematoxylin, eosin) densities in [0, ~1.5]
# --------------------------------------------------------------------------- #

StainMaps = tuple[np.ndarray, np.ndarray]


def render_normal(rng: np.random.Generator, size: int, scale: float) -> StainMaps:
    """Alveolar network: thin septa around large air spaces, few flat nuclei."""
    spacing = rng.uniform(55, 85) * scale
    gap = _voronoi_gap(size, _jittered_grid(rng, size, spacing))
    septum_width = rng.uniform(1.6, 3.0) * scale
    septa = np.clip(1.0 - (gap - septum_width) / 1.5, 0.0, 1.0)
    septa *= 0.75 + 0.25 * _smooth_noise(rng, size, 20)

    # A few small, flat (elongated) nuclei lying on the septa.
    border = np.argwhere(gap < septum_width * 0.6)
    count = int(rng.integers(12, 28))
    picks = border[rng.choice(len(border), size=min(count, len(border)), replace=False)]
    centres = picks[:, ::-1].astype(float)
    radii = np.stack([rng.uniform(3.0, 4.5, len(picks)), rng.uniform(1.0, 1.6, len(picks))], 1) * scale
    nuclei = _ellipses(size, centres, radii, rng.uniform(0, np.pi, len(picks)))

    eosin = 0.85 * septa + 0.04
    hematoxylin = 1.0 * nuclei + 0.10 * septa
    return hematoxylin, eosin


def render_adenocarcinoma(rng: np.random.Generator, size: int, scale: float) -> StainMaps:
    """Gland-like rings of crowded, enlarged nuclei around lumens, in stroma."""
    eosin = 0.45 + 0.25 * _fibres(rng, size) * _smooth_noise(rng, size, 40)
    hematoxylin = 0.04 + 0.06 * _smooth_noise(rng, size, 10)

    spacing = rng.uniform(62, 80) * scale
    glands = _jittered_grid(rng, size, spacing, jitter=0.25).reshape(-1, 2)
    lumens_c, lumens_r = [], []
    epith_c, epith_r = [], []
    nuclei_c, nuclei_r = [], []
    for cx, cy in glands:
        lumen = rng.uniform(9, 17) * scale
        depth = rng.uniform(7, 10) * scale  # epithelial layer thickness
        lumens_c.append((cx, cy))
        lumens_r.append((lumen, lumen * rng.uniform(0.7, 1.0)))
        epith_c.append((cx, cy))
        epith_r.append((lumen + depth, (lumen + depth) * rng.uniform(0.75, 1.0)))
        ring = lumen + depth * 0.55
        n = int(2 * np.pi * ring / (4.2 * scale))  # crowded: nuclei touch
        for a in np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 1):
            r = ring + rng.normal(0, 1.0) * scale
            nuclei_c.append((cx + r * np.cos(a), cy + r * np.sin(a)))
            big = rng.uniform(3.0, 4.2) * scale
            nuclei_r.append((big, big * rng.uniform(0.75, 1.0)))

    epithelium = _ellipses(size, np.array(epith_c), np.array(epith_r))
    lumen_mask = _ellipses(size, np.array(lumens_c), np.array(lumens_r))
    nuclei = _ellipses(size, np.array(nuclei_c), np.array(nuclei_r))
    eosin = eosin * (1 - epithelium) + 0.55 * epithelium
    hematoxylin = hematoxylin + 0.15 * epithelium + 1.1 * nuclei
    eosin = eosin * (1 - lumen_mask) + 0.03 * lumen_mask
    hematoxylin = hematoxylin * (1 - lumen_mask)
    return hematoxylin, eosin


def render_squamous(rng: np.random.Generator, size: int, scale: float) -> StainMaps:
    """Solid nests of polygonal cells (pink cytoplasm, big nuclei), keratin pearls."""
    spacing = rng.uniform(13, 17) * scale
    grid = _jittered_grid(rng, size, spacing, jitter=0.3)
    points = grid.reshape(-1, 2)
    membranes = np.clip(1.0 - _voronoi_gap(size, grid) / 1.4, 0.0, 1.0)

    nests = _smooth_noise(rng, size, rng.uniform(90, 140) * scale)
    nest_mask = np.clip((nests - 0.25) * 8.0, 0.0, 1.0)

    radius = rng.uniform(3.2, 4.4, len(points)) * scale
    nuclei = _ellipses(size, points, np.stack([radius, radius * rng.uniform(0.8, 1.0, len(points))], 1))

    cytoplasm = 0.75 + 0.15 * _smooth_noise(rng, size, 12)
    eosin = nest_mask * (cytoplasm + 0.35 * membranes)
    hematoxylin = nest_mask * (0.05 + 0.3 * membranes + 1.05 * nuclei)

    # Keratin pearls: concentric whorls of dense eosin, no nuclei inside.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        pearl = rng.uniform(16, 28) * scale
        d = np.hypot(xx - cx, yy - cy)
        inside = np.clip((pearl - d) / 2.0, 0.0, 1.0)
        rings = 0.5 + 0.5 * np.cos(d / (2.2 * scale))
        eosin = eosin * (1 - inside) + inside * (1.0 + 0.35 * rings)
        hematoxylin = hematoxylin * (1 - inside)
        nest_mask = np.maximum(nest_mask, inside)

    # Between nests: loose stroma.
    stroma = 1.0 - nest_mask
    eosin = eosin + stroma * (0.40 + 0.15 * _fibres(rng, size) * _smooth_noise(rng, size, 40))
    hematoxylin = hematoxylin + stroma * 0.05
    return hematoxylin, eosin


RENDERERS: dict[str, Callable[[np.random.Generator, int, float], StainMaps]] = {
    "lung_aca": render_adenocarcinoma,
    "lung_n": render_normal,
    "lung_scc": render_squamous,
}


# --------------------------------------------------------------------------- #
# From stain densities to an RGB tile
# --------------------------------------------------------------------------- #


def _stains_to_rgb(maps: StainMaps, look: Appearance) -> np.ndarray:
    """Beer-Lambert: transmitted light through hematoxylin and eosin."""
    hematoxylin, eosin = maps
    od = hematoxylin[..., None] * look.hematoxylin_od + eosin[..., None] * look.eosin_od
    return 255.0 * np.exp(-od)


def _match_colour_statistics(rgb: np.ndarray, look: Appearance) -> np.ndarray:
    """Give the tile the drawn per-channel mean and spread (Reinhard-style)."""
    mean = rgb.reshape(-1, 3).mean(0)
    std = rgb.reshape(-1, 3).std(0) + 1e-6
    return (rgb - mean) / std * look.target_std + look.target_mean


def render_tile(class_name: str, size: int, seed: int) -> Image.Image:
    """Render one RGB tile of `class_name`, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    look = draw_appearance(rng)
    work = max(16, size // _RENDER_DIVISOR)
    maps = RENDERERS[class_name](rng, work, look.scale * work / 384)
    rgb = _match_colour_statistics(_stains_to_rgb(maps, look), look)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if look.blur_radius > 0.05:  # blur at render scale: same look, a quarter of the cost
        image = image.filter(ImageFilter.GaussianBlur(look.blur_radius * work / size))
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * look.noise_sigma
    noisy = np.asarray(image, np.float32) + noise
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def tile_seed(seed: int, class_name: str, index: int) -> int:
    """Stable per-tile seed, independent of generation order and process."""
    return zlib.crc32(f"{seed}:{class_name}:{index}".encode())


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


@dataclass(frozen=True)
class TileJob:
    class_name: str
    index: int  # of the drawn (original) tile within its class
    size: int
    seed: int
    folder: Path
    augmented_copies: int = 0


def _write_tile(job: TileJob) -> list[Path]:
    """Render one original tile and write it, plus its augmented copies."""
    tile_rng_seed = tile_seed(job.seed, job.class_name, job.index)
    image = render_tile(job.class_name, job.size, tile_rng_seed)
    rng = np.random.default_rng(tile_rng_seed + 1)
    quality = draw_appearance(np.random.default_rng(tile_rng_seed)).jpeg_quality
    copies = [image] + [
        image.transpose(ORIENTATIONS[rng.integers(len(ORIENTATIONS))]) for _ in range(job.augmented_copies)
    ]
    paths = []
    for offset, copy in enumerate(copies):
        # LC25000 names files like lungaca1.jpeg; keep that flavour (copies numbered on).
        number = job.index * (job.augmented_copies + 1) + offset + 1
        path = job.folder / f"{job.class_name.replace('_', '')}{number}.jpeg"
        copy.save(path, format="JPEG", quality=quality)
        paths.append(path)
    return paths


def generate_dataset(
    out: Path,
    per_class: int,
    size: int = 768,
    seed: int = 0,
    classes: tuple[str, ...] = LUNG_CLASSES,
    workers: int | None = None,
    augmented_copies: int = 0,
) -> Path:
    """Write `per_class` original tiles per class, each with `augmented_copies`
    rotated/mirrored copies, under ``out/lung_image_sets/<class>/``.

    Returns the folder that holds the class sub-folders (what training takes).
    """
    if augmented_copies < 0:
        raise ValueError("augmented_copies must be >= 0")
    root = Path(out) / LC25000_SUBDIR
    jobs = []
    for class_name in classes:
        folder = root / class_name
        folder.mkdir(parents=True, exist_ok=True)
        jobs += [TileJob(class_name, i, size, seed, folder, augmented_copies) for i in range(per_class)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        written = sum(len(paths) for paths in pool.map(_write_tile, jobs, chunksize=8))
    logger.info(
        "wrote %d tiles (%d originals per class, %d copies each, %dpx) to %s",
        written,
        per_class,
        augmented_copies,
        size,
        root,
    )
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic",
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = generate_dataset(
        args.out, args.per_class, args.size, args.seed, workers=args.workers, augmented_copies=args.augmented_copies
    )
    logger.info("dataset ready: %s", root)


if __name__ == "__main__":
    main()
