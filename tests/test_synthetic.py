"""The synthetic generator: deterministic, LC25000 layout, and colour alone is useless."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from training.synthetic import LUNG_CLASSES, generate_dataset


def _digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpeg"))
    }


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = generate_dataset(tmp_path / "a", per_class=3, size=64, seed=5, workers=2)
    b = generate_dataset(tmp_path / "b", per_class=3, size=64, seed=5, workers=1)
    c = generate_dataset(tmp_path / "c", per_class=3, size=64, seed=6, workers=1)
    assert _digest(a) == _digest(b)
    assert _digest(a).keys() == _digest(c).keys()
    assert _digest(a) != _digest(c)


def test_lc25000_layout(synthetic_root):
    assert synthetic_root.name == "lung_image_sets"
    assert sorted(p.name for p in synthetic_root.iterdir()) == sorted(LUNG_CLASSES)
    files = list((synthetic_root / "lung_aca").glob("*.jpeg"))
    assert len(files) == 60
    with Image.open(files[0]) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (256, 256)


def test_default_dataset_is_768_px_rgb_jpeg_files_like_lc25000(tmp_path):
    root = generate_dataset(tmp_path, per_class=1, seed=0)  # every default but the count
    files = sorted(root.rglob("*"))
    assert [p.relative_to(root).as_posix() for p in files if p.is_file()] == [
        "lung_aca/lungaca1.jpeg", "lung_n/lungn1.jpeg", "lung_scc/lungscc1.jpeg"
    ]
    for path in files:
        if path.is_file():
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (768, 768)
                assert not image.info.get("progressive")  # baseline, as LC25000's are


def test_colour_statistics_alone_do_not_reveal_the_class(synthetic_root):
    """Logistic regression on per-image RGB mean and std stays near chance (<= 55%)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = [], []
    for label, name in enumerate(LUNG_CLASSES):
        for path in sorted((synthetic_root / name).glob("*.jpeg")):
            pixels = np.asarray(Image.open(path).convert("RGB"), np.float32).reshape(-1, 3)
            features.append(np.concatenate([pixels.mean(0), pixels.std(0)]))
            labels.append(label)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    scores = cross_val_score(classifier, np.array(features), np.array(labels), cv=5)
    assert scores.mean() <= 0.55, f"colour statistics predict the class: {scores.mean():.2f}"
