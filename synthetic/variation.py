"""How synthetic tissue varies, before any of it is drawn: the difficulty knobs, the simulated sites
(each with its stain-matrix family, scanner blur, magnification, sensor noise and colour cast), and one
tile's appearance drawn from them. Used by :mod:`synthetic.tissue` to draw and by
:mod:`synthetic.tiles` to plan and record a dataset.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

# Optical density of one unit of each stain per RGB channel (Ruifrok & Johnston).
HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
EOSIN_OD = np.array([0.07, 0.99, 0.11])


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
        hematoxylin_od=jitter(HEMATOXYLIN_OD + site.hematoxylin_shift),
        eosin_od=jitter(EOSIN_OD + site.eosin_shift),
        target_mean=rng.uniform([180.0, 125.0, 170.0], [230.0, 185.0, 225.0]),
        target_std=rng.uniform(20.0, 50.0, size=3),
        blur_radius=float(rng.uniform(*difficulty.blur)) + site.blur,
        noise_sigma=float(rng.uniform(1.0, 7.0)) + site.noise,
        illumination=float(rng.uniform(0.0, difficulty.illumination)),
    )
