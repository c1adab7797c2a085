"""ONE resampling from an image to the model's input, for uploads and slide tiles alike.

A model learns tissue at one pixel size: its training tiles were
``dataset.tile_size`` pixels of ``dataset.microns_per_pixel`` each (the card),
shrunk to ``input_size``. So every input pixel covers ``field / input_size``
microns, where ``field = tile_size * microns_per_pixel`` is the side of the
training tiles' field of view.

* Pixel size unknown (the image's or the card's): the whole image is resized
  to ``input_size`` x ``input_size``, as the model's training tiles were.
* Both known: the image is resampled uniformly to the model's input pixel
  size, and fitted to the field of view: a larger image is cropped to the
  field's centre first (never resampled whole: the work stays bounded by the
  model input); a smaller one is mirrored at its edges to fill the field (a
  constant pad would read as background glass to the quality gate).

The decode path (:mod:`models.preprocessing`) and the slide path
(:mod:`slides.analyze`) both call :func:`resample`, so an upload sent with its
`mpp` and a slide tile are made into model inputs the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the decoder imports this module; it needs no card
    from models.card import ModelCard

# A pixel size outside this is a unit mistake (nanometres, millimetres), not a microscope: 0.05 um/px is
# beyond optical resolution at any objective, 20 um/px is a 0.5x overview.
MIN_MICRONS_PER_PIXEL = 0.05
MAX_MICRONS_PER_PIXEL = 20.0
# An output this close to the input size is stretched the last pixels instead of mirrored (rounding of
# slide reads, whose side is a whole number of pixels at their level).
SNAP = 0.02


@dataclass(frozen=True)
class ModelScale:
    """What a model input is: its side in pixels, and the training field of view it shows, in microns."""

    input_size: int
    field_microns: float | None  # None: the card declares no pixel size

    @classmethod
    def of(cls, card: ModelCard) -> ModelScale:
        data = card.dataset
        field = data.tile_size * data.microns_per_pixel if data.tile_size and data.microns_per_pixel else None
        return cls(card.input_size, field)

    @property
    def input_microns_per_pixel(self) -> float | None:
        return None if self.field_microns is None else self.field_microns / self.input_size


@dataclass(frozen=True)
class Plan:
    """Where an image of `width` x `height` goes: the centre box kept (in its own pixels), the size
    it is resampled to, and the mirroring that fills the rest of the input."""

    box: tuple[int, int, int, int]  # left, top, right, bottom
    resized: tuple[int, int]  # width, height, at most the input size
    input_size: int
    scale: float | None  # input pixels per image pixel (None: resized whole, not to a pixel size)

    @property
    def coverage(self) -> float:
        """Share of the model input the image fills (the rest mirrored)."""
        return self.resized[0] * self.resized[1] / self.input_size**2


def check_microns_per_pixel(mpp: float) -> float:
    """`mpp` if it is a finite pixel size in the sane range; ValueError saying the range otherwise."""
    if not (math.isfinite(mpp) and MIN_MICRONS_PER_PIXEL <= mpp <= MAX_MICRONS_PER_PIXEL):
        raise ValueError(
            f"mpp is the image's microns per pixel, {MIN_MICRONS_PER_PIXEL:g} to {MAX_MICRONS_PER_PIXEL:g} "
            "(about 0.25 at 40x, 0.5 at 20x, 1 at 10x)"
        )
    return mpp


def plan(width: int, height: int, target: ModelScale, mpp: float | None = None) -> Plan:
    """How an image of `width` x `height` pixels of `mpp` microns becomes the model input."""
    size = target.input_size
    model_mpp = target.input_microns_per_pixel
    if mpp is None or model_mpp is None:
        return Plan((0, 0, width, height), (size, size), size, None)
    scale = mpp / model_mpp
    crop_w, crop_h = min(width, round(size / scale)), min(height, round(size / scale))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    resized = tuple(min(size, max(1, round(side * scale))) for side in (crop_w, crop_h))
    resized = tuple(size if side >= size * (1 - SNAP) else side for side in resized)
    return Plan((left, top, left + crop_w, top + crop_h), resized, size, scale)  # type: ignore[arg-type]


def resample(image: Image.Image, target: ModelScale, mpp: float | None = None) -> np.ndarray:
    """The model input, RGB uint8 (S, S, 3), of an RGB image whose pixels are `mpp` microns (see the module)."""
    steps = plan(image.width, image.height, target, mpp)
    # The box crops inside the resize (no copy of the region); reducing_gap shrinks by whole factors
    # first (box filter), then resamples: a one-pixel-high 39-megapixel PNG resized in one step took
    # 780 MB of resampling coefficients.
    resized = image.resize(steps.resized, Image.Resampling.BILINEAR, box=steps.box, reducing_gap=3.0)
    resized = np.asarray(resized, dtype=np.uint8)
    missing_w, missing_h = steps.input_size - steps.resized[0], steps.input_size - steps.resized[1]
    if missing_w or missing_h:
        # Mirrored, not padded: glass-white padding would fail the gate's background check, and tiling
        # would put seams into the field. Symmetric padding repeats as often as the image is small.
        pads = ((missing_h // 2, missing_h - missing_h // 2), (missing_w // 2, missing_w - missing_w // 2), (0, 0))
        resized = np.pad(resized, pads, mode="symmetric")
    return resized
