"""Group near-duplicate tiles so that no original image straddles two splits.

LC25000 expanded 250 original images per class to 5,000 by rotations and
flips. A split by image puts siblings of one original into train AND test, and
the test score measures memory, not generalisation. Here every image gets a
64-bit perceptual hash (pHash: the signs of the low-frequency DCT of a 32x32
grey thumbnail against their median) in each of its eight orientations (the
dihedral group D4: four rotations, each optionally mirrored). Two images are
near-duplicates when some orientation of one is within ``max_distance`` bits
of the other; near-duplicates are merged transitively (the connected components of the
near-duplicate graph) into groups.

The hash is 256 bits (16x16 coefficients of a 64x64 thumbnail) rather than
pHash's usual 64: tissue tiles are self-similar textures, and on the synthetic
tiles unrelated pairs came within 4 of 64 bits, as close as re-encoded rotated
copies. At 256 bits unrelated tiles differed by at least 66 bits and copies by
at most 6, hence the default threshold of 24.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

logger = logging.getLogger(__name__)

THUMBNAIL = 64
LOW_FREQUENCIES = 16  # 16x16 coefficients -> 256 bits
HASH_WORDS = LOW_FREQUENCIES * LOW_FREQUENCIES // 64
DEFAULT_MAX_DISTANCE = 24  # of 256 bits (see the module docstring)
_COMPARE_CHUNK = 64  # rows per comparison block: (chunk, 8, N, 4) uint64 stays small


def thumbnail(path: Path) -> np.ndarray:
    """Grey 64x64 float thumbnail; JPEG draft mode decodes at a reduced scale for speed."""
    with Image.open(path) as image:
        image.draft("L", (THUMBNAIL * 2, THUMBNAIL * 2))
        grey = image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX)
        return np.asarray(grey, np.float32)


def orientations(square: np.ndarray) -> list[np.ndarray]:
    """The eight D4 orientations of a square array (identity first)."""
    rotations = [np.rot90(square, k) for k in range(4)]
    return rotations + [np.fliplr(r) for r in rotations]


def phash(grey: np.ndarray) -> np.ndarray:
    """256-bit perceptual hash of a grey thumbnail, as (4,) uint64 words."""
    coefficients = dctn(grey, norm="ortho")[:LOW_FREQUENCIES, :LOW_FREQUENCIES].ravel()
    # The DC term (overall brightness) is left out of the median, as in pHash.
    bits = coefficients > np.median(coefficients[1:])
    return np.packbits(bits).view(np.uint64)


def orientation_hashes(grey: np.ndarray) -> np.ndarray:
    """pHash of each of the eight orientations, shape (8, 4) uint64."""
    return np.stack([phash(o) for o in orientations(grey)])


def hash_files(paths: Sequence[Path], workers: int = 4) -> np.ndarray:
    """Orientation hashes of every file, shape (N, 8, 4) uint64."""
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        thumbnails = list(pool.map(thumbnail, paths))
    if not thumbnails:
        return np.zeros((0, 8, HASH_WORDS), np.uint64)
    return np.stack([orientation_hashes(t) for t in thumbnails])


def hash_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Bits by which some orientation of `a` (8, 4) differs from `b` in its identity orientation."""
    return int(np.bitwise_count(a ^ b[0]).sum(axis=-1).min())


def group_hashes(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Group ids 0..G-1 (numbered by first member) for (N, 8, 4) orientation hashes.

    Images i and j join one group when min over orientations o of
    popcount(hash_o(i) XOR hash_identity(j)) <= max_distance, transitively:
    the groups are the connected components of the near-duplicate graph.
    """
    count = len(hashes)
    if count == 0:
        return np.zeros(0, np.int64)
    identity = hashes[:, 0]
    sources, targets = [], []
    for start in range(0, count, _COMPARE_CHUNK):
        block = hashes[start : start + _COMPARE_CHUNK]
        xor = block[:, :, None, :] ^ identity[None, None, :, :]
        distances = np.bitwise_count(xor).sum(axis=-1, dtype=np.int64).min(axis=1)
        rows, columns = np.nonzero(distances <= max_distance)
        sources.append(rows + start)
        targets.append(columns)
    edges = np.concatenate(sources), np.concatenate(targets)
    graph = coo_array((np.ones(len(edges[0]), np.int8), edges), shape=(count, count))
    _, components = connected_components(graph, directed=False)
    _, first_index, inverse = np.unique(components, return_index=True, return_inverse=True)
    # Renumber so that group ids follow the order in which groups first appear.
    order = np.argsort(np.argsort(first_index))
    return order[inverse].astype(np.int64)


@dataclass(frozen=True)
class GroupSummary:
    """How much near-duplication a dataset has."""

    n_images: int
    n_groups: int
    largest_group: int

    def __str__(self) -> str:
        return f"{self.n_images} images in {self.n_groups} near-duplicate groups (largest: {self.largest_group})"


def summarise(groups: np.ndarray) -> GroupSummary:
    sizes = np.bincount(groups) if len(groups) else np.zeros(0, np.int64)
    return GroupSummary(len(groups), int((sizes > 0).sum()), int(sizes.max()) if len(sizes) else 0)


def group_files(paths: Sequence[Path], max_distance: int = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Near-duplicate group id of every file (see :func:`group_hashes`)."""
    groups = group_hashes(hash_files(paths), max_distance)
    logger.info("%s", summarise(groups))
    return groups
