"""Resource exhaustion: no small request may pin a core, hold every slot, eat memory or mint metrics."""

from __future__ import annotations

import asyncio
import ctypes
import io
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtests.hostile import (
    arithmetic_jpeg,
    half_sent_headers,
    large_flat_webp,
    multipart,
    scan_bomb_jpeg,
    thin_png,
)
from loadtests.servers import RunningServer
from models.preprocessing import (
    CorruptImageError,
    DecodeAbandonedError,
    DecodeLimits,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_cost,
    decode_upload,
)
from serving.inference.heap import TRIM_AFTER_BYTES, release_heap
from tests.helpers import PROBLEM, STRICT_TOKEN, assert_problem, fresh_tile, serve_tiny_model, wait_until


def progressive_jpeg(side: int = 768) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", quality=90, progressive=True
    )
    return buffer.getvalue()


# --------------------------------------------------------------------------- decode budgets, in-process


def test_jpeg_scans_and_coding_are_judged_from_the_header():
    assert decode_cost(progressive_jpeg(), 128).scans == 10  # libjpeg's standard progressive script
    with pytest.raises(ImageTooLargeError, match="scans"):
        decode_cost(scan_bomb_jpeg(copies=300), 128)
    with pytest.raises(ImageTooLargeError, match="decoding work"):
        decode_cost(progressive_jpeg(768), 128, DecodeLimits(max_scan_pixels=1_000_000))
    with pytest.raises(UnsupportedImageError, match="arithmetic-coded JPEG is not supported"):
        decode_cost(arithmetic_jpeg(), 128)


def test_decoded_memory_is_estimated_for_every_format_and_capped():
    for hostile in (thin_png(), large_flat_webp()):
        assert len(hostile) < 100_000  # tiny on the wire
        with pytest.raises(ImageTooLargeError, match="MiB"):
            decode_cost(hostile, 128)
    # The estimate grows with what decoding really holds: frame, conversion, output.
    small = decode_cost(encode_png(np.zeros((500, 500, 3), np.uint8)), 128)
    large = decode_cost(encode_png(np.zeros((2000, 2000, 3), np.uint8)), 128)
    assert large.estimated_bytes >= 16 * small.estimated_bytes * 0.9
    assert large.estimated_bytes >= 2 * 3 * 2000 * 2000  # at least the decoder's buffer and the frame
    full = decode_cost(encode_png(np.zeros((2000, 2000, 3), np.uint8)), None)
    assert full.estimated_bytes > large.estimated_bytes  # a full-size decode keeps the whole image


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decoding_stops_at_its_deadline_and_messages_name_no_internals():
    with pytest.raises(DecodeAbandonedError):
        decode_upload(progressive_jpeg(), 128, DecodeLimits(), deadline=time.monotonic() - 1)
    image, cost = decode_upload(progressive_jpeg(), 128, DecodeLimits(), deadline=time.monotonic() + 30)
    assert image.shape == (128, 128, 3) and cost.scans == 10
    with pytest.raises(CorruptImageError) as damaged:
        decode_cost(b"II*\x00" + bytes(200), 128)  # a TIFF signature and nothing sane after it
    assert "0x" not in str(damaged.value) and "object at" not in str(damaged.value)


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_heap_is_trimmed_only_after_large_decodes():
    # 64 MiB of freed heap that glibc keeps (one chunk still in use above it, so free() cannot give the
    # top back): what a large decode leaves. Only a real trim returns it to the operating system.
    libc = ctypes.CDLL("libc.so.6")  # glibc (Debian): malloc_trim is there
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(64 * 1024) for _ in range(1024)]
    for chunk in chunks:
        ctypes.memset(chunk, 1, 64 * 1024)  # resident, not just reserved
    kept = chunks.pop()
    for chunk in chunks:
        libc.free(chunk)
    try:
        before = _resident_bytes()
        assert release_heap(TRIM_AFTER_BYTES - 1) is False
        assert before - _resident_bytes() < 8 << 20  # a small decode: nothing trimmed
        before = _resident_bytes()
        assert release_heap(TRIM_AFTER_BYTES) is True
        assert before - _resident_bytes() > 32 << 20  # the freed 64 MiB went back
    finally:
        libc.free(kept)


# --------------------------------------------------------------------------- a real server with tight budgets


@pytest.fixture(scope="module")
def budget_server(tiny_model_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One worker, 4 requests in flight, bodies within 4 s (no pause over 1.5 s), headers within 1.5 s."""
    yield from serve_tiny_model(
        tiny_model_tag, tmp_path_factory, "budget", HISTO_WORKERS="1", HISTO_MAX_IN_FLIGHT="4",
        HISTO_BODY_TIMEOUT_MS="4000", HISTO_BODY_IDLE_TIMEOUT_MS="1500", HISTO_HEADER_TIMEOUT_MS="1500",
    )


def post(url: str, data: bytes, route: str = "/predict", name: str = "tile.jpeg", **fields: str) -> httpx.Response:
    return httpx.post(f"{url}{route}", files={"file": (name, data, "image/jpeg")}, data=fields, timeout=30)


def read_response(connection: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout`)."""
    connection.settimeout(timeout)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    return received


def _stalled_inside(url: str, payload: bytes) -> socket.socket:
    """An upload the service has begun reading (its `100 Continue` came back), stalled half way."""
    body, content_type = multipart([("file", "tile.jpeg", payload)])
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    connection.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                       f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
    assert connection.recv(1024).startswith(b"HTTP/1.1 100 Continue")  # the guard is reading this body
    connection.sendall(body[: len(body) // 2])
    return connection


def test_stalled_uploads_hold_no_slot_and_get_408(budget_server):
    # 3x the 4 slots, each one being read by the service before the fast client comes (no sleep as a barrier).
    stalled = [_stalled_inside(budget_server.url, fresh_tile("lung_n", 600 + i)) for i in range(12)]
    try:
        response = post(budget_server.url, fresh_tile("lung_aca", 650))
        assert response.status_code == 200, response.text  # admitted, not "4 requests in flight": no slot held
        answers = [read_response(connection, 10) for connection in stalled]
    finally:
        for connection in stalled:
            connection.close()
    for answer in answers:
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 408"), answer[:200]
        assert b"connection: close" in head and PROBLEM.encode() in head


def test_half_sent_headers_are_closed_at_the_header_deadline(budget_server):
    connections = [half_sent_headers(budget_server.url) for _ in range(20)]
    try:
        closed = [read_response(connection, 4) == b"" for connection in connections]  # EOF, nothing sent
    finally:
        for connection in connections:
            connection.close()
    assert all(closed)
    assert post(budget_server.url, fresh_tile("lung_scc", 651)).status_code == 200


def test_unknown_paths_collapse_into_one_metrics_label(budget_server):
    before = httpx.get(f"{budget_server.url}/metrics", timeout=10).text
    marker = uuid.uuid4().hex[:12]

    async def probe() -> None:
        async with httpx.AsyncClient(base_url=budget_server.url, timeout=30) as client:
            for start in range(0, 300, 50):
                await asyncio.gather(*(client.get(f"/{marker}-{i}") for i in range(start, start + 50)))

    asyncio.run(probe())
    after = httpx.get(f"{budget_server.url}/metrics", timeout=10).text
    assert marker not in after
    assert len(after) - len(before) < 20_000, len(after) - len(before)
    assert 'endpoint="/(other)"' in after
    assert httpx.get(f"{budget_server.url}/ui/app.js", timeout=10).status_code == 200  # served paths still work


FIELD_CASES = [
    ("a 300-byte file name", "x" * 296 + ".jpg", {}),
    ("a control character in the file name", "tile\x01.jpg", {}),
    ("deeply nested JSON in target_class", "tile.jpg", {"target_class": "[" * 5000 + "]" * 5000}),
    ("JSON object in target_class", "tile.jpg", {"target_class": '{"a": 1}'}),
    ("a 5,000-digit include_map", "tile.jpg", {"include_map": "9" * 5000}),
    ("a word in include_map", "tile.jpg", {"include_map": "maybe"}),
]


@pytest.mark.parametrize(("case", "filename", "fields"), FIELD_CASES, ids=[case for case, _, _ in FIELD_CASES])
def test_no_field_can_cause_a_500(budget_server, case, filename, fields):
    parts = [("file", filename, fresh_tile("lung_n", 660)), *((k, None, v.encode()) for k, v in fields.items())]
    body, content_type = multipart(parts)  # raw: a client library would escape the file name
    response = httpx.post(f"{budget_server.url}/explain", content=body, headers={"Content-Type": content_type},
                          timeout=30)
    assert_problem(response, 400)


def test_hostile_images_are_refused_with_their_status(budget_server):
    # Refused from the header, before any pixel is decoded: the in-process tests above show it; no clock here.
    for data, status in ((scan_bomb_jpeg(), 413), (arithmetic_jpeg(), 415), (thin_png(), 413),
                         (large_flat_webp(), 413)):
        assert_problem(post(budget_server.url, data), status)
    body, content_type = multipart([("file", f"{i}.png", thin_png(1_500_000)) for i in range(32)])
    response = httpx.post(f"{budget_server.url}/predict_batch", content=body,
                          headers={"Content-Type": content_type}, timeout=30)
    detail = assert_problem(response, 413)["detail"]
    assert detail.startswith("file[") and "pixels in all" in detail  # the request's total, not one part
    assert httpx.get(f"{budget_server.url}/readyz", timeout=10).status_code == 200


def test_client_errors_are_one_line_without_traceback_or_upload_bytes(budget_server):
    marker = f"secret-{uuid.uuid4().hex[:8]}"
    post(budget_server.url, b"not an image " + marker.encode(), name=f"{marker}.jpg")
    post(budget_server.url, fresh_tile("lung_n", 661)[:900], name=f"{marker}.jpg")
    body, content_type = multipart([("file", None, marker.encode())])  # a string, not a file
    httpx.post(f"{budget_server.url}/predict", content=body, headers={"Content-Type": content_type}, timeout=10)
    expected = ("POST /predict 415", "POST /predict 422", "POST /predict 400")
    # The log file is written by another process.
    log = wait_until(lambda: all(line in budget_server.log() for line in expected) and budget_server.log(),
                     f"log lines {expected}")
    assert marker not in log and "Traceback" not in log


@pytest.fixture(scope="module")
def impatient_server(tiny_model_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A service that must answer every request within 100 ms."""
    yield from serve_tiny_model(tiny_model_tag, tmp_path_factory, "impatient", HISTO_WORKERS="1",
                                HISTO_REQUEST_TIMEOUT_MS="100")


def test_a_request_past_its_deadline_gets_a_problem_504_with_its_id(impatient_server):
    slow = progressive_jpeg(3600)  # ~0.3 s of decoding here, three times the deadline
    response = httpx.post(f"{impatient_server.url}/predict", files={"file": ("big.jpeg", slow)},
                          headers={"X-Request-ID": "deadline-test-1"}, timeout=30)
    assert_problem(response, 504)
    assert response.headers["x-request-id"] == "deadline-test-1"
    line = wait_until(
        lambda: next((line for line in impatient_server.log().splitlines() if "POST /predict 504" in line), None),
        "the 504's log line",
    )
    assert "id=deadline-test-1" in line
    metrics = httpx.get(f"{impatient_server.url}/metrics", timeout=10).text
    assert 'histopathology_rejected_total{reason="timeout"} 1.0' in metrics
    assert httpx.get(f"{impatient_server.url}/readyz", timeout=10).status_code == 200


def test_overload_refusals_are_cheap_and_closed(strict_server):

    payload = fresh_tile("lung_scc", 401)
    headers = {"Authorization": f"Bearer {STRICT_TOKEN}"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=strict_server.url, headers=headers, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/predict", files={"file": ("t.jpeg", payload, "image/jpeg")}) for _ in range(40))
            )

    refused = [r for r in asyncio.run(burst()) if r.status_code == 503]
    assert refused
    for response in refused:
        assert response.headers["connection"] == "close" and response.headers["retry-after"] == "1"
        assert response.headers["x-request-id"]
        assert json.loads(response.text)["detail"].startswith("over capacity")


def test_bentoml_client_error_records_become_one_warning_line():
    import logging

    from pydantic import BaseModel, ValidationError

    from serving.observability.logs import ClientErrorFilter

    class Upload(BaseModel):
        count: int

    try:
        Upload(count="secret-bytes-of-the-upload")
    except ValidationError:
        record = logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]",
                                   ("/predict", "POST"), exc_info=sys.exc_info())
    assert ClientErrorFilter().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage().startswith("client error on /predict [POST]: ValidationError")
    assert "secret" not in record.getMessage()
    server_error = logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]",
                                     ("/predict", "POST"), exc_info=(RuntimeError, RuntimeError("bug"), None))
    assert ClientErrorFilter().filter(server_error) and server_error.levelno == logging.ERROR  # kept as is
