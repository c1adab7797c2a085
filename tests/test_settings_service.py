"""Settings followed from the environment into a running server, and what each one promises over HTTP.

Two servers carry several settings at once, so the suite starts few: `tight_server` (one worker, few open
uploads, a small byte budget, short bodies, three files a request, an abstain threshold of its own, a slide
folder with expiry) and `impatient_model_server` (the batcher's 1 ms latency and queue-delay limits).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtests.servers import RunningServer
from slides.analysis import analyze
from slides.store import SLIDE_FILE
from tests.helpers import (
    STRICT_TOKEN,
    assert_problem,
    encode,
    fresh_tile,
    serve_tiny_model,
    wait_until,
    write_pyramidal_tiff,
)

pytestmark = pytest.mark.service

CLASS_NAMES = ("lung_aca", "lung_n", "lung_scc")
ABSTAIN_TILES = [(name, 700 + index) for name in CLASS_NAMES for index in range(3)]
BODY_TIMEOUT_S = 3.0


def _abstain_threshold(confidences: list[float], card_threshold: float) -> float:
    """A threshold between two of the tiles' confidences that flags a different set of them than the
    card's threshold does: the server can only match the test's verdicts by following the setting."""
    ordered = sorted(confidences)
    card_flags = sum(c < card_threshold for c in ordered)
    splits = [(low + high) / 2 for low, high in itertools.pairwise(ordered) if high - low > 1e-3]
    candidates = [t for t in splits if sum(c < t for c in ordered) != card_flags]
    assert candidates, "the tiles' confidences are too close together to pick a threshold"
    return candidates[len(candidates) // 2]


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("settings-slide") / "grid.tiff"
    write_pyramidal_tiff(path)
    return path


@pytest.fixture(scope="module")
def tight(reference, tiny_model_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    confidences = [float(reference.expect(fresh_tile(*tile))["probabilities"].max()) for tile in ABSTAIN_TILES]
    threshold = _abstain_threshold(confidences, reference.stored.card.abstain_threshold)
    slides = tmp_path_factory.mktemp("tight-slides")
    for running in serve_tiny_model(
        tiny_model_tag, tmp_path_factory, "tight", HISTO_WORKERS="1", HISTO_MAX_OPEN_UPLOADS="2",
        HISTO_MAX_BUFFERED_BYTES=str(1024 * 1024), HISTO_BODY_TIMEOUT_MS=str(int(BODY_TIMEOUT_S * 1000)),
        HISTO_MAX_FILES_PER_REQUEST="3", HISTO_ABSTAIN_THRESHOLD=repr(threshold), HISTO_SLIDE_DIR=str(slides),
        HISTO_SLIDE_TTL_S="60", HISTO_SLIDE_RECONCILE_S="1",
    ):
        yield {"server": running, "threshold": threshold, "slides": slides}


def _open_upload(url: str, declared: int) -> socket.socket:
    """A /predict upload whose headers and first bytes are sent, the rest held back."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                       f"boundary=x\r\nContent-Length: {declared}\r\n\r\n--x\r\n".encode())
    return connection


def _status_of(connection: socket.socket, timeout: float) -> int:
    connection.settimeout(timeout)
    head = connection.recv(65536)
    return int(head.split(b" ", 2)[1])


def test_uploads_over_the_open_upload_cap_get_503_and_the_slots_come_back(tight):
    url = tight["server"].url
    held = [_open_upload(url, 100_000) for _ in range(2)]
    try:
        # The two are open once the worker reads their bodies: until then a third is still let in.
        refused = wait_until(
            lambda: (r := httpx.post(f"{url}/predict", files={"file": ("t.jpeg", fresh_tile("lung_n", 1))},
                                     timeout=30)).status_code == 503 and r,
            "a third upload refused while two are arriving", timeout=BODY_TIMEOUT_S * 0.8, interval=0.1)
        assert "2 uploads arriving" in assert_problem(refused, 503)["detail"]
        assert refused.headers["retry-after"] == "1"
        assert [_status_of(c, BODY_TIMEOUT_S + 10) for c in held] == [408, 408]  # HISTO_BODY_TIMEOUT_MS
    finally:
        for connection in held:
            connection.close()
    assert httpx.post(f"{url}/predict", files={"file": ("t.jpeg", fresh_tile("lung_n", 2))},
                      timeout=30).status_code == 200


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_body_trickling_past_the_body_timeout_gets_408(tight):
    url = tight["server"].url
    connection = _open_upload(url, 100_000)
    started = time.monotonic()
    try:
        connection.settimeout(0.5)
        while True:  # a byte every 0.5 s: never idle for long, but never done
            connection.sendall(b"x")
            try:
                head = connection.recv(65536)
                break
            except TimeoutError:
                assert time.monotonic() - started < BODY_TIMEOUT_S + 20, "no answer to a body that never ends"
        connection.settimeout(10)
        while b"\r\n\r\n" not in head or len(head.split(b"\r\n\r\n", 1)[1]) < _content_length(head):
            more = connection.recv(65536)  # the body may come in a later packet than the head
            if not more:
                break
            head += more
        assert int(head.split(b" ", 2)[1]) == 408
        assert f"did not arrive within {BODY_TIMEOUT_S:g} s".encode() in head
    finally:
        connection.close()


def test_uploads_over_the_buffered_byte_budget_get_503(tight):
    url = tight["server"].url
    big = bytes(3 * 1024 * 1024)  # under the 20 MB body cap, over the 1 MiB budget for bytes arriving
    try:
        answer = httpx.post(f"{url}/predict", files={"file": ("big.jpeg", big, "image/jpeg")}, timeout=60)
    except httpx.TransportError:  # the server may close before the last bytes are sent
        pytest.fail("the refusal must reach the client")
    assert "MiB of uploads arriving" in assert_problem(answer, 503)["detail"]
    assert httpx.post(f"{url}/predict", files={"file": ("t.jpeg", fresh_tile("lung_n", 3))},
                      timeout=30).status_code == 200


def test_more_files_than_the_per_request_cap_get_400(tight):
    url = tight["server"].url
    files = [("file", (f"{i}.jpeg", fresh_tile("lung_aca", 40 + i), "image/jpeg")) for i in range(4)]
    refused = httpx.post(f"{url}/predict_batch", files=files, timeout=60)
    assert "at most 3" in assert_problem(refused, 400)["detail"]
    assert httpx.post(f"{url}/predict_batch", files=files[:3], timeout=60).status_code == 200


def test_the_abstain_threshold_from_the_environment_decides_low_confidence(tight, reference):
    url, threshold = tight["server"].url, tight["threshold"]
    for tile in ABSTAIN_TILES:
        payload = fresh_tile(*tile)
        confidence = float(reference.expect(payload)["probabilities"].max())
        answer = httpx.post(f"{url}/predict", files={"file": ("t.jpeg", payload)}, timeout=30).json()
        assert answer["confidence"] == pytest.approx(confidence, abs=1e-5)
        assert ("low_confidence" in answer["reasons"]) is (confidence < threshold), (tile, confidence, threshold)


def _upload(url: str, content: bytes) -> str:
    answer = httpx.post(f"{url}/slides", files={"file": ("grid.tiff", content)}, timeout=60)
    assert answer.status_code == 201, answer.text
    return answer.json()["slide_id"]


def _submit(url: str, slide_id: str, **options: object) -> dict:
    answer = httpx.post(f"{url}/slides/{slide_id}/analysis", json=options, timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.json()


def _ended(url: str, slide_id: str) -> dict:
    def progress() -> dict | None:
        body = httpx.get(f"{url}/slides/{slide_id}/progress", timeout=10).json()
        return body if body["state"] in ("done", "failed") else None

    return wait_until(progress, f"slide {slide_id}'s analysis to end", timeout=300, interval=0.2)


def test_slide_progress_goes_queued_running_done_and_the_summary_matches(tight, slide_file, reference):
    url = tight["server"].url
    first, second = _upload(url, slide_file.read_bytes()), _upload(url, slide_file.read_bytes())
    # Small tiles make the first analysis long enough to be seen running; the worker's one engine worker
    # analyses one slide at a time, so the second waits its turn.
    for slide in (first, second):
        _submit(url, slide, tile_size=32)
    seen: dict[str, set] = {first: set(), second: set()}
    running: list[dict] = []

    def both_done() -> bool:
        for slide in (first, second):
            progress = httpx.get(f"{url}/slides/{slide}/progress", timeout=10).json()
            seen[slide].add(progress["state"])
            if progress["state"] == "running":
                running.append(progress)
        return "done" in seen[first] and "done" in seen[second]

    wait_until(both_done, "both analyses done", timeout=300, interval=0.02)
    assert "running" in seen[first] and "queued" in seen[second], seen
    assert any(0 < p["tiles_done"] < p["tiles_total"] for p in running), running[:3]
    expected = analyze(slide_file, reference.stored, tile_size=32)
    for slide in (first, second):
        summary = httpx.get(f"{url}/slides/{slide}/summary.json", timeout=30)
        assert summary.status_code == 200 and summary.headers["content-type"] == "application/json"
        assert summary.json()["tiles_analysed"] == len(expected.tiles)
        done = httpx.get(f"{url}/slides/{slide}/progress", timeout=10).json()
        assert (done["state"], done["tiles_done"], done["tiles_total"], done["attempt"], done["reason"]) == (
            "done", len(expected.tiles), len(expected.tiles), 1, None)


def test_a_failed_analysis_shows_failed_with_its_reason(tight, slide_file):
    url = tight["server"].url
    slide = _upload(url, slide_file.read_bytes())
    content = slide_file.read_bytes()
    (tight["slides"] / slide / SLIDE_FILE).write_bytes(content[: len(content) // 3])  # damaged after its upload
    _submit(url, slide)
    failed = _ended(url, slide)
    assert failed["state"] == "failed" and failed["reason"] and failed["attempt"] == 1  # a bad slide: no retry
    assert_problem(httpx.get(f"{url}/slides/{slide}/summary.json", timeout=10), 404)


@pytest.mark.parametrize("options", [{"min_tissue": 1.5}, {"min_tissue": -0.1}, {"tile_size": 8},
                                     {"tile_size": 20_000}])
def test_slide_options_out_of_range_get_400(tight, slide_file, options):
    url = tight["server"].url
    slide = _upload(url, slide_file.read_bytes())
    assert_problem(httpx.post(f"{url}/slides/{slide}/analysis", json=options, timeout=30), 400)
    assert httpx.get(f"{url}/slides/{slide}/progress", timeout=10).json()["state"] == "uploaded"  # never queued


def test_slides_expire_in_the_running_service(tight, slide_file):
    url = tight["server"].url
    old, new = _upload(url, slide_file.read_bytes()), _upload(url, slide_file.read_bytes())
    hours_ago = time.time() - 2 * 3600
    for path in [tight["slides"] / old, *(tight["slides"] / old).rglob("*")]:
        os.utime(path, (hours_ago, hours_ago))  # older than HISTO_SLIDE_TTL_S (60 s)
    # The reconciler (every HISTO_SLIDE_RECONCILE_S, 1 s here) removes it.
    wait_until(lambda: httpx.get(f"{url}/slides/{old}/progress", timeout=10).status_code == 404,
               "the old slide to expire", timeout=60, interval=0.5)
    assert not (tight["slides"] / old).exists()
    assert httpx.get(f"{url}/slides/{new}/progress", timeout=10).json()["state"] == "uploaded"


# --------------------------------------------------------------------------- the API token on the slide routes


def test_the_slide_routes_need_the_token(strict_server, slide_file):
    url = strict_server.url
    auth = {"Authorization": f"Bearer {STRICT_TOKEN}"}
    small = encode(_tiny_tiff(), "TIFF")
    for method, path, kwargs in [
        ("POST", "/slides", {"files": {"file": ("s.tiff", small)}}),
        ("GET", f"/slides/{'0' * 32}/progress", {}),
        ("GET", f"/slides/{'0' * 32}/summary.json", {}),
        ("GET", f"/slides/{'0' * 32}/tile", {"params": {"x": 0, "y": 0, "size": 16}}),
        ("POST", f"/slides/{'0' * 32}/analysis", {"json": {}}),
    ]:
        refused = httpx.request(method, f"{url}{path}", timeout=30, **kwargs)
        assert_problem(refused, 401)
        assert refused.headers["www-authenticate"] == "Bearer", path
        allowed = httpx.request(method, f"{url}{path}", headers=auth, timeout=30, **kwargs)
        assert allowed.status_code != 401, (path, allowed.text)
    assert httpx.get(f"{url}/slides/{'0' * 32}/progress", headers=auth, timeout=10).status_code == 404


def _tiny_tiff():
    from PIL import Image

    return Image.fromarray(np.full((32, 32, 3), 200, np.uint8))


# --------------------------------------------------------------------------- JPEG codings the decoder cannot read


@pytest.mark.parametrize(("marker", "coding"), [(0xC3, "lossless"), (0xC5, "hierarchical"), (0xC7, "lossless"),
                                                (0xC9, "arithmetic-coded")])
def test_jpeg_codings_the_decoder_cannot_read_get_415(server, marker, coding):
    baseline = bytearray(fresh_tile("lung_n", 5))
    frame = baseline.index(b"\xff\xc0")
    baseline[frame + 1] = marker  # the same frame header, declaring another coding process
    body = assert_problem(httpx.post(f"{server.url}/predict", files={"file": ("t.jpeg", bytes(baseline))},
                                     timeout=30), 415)
    assert f"{coding} JPEG is not supported" in body["detail"]


# --------------------------------------------------------------------------- the batcher's limits


@pytest.fixture(scope="module")
def impatient_model_server(tiny_model_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Images may wait 1 ms for the model in all (HISTO_MAX_LATENCY_MS), and new uploads are refused while
    images wait over 1 ms (HISTO_MAX_QUEUE_DELAY_MS)."""
    yield from serve_tiny_model(tiny_model_tag, tmp_path_factory, "impatient-model", HISTO_WORKERS="1",
                                HISTO_MAX_LATENCY_MS="1", HISTO_MAX_QUEUE_DELAY_MS="1")


def test_the_model_latency_limit_gives_504_and_the_queue_delay_limit_503(impatient_model_server):
    url = impatient_model_server.url
    batch = [("file", (f"{i}.jpeg", fresh_tile("lung_scc", 300 + i), "image/jpeg")) for i in range(32)]
    single = {"file": ("t.jpeg", fresh_tile("lung_scc", 299), "image/jpeg")}

    async def burst() -> list[httpx.Response | Exception]:
        # Batches fill the model's queue (32 images cannot all be classified within 1 ms of arriving: 504);
        # the single tiles come while images wait for the model (503). A refused upload's connection closes
        # before its body is read, so a client may see the connection end instead: that is not counted.
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            requests = [client.post("/predict_batch", files=batch) for _ in range(2)]
            requests += [client.post("/predict", files=single) for _ in range(8)]
            return await asyncio.gather(*requests, return_exceptions=True)

    details: dict[int, str] = {}
    deadline = time.monotonic() + 120
    while not {503, 504} <= details.keys():
        assert time.monotonic() < deadline, f"only {details} in 120 s"
        for response in asyncio.run(burst()):
            if isinstance(response, httpx.TransportError):
                continue
            assert not isinstance(response, Exception), response
            if response.status_code in (503, 504):
                details[response.status_code] = assert_problem(response, response.status_code)["detail"]
    assert "not classified in time" in details[504]
    assert details[503].startswith("over capacity (images wait") and "for the model" in details[503]
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
