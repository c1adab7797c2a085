"""Generated near-out-of-distribution sets, and how well the gate and the score find them.

None of these sets is ever used to fit anything: the gate and the score are
fitted on the training split alone (:mod:`training.trust`). They are made
from the in-distribution TEST tiles (or drawn from scratch), at the model's
input size, so they work for any dataset the training CLI accepts.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from sklearn.metrics import roc_auc_score

from models.ood import OodSetResult
from models.quality import QualityGate
from training.trust import gate_failures

SET_SIZE = 60  # images per generated set


@dataclass(frozen=True)
class OodSet:
    name: str
    description: str
    images: np.ndarray  # (N, S, S, 3) uint8


def _blank_glass(rng: np.random.Generator, size: int) -> np.ndarray:
    level = rng.uniform(228, 250)
    tint = rng.normal(0, 3, size=3)
    gradient = np.linspace(-6, 6, size)[None, :, None] * rng.uniform(-1, 1)
    glass = level + tint + gradient + rng.normal(0, 2, size=(size, size, 3))
    return glass.clip(0, 255).astype(np.uint8)


def _sparse_cells(rng: np.random.Generator, tile: np.ndarray) -> np.ndarray:
    """Glass with a few cells: small blobs in the tile's darkest (nuclear) colour."""
    size = tile.shape[0]
    image = Image.fromarray(_blank_glass(rng, size))
    draw = ImageDraw.Draw(image)
    darkest = tile.reshape(-1, 3)[np.argsort(tile.reshape(-1, 3).sum(axis=1))[: max(1, size)]].mean(axis=0)
    for _ in range(int(rng.integers(2, 7))):
        x, y = rng.uniform(0, size, 2)
        radius = rng.uniform(1.5, 3.5) * size / 128
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=tuple(int(c) for c in darkest))
    return np.asarray(image)


def _jpeg(tile: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A drawn non-tissue texture: stripes, checks, rings or rectangles in random colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    colours = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    kind = int(rng.integers(4))
    period = rng.uniform(6, 24) * size / 128
    if kind == 0:
        angle = rng.uniform(0, np.pi)
        mask = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0
    elif kind == 1:
        mask = ((xx // period) + (yy // period)) % 2 == 0
    elif kind == 2:
        cx, cy = rng.uniform(0, size, 2)
        mask = np.sin(np.hypot(xx - cx, yy - cy) * 2 * np.pi / period) > 0
    else:
        image = Image.new("RGB", (size, size), tuple(int(c) for c in colours[0]))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = rng.uniform(0, size, 2)
            w, h = rng.uniform(4, size / 3, 2)
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        return np.asarray(image)
    return np.where(mask[..., None], colours[0], colours[1]).astype(np.uint8)


def near_ood_sets(test_images: np.ndarray, seed: int = 0) -> list[OodSet]:
    """Every generated set (SET_SIZE images each, or fewer test tiles to start from)."""
    rng = np.random.default_rng(seed)
    size = test_images.shape[1]
    sources = test_images[rng.permutation(len(test_images))[:SET_SIZE]]

    def from_tiles(transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return np.stack([transform(tile) for tile in sources])

    def drawn(make: Callable[[], np.ndarray]) -> np.ndarray:
        return np.stack([make() for _ in range(SET_SIZE)])

    def blur(tile: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(tile).filter(ImageFilter.GaussianBlur(size / 24)))

    def wash(tile: np.ndarray) -> np.ndarray:
        flat = np.full_like(tile, tile.reshape(-1, 3).mean(axis=0).astype(np.uint8))
        return (flat + rng.normal(0, 2, tile.shape)).clip(0, 255).astype(np.uint8)

    def shifted(tile: np.ndarray) -> np.ndarray:
        # One of the two rotations, never the identity or a swap (a permutation of [1, 2, 0] could be either).
        return tile[..., [1, 2, 0] if rng.random() < 0.5 else [2, 0, 1]]

    def grey(tile: np.ndarray) -> np.ndarray:
        return np.repeat(tile.mean(axis=2, keepdims=True), 3, axis=2).astype(np.uint8)

    return [
        OodSet("blank_glass", "empty glass: near-white, slight tint, gradient and noise",
               drawn(lambda: _blank_glass(rng, size))),
        OodSet("sparse_cells", "glass with 2-6 small cells in the tile's nuclear colour",
               from_tiles(lambda tile: _sparse_cells(rng, tile))),
        OodSet("heavy_blur", f"test tiles under a Gaussian blur of radius {size / 24:.1f} px", from_tiles(blur)),
        OodSet("heavy_jpeg", "test tiles re-encoded as JPEG at quality 3", from_tiles(lambda tile: _jpeg(tile, 3))),
        OodSet("noise", "uniform random RGB noise",
               drawn(lambda: rng.integers(0, 256, (size, size, 3), dtype=np.uint8))),
        OodSet("stain_wash", "a flat wash of the tile's mean stain colour", from_tiles(wash)),
        OodSet("shifted_stain", "test tiles with colour channels rotated (a 120-degree hue shift)",
               from_tiles(shifted)),
        OodSet("greyscale", "test tiles in grey-scale", from_tiles(grey)),
        OodSet("textures", "drawn stripes, checks, rings and rectangles", drawn(lambda: _texture(rng, size))),
    ]


def evaluate_set(
    ood: OodSet, scores: np.ndarray, test_scores: np.ndarray, gate: QualityGate, threshold: float
) -> OodSetResult:
    """Detection rate (gate or score), the gate's share, AUROC and FPR at 95% TPR of the score."""
    gate_flags = np.array([bool(failed) for failed in gate_failures(ood.images, gate)])
    labels = np.r_[np.zeros(len(test_scores)), np.ones(len(scores))]
    values = np.r_[test_scores, scores]
    finds_95 = np.quantile(scores, 0.05)  # the score above which 95% of this set lies
    return OodSetResult(
        name=ood.name,
        description=ood.description,
        n_images=len(scores),
        detection_rate=float(np.mean(gate_flags | (scores > threshold))),
        gate_rate=float(np.mean(gate_flags)),
        score_auroc=float(roc_auc_score(labels, values)),
        fpr_at_95_tpr=float(np.mean(test_scores >= finds_95)),
    )
