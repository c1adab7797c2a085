"""Open a whole-slide image without holding it in memory.

OpenSlide (the `openslide-python` bindings with the `openslide-bin` wheel: no
system package) reads the vendor formats (SVS, NDPI, MRXS, ...) and pyramidal
TIFF region by region. A plain JPEG, PNG or flat TIFF is read through
OpenSlide's `ImageSlide`, which does hold it in memory, so it is refused
above a pixel cap first.

A hostile file can claim what it likes in its header, so before any pixel is
read a slide must stay inside caps on its side, its TIFF tiles (OpenSlide
decodes a tile whole) and the level an overview is taken from; the overview
is read in blocks, so it never holds a whole level either. A slide that
fails while being read (truncated, corrupt) raises :class:`SlideError` too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PLAIN_PIXELS = 100_000_000  # a flat image above this must come as a pyramid
MAX_SIDE = 500_000  # level-0 pixels: a whole 75 mm glass slide at 0.15 um per pixel
MAX_TILE_SIDE = 8192  # pixels of one stored tile, which OpenSlide decodes whole
# The level an overview is read from (in blocks): a 31,600 px slide without a pyramid still passes (its
# overview takes about 30 s here); beyond, the slide must come with smaller levels.
MAX_OVERVIEW_PIXELS = 1_000_000_000
BLOCK_BYTES = 64 * 2**20  # RGBA bytes of one block of that level, read at a time


class SlideError(ValueError):
    """The slide cannot be analysed: over a cap, damaged, or failing while read."""


class NotASlideError(SlideError):
    """The file is neither a slide format OpenSlide reads nor a plain image."""


@dataclass(frozen=True)
class SlideInfo:
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    microns_per_pixel: float | None  # at level 0, when the slide declares it
    vendor: str | None
    objective_power: float | None = None  # the scan's magnification (20, 40), when the slide declares it


class Slide:
    """A slide opened for region reads (use as a context manager)."""

    def __init__(self, path: Path, max_plain_pixels: int = DEFAULT_MAX_PLAIN_PIXELS) -> None:
        import openslide

        kind = openslide.OpenSlide.detect_format(str(path))
        if kind is None:  # not a format OpenSlide knows: a plain image, opened whole
            try:
                with Image.open(path) as image:
                    pixels = image.width * image.height
            except (OSError, Image.DecompressionBombError) as exc:
                raise NotASlideError(f"{path.name}: not a slide or an image ({exc})") from None
            if pixels > max_plain_pixels:
                raise SlideError(
                    f"{path.name}: a flat image of {pixels} pixels; over {max_plain_pixels}, send a pyramidal "
                    "TIFF or a vendor format"
                )
            self._slide = openslide.ImageSlide(str(path))
        else:
            try:
                self._slide = openslide.OpenSlide(str(path))
            except openslide.OpenSlideError as exc:
                raise SlideError(f"{path.name}: {exc}") from None
        properties = self._slide.properties
        _check_limits(path.name, self._slide.level_dimensions, properties)
        mpp_x = properties.get(openslide.PROPERTY_NAME_MPP_X)
        power = properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        self.info = SlideInfo(
            width=self._slide.dimensions[0],
            height=self._slide.dimensions[1],
            level_dimensions=tuple(self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            microns_per_pixel=_positive(mpp_x),
            vendor=properties.get(openslide.PROPERTY_NAME_VENDOR),
            objective_power=_positive(power),
        )

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *_: object) -> None:
        self._slide.close()

    def thumbnail(self, longest_side: int, at_least: int | None = None) -> np.ndarray:
        """The whole slide as RGB uint8, its longest side at most `longest_side`, read in blocks from the
        level nearest above that scale (OpenSlide's own thumbnail reads the whole level at once). With
        `at_least`, a stored level whose longest side lies in [at_least, longest_side] is taken as it is
        (the coarsest such), so no larger level is read only to be shrunk."""
        info = self.info
        longest = max(info.width, info.height)
        stored = [max(size) for size in info.level_dimensions if at_least and at_least <= max(size) <= longest_side]
        scale = max(1.0, longest / (min(stored) if stored else longest_side))  # level-0 pixels per view pixel
        size = (max(1, round(info.width / scale)), max(1, round(info.height / scale)))
        level = self._slide.get_best_level_for_downsample(scale * 1.001)  # a level's downsample is rounded
        level_width, level_height = info.level_dimensions[level]
        if level_width * level_height > MAX_OVERVIEW_PIXELS:
            raise SlideError(f"no pyramid level small enough for an overview (the nearest is {level_width} x "
                             f"{level_height} pixels; the cap is {MAX_OVERVIEW_PIXELS}): send a pyramidal slide")
        downsample = info.level_downsamples[level]
        across, down = level_width / size[0], level_height / size[1]  # level pixels per view pixel
        # Square blocks of the view whose level region stays within BLOCK_BYTES of RGBA, however wide the level.
        block = max(1, math.isqrt(int(BLOCK_BYTES / (4 * across * down))))
        overview = Image.new("RGB", size, (255, 255, 255))
        for top in range(0, size[1], block):
            bottom = min(size[1], top + block)
            first_row, last_row = round(top * down), max(round(top * down) + 1, round(bottom * down))
            for left in range(0, size[0], block):
                right = min(size[0], left + block)
                first_col, last_col = round(left * across), max(round(left * across) + 1, round(right * across))
                region = self.region(round(first_col * downsample), round(first_row * downsample), level,
                                     last_col - first_col, last_row - first_row)
                overview.paste(region.resize((right - left, bottom - top), Image.Resampling.BOX), (left, top))
        return np.asarray(overview)

    def region(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """RGB pixels of `level` whose top-left corner is (x, y) in level-0 coordinates."""
        import openslide

        try:
            return _on_white(self._slide.read_region((x, y), level, (width, height)))
        except (openslide.OpenSlideError, OSError) as exc:  # truncated or corrupt data
            raise SlideError(f"the slide is damaged: {exc}") from None


def _check_limits(name: str, level_dimensions: tuple[tuple[int, int], ...], properties: Mapping[str, str]) -> None:
    """Refuse what no scanner writes before a pixel is decoded: a side or a stored tile over its cap."""
    width, height = level_dimensions[0]
    if max(width, height) > MAX_SIDE:
        raise SlideError(f"{name}: claims {width} x {height} pixels; over {MAX_SIDE} a side, it is no glass slide")
    for level in range(len(level_dimensions)):
        tile = [int(properties.get(f"openslide.level[{level}].tile-{side}", 0)) for side in ("width", "height")]
        if max(tile) > MAX_TILE_SIDE:
            raise SlideError(f"{name}: level {level} is stored in {tile[0]} x {tile[1]} tiles; over {MAX_TILE_SIDE}")


def _positive(value: str | None) -> float | None:
    """A declared positive number, or None when the property is missing or not one (a header can say anything)."""
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _on_white(image: Image.Image) -> Image.Image:
    """Transparent (outside the scanned area) pixels are glass: white."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white
