"""What several test modules share: constants, tiles, HTTP helpers, metrics, waiting, Locust.

Tests import from here, never from each other; fixtures live in conftest.py.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from loadtests.servers import REPO_ROOT, RunningServer, start_server, stop_server

T = TypeVar("T")

TINY_TILE = 256  # px: small tiles keep generation and decoding fast in tests
TINY_MODEL_NAME = "tiny_lung"
TINY_MODEL_EPOCHS = 30
FRESH_SEED = 999  # tiles no model saw (the test dataset uses seed 7)
PROBLEM = "application/problem+json"
STRICT_TOKEN = "test-token-5f2c"  # noqa: S105 - a throwaway credential for the strict test server
STRICT_ORIGIN = "https://viewer.example"
LOCUST = str(Path(sys.executable).with_name("locust"))
KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"


def encode(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def gradient_image(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """The RGB test image of `make_image`: a ramp, the ramp reversed and a flat 128, one per channel."""
    w, h = size
    ramp = np.linspace(0, 255, w * h, dtype=np.float64).reshape(h, w)
    return Image.fromarray(np.stack([ramp, ramp[::-1], np.full_like(ramp, 128)], -1).astype(np.uint8), "RGB")


@functools.cache
def _tile_cache_dir() -> Path:
    """A folder of rendered tiles, named after the synthetic package's source: any change to the
    renderer starts a new folder, so a cached tile is always the one the code would draw."""
    digest = hashlib.sha256()
    for source in sorted((REPO_ROOT / "synthetic").glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return Path(tempfile.gettempdir()) / "histo-test-tiles" / digest.hexdigest()[:16]


def rendered_tile(class_name: str, size: int, seed: int) -> Image.Image:
    """`synthetic.tissue.render_tile`, kept on disk between test processes.

    Rendering takes about 30 ms a tile; the trust tests draw hundreds, and mutation testing runs them
    in a fresh process for every mutant. Loading the lossless copy takes under a millisecond.
    """
    from synthetic.tissue import render_tile

    path = _tile_cache_dir() / f"{class_name}-{size}-{seed}.png"
    if path.exists():
        with Image.open(path) as cached:
            return cached.convert("RGB")
    image = render_tile(class_name, size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    image.save(partial, format="PNG", compress_level=1)
    partial.replace(path)  # atomic: a concurrent reader sees the whole file or none
    return image


def fresh_tile(class_name: str, index: int) -> bytes:
    """A JPEG tile of this class that no test model was trained on."""
    from synthetic.tissue import tile_seed

    return encode(rendered_tile(class_name, TINY_TILE, tile_seed(FRESH_SEED, class_name, index)), "JPEG", quality=90)


def post_file(url: str, data: bytes, filename: str = "tile.jpeg", content_type: str = "image/jpeg") -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (filename, data, content_type)}, timeout=60)


def assert_problem(response: httpx.Response, status: int) -> dict:
    """The response is an RFC 9457 problem with this status and no stack trace; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"] == "about:blank"
    assert body["detail"] and "Traceback" not in body["detail"]
    return body


def wait_until(condition: Callable[[], T], what: str, timeout: float = 10, interval: float = 0.05) -> T:
    """Poll until `condition()` is truthy and return it; fail the test, naming `what`, at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the service's own metrics: (name, sorted labels) -> value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("histopathology_"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def metric_delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def run_locust(url: str, out: Path, seconds: int, **slo: str) -> subprocess.CompletedProcess[str]:
    """A headless Locust run of loadtests/locustfile.py (8 users, 256 px tiles), CSV under `out`."""
    command = [
        LOCUST, "-f", "loadtests/locustfile.py", "--headless", "--host", url, "-u", "8", "-r", "8",
        "-t", f"{seconds}s", "--stop-timeout", "5", "--csv", str(out / "run"), "--only-summary",
    ]
    env = {**os.environ, "LOADTEST_TILE_SIZE": str(TINY_TILE), **slo}
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=seconds + 120, check=False
    )


def locust_stats(out: Path) -> dict[str, dict[str, str]]:
    """The run's per-route statistics (Locust's CSV), by route name."""
    with (out / "run_stats.csv").open() as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def serve_tiny_model(
    tiny_model_tag: str, tmp_path_factory: pytest.TempPathFactory, name: str, **settings: str
) -> Iterator[RunningServer]:
    """For a fixture: a real `bentoml serve service:Histopathology` of the tiny model with these HISTO_* settings."""
    running = start_server(
        "service:Histopathology",
        tmp_path_factory.mktemp(name) / "serve.log",
        env={"HISTO_MODEL_TAG": tiny_model_tag, **settings},
    )
    yield running
    stop_server(running)


def kubernetes_objects() -> dict[str, dict]:
    """deploy/kubernetes/: kind -> the one object of that kind (kustomization.yaml included)."""
    import yaml

    objects = [yaml.safe_load(path.read_text()) for path in sorted(KUBERNETES.glob("*.yaml"))]
    kinds = {item["kind"]: item for item in objects}
    assert len(kinds) == len(objects), "one object of each kind"
    return kinds


def pod_container(kinds: dict[str, dict]) -> dict:
    """The Deployment's one container."""
    [only] = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def temperature_text(card: object) -> str:
    """What the report says about the card's temperature (fitted, or why none could be)."""
    cal = card.calibration
    return "no temperature can be fitted" if cal.validation_errors == 0 else f"T = {cal.fitted_temperature:.3f}"


# A test slide: a 3 x 2 grid of tiles, tissue of each class and two of blank glass.
GRID_TILE = 768
GRID_LAYOUT = [["lung_aca", "glass", "lung_scc"], ["lung_n", "lung_aca", "glass"]]
GRID_MPP = 0.5


def grid_tile(name: str, index: int) -> np.ndarray:
    if name == "glass":
        return np.full((GRID_TILE, GRID_TILE, 3), 244, np.uint8)
    return np.asarray(Image.open(io.BytesIO(fresh_tile(name, index))).resize((GRID_TILE, GRID_TILE)))


def write_pyramidal_tiff(path: Path, width: int | None = None, height: int | None = None,
                         microns_per_pixel: float | None = GRID_MPP) -> np.ndarray:
    """A tiled, pyramidal (levels 1, 2, 4), deflate-compressed TIFF of the grid, cut to `width` x `height`
    when given, with its pixel size unless None; returns level 0."""
    import tifffile

    rows = [np.concatenate([grid_tile(name, 800 + 3 * r + c) for c, name in enumerate(row)], axis=1)
            for r, row in enumerate(GRID_LAYOUT)]
    level0 = np.ascontiguousarray(np.concatenate(rows, axis=0)[:height, :width])
    with tifffile.TiffWriter(path) as tif:
        for factor in (1, 2, 4):
            level = np.asarray(Image.fromarray(level0).reduce(factor)) if factor > 1 else level0
            # Pixels per centimetre; without a pixel size, no resolution tags at all.
            scale = ({"resolution": (1e4 / microns_per_pixel / factor,) * 2, "resolutionunit": "CENTIMETER"}
                     if microns_per_pixel else {})
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib", **scale,
                      subfiletype=1 if factor > 1 else 0)  # reduced-resolution images: OpenSlide's levels
    return level0


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims huge dimensions (decompression-bomb shape)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )
