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

Real data is not clean, and an evaluation can only show its worth on data
that is not either; :class:`Difficulty` sets how hard the tiles are:

* **ambiguity**: poorly differentiated carcinomas whose architecture drifts
  towards the other carcinoma (the two tissue maps blended), and border
  tiles that mix tumour and normal tissue (a region of the other tissue;
  the label is the majority, the area share is recorded);
* **label noise**: a small share of tiles filed under a wrong class;
* **acquisition**: focus, JPEG quality and uneven illumination per tile;
* **sites**: every tile comes from one of several simulated sites, each with
  its own stain-matrix family, scanner blur, magnification, sensor noise and
  colour cast, balanced over the classes.

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
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
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

# The pixel size of a 768-pixel tile (the synthetic slides declare it too): every tissue length is drawn
# relative to the tile, so a tile of `size` pixels has pixels of MICRONS_PER_PIXEL * 768 / size.
MICRONS_PER_PIXEL = 0.5
REFERENCE_SIZE = 768

# Optical density of one unit of each stain per RGB channel (Ruifrok & Johnston).
_HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
_EOSIN_OD = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class Difficulty:
    """How hard the generated tiles are. The defaults put the default model (`make model`) between
    85% and 97% test accuracy, its errors mostly between the two carcinomas, as on real slides."""

    poorly_differentiated: float = 0.8  # share of carcinoma tiles that drift towards the other carcinoma
    drift: tuple[float, float] = (0.4, 0.495)  # how far: the other carcinoma's weight in the blend
    border: float = 0.1  # share of tiles that mix tumour and normal tissue
    border_share: tuple[float, float] = (0.15, 0.4)  # the minority tissue's share of the area
    label_noise: float = 0.02  # share of tiles filed under a wrong class
    sites: int = 4  # simulated sites (stain family, scanner blur, colour cast), balanced over classes
    site_shift: float = 1.0  # how far sites differ (0: all alike)
    blur: tuple[float, float] = (0.0, 1.6)  # per-tile focus blur radius, px at 768
    jpeg_quality: tuple[int, int] = (70, 95)  # per-tile JPEG quality, inclusive
    illumination: float = 0.12  # strongest uneven-illumination dimming at a tile's edge (0: even)

    def __post_init__(self) -> None:
        for name in ("poorly_differentiated", "border", "label_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if not 0.0 <= self.border_share[0] <= self.border_share[1] < 0.5:
            raise ValueError("border_share must lie in [0, 0.5): the label is the majority tissue")
        if not 0.0 <= self.drift[0] <= self.drift[1] < 0.5:
            raise ValueError("drift must lie in [0, 0.5): the label is the tissue that dominates")
        if self.sites < 1:
            raise ValueError("sites must be at least 1")


# The generator as it was before difficulty existed: every tile clean, one site.
EASY = Difficulty(
    poorly_differentiated=0.0, border=0.0, label_noise=0.0, sites=1, site_shift=0.0, blur=(0.0, 1.2),
    jpeg_quality=(85, 95), illumination=0.0,
)


@dataclass(frozen=True)
class Site:
    """One simulated lab: its stainer's stain family, its scanner's blur, its colour cast."""

    name: str
    hematoxylin_shift: np.ndarray
    eosin_shift: np.ndarray
    blur: float  # added to every tile's blur radius
    colour_gain: np.ndarray  # per-channel multiplier after colour matching
    magnification: float = 1.0  # its scanner's scale: multiplies every tissue length
    noise: float = 0.0  # its sensor's noise, added to every tile's


NO_SITE = Site("site0", np.zeros(3), np.zeros(3), 0.0, np.ones(3))


def make_sites(seed: int, difficulty: Difficulty) -> list[Site]:
    """The dataset's sites, drawn from its seed (the same seed, the same sites)."""
    sites = []
    for k in range(difficulty.sites):
        rng = np.random.default_rng(zlib.crc32(f"{seed}:site:{k}".encode()))
        shift = difficulty.site_shift
        sites.append(
            Site(
                name=f"site{k}",
                hematoxylin_shift=rng.normal(0.0, 0.08, 3) * shift,
                eosin_shift=rng.normal(0.0, 0.08, 3) * shift,
                blur=float(rng.uniform(0.0, 1.4)) * shift,
                colour_gain=1.0 + rng.uniform(-0.1, 0.1, 3) * shift,
                magnification=float(np.exp(rng.uniform(-0.25, 0.25) * shift)),
                noise=float(rng.uniform(0.0, 5.0)) * shift,
            )
        )
    return sites


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
    illumination: float  # dimming at the darkest edge (0: even)


def draw_appearance(rng: np.random.Generator, difficulty: Difficulty = EASY, site: Site = NO_SITE) -> Appearance:
    """Draw imaging parameters; identical distribution for every class."""

    def jitter(vector: np.ndarray) -> np.ndarray:
        return np.clip(vector + rng.normal(0.0, 0.05, size=3), 0.02, None)

    return Appearance(
        scale=float(rng.uniform(0.8, 1.25)) * site.magnification,
        hematoxylin_od=jitter(_HEMATOXYLIN_OD + site.hematoxylin_shift),
        eosin_od=jitter(_EOSIN_OD + site.eosin_shift),
        target_mean=rng.uniform([180.0, 125.0, 170.0], [230.0, 185.0, 225.0]),
        target_std=rng.uniform(20.0, 50.0, size=3),
        blur_radius=float(rng.uniform(*difficulty.blur)) + site.blur,
        noise_sigma=float(rng.uniform(1.0, 7.0)) + site.noise,
        illumination=float(rng.uniform(0.0, difficulty.illumination)),
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


CARCINOMAS = ("lung_aca", "lung_scc")
NORMAL = "lung_n"
CLEAN, POORLY_DIFFERENTIATED, BORDER = "clean", "poorly_differentiated", "border"


@dataclass(frozen=True)
class Recipe:
    """What one tile shows: its (majority) tissue, what is mixed in, where it was captured."""

    class_name: str  # the tissue that dominates: the tile's true class
    kind: str = CLEAN  # clean, poorly_differentiated or border
    other_class: str | None = None  # the tissue mixed in
    other_share: float = 0.0  # its blend weight (poorly differentiated) or area share (border)
    site: Site = NO_SITE


def _mixed_maps(recipe: Recipe, rng: np.random.Generator, work: int, scale: float) -> StainMaps:
    own = RENDERERS[recipe.class_name](rng, work, scale)
    if recipe.kind == CLEAN or recipe.other_class is None:
        return own
    other = RENDERERS[recipe.other_class](rng, work, scale)
    if recipe.kind == POORLY_DIFFERENTIATED:  # the architecture drifts: both patterns, one weaker
        weight = recipe.other_share
    else:  # a border: a region of the other tissue, with a soft edge, covering `other_share` of the area
        field = _smooth_noise(rng, work, work / 2.5)
        cut = float(np.quantile(field, 1.0 - recipe.other_share))
        weight = np.clip((field - cut) / 0.02 + 0.5, 0.0, 1.0)
    return tuple((1.0 - weight) * mine + weight * theirs for mine, theirs in zip(own, other, strict=True))


def _illumination_field(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Uneven light: a linear fall-off in a random direction, dimming one edge by `strength`."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    along = (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle)  # in [-0.71, 0.71]
    return (1.0 - strength * (along - along.min()) / (np.ptp(along) + 1e-6))[..., None]


def render_tile(class_name: str, size: int, seed: int) -> Image.Image:
    """Render one clean RGB tile of `class_name`, fully determined by `seed`."""
    return _render(Recipe(class_name), size, seed, EASY)[0]


def render_recipe(recipe: Recipe, size: int, seed: int, difficulty: Difficulty) -> Image.Image:
    """The RGB tile a recipe describes, fully determined by `seed` (the synthetic slides draw with it)."""
    return _render(recipe, size, seed, difficulty)[0]


def _render(recipe: Recipe, size: int, seed: int, difficulty: Difficulty) -> tuple[Image.Image, Appearance]:
    """The tile a recipe describes, and the appearance it was drawn with."""
    rng = np.random.default_rng(seed)
    look = draw_appearance(rng, difficulty, recipe.site)
    work = max(16, size // _RENDER_DIVISOR)
    maps = _mixed_maps(recipe, rng, work, look.scale * work / 384)
    rgb = _match_colour_statistics(_stains_to_rgb(maps, look), look) * recipe.site.colour_gain
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if look.blur_radius > 0.05:  # blur at render scale: same look, a quarter of the cost
        image = image.filter(ImageFilter.GaussianBlur(look.blur_radius * work / size))
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, np.float32)
    if look.illumination > 0:
        pixels = pixels * _illumination_field(rng, size, look.illumination)
    noisy = pixels + rng.standard_normal((size, size, 3), dtype=np.float32) * look.noise_sigma
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), look


def microns_per_pixel(size: int) -> float:
    """The pixel size of a generated tile of `size` pixels (each shows the same field of view)."""
    return round(MICRONS_PER_PIXEL * REFERENCE_SIZE / size, 6)


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
    image, look = _render(job.recipe, job.size, tile_rng_seed, job.difficulty)
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
            {"name": site.name, "hematoxylin_od": (_HEMATOXYLIN_OD + site.hematoxylin_shift).round(4).tolist(),
             "eosin_od": (_EOSIN_OD + site.eosin_shift).round(4).tolist(), "blur": round(site.blur, 3),
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
