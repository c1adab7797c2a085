"""The synthetic generator: deterministic, LC25000 layout, colour alone is useless, and every
difficulty knob does what it says, measured on what it wrote."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from synthetic.tiles import DATASET_FILE, GENERATION_FILE, TILES_FILE, generate_dataset
from synthetic.tissue import LUNG_CLASSES, render_tile
from synthetic.variation import EASY, Difficulty, make_sites
from tests.helpers import rendered_tile
from training import data

QUIET = replace(EASY, sites=3)  # clean tiles from three sites: one knob at a time is turned up from here


def tiles_table(root) -> list[dict[str, str]]:
    with (root / TILES_FILE).open() as handle:
        return list(csv.DictReader(handle))


def _digest(root):
    files = [p for p in sorted(root.rglob("*")) if p.suffix in (".jpeg", ".csv", ".json")]
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = generate_dataset(tmp_path / "a", per_class=3, size=64, seed=5, workers=2)
    b = generate_dataset(tmp_path / "b", per_class=3, size=64, seed=5, workers=1)
    c = generate_dataset(tmp_path / "c", per_class=3, size=64, seed=6, workers=1)
    assert _digest(a) == _digest(b)
    assert _digest(a).keys() == _digest(c).keys()
    assert _digest(a) != _digest(c)


def test_lc25000_layout(synthetic_root):
    assert synthetic_root.name == "lung_image_sets"
    assert sorted(p.name for p in synthetic_root.iterdir() if p.is_dir()) == sorted(LUNG_CLASSES)
    files = sorted(p.name for p in synthetic_root.iterdir() if p.is_file())
    assert files == [DATASET_FILE, GENERATION_FILE, TILES_FILE]
    # 256 px tiles show the field a 768 px tile shows at 0.5 um per pixel: training reads this into the card.
    assert json.loads((synthetic_root / DATASET_FILE).read_text()) == {"microns_per_pixel": 1.5}
    files = list((synthetic_root / "lung_aca").glob("*.jpeg"))
    assert len(list(synthetic_root.glob("*/*.jpeg"))) == 180  # 60 drawn per class; noisy labels move a few
    with Image.open(files[0]) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (256, 256)


def test_default_dataset_is_768_px_rgb_jpeg_files_like_lc25000(tmp_path):
    root = generate_dataset(tmp_path, per_class=1, seed=0, difficulty=replace(Difficulty(), label_noise=0.0))
    files = sorted(root.rglob("*.jpeg"))
    assert [p.relative_to(root).as_posix() for p in files] == [
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


def test_label_noise_files_tiles_under_a_wrong_class_at_the_rate_asked(tmp_path):
    root = generate_dataset(tmp_path, per_class=100, size=32, seed=2, difficulty=replace(QUIET, label_noise=0.2))
    rows = tiles_table(root)
    noisy = [row for row in rows if row["noisy_label"] == "1"]
    # 300 draws at p = 0.2: 60 expected, standard deviation 6.9; 4 of them either side.
    assert 32 <= len(noisy) <= 88
    assert all(row["label"] != row["true_class"] for row in noisy)
    assert all(row["path"].split("/")[0] == row["label"] for row in rows)  # filed under the label, not the truth
    realised = json.loads((root / GENERATION_FILE).read_text())["realised"]["label_noise_rate"]
    assert realised == pytest.approx(len(noisy) / len(rows), abs=1e-4)  # written rounded
    clean = generate_dataset(tmp_path / "clean", per_class=100, size=32, seed=2, difficulty=QUIET)
    assert not [row for row in tiles_table(clean) if row["noisy_label"] == "1"]


def test_ambiguous_tiles_are_carcinomas_drifting_and_borders_with_a_minority_share(tmp_path):
    knobs = replace(QUIET, poorly_differentiated=1.0, border=1.0)
    rows = tiles_table(generate_dataset(tmp_path, per_class=20, size=32, seed=3, difficulty=knobs))
    for row in rows:
        share = float(row["other_share"])
        if row["true_class"] == "lung_n":  # normal tissue never "drifts"; its border is with a carcinoma
            assert row["kind"] == "border" and row["other_class"] in ("lung_aca", "lung_scc")
            assert knobs.border_share[0] <= share <= knobs.border_share[1]
        else:
            other = "lung_scc" if row["true_class"] == "lung_aca" else "lung_aca"
            assert row["kind"] == "poorly_differentiated" and row["other_class"] == other
            assert knobs.drift[0] <= share <= knobs.drift[1] < 0.5  # the label stays the dominant tissue
    none = tiles_table(generate_dataset(tmp_path / "none", per_class=20, size=32, seed=3, difficulty=QUIET))
    assert {row["kind"] for row in none} == {"clean"}


def test_mixing_changes_the_pixels_it_says_it_does(tmp_path):
    plain = generate_dataset(tmp_path / "plain", per_class=4, size=64, seed=4, difficulty=QUIET)
    mixed = generate_dataset(tmp_path / "mixed", per_class=4, size=64, seed=4,
                             difficulty=replace(QUIET, poorly_differentiated=1.0))
    for name in ("lung_aca/lungaca1.jpeg", "lung_n/lungn1.jpeg"):
        a = np.asarray(Image.open(plain / name), np.float32)
        b = np.asarray(Image.open(mixed / name), np.float32)
        if name.startswith("lung_n"):
            assert np.array_equal(a, b)  # normal tiles never drift
        else:
            assert np.abs(a - b).mean() > 5


def test_sites_are_balanced_over_classes_and_their_stain_families_differ(tmp_path):
    sites = make_sites(0, Difficulty())
    assert [site.name for site in sites] == ["site0", "site1", "site2", "site3"]
    distances = [
        np.linalg.norm(np.concatenate([a.eosin_shift - b.eosin_shift, a.hematoxylin_shift - b.hematoxylin_shift]))
        for i, a in enumerate(sites) for b in sites[i + 1 :]
    ]
    assert min(distances) > 0.02  # every pair of stain families differs
    alike = make_sites(0, replace(Difficulty(), site_shift=0.0))
    assert all(np.array_equal(site.eosin_shift, np.zeros(3)) for site in alike)

    # Measured on the pixels: a site's colour cast moves its tiles' mean colour more than chance would.
    root = generate_dataset(tmp_path, per_class=60, size=32, seed=5, difficulty=replace(QUIET, site_shift=3.0))
    rows = tiles_table(root)
    counts = {(row["true_class"], row["site"]) for row in rows}
    assert len(counts) == 9  # every class at every site
    means = {}
    for site in ("site0", "site1", "site2"):
        pixels = [np.asarray(Image.open(root / r["path"]), np.float32).reshape(-1, 3).mean(0)
                  for r in rows if r["site"] == site]
        means[site] = (np.mean(pixels, 0), np.std(pixels, 0) / np.sqrt(len(pixels)))
    (m0, e0), (m1, e1) = means["site0"], means["site1"]
    assert np.max(np.abs(m0 - m1) / np.hypot(e0, e1)) > 4


def test_acquisition_knobs_reach_the_files(tmp_path):
    rows = tiles_table(generate_dataset(tmp_path, per_class=20, size=32, seed=6))
    qualities = [int(row["jpeg_quality"]) for row in rows]
    default = Difficulty()
    assert default.jpeg_quality[0] <= min(qualities) < max(qualities) <= default.jpeg_quality[1]
    assert max(float(row["illumination"]) for row in rows) > 0
    even = tiles_table(generate_dataset(tmp_path / "even", per_class=5, size=32, seed=6,
                                        difficulty=replace(Difficulty(), illumination=0.0)))
    assert {float(row["illumination"]) for row in even} == {0.0}


def test_site_held_out_split_never_mixes_sites(synthetic_root):
    manifest = data.split_dataset(synthetic_root, seed=3, holdout_sites=("site1",))
    assert sorted({e.site for e in manifest.examples}) == ["site0", "site1", "site2", "site3"]
    held = [e for e in manifest.examples if e.split == data.SITE_HOLDOUT]
    assert held and {e.site for e in held} == {"site1"}
    assert "site1" not in {e.site for e in manifest.examples if e.split != data.SITE_HOLDOUT}
    assert all(manifest.sizes()[split] > 0 for split in data.SPLITS)
    assert data.split_dataset(synthetic_root, seed=3, holdout_sites=("auto",)).held_out_sites() == ["site3"]
    assert not data.split_dataset(synthetic_root, seed=3).held_out_sites()
    with pytest.raises(ValueError, match="site9"):
        data.split_dataset(synthetic_root, seed=3, holdout_sites=("site9",))


def test_a_cached_tile_is_the_tile_the_renderer_draws():
    """The tests' disk cache of rendered tiles (tests/helpers.py) returns exactly what render_tile
    draws, on the call that fills it and on the calls that read it."""
    seed = int.from_bytes(np.random.default_rng().bytes(4), "little")  # a fresh one: the first call renders
    drawn = np.asarray(render_tile("lung_scc", 64, seed))
    for _ in range(2):
        cached = rendered_tile("lung_scc", 64, seed)
        assert cached.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(cached), drawn)
