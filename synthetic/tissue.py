"""Drawing procedural H&E-like lung tissue: one tile of a class, a recipe, at a difficulty and a site.

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

The dataset writer and its CLI are :mod:`synthetic.tiles`.
"""


from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.spatial import cKDTree

from synthetic.variation import EASY, NO_SITE, Appearance, Difficulty, Site, draw_appearance

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
    return render_with_appearance(Recipe(class_name), size, seed, EASY)[0]


def render_recipe(recipe: Recipe, size: int, seed: int, difficulty: Difficulty) -> Image.Image:
    """The RGB tile a recipe describes, fully determined by `seed` (the synthetic slides draw with it)."""
    return render_with_appearance(recipe, size, seed, difficulty)[0]


def render_with_appearance(recipe: Recipe, size: int, seed: int,
                           difficulty: Difficulty) -> tuple[Image.Image, Appearance]:
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
