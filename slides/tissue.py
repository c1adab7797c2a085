"""Tissue detection on a low-resolution view of the slide, so background glass never reaches the model.

As HistoQC and TIAToolbox do it: a pixel is tissue when it is darker than
glass (grey < 0.9 of white) and coloured (the spread of its RGB values above
10), then specks are removed and small holes filled with a morphological
opening and closing (a 3 x 3 square, in NumPy: no SciPy in serving).
"""

from __future__ import annotations

import numpy as np

GREY_BELOW = 0.9 * 255
SPREAD_ABOVE = 10
SPECK_FILTER = 3  # px of the low-resolution mask: opening and closing with this square


def _shifted(mask: np.ndarray, reduce: np.ufunc, pad_value: bool) -> np.ndarray:
    """`reduce` over the SPECK_FILTER x SPECK_FILTER square around each pixel."""
    reach = SPECK_FILTER // 2
    padded = np.pad(mask, reach, constant_values=pad_value)
    height, width = mask.shape
    out = padded[reach : reach + height, reach : reach + width].copy()
    for dy in range(SPECK_FILTER):
        for dx in range(SPECK_FILTER):
            reduce(out, padded[dy : dy + height, dx : dx + width], out=out)
    return out


def _eroded(mask: np.ndarray, times: int = 1) -> np.ndarray:
    """Tissue only where the whole square around a pixel is tissue (the image edge counts as tissue)."""
    for _ in range(times):
        mask = _shifted(mask, np.logical_and, True)
    return mask


def _dilated(mask: np.ndarray, times: int = 1) -> np.ndarray:
    """Tissue wherever the square around a pixel holds any."""
    for _ in range(times):
        mask = _shifted(mask, np.logical_or, False)
    return mask


def tissue_mask(rgb: np.ndarray, grey_below: float = GREY_BELOW, spread_above: float = SPREAD_ABOVE) -> np.ndarray:
    """Boolean (H, W) mask of tissue in an RGB uint8 image."""
    grey_sum = rgb.sum(axis=2, dtype=np.uint16)  # integer sums: a 2048-pixel view in milliseconds
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    raw = (grey_sum < 3 * grey_below) & (spread > spread_above)
    opened = _dilated(_eroded(raw))  # specks gone
    return _eroded(_dilated(opened))  # small holes filled


OUTLINE_SMOOTHING = 4  # closings before the outline is drawn: holes up to ~8 view pixels are not outlined


def outline(mask: np.ndarray, smoothing: int = OUTLINE_SMOOTHING) -> np.ndarray:
    """The tissue's boundary, for drawing: the mask closed `smoothing` times (so the gaps inside tissue,
    such as alveolar air spaces, are not outlined), then its pixels with glass among their neighbours."""
    closed = _eroded(_dilated(mask, smoothing), smoothing)
    return closed & ~_eroded(closed)


def tissue_fraction(mask: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of tissue in the mask's (left, top, right, bottom) box, the part of the box past the mask's
    edge counted as glass (an edge tile is read that way); 0 for an empty box."""
    left, top, right, bottom = box
    area = max(0, right - left) * max(0, bottom - top)
    window = mask[max(0, top) : max(0, bottom), max(0, left) : max(0, right)]
    return float(window.sum()) / area if area else 0.0
