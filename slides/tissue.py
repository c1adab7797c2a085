"""Tissue detection on a low-resolution view of the slide, so background glass never reaches the model.

As HistoQC and TIAToolbox do it: a pixel is tissue when it is darker than
glass (grey < 0.9 of white) and coloured (the spread of its RGB values above
10), then specks are removed and small holes filled with a morphological
opening and closing (PIL's min and max filters, no SciPy in serving).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

GREY_BELOW = 0.9 * 255
SPREAD_ABOVE = 10
SPECK_FILTER = 3  # px of the low-resolution mask: opening and closing with this square


def tissue_mask(rgb: np.ndarray, grey_below: float = GREY_BELOW, spread_above: float = SPREAD_ABOVE) -> np.ndarray:
    """Boolean (H, W) mask of tissue in an RGB uint8 image."""
    pixels = rgb.astype(np.float32)
    grey = pixels.mean(axis=2)
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    raw = Image.fromarray(((grey < grey_below) & (spread > spread_above)).astype(np.uint8) * 255)
    opened = raw.filter(ImageFilter.MinFilter(SPECK_FILTER)).filter(ImageFilter.MaxFilter(SPECK_FILTER))
    closed = opened.filter(ImageFilter.MaxFilter(SPECK_FILTER)).filter(ImageFilter.MinFilter(SPECK_FILTER))
    return np.asarray(closed) > 127


def tissue_fraction(mask: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of tissue in the mask's (left, top, right, bottom) box; 0 for an empty box."""
    left, top, right, bottom = box
    window = mask[max(0, top) : max(0, bottom), max(0, left) : max(0, right)]
    return float(window.mean()) if window.size else 0.0
