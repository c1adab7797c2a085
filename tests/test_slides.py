"""Whole slides: a pyramidal TIFF read level by level, tissue found, tiles classified as /predict does."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtests.servers import REPO_ROOT
from slides.analyze import TISSUE_OUTLINE, UNCERTAIN, analyze, choose_level, geojson, overlay, summary
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
    assert json.loads(result.stdout.splitlines()[-1]).keys() == {"slide", "geojson", "overlay", "summary"}
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
    from models.quality import QualityReport
    from serving.predictions import Prediction
    from slides.analyze import SlideAnalysis, TileAnswer
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

    info = SlideInfo(30, 10, ((30, 10),), (1.0,), None, None)
    mask = np.ones((10, 30), bool)
    mask[:, 25:] = False  # glass at the right edge
    analysis = SlideAnalysis(info, "m:1", ["a", "n", "s"], 10, 0, mask, 1.0,
                             [answer(0, "a", 0.9, False), answer(10, "n", 0.8, False, 0.5),
                              answer(20, "s", 0.4, True, 0.5)],
                             np.full((10, 30, 3), 200, np.uint8))
    names = [f["properties"]["classification"]["name"] for f in geojson(analysis)["features"]]
    assert names == ["a", "n", UNCERTAIN]
    facts = summary(analysis, ["a", "s"])
    assert facts["grid"] == {"origin": [0, 0], "tile_size": 10, "columns": 3, "rows": 1, "level": 0}
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


def _finished(url: str, task_id: str) -> dict:
    def status() -> dict | None:
        body = httpx.get(f"{url}/analyze_slide/status", params={"task_id": task_id}, timeout=10).json()
        return body if body["status"] not in ("pending", "in_progress") else None

    return wait_until(status, f"task {task_id} to finish", timeout=120, interval=0.5)


@pytest.mark.service
def test_a_slide_uploaded_then_analysed_as_a_task_matches_the_cli(server, reference, slide_path):
    uploaded = httpx.post(f"{server.url}/slides", files={"file": ("grid.tiff", slide_path.read_bytes())}, timeout=60)
    assert uploaded.status_code == 201, uploaded.text
    slide_id = uploaded.json()["slide_id"]
    progress = f"{server.url}/slides/{slide_id}/progress"
    assert httpx.get(progress, timeout=10).json() == {"state": "uploaded", "tiles_done": 0, "tiles_total": None}
    submitted = httpx.post(f"{server.url}/analyze_slide/submit", json={"slide_id": slide_id, "tile_size": TILE},
                           timeout=30)
    assert submitted.status_code == 200, submitted.text
    assert _finished(server.url, submitted.json()["task_id"])["status"] == "completed"
    assert httpx.get(progress, timeout=10).json() == {"state": "done", "tiles_done": 4, "tiles_total": 4}
    result = httpx.get(f"{server.url}/analyze_slide/get", params={"task_id": submitted.json()["task_id"]},
                       timeout=30).json()
    assert result["slide_id"] == slide_id and result["tiles_analysed"] == 4
    features = httpx.get(f"{server.url}/slides/{slide_id}/analysis.geojson", timeout=30).json()["features"]
    expected = analyze(slide_path, reference.stored, tile_size=TILE)  # the same slide, in-process
    by_corner = {tuple(f["geometry"]["coordinates"][0][0]): f["properties"] for f in features}
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
    for query in ({"x": 0, "y": 0}, {"x": "a", "y": 0, "size": 10}, {"x": 0, "y": 0, "size": 100_000},
                  {"x": 3 * TILE - 10, "y": 0, "size": 20}, {"x": -1, "y": 0, "size": 20}):
        assert_problem(httpx.get(tile_url, params=query, timeout=30), 400)


@pytest.mark.service
def test_slide_failures_are_problems_and_a_failed_task_ends(server):
    notes = httpx.post(f"{server.url}/slides", files={"file": ("notes.svs", b"not a slide at all")}, timeout=30)
    assert_problem(notes, 415)
    assert_problem(httpx.post(f"{server.url}/slides", content=b"raw", headers={"Content-Type": "image/tiff"}), 415)
    assert_problem(httpx.get(f"{server.url}/slides/{'0' * 32}/overlay.png", timeout=10), 404)
    assert_problem(httpx.get(f"{server.url}/slides/not-an-id/overlay.png", timeout=10), 400)
    missing = httpx.post(f"{server.url}/analyze_slide/submit", json={"slide_id": "0" * 32}, timeout=30).json()
    assert _finished(server.url, missing["task_id"])["status"] == "failed"  # never stuck "in progress"
    answer = httpx.get(f"{server.url}/analyze_slide/get", params={"task_id": missing["task_id"]}, timeout=30)
    assert_problem(answer, 404)
    neither = httpx.post(f"{server.url}/analyze_slide/submit", json={}, timeout=30).json()
    assert _finished(server.url, neither["task_id"])["status"] == "failed"
    answer = httpx.get(f"{server.url}/analyze_slide/get", params={"task_id": neither["task_id"]}, timeout=30)
    assert assert_problem(answer, 400)["detail"] == "give exactly one of `slide_id` and `path`"


@pytest.fixture(scope="module")
def slide_server(tiny_model_tag, tmp_path_factory, slide_path):
    """A 1 MiB slide cap, a slide folder of its own, a server-side slide root holding the grid, short
    request and body-idle timeouts."""
    folder = tmp_path_factory.mktemp("slide-server")
    root = folder / "root"
    root.mkdir()
    (root / "grid.tiff").write_bytes(slide_path.read_bytes())
    (root / "escape.tiff").symlink_to(slide_path)  # a link out of the root
    # A 2 s request deadline made BentoML's own backstop timeout 12 s, which used to cut slide uploads too.
    for running in serve_tiny_model(tiny_model_tag, tmp_path_factory, "slides", HISTO_WORKERS="1",
                                    HISTO_MAX_SLIDE_BYTES=str(1024 * 1024), HISTO_SLIDE_DIR=str(folder / "uploads"),
                                    HISTO_SLIDE_ROOT=str(root), HISTO_REQUEST_TIMEOUT_MS="2000",
                                    HISTO_BODY_IDLE_TIMEOUT_MS="1500"):
        yield running, folder / "uploads"


@pytest.mark.service
def test_the_slide_cap_leaves_nothing_and_paths_stay_inside_the_root(slide_server):
    server, uploads = slide_server
    url = server.url
    big = bytes(2 * 1024 * 1024)
    assert_problem(httpx.post(f"{url}/slides", files={"file": ("big.tiff", big)}, timeout=60), 413)
    assert not uploads.exists() or not [p for p in uploads.rglob("*") if p.is_file()]  # nothing kept
    ok = httpx.post(f"{url}/analyze_slide/submit", json={"path": "grid.tiff", "tile_size": TILE}, timeout=30).json()
    assert _finished(url, ok["task_id"])["status"] == "completed"
    # A slide named by path gets an id of its own, for its outputs, its progress and its tiles.
    slide_id = httpx.get(f"{url}/analyze_slide/get", params={"task_id": ok["task_id"]}, timeout=30).json()["slide_id"]
    assert len(httpx.get(f"{url}/slides/{slide_id}/analysis.geojson", timeout=30).json()["features"]) == 4
    assert httpx.get(f"{url}/slides/{slide_id}/progress", timeout=10).json()["state"] == "done"
    tile = httpx.get(f"{url}/slides/{slide_id}/tile", params={"x": 0, "y": 0, "size": 64}, timeout=30)
    assert tile.status_code == 200 and Image.open(io.BytesIO(tile.content)).size == (64, 64)
    for path in ("../grid.tiff", "/etc/passwd", "escape.tiff", "http://127.0.0.1:9/x.svs"):
        task = httpx.post(f"{url}/analyze_slide/submit", json={"path": path}, timeout=30).json()
        assert _finished(url, task["task_id"])["status"] == "failed", path
        answer = httpx.get(f"{url}/analyze_slide/get", params={"task_id": task["task_id"]}, timeout=30)
        assert "inside the slide folder" in assert_problem(answer, 400)["detail"], path  # refused, not "not found"


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
    server, uploads = slide_server
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
    assert "no data for 1.5 s" in stalled.json()["detail"]
    assert set(uploads.iterdir()) == before  # the partial upload is gone


async def _chunks(pieces: list[bytes], gap_s: float) -> AsyncIterator[dict]:
    for index, piece in enumerate(pieces):
        await asyncio.sleep(gap_s)
        yield {"type": "http.request", "body": piece, "more_body": index < len(pieces) - 1}


def test_a_slide_upload_goes_straight_to_its_folder_within_its_time_limit(tmp_path, monkeypatch):
    import starlette.formparsers
    from starlette.requests import Request

    from serving.problems import Problem
    from serving.slide_store import SLIDE_FILE, SlideStore

    boundary = "b"
    store = SlideStore(tmp_path / "slides", ttl_s=3600)

    def part(name: str, filename: str | None, content: bytes) -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"

    async def upload(pieces: list[bytes], gap_s: float = 0.0, total_s: float = 10) -> str:
        scope = {"type": "http", "method": "POST", "path": "/slides",
                 "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]}
        messages = _chunks([*pieces, f"--{boundary}--\r\n".encode()], gap_s)
        request = Request(scope, receive=messages.__anext__)
        return await store.receive(request, 10**6, idle_timeout_s=1, total_timeout_s=total_s)

    def no_spooling(*_: object, **__: object) -> None:
        raise AssertionError("the slide was spooled to the temporary folder")

    # Starlette's form parser spools a file part to the system temporary folder: a pod's small /tmp.
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", no_spooling)
    content = bytes(range(256)) * 40  # 10 KB, every byte value, split across messages below
    first = part("file", "s.svs", content)
    slide_id = asyncio.run(upload([first[:100], first[100:5000], first[5000:]], gap_s=0.01))
    assert (store.folder / slide_id / SLIDE_FILE).read_bytes() == content
    with pytest.raises(Problem, match=r"took longer than 0\.1 s") as slow:
        asyncio.run(upload([first[i : i + 500] for i in range(0, len(first), 500)], gap_s=0.02, total_s=0.1))
    assert slow.value.status == 408  # each gap is short, all of them are not
    for refused in ([part("file", "a.svs", b"a"), part("file", "b.svs", b"b")],  # two files
                    [part("file", None, b"a")],  # no file name
                    [part("notes", None, b"a"), part("file", "a.svs", b"a")],  # another field
                    []):  # no part at all
        with pytest.raises(Problem, match="one `file` part") as problem:
            asyncio.run(upload(refused))
        assert problem.value.status == 400
    assert [p.name for p in store.folder.iterdir()] == [slide_id]  # nothing kept of the others


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
    server, uploads = slide_server
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


def test_slides_and_their_outputs_expire(tmp_path):
    import time

    from serving.slide_store import SLIDE_FILE, SlideStore

    store = SlideStore(tmp_path, ttl_s=3600)
    old, new = tmp_path / ("a" * 32), tmp_path / ("b" * 32)
    for folder in (old, new):
        folder.mkdir()
        (folder / SLIDE_FILE).write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    assert store.expire() == 1
    assert not old.exists() and store.folder_of("b" * 32) == new
