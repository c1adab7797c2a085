"""Whole slides: a pyramidal TIFF read level by level, tissue found, tiles classified as /predict does."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loadtests.servers import REPO_ROOT
from slides.analyze import UNCERTAIN, analyze, choose_level, geojson, summary
from slides.reader import Slide, SlideError
from slides.tissue import tissue_mask
from tests.helpers import encode, fresh_tile

TILE = 768
# A 3 x 2 grid of tiles: tissue of each class and two of blank glass.
LAYOUT = [["lung_aca", "glass", "lung_scc"], ["lung_n", "lung_aca", "glass"]]
MPP = 0.5


def _tile(name: str, index: int) -> np.ndarray:
    if name == "glass":
        return np.full((TILE, TILE, 3), 244, np.uint8)
    return np.asarray(Image.open(io.BytesIO(fresh_tile(name, index))).resize((TILE, TILE)))


def write_pyramidal_tiff(path: Path) -> np.ndarray:
    """A tiled, pyramidal (levels 1, 2, 4), deflate-compressed TIFF with its pixel size; returns level 0."""
    import tifffile

    rows = [np.concatenate([_tile(name, 800 + 3 * r + c) for c, name in enumerate(row)], axis=1)
            for r, row in enumerate(LAYOUT)]
    level0 = np.concatenate(rows, axis=0)
    resolution = (1e4 / MPP, 1e4 / MPP)  # pixels per centimetre
    with tifffile.TiffWriter(path) as tif:
        for factor in (1, 2, 4):
            level = np.asarray(Image.fromarray(level0).reduce(factor)) if factor > 1 else level0
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                      resolution=(resolution[0] / factor, resolution[1] / factor), resolutionunit="CENTIMETER",
                      subfiletype=1 if factor > 1 else 0)  # reduced-resolution images: OpenSlide's levels
    return level0


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "grid.tiff"
    write_pyramidal_tiff(path)
    return path


def test_the_slide_is_read_by_level_with_its_pixel_size(slide_path):
    with Slide(slide_path) as slide:
        info = slide.info
        assert (info.width, info.height) == (3 * TILE, 2 * TILE)
        assert info.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert info.microns_per_pixel == pytest.approx(MPP, rel=1e-3)
        region = np.asarray(slide.region(TILE, 0, 1, 64, 64))  # the glass tile, read at level 1
    assert region.shape == (64, 64, 3) and region.min() >= 240


def test_tissue_mask_finds_tissue_and_not_glass():
    glass = np.full((40, 60, 3), 244, np.uint8)
    glass[10:30, 10:30] = (150, 80, 160)  # a stained patch
    glass[2, 50] = (100, 50, 120)  # a single-pixel speck
    mask = tissue_mask(glass)
    assert mask[12:28, 12:28].all() and not mask[:, 40:].any() and not mask[0:5, 45:55].any()


def test_a_flat_image_is_read_whole_only_under_its_cap(tmp_path):
    flat = tmp_path / "flat.png"
    Image.fromarray(_tile("lung_n", 820)).save(flat)
    with Slide(flat) as slide:
        assert (slide.info.width, slide.info.height) == (TILE, TILE)
    with pytest.raises(SlideError, match="pyramidal"):
        Slide(flat, max_plain_pixels=1000)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a slide")
    with pytest.raises(SlideError, match="not a slide"):
        Slide(notes)


@pytest.mark.training
def test_tissue_tiles_are_classified_exactly_as_predict_would(slide_path, reference):
    stored = reference.stored
    analysis = analyze(slide_path, stored, tile_size=TILE, min_tissue=0.5, batch_size=3)
    level = choose_level(analysis.info, TILE, stored.card.input_size)
    assert analysis.level == level and analysis.info.level_downsamples[level] >= 2  # read small, not level 0
    tissue = {(c * TILE, r * TILE) for r, row in enumerate(LAYOUT) for c, name in enumerate(row) if name != "glass"}
    assert {(t.x, t.y) for t in analysis.tiles} == tissue  # glass never reached the model
    with Slide(slide_path) as slide:
        side = TILE // int(analysis.info.level_downsamples[level])
        for tile in analysis.tiles:
            pixels = slide.region(tile.x, tile.y, level, side, side)
            expected = reference.expect(encode(pixels, "PNG"))  # the same pixels, uploaded losslessly
            got = tile.prediction
            np.testing.assert_allclose(list(got.probabilities.values()), expected["probabilities"], atol=1e-5)
            assert got.quality == expected["quality"]
            assert got.ood_score == pytest.approx(expected["ood_score"], abs=1e-3)


@pytest.mark.training
def test_cli_writes_qupath_geojson_an_overlay_and_a_summary(slide_path, tiny_model_tag, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "slides.analyze", str(slide_path), "--out", str(out), "--model", tiny_model_tag,
         "--tile-size", str(TILE)],
        cwd=REPO_ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]).keys() == {"geojson", "overlay", "summary"}
    collection = json.loads((out / "analysis.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 4
    for feature in collection["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 5
        x0, y0 = ring[0]
        assert x0 % TILE == 0 and y0 % TILE == 0 and ring[2] == [x0 + TILE, y0 + TILE]
        properties = feature["properties"]
        name = properties["classification"]["name"]
        assert name == (UNCERTAIN if properties["uncertain"] else properties["predicted_class"])
        assert sum(v for k, v in properties["measurements"].items() if k.startswith("p_")) == pytest.approx(1, abs=1e-3)
    facts = json.loads((out / "summary.json").read_text())
    assert facts["tiles_analysed"] == 4
    assert sum(facts["tiles_per_class"].values()) + facts["tiles_uncertain"] == 4
    assert 0.5 < facts["tissue_share_of_slide"] < 0.8  # four of six tiles are tissue
    with Image.open(out / "overlay.png") as overlay:
        assert overlay.size[0] == 2048 and overlay.size[1] == round(2048 * 2 / 3)


def test_geojson_and_summary_from_an_analysis_in_memory():
    from models.quality import QualityReport
    from serving.predictions import Prediction
    from slides.analyze import SlideAnalysis, TileAnswer
    from slides.reader import SlideInfo

    quality = QualityReport(passed=True, failed_checks=[], background_fraction=0.0, stain_fraction=1.0,
                            stain_distance=1.0, saturation=0.3, focus=900.0)

    def answer(x: int, cls: str, p: float, uncertain: bool) -> TileAnswer:
        others = [c for c in ("a", "n", "s") if c != cls]
        probabilities = {cls: p, others[0]: (1 - p) / 2, others[1]: (1 - p) / 2}
        prediction = Prediction(predicted_class=cls, confidence=p, probabilities=probabilities, uncertain=uncertain,
                                reasons=["low_confidence"] if uncertain else [], out_of_distribution=False,
                                ood_score=1.0, ood_threshold=2.0, quality=quality, model="m:1")
        return TileAnswer(x, 0, 10, 1.0, prediction)

    info = SlideInfo(30, 10, ((30, 10),), (1.0,), None, None)
    analysis = SlideAnalysis(info, "m:1", ["a", "n", "s"], 10, 0, np.ones((10, 30), bool), 1.0,
                             [answer(0, "a", 0.9, False), answer(10, "n", 0.8, False), answer(20, "s", 0.4, True)])
    names = [f["properties"]["classification"]["name"] for f in geojson(analysis)["features"]]
    assert names == ["a", "n", UNCERTAIN]
    facts = summary(analysis, ["a", "s"])
    assert facts["tiles_per_class"] == {"a": 1, "n": 1, "s": 0} and facts["tiles_uncertain"] == 1
    assert facts["share_of_answered"] == {"a": 0.5, "n": 0.5, "s": 0.0}
    assert [t["x"] for t in facts["most_suspicious"]][:1] == [0]  # a at 0.9 is the most suspicious


@pytest.mark.training
def test_tiles_take_the_training_scale_from_the_card(reference, slide_path):
    from slides.analyze import tile_size_for

    card = reference.stored.card
    assert card.dataset.tile_size == 256 and card.dataset.microns_per_pixel is None  # the tests' 256 px tiles
    with Slide(slide_path) as slide:
        info = slide.info  # 0.5 um per pixel
    assert tile_size_for(card, info, requested=512) == 512
    assert tile_size_for(card, info) == 256  # no pixel size on the card: the training size as it is
    known = card.model_copy(update={"dataset": card.dataset.model_copy(update={"microns_per_pixel": 0.25})})
    assert tile_size_for(known, info) == 128  # 256 px at 0.25 um cover 128 px at 0.5 um
