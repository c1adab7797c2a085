"""Hardening against a real server: request shape, image variants, token, caps, overload, CORS, logs, fuzzing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import ExifTags, Image

from loadtests.servers import (
    BENTOML,
    REPO_ROOT,
    WORKER_MODULE,
    RunningServer,
    free_port,
    private_home,
    stop_server,
)
from synthetic.tissue import render_tile
from tests.helpers import (
    PROBLEM,
    STRICT_ORIGIN,
    STRICT_TOKEN,
    TINY_TILE,
    assert_problem,
    encode,
    fresh_tile,
    post_file,
    wait_until,
)

pytestmark = pytest.mark.service

AUTH = {"Authorization": f"Bearer {STRICT_TOKEN}"}


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> tuple[bytes, dict]:
    """A hand-built multipart body: (name, filename or None for a plain field, content) per part."""
    lines = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        lines.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n")
    body = b"".join(lines) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _post_raw(url: str, body: bytes, headers: dict, route: str = "/predict") -> httpx.Response:
    return httpx.post(f"{url}{route}", content=body, headers=headers, timeout=60)


TILE = encode(render_tile("lung_n", TINY_TILE, seed=77), "JPEG", quality=90)

SHAPE_CASES = [
    # (case, request factory -> (body, headers), status)
    ("wrong field name", lambda: _multipart([("image", "t.jpeg", TILE)]), 400),
    ("two files to /predict", lambda: _multipart([("file", "a.jpeg", TILE), ("file", "b.jpeg", TILE)]), 400),
    ("url string in the file field", lambda: _multipart([("file", None, b"http://127.0.0.1:9/x.jpeg")]), 400),
    ("extra plain field", lambda: _multipart([("file", "t.jpeg", TILE), ("note", None, b"hi")]), 400),
    ("empty multipart", lambda: (b"--b0undary--\r\n", {"Content-Type": "multipart/form-data; boundary=b0undary"}), 400),
    ("part without a name", lambda: (
        b'--b0undary\r\nContent-Disposition: form-data; filename="t.jpeg"\r\n\r\nxx\r\n--b0undary--\r\n',
        {"Content-Type": "multipart/form-data; boundary=b0undary"}), 400),
    ("multipart without boundary", lambda: (b"abc", {"Content-Type": "multipart/form-data"}), 400),
    ("json body", lambda: (b'{"file": "tile.jpeg"}', {"Content-Type": "application/json"}), 415),
    ("raw image/jpeg body", lambda: (TILE, {"Content-Type": "image/jpeg"}), 415),
    ("no content type", lambda: (TILE, {}), 415),
]


@pytest.mark.parametrize(("case", "make", "status"), SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_malformed_requests_get_4xx_problem_json(server, case, make, status):
    body, headers = make()
    assert_problem(_post_raw(server.url, body, headers), status)
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_unknown_routes_and_methods_answer_problem_json(server):
    assert_problem(httpx.get(f"{server.url}/no-such-route", timeout=10), 404)
    assert_problem(httpx.get(f"{server.url}/predict", timeout=10), 405)


def _png16(tile: Image.Image) -> bytes:
    grey = np.asarray(tile.convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")


def _palette_with_transparency(tile: Image.Image) -> bytes:
    return encode(tile.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0)


def _multi_frame_tiff(tile: Image.Image) -> bytes:
    return encode(tile, "TIFF", save_all=True, append_images=[tile.rotate(90), tile.rotate(180)])


ACCEPTED_VARIANTS = [
    ("16-bit png", _png16),
    ("cmyk jpeg", lambda tile: encode(tile.convert("CMYK"), "JPEG")),
    ("palette png with transparency", _palette_with_transparency),
    ("grayscale jpeg", lambda tile: encode(tile.convert("L"), "JPEG")),
    ("rgba png", lambda tile: encode(tile.convert("RGBA"), "PNG")),
    ("webp", lambda tile: encode(tile, "WEBP")),
    ("multi-frame tiff (first frame)", _multi_frame_tiff),
]


@pytest.mark.parametrize(("case", "make"), ACCEPTED_VARIANTS, ids=[c[0] for c in ACCEPTED_VARIANTS])
def test_image_variants_are_accepted(server, tile_image, case, make):
    response = post_file(server.url, make(tile_image), filename="x.bin", content_type="application/octet-stream")
    assert response.status_code == 200, response.text
    assert sum(response.json()["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_multi_frame_tiff_is_classified_by_its_first_frame(server, tile_image):
    first_only = post_file(server.url, encode(tile_image, "TIFF")).json()["probabilities"]
    stack = post_file(server.url, _multi_frame_tiff(tile_image)).json()["probabilities"]
    assert stack == pytest.approx(first_only, abs=1e-6)


def test_animated_gif_is_refused_with_415(server, tile_image):
    gif = encode(tile_image, "GIF", save_all=True, append_images=[tile_image.rotate(90)], duration=100)
    body = assert_problem(post_file(server.url, gif), 415)
    assert "JPEG, PNG, WebP or TIFF" in body["detail"]


def test_exif_orientation_is_applied(server, tile_image):
    # Stored rotated, with EXIF orientation 6 ("rotate 90 clockwise to display"): upright once applied.
    stored = tile_image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    upright = post_file(server.url, encode(tile_image, "PNG")).json()["probabilities"]
    tagged = post_file(server.url, encode(stored, "PNG", exif=exif)).json()["probabilities"]
    untagged = post_file(server.url, encode(stored, "PNG")).json()["probabilities"]
    assert tagged == pytest.approx(upright, abs=1e-6)
    assert untagged != pytest.approx(upright, abs=1e-6)  # so the check above is not vacuous


def test_logs_never_contain_uploaded_bytes_or_file_names(server):
    marker = "zz-private-marker-7c1e"
    for index, (data, name) in enumerate(
        [(f"patient {marker} notes".encode(), f"{marker}.txt"), (fresh_tile("lung_aca", 300), f"{marker}-slide.jpeg")]
    ):
        httpx.post(f"{server.url}/predict", files={"file": (name, data, "text/plain")},
                   headers={"X-Request-ID": f"private-{index}"}, timeout=60)
    # Both requests are logged (the log file is written by another process) ...
    log = wait_until(lambda: all(f"id=private-{i}" in server.log() for i in range(2)) and server.log(),
                     "both requests' log lines")
    assert marker not in log  # ... without their content or names


def test_api_token_guards_model_routes_only(strict_server):
    url = strict_server.url
    for route in ("/predict", "/predict_batch"):
        response = httpx.post(f"{url}{route}", files={"file": ("t.jpeg", TILE, "image/jpeg")}, timeout=30)
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = {"Authorization": "Bearer not-the-token"}
    for model_route in ("/model", "/model/report", "/model/report/roc_curves.png"):
        assert_problem(httpx.get(f"{url}{model_route}", headers=wrong, timeout=10), 401)
        assert httpx.get(f"{url}{model_route}", headers=AUTH, timeout=10).status_code == 200
    response = httpx.post(f"{url}/predict", files={"file": ("t.jpeg", TILE, "image/jpeg")}, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    for open_route in ("/readyz", "/livez", "/healthz", "/metrics", "/docs.json"):
        assert httpx.get(f"{url}{open_route}", timeout=10).status_code == 200, open_route


def test_body_cap_with_content_length_and_streamed(strict_server):
    big = b"\xff\xd8\xff" + bytes(1_200_000)  # over the strict server's 1 MB cap
    body, headers = _multipart([("file", "big.jpeg", big)])
    assert_problem(_post_raw(strict_server.url, body, {**headers, **AUTH}), 413)

    def chunks():  # no Content-Length: the cap must hold on the stream itself
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = httpx.post(f"{strict_server.url}/predict", content=chunks(), headers={**headers, **AUTH}, timeout=30)
    assert "content-length" not in response.request.headers
    assert_problem(response, 413)
    assert httpx.get(f"{strict_server.url}/readyz", timeout=10).status_code == 200


def test_overload_gets_503_with_retry_after_and_the_service_recovers(strict_server, reference):
    payload = fresh_tile("lung_scc", 400)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=strict_server.url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/predict", files={"file": ("t.jpeg", payload, "image/jpeg")}) for _ in range(32))
            )

    responses = asyncio.run(burst())
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert response.headers["content-type"] == PROBLEM
        else:
            assert response.json()["predicted_class"] == reference.predicted_class(payload)
    after = httpx.post(f"{strict_server.url}/predict", files={"file": ("t.jpeg", payload)}, headers=AUTH, timeout=30)
    assert after.status_code == 200


def test_cors_allows_only_the_configured_origin(strict_server, server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{strict_server.url}/predict", headers={"Origin": STRICT_ORIGIN, **preflight}, timeout=10)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == STRICT_ORIGIN
    other = httpx.options(f"{strict_server.url}/predict", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    default = httpx.get(f"{server.url}/readyz", headers={"Origin": STRICT_ORIGIN}, timeout=10)
    assert "access-control-allow-origin" not in default.headers  # no origins by default


def test_schemathesis_finds_no_server_errors(server, tmp_path):
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/docs.json",
            # The document says which statuses and content types each route answers: hold it to that.
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
            "--max-examples", "25", "--seed", "1",
            "--request-timeout", "30", "--generation-deterministic",
        ],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "/predict" in result.stdout
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


# --------------------------------------------------------------------------- one server's life: warm-up, a killed
# worker, SIGTERM. These three run in this order on one server (the last one ends it).


@pytest.fixture(scope="module")
def lifecycle(tiny_model_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A one-worker server started by hand, and the first /readyz sent as soon as its port took connections.
    The warm-up runs every batch size up to 64, so it takes seconds after the port opens."""
    log_path = tmp_path_factory.mktemp("lifecycle") / "serve.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [BENTOML, "serve", "service:Histopathology", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "BENTOML_HOME": str(private_home(log_path.parent / "home")),
                 "HISTO_MODEL_TAG": tiny_model_tag, "HISTO_WORKERS": "1", "HISTO_MAX_BATCH_SIZE": "64"},
        )
    server = RunningServer(url, process, log_path)
    try:
        wait_until(lambda: _port_open(port) or process.poll() is not None, "the port open", timeout=300)
        assert process.poll() is None, server.log()[-3000:]
        warm_when_sent = WARMED_UP in server.log()
        first = httpx.get(f"{url}/readyz", timeout=300)  # waits in the listen backlog while the worker warms up
        yield {"server": server, "warm_when_sent": warm_when_sent, "first": first,
               "warm_when_answered": WARMED_UP in server.log()}
    finally:
        stop_server(server)


WARMED_UP = "warmed up for batch sizes 1..64"


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_request_during_warm_up_waits_for_it_instead_of_failing(lifecycle):
    # BentoML 1.4 runs start-up hooks (the warm-up) before its worker serves anything, so /readyz is never
    # seen 503 over HTTP: a request that arrives meanwhile waits, and is answered once the worker is warm.
    assert not lifecycle["warm_when_sent"]  # the port opens long before the worker has loaded the model
    assert lifecycle["first"].status_code == 200 and lifecycle["warm_when_answered"]


def _workers(server: RunningServer) -> list[int]:
    """The live workers' PIDs (a killed one stays a zombie until reaped, with no command line to read)."""
    import psutil

    alive = []
    for child in psutil.Process(server.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.ZombieProcess, psutil.NoSuchProcess):
            if child.status() != psutil.STATUS_ZOMBIE and WORKER_MODULE in " ".join(child.cmdline()):
                alive.append(child.pid)
    return alive


def test_a_killed_worker_is_restarted_and_answers(lifecycle, reference):
    server = lifecycle["server"]
    [worker] = _workers(server)
    os.kill(worker, signal.SIGKILL)
    replacement = wait_until(lambda: [pid for pid in _workers(server) if pid != worker], "a new worker", 120)
    assert len(replacement) == 1 and server.process.poll() is None
    wait_until(lambda: _ready(server.url), "the new worker ready", timeout=300, interval=0.2)
    payload = fresh_tile("lung_aca", 77)
    answer = post_file(server.url, payload)
    assert answer.status_code == 200 and answer.json()["predicted_class"] == reference.predicted_class(payload)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_drains_requests_in_flight(lifecycle, reference):
    server = lifecycle["server"]
    host, port = server.url.removeprefix("http://").split(":")
    tiles = [fresh_tile("lung_n", 500 + i) for i in range(16)]
    body, headers = _multipart([("file", f"{i}.jpeg", tile) for i, tile in enumerate(tiles)])
    connections = []
    for _ in range(3):
        connection = socket.create_connection((host, int(port)), timeout=60)
        connection.sendall(
            f"POST /predict_batch HTTP/1.1\r\nHost: {host}\r\nContent-Type: {headers['Content-Type']}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        # The barrier: the server answers 100 Continue once the service reads this request's body, so the
        # request is in flight there before the signal, however busy this machine is.
        assert connection.recv(1024).startswith(b"HTTP/1.1 100 Continue"), "no 100 Continue"
        connections.append(connection)
    try:
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # not a barrier: only gives the signal time to reach the worker before the bodies
        for connection in connections:
            connection.sendall(body)
        expected = [reference.predicted_class(tile) for tile in tiles]
        for connection in connections:
            head, _, content = _read_all(connection).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            answers = json.loads(_dechunked(head, content))
            assert [a["predicted_class"] for a in answers] == expected
        assert server.process.wait(60) == 0
    finally:
        for connection in connections:
            connection.close()


def _read_all(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
        head, _, content = received.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        if length is not None and len(content) >= length:
            break
    return received


def _dechunked(head: bytes, content: bytes) -> bytes:
    if b"transfer-encoding: chunked" not in head.lower():
        return content
    out, rest = b"", content
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, rest = out + rest[:size], rest[size + 2:]
