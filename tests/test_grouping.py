"""Near-duplicate grouping and the leakage-aware split on an LC25000-like dataset."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthetic.tiles import generate_dataset
from synthetic.tissue import LUNG_CLASSES
from tests.helpers import TINY_TILE
from training import data
from training.grouping import group_files, hash_distance, hash_files, orientations, summarise

ORIGINALS_PER_CLASS = 12
COPIES = 4  # each original plus 4 rotated/mirrored copies: groups of 5


@pytest.fixture(scope="module")
def augmented_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 originals per class, each written 5 times (like LC25000's 250 x 20)."""
    out = tmp_path_factory.mktemp("augmented")
    return generate_dataset(out, ORIGINALS_PER_CLASS, size=TINY_TILE, seed=11, augmented_copies=COPIES)


def original_of(path: Path) -> int:
    """The generator numbers an original's copies consecutively: files 1-5 share original 0."""
    number = int(re.search(r"(\d+)\.jpeg$", path.name).group(1))
    return (number - 1) // (COPIES + 1)


def test_orientations_are_the_eight_symmetries_of_a_square():
    square = np.arange(16).reshape(4, 4)
    views = orientations(square)
    assert len(views) == 8 and np.array_equal(views[0], square)
    assert len({v.tobytes() for v in views}) == 8  # all distinct for an asymmetric array


def test_every_orientation_of_a_tile_hashes_within_a_few_bits(tile_image, tmp_path):
    original = tmp_path / "original.jpeg"
    tile_image.save(original, quality=90)
    reference = hash_files([original])[0]
    for k, transpose in enumerate(Image.Transpose):
        copy = tmp_path / f"copy{k}.jpeg"
        tile_image.transpose(transpose).save(copy, quality=80)  # re-encoded at another quality too
        assert hash_distance(reference, hash_files([copy])[0]) <= 12, transpose


def test_copies_share_a_group_and_distinct_originals_do_not(augmented_root):
    for class_name in LUNG_CLASSES:
        files = sorted((augmented_root / class_name).glob("*.jpeg"))
        assert len(files) == ORIGINALS_PER_CLASS * (COPIES + 1)
        groups = group_files(files)
        summary = summarise(groups)
        assert summary.n_groups == ORIGINALS_PER_CLASS and summary.largest_group == COPIES + 1
        # Same original <=> same group.
        originals = np.array([original_of(f) for f in files])
        assert np.array_equal(originals[:, None] == originals[None, :], groups[:, None] == groups[None, :])


def test_group_split_never_leaks_and_image_split_would(augmented_root):
    manifest = data.split_dataset(augmented_root, seed=0)
    assert manifest.n_groups() == ORIGINALS_PER_CLASS * len(LUNG_CLASSES)
    assert manifest.largest_group() == COPIES + 1
    assert manifest.groups_across_splits() == 0
    for split in data.SPLITS:  # still stratified: every class in every split
        assert set(manifest.labels(split)) == {0, 1, 2}
    split_of_original = {}
    for example in manifest.examples:
        key = (example.label, original_of(Path(example.path)))
        assert split_of_original.setdefault(key, example.split) == example.split
    assert "near-duplicate group" in manifest.policy

    leaky = data.split_dataset(augmented_root, seed=0, split_by="image")
    assert leaky.groups_across_splits() > 0
    assert "may cross" in leaky.policy


def test_manifest_round_trip_keeps_groups_and_policy(augmented_root, tmp_path):
    manifest = data.split_dataset(augmented_root, seed=1)
    manifest.save(tmp_path / "manifest.json")
    loaded = data.SplitManifest.load(tmp_path / "manifest.json", augmented_root)
    assert loaded.examples == manifest.examples and loaded.policy == manifest.policy
    assert np.array_equal(loaded.groups("test"), manifest.groups("test"))


def test_unknown_split_policy_is_rejected(augmented_root):
    with pytest.raises(ValueError, match="split_by"):
        data.split_dataset(augmented_root, split_by="patient")
