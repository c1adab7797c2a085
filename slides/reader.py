"""Open a whole-slide image without holding it in memory.

OpenSlide (the `openslide-python` bindings with the `openslide-bin` wheel: no
system package) reads the vendor formats (SVS, NDPI, MRXS, ...) and pyramidal
TIFF region by region. A plain JPEG, PNG or flat TIFF is read through
OpenSlide's `ImageSlide`, which does hold it in memory, so it is refused
above a pixel cap first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PLAIN_PIXELS = 100_000_000  # a flat image above this must come as a pyramid


class SlideError(ValueError):
    """The file is not a slide this reader can open, or a plain image over its pixel cap."""


@dataclass(frozen=True)
class SlideInfo:
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    microns_per_pixel: float | None  # at level 0, when the slide declares it
    vendor: str | None


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
                raise SlideError(f"{path.name}: not a slide or an image ({exc})") from None
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
        mpp_x = properties.get(openslide.PROPERTY_NAME_MPP_X)
        self.info = SlideInfo(
            width=self._slide.dimensions[0],
            height=self._slide.dimensions[1],
            level_dimensions=tuple(self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            microns_per_pixel=float(mpp_x) if mpp_x else None,
            vendor=properties.get(openslide.PROPERTY_NAME_VENDOR),
        )

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *_: object) -> None:
        self._slide.close()

    def thumbnail(self, longest_side: int) -> np.ndarray:
        """The whole slide as RGB uint8, its longest side at most `longest_side` (from the nearest level)."""
        image = self._slide.get_thumbnail((longest_side, longest_side))
        return np.asarray(_on_white(image))

    def region(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """RGB pixels of `level` whose top-left corner is (x, y) in level-0 coordinates."""
        return _on_white(self._slide.read_region((x, y), level, (width, height)))


def _on_white(image: Image.Image) -> Image.Image:
    """Transparent (outside the scanned area) pixels are glass: white."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white
