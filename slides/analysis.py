"""Analyse a whole slide: find tissue, and classify its tiles as `/predict` does.

Each tile is read at the pyramid level nearest below the model's scale,
made into the model input by the same resampling as an upload sent with its
pixel size (:func:`models.resampling.resample`), and answered by the one answer
rule (`models.prediction`: the same quality gate, model and
out-of-distribution score as `/predict`), in batches; a tile that fails the
gate or scores out of distribution is uncertain, never given a plain class.
Background glass (the tissue mask, on a low-resolution view) never reaches
the model.

The grid covers the whole slide: the tiles along the right and bottom edges
run past it and are read with the outside as glass (white), so the tissue
there is analysed too. A tile is analysed when the tissue mask covers at
least DEFAULT_MIN_TISSUE of it; the quality gate then declines a mostly-glass
one (uncertain, reason `background`). What the analysis writes is in
:mod:`slides.outputs`; the command line in :mod:`slides.__main__`.
"""


from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.card import ModelCard
from models.prediction import Prediction, TileClassifier
from models.resampling import ModelScale, resample
from models.store import StoredModel
from slides.reader import Slide, SlideInfo
from slides.tissue import tissue_fraction, tissue_mask

logger = logging.getLogger(__name__)


DEFAULT_TILE_SIZE = 768  # level-0 pixels: LC25000's tiles are 768x768 crops of slides
DEFAULT_MIN_TISSUE = 0.01  # share of a tile the tissue mask must cover for it to be analysed (docs/slides.md)
TILE_SIZE_LIMITS = (16, 16384)  # level-0 pixels a side a request may ask tiles of
MASK_LONGEST_SIDE = 2048  # the low-resolution view tissue is found on: at most this long,
MASK_AT_LEAST = 1024  # and a stored level this long or longer is used as it is (about 1.25x on a 40x scan)
READERS = 2  # threads reading tiles while the model runs
BATCH_SIZE = 32  # tiles per model call
READ_AHEAD = 3  # batches read ahead of the model


# How the tile size was chosen (summary: `tile_size_basis`).
REQUESTED = "requested"  # given by the caller
PIXEL_SIZE = "microns_per_pixel"  # the training images' size rescaled by the card's and the slide's pixel sizes
TRAINING_SIZE = "training_tile_size"  # the training images' size in pixels as it is: a pixel size is missing
DEFAULT_SIZE = "default"  # nothing known: LC25000's 768


@dataclass(frozen=True)
class TileAnswer:
    x: int  # level-0 left
    y: int  # level-0 top
    size: int  # level-0 side
    tissue_fraction: float
    prediction: Prediction


@dataclass(frozen=True)
class SlideAnalysis:
    info: SlideInfo
    model: str
    class_names: list[str]
    tile_size: int
    tile_size_basis: str  # REQUESTED, PIXEL_SIZE, TRAINING_SIZE or DEFAULT_SIZE
    level: int
    mask: np.ndarray  # tissue, on the low-resolution view
    mask_downsample: float  # level-0 pixels per mask pixel
    tiles: list[TileAnswer]
    thumbnail: np.ndarray  # the low-resolution view the mask was found on (the overlay's background)


def check_readable(path: Path) -> None:
    """Open the slide and read the overview its analysis starts from: a slide over a cap, damaged where
    the overview reads, or no slide at all raises :class:`~slides.reader.SlideError` here, not later."""
    with Slide(path) as slide:
        slide.thumbnail(MASK_LONGEST_SIDE, MASK_AT_LEAST)


def tile_size_for(card: ModelCard, info: SlideInfo, requested: int | None = None) -> int:
    """Level-0 pixels per tile: as requested; else the training images' size from the card, rescaled to
    the slide's pixel size when both declare microns per pixel; else LC25000's 768."""
    if requested is not None:
        return requested
    trained = card.dataset.tile_size or DEFAULT_TILE_SIZE
    if card.dataset.microns_per_pixel and info.microns_per_pixel:
        return max(1, round(trained * card.dataset.microns_per_pixel / info.microns_per_pixel))
    return trained


def tile_size_basis(card: ModelCard, info: SlideInfo, requested: int | None = None) -> str:
    """How :func:`tile_size_for` chose the size: REQUESTED, PIXEL_SIZE, TRAINING_SIZE or DEFAULT_SIZE."""
    if requested is not None:
        return REQUESTED
    if card.dataset.microns_per_pixel and info.microns_per_pixel:
        return PIXEL_SIZE
    return TRAINING_SIZE if card.dataset.tile_size else DEFAULT_SIZE


def choose_level(info: SlideInfo, tile_size: int, input_size: int) -> int:
    """The coarsest level that still has at least `input_size` pixels across a tile (fewer pixels read)."""
    usable = [k for k, downsample in enumerate(info.level_downsamples) if tile_size / downsample >= input_size]
    return max(usable, default=0)


def mask_box(x: int, y: int, size: int, downsample: float) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a level-0 tile on the mask: the mask pixels whose centres lie
    in the tile, so the boxes of a grid's tiles share no pixel and miss none."""
    return (round(x / downsample), round(y / downsample), round((x + size) / downsample),
            round((y + size) / downsample))


def tile_grid(info: SlideInfo, mask: np.ndarray, downsample: float, tile_size: int,
              min_tissue: float) -> Iterator[tuple[int, int, float]]:
    """(x, y, tissue share) of every tile of the grid over the whole slide (the last column and row run
    past its right and bottom edges; that part counts as glass) whose tissue share is above zero and
    reaches `min_tissue`."""
    for y in range(0, info.height, tile_size):
        for x in range(0, info.width, tile_size):
            share = tissue_fraction(mask, mask_box(x, y, tile_size, downsample))
            if share > 0 and share >= min_tissue:
                yield x, y, share


def region_microns_per_pixel(card: ModelCard, info: SlideInfo, level: int, requested: int | None) -> float | None:
    """The pixel size of the tiles read at `level`, when the tiles are cut at the model's pixel size (the card
    and the slide both declare one, and no tile size was requested); None: each tile is resized whole."""
    if requested is not None or not (card.dataset.microns_per_pixel and info.microns_per_pixel):
        return None
    return info.microns_per_pixel * info.level_downsamples[level]


def _tile_pixels(slide: Slide, x: int, y: int, level: int, tile_size: int, target: ModelScale,
                 mpp: float | None) -> np.ndarray:
    """The tile as the model gets it. Past the slide's edge OpenSlide returns transparent pixels, which
    the reader turns to white: glass."""
    downsample = slide.info.level_downsamples[level]
    side = max(1, round(tile_size / downsample))
    region = slide.region(x, y, level, side, side)
    # The same resampling as an upload's with its `mpp` (models.resampling): its pixels to the model's.
    return resample(region, target, mpp)


def analyze(path: Path, stored: StoredModel, tile_size: int | None = None,
            min_tissue: float = DEFAULT_MIN_TISSUE, batch_size: int = BATCH_SIZE,
            progress: Callable[[int, int], None] | None = None,
            classifier: TileClassifier | None = None) -> SlideAnalysis:
    """Classify every tissue tile of the slide at `path` with the stored model, in batches
    (`tile_size`: level-0 pixels, default from the card; see :func:`tile_size_for`); `progress` is
    called with (tiles done, tiles to do) once the tissue is found and after every batch. `classifier`:
    the caller's (its traced model and its thresholds, so a tile is answered as `/predict` answers it);
    else one with the card's thresholds.

    Tiles are read ahead on READERS threads while the model runs (OpenSlide and PIL release the
    GIL), so reading and the model overlap instead of taking turns.
    """
    card = stored.card
    classifier = classifier or TileClassifier(stored)
    with Slide(path) as slide, ThreadPoolExecutor(READERS, thread_name_prefix="slide-read") as readers:
        info = slide.info
        view = slide.thumbnail(MASK_LONGEST_SIDE, MASK_AT_LEAST)
        mask = tissue_mask(view)
        downsample = info.width / view.shape[1]
        basis = tile_size_basis(card, info, tile_size)
        requested = tile_size
        tile_size = tile_size_for(card, info, tile_size)
        level = choose_level(info, tile_size, card.input_size)
        target, mpp = ModelScale.of(card), region_microns_per_pixel(card, info, level, requested)
        grid = list(tile_grid(info, mask, downsample, tile_size, min_tissue))
        logger.info("%s: %dx%d, tissue %.1f%% of the view, %d tiles of %d px (%s) at level %d",
                    path.name, info.width, info.height, 100 * mask.mean(), len(grid), tile_size, basis, level)

        def read(chunk: list[tuple[int, int, float]]) -> np.ndarray:
            return np.stack([_tile_pixels(slide, x, y, level, tile_size, target, mpp) for x, y, _ in chunk])

        chunks = [grid[start : start + batch_size] for start in range(0, len(grid), batch_size)]
        reads = deque(readers.submit(read, chunk) for chunk in chunks[:READ_AHEAD])
        answers: list[TileAnswer] = []
        if progress:
            progress(0, len(grid))
        for number, chunk in enumerate(chunks):
            images = reads.popleft().result()
            if number + READ_AHEAD < len(chunks):
                reads.append(readers.submit(read, chunks[number + READ_AHEAD]))
            for (x, y, share), evidence in zip(chunk, classifier.evidence(images), strict=True):
                answers.append(TileAnswer(x, y, tile_size, share, classifier.answer(evidence)))
            if progress:
                progress(len(answers), len(grid))
    return SlideAnalysis(info, stored.tag, card.class_names, tile_size, basis, level, mask, downsample, answers,
                         view)


def _check_corner(info: SlideInfo, x: int, y: int, size: int) -> None:
    """A tile starts inside the slide; it may run past the right and bottom edges, as the grid's last ones do."""
    if not (0 <= x < info.width and 0 <= y < info.height) or size < 1:
        raise ValueError(f"the tile ({x}, {y}, {size}) does not start inside the {info.width} x {info.height} slide")


def read_tile(path: Path, x: int, y: int, size: int) -> Image.Image:
    """The level-0 pixels of a `size`-pixel square at (x, y), which must start inside the slide (the
    part past its edge is glass: white)."""
    with Slide(path) as slide:
        _check_corner(slide.info, x, y, size)
        return slide.region(x, y, 0, size, size)


def read_analysed_tile(path: Path, x: int, y: int, size: int, card: ModelCard) -> Image.Image:
    """The pixels the analysis gave the model for the tile at (x, y) of `size` level-0 pixels: read from the
    same level and resampled the same way (by pixel size when the tile is the card's own size for this slide),
    `card.input_size` a side. Their Grad-CAM explains the slide's answer."""
    with Slide(path) as slide:
        info = slide.info
        _check_corner(info, x, y, size)
        level = choose_level(info, size, card.input_size)
        requested = None if size == tile_size_for(card, info) else size
        mpp = region_microns_per_pixel(card, info, level, requested)
        return Image.fromarray(_tile_pixels(slide, x, y, level, size, ModelScale.of(card), mpp))
