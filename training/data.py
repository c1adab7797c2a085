"""Datasets: discover classes, split reproducibly, decode once, augment.

Any folder of class sub-folders is a dataset (LC25000's ``lung_image_sets/``,
a brain-MRI ``Training/`` folder, the synthetic tiles). Classes are the sorted
sub-folder names; that order is the model's output order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from models.preprocessing import decode_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "validation", "test")
SPLIT_POLICY = "stratified random split by image"
AUGMENTATIONS = ["flip_left_right", "flip_up_down", "rotate_90", "brightness", "contrast", "saturation", "stain_gain"]


@dataclass(frozen=True)
class Example:
    """One image file, its class index and its split."""

    path: str  # relative to the dataset root
    label: int
    split: str


@dataclass(frozen=True)
class SplitManifest:
    """The reproducible split: written beside the model, read by evaluation."""

    root: Path
    class_names: list[str]
    seed: int
    fractions: dict[str, float]
    examples: list[Example]

    def paths(self, split: str) -> list[Path]:
        return [self.root / e.path for e in self.examples if e.split == split]

    def labels(self, split: str) -> np.ndarray:
        return np.array([e.label for e in self.examples if e.split == split], dtype=np.int32)

    def sizes(self) -> dict[str, int]:
        return {s: sum(e.split == s for e in self.examples) for s in SPLITS}

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
            "policy": SPLIT_POLICY,
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
        )


def resolve_dataset_root(path: Path) -> Path:
    """Accept the LC25000 top folder too: descend into ``lung_image_sets``."""
    nested = path / "lung_image_sets"
    return nested if nested.is_dir() else path


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
    root: Path, seed: int = 0, validation_fraction: float = 0.15, test_fraction: float = 0.15
) -> SplitManifest:
    """Stratified train/validation/test split of a class-folder dataset."""
    if not 0 < validation_fraction < 1 or not 0 < test_fraction < 1 or validation_fraction + test_fraction >= 1:
        raise ValueError("validation and test fractions must be in (0, 1) and sum below 1")
    classes = discover_classes(root)
    rng = np.random.default_rng(seed)
    examples: list[Example] = []
    for label, (name, files) in enumerate(classes.items()):
        order = rng.permutation(len(files))
        n_test = max(1, round(len(files) * test_fraction))
        n_val = max(1, round(len(files) * validation_fraction))
        if len(files) - n_test - n_val < 1:
            raise ValueError(f"class {name!r} has too few images ({len(files)}) to split")
        for rank, index in enumerate(order):
            split = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
            examples.append(Example(files[index].relative_to(root).as_posix(), label, split))
    return SplitManifest(
        root=root,
        class_names=list(classes),
        seed=seed,
        fractions={"validation": validation_fraction, "test": test_fraction},
        examples=examples,
    )


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
