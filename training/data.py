"""Datasets: discover classes, split reproducibly, decode once, augment.

Any folder of class sub-folders is a dataset (LC25000's ``lung_image_sets/``,
a brain-MRI ``Training/`` folder, the synthetic tiles). Classes are the sorted
sub-folder names; that order is the model's output order.

Splits are by near-duplicate group (see :mod:`training.grouping`), stratified
by class: rotated and flipped copies of one original never end up on both
sides of a split. ``split_by="image"`` reproduces the leaky image-level split
that published LC25000 scores use, for comparison only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from models.preprocessing import decode_image
from training.grouping import DEFAULT_MAX_DISTANCE, group_files, summarise

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff"})
# train: fitting; early_stopping: model selection (early stopping, learning-rate schedule, best
# checkpoint); validation: the temperature and the abstain threshold, on images model selection never
# looked at (selecting on them as well made them look easier than the test split); test: the report.
SPLITS = ("train", "early_stopping", "validation", "test")
HELD_OUT_SPLITS = ("test", "validation", "early_stopping")  # dealt in this order, the rest is train
SITE_HOLDOUT = "site_holdout"  # the split of images from held-out sites: never trained, validated or tested on
SITES_FILE = "tiles.csv"  # optional, beside the class folders: `path` (relative) and `site` columns
# Optional, beside the class folders: facts of the whole dataset, {"microns_per_pixel": 0.5} (the images'
# pixel size; the synthetic generator writes it, for other data the user does).
DATASET_FILE = "dataset.json"
AUTO = "auto"  # hold out the last of three or more declared sites
SPLIT_BY = ("group", "image")
SPLIT_POLICIES = {
    "group": "stratified by near-duplicate group (rotation/flip-invariant 256-bit pHash, Hamming <= {distance})",
    "image": "stratified random split by image (near-duplicates may cross splits)",
}
AUGMENTATIONS = ["flip_left_right", "flip_up_down", "rotate_90", "brightness", "contrast", "saturation", "stain_gain"]


@dataclass(frozen=True)
class Example:
    """One image file, its class index and its split."""

    path: str  # relative to the dataset root
    label: int
    split: str
    group: int = -1  # near-duplicate group; -1 in manifests written before grouping existed
    site: str = ""  # where the image was acquired, when the dataset says (tiles.csv)


@dataclass(frozen=True)
class SplitManifest:
    """The reproducible split: written beside the model, read by evaluation."""

    root: Path
    class_names: list[str]
    seed: int
    fractions: dict[str, float]
    examples: list[Example]
    policy: str = SPLIT_POLICIES["image"]

    def paths(self, split: str) -> list[Path]:
        return [self.root / e.path for e in self.examples if e.split == split]

    def sites(self, split: str) -> np.ndarray:
        return np.array([e.site for e in self.examples if e.split == split])

    def held_out_sites(self) -> list[str]:
        return sorted({e.site for e in self.examples if e.split == SITE_HOLDOUT})

    def labels(self, split: str) -> np.ndarray:
        return np.array([e.label for e in self.examples if e.split == split], dtype=np.int32)

    def groups(self, split: str) -> np.ndarray:
        return np.array([e.group for e in self.examples if e.split == split], dtype=np.int64)

    def n_groups(self) -> int:
        return summarise(np.array([e.group for e in self.examples])).n_groups

    def largest_group(self) -> int:
        return summarise(np.array([e.group for e in self.examples])).largest_group

    def groups_across_splits(self) -> int:
        """How many near-duplicate groups have members in more than one split (0 means no leak)."""
        splits_of: dict[int, set[str]] = {}
        for example in self.examples:
            splits_of.setdefault(example.group, set()).add(example.split)
        return sum(len(splits) > 1 for splits in splits_of.values())

    def sizes(self) -> dict[str, int]:
        splits = SPLITS + ((SITE_HOLDOUT,) if self.held_out_sites() else ())
        return {s: sum(e.split == s for e in self.examples) for s in splits}

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount([e.label for e in self.examples], minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def fingerprint(self) -> str:
        """sha256 of the sorted file list (with sizes) and the class counts."""
        digest = hashlib.sha256()
        for example in sorted(self.examples, key=lambda e: e.path):
            size = (self.root / example.path).stat().st_size
            digest.update(f"{example.path}\t{size}\n".encode())
        digest.update(json.dumps(self.class_counts(), sort_keys=True).encode())
        return digest.hexdigest()

    def save(self, path: Path) -> None:
        payload = {
            "class_names": self.class_names,
            "seed": self.seed,
            "fractions": self.fractions,
            "policy": self.policy,
            "examples": [e.__dict__ for e in self.examples],
        }
        path.write_text(json.dumps(payload, indent=1))

    @classmethod
    def load(cls, path: Path, root: Path) -> SplitManifest:
        payload = json.loads(path.read_text())
        return cls(
            root=root,
            class_names=payload["class_names"],
            seed=payload["seed"],
            fractions=payload["fractions"],
            examples=[Example(**e) for e in payload["examples"]],
            policy=payload.get("policy", SPLIT_POLICIES["image"]),
        )


def resolve_dataset_root(path: Path) -> Path:
    """Accept the LC25000 top folder too: descend into ``lung_image_sets``."""
    nested = path / "lung_image_sets"
    return nested if nested.is_dir() else path


def read_microns_per_pixel(root: Path) -> float | None:
    """The images' pixel size the dataset declares in its dataset.json; None when it declares none."""
    path = root / DATASET_FILE
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("microns_per_pixel")
    if value is not None and not (isinstance(value, int | float) and value > 0):
        raise ValueError(f"{path}: microns_per_pixel must be a positive number, not {value!r}")
    return None if value is None else float(value)


def read_sites(root: Path) -> dict[str, str]:
    """Relative path -> site, from the dataset's tiles.csv; empty when it has none."""
    table = root / SITES_FILE
    if not table.is_file():
        return {}
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"path", "site"} <= set(rows[0]):
        raise ValueError(f"{table} needs `path` and `site` columns")
    return {row["path"]: row["site"] for row in rows}


def choose_held_out_sites(sites: list[str], requested: tuple[str, ...]) -> tuple[str, ...]:
    """The sites to hold out: those named, or with `auto` the last (sorted) of three or more."""
    if requested == (AUTO,):
        return (sites[-1],) if len(sites) >= 3 else ()
    unknown = set(requested) - set(sites)
    if unknown:
        raise ValueError(f"cannot hold out {sorted(unknown)}: the dataset's sites are {sites or 'not declared'}")
    if len(set(requested)) >= len(sites) > 0:
        raise ValueError("at least one site must remain for training")
    return requested


def discover_classes(root: Path) -> dict[str, list[Path]]:
    """Map each class (sorted sub-folder name) to its sorted image files."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    classes: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if files:
            classes[folder.name] = files
    if len(classes) < 2:
        raise ValueError(f"{root} needs at least two class sub-folders with images, found {list(classes)}")
    return classes


def split_dataset(
    root: Path,
    seed: int = 0,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_by: str = "group",
    early_stopping_fraction: float = 0.1,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    exclude: tuple[str, ...] = (),
    holdout_sites: tuple[str, ...] = (),
) -> SplitManifest:
    """Stratified train/validation/test split of a class-folder dataset.

    Near-duplicate groups are found within each class. With ``split_by="group"``
    whole groups are dealt to test, then validation, then train, in a seeded
    random order, until each split holds its share of the class's images.
    Classes named in ``exclude`` are left out (a held-out-class experiment).
    Images from ``holdout_sites`` (sites come from the dataset's tiles.csv;
    ``("auto",)`` picks the last of three or more) go to the ``site_holdout``
    split whole: no site is ever on both sides.
    """
    shares = {"test": test_fraction, "validation": validation_fraction, "early_stopping": early_stopping_fraction}
    if not all(0 < share < 1 for share in shares.values()) or sum(shares.values()) >= 1:
        raise ValueError("test, validation and early-stopping fractions must be in (0, 1) and sum below 1")
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    classes = discover_classes(root)
    unknown = set(exclude) - set(classes)
    if unknown:
        raise ValueError(f"cannot leave out {sorted(unknown)}: the classes are {list(classes)}")
    classes = {name: files for name, files in classes.items() if name not in exclude}
    if len(classes) < 2:
        raise ValueError("at least two classes must remain for training")
    site_of = read_sites(root)
    held_out = set(choose_held_out_sites(sorted(set(site_of.values())), holdout_sites))
    rng = np.random.default_rng(seed)
    examples: list[Example] = []
    next_group = 0
    for label, (name, files) in enumerate(classes.items()):
        groups = group_files(files, max_distance) + next_group
        next_group = int(groups.max()) + 1
        paths = [path.relative_to(root).as_posix() for path in files]
        sites = [site_of.get(path, "") for path in paths]
        kept = np.array([site not in held_out for site in sites])
        units = groups if split_by == "group" else np.arange(len(files))
        assignment = _deal_units(units[kept], rng, shares)
        if assignment is None:
            raise ValueError(f"class {name!r} has too few {split_by}s ({len(np.unique(units[kept]))}) to split")
        splits = iter(assignment)
        examples += [
            Example(path, label, next(splits) if keep else SITE_HOLDOUT, int(group), site)
            for path, keep, group, site in zip(paths, kept, groups, sites, strict=True)
        ]
    return SplitManifest(
        root=root,
        class_names=list(classes),
        seed=seed,
        fractions=shares,
        examples=examples,
        policy=SPLIT_POLICIES[split_by].format(distance=max_distance)
        + (f"; site(s) {', '.join(sorted(held_out))} held out whole" if held_out else ""),
    )


def _deal_units(units: np.ndarray, rng: np.random.Generator, shares: dict[str, float]) -> list[str] | None:
    """Split name per image, dealing whole units (groups or single images); None if a split would be empty."""
    unique, sizes = np.unique(units, return_counts=True)
    total = int(sizes.sum())
    targets = {split: max(1, round(total * shares[split])) for split in HELD_OUT_SPLITS}
    split_of_unit: dict[int, str] = {}
    filled = dict.fromkeys(SPLITS, 0)
    for position in rng.permutation(len(unique)):
        split = next((s for s in HELD_OUT_SPLITS if filled[s] < targets[s]), "train")
        split_of_unit[int(unique[position])] = split
        filled[split] += int(sizes[position])
    if min(filled.values()) == 0:
        return None
    return [split_of_unit[int(unit)] for unit in units]


def common_side(paths: list[Path]) -> int | None:
    """The most common longer side of these images (headers only): the scale a slide is tiled at."""
    sides: Counter[int] = Counter()
    for path in paths:
        with Image.open(path) as image:
            sides[max(image.size)] += 1
    return sides.most_common(1)[0][0] if sides else None


def load_images(paths: list[Path], size: int, workers: int = 4) -> np.ndarray:
    """Decode files through the shared preprocessing function into (N, S, S, 3) uint8."""
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL
        arrays = list(pool.map(lambda p: decode_image(p, size), paths))
    return np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)


def augment(images: tf.Tensor, labels: tf.Tensor, seed: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Label-preserving tissue augmentations on a uint8 batch; returns float32 0..255.

    Tissue has no canonical orientation, so all eight flips/rotations are
    equally valid; mild brightness, contrast, saturation and per-channel gain
    jitter mimic stain and scanner variation.
    """
    x = tf.cast(images, tf.float32)
    batch = tf.shape(x)[0]

    def per_image(shape_tail: list[int], low: float, high: float) -> tf.Tensor:
        return tf.random.uniform(tf.concat([[batch], shape_tail], 0), low, high, seed=seed)

    x = tf.where(per_image([1, 1, 1], 0, 1) < 0.5, tf.reverse(x, axis=[2]), x)
    x = tf.where(per_image([1, 1, 1], 0, 1) < 0.5, tf.reverse(x, axis=[1]), x)
    # Transposing square images + the flips above gives all 8 orientations.
    x = tf.where(per_image([1, 1, 1], 0, 1) < 0.5, tf.transpose(x, [0, 2, 1, 3]), x)

    x = x + per_image([1, 1, 1], -0.06, 0.06) * 255.0
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * per_image([1, 1, 1], 0.9, 1.1) + mean
    grey = tf.reduce_mean(x, axis=3, keepdims=True)
    x = grey + (x - grey) * per_image([1, 1, 1], 0.9, 1.1)
    x = x * per_image([1, 1, 3], 0.95, 1.05)
    return tf.clip_by_value(x, 0.0, 255.0), labels


def make_dataset(
    images: np.ndarray, labels: np.ndarray, batch_size: int, training: bool, seed: int = 0
) -> tf.data.Dataset:
    """tf.data pipeline over decoded images; shuffles and augments only for training."""
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if training:
        dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y))
    return dataset.prefetch(tf.data.AUTOTUNE)
