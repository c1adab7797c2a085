"""The out-of-distribution contract over real HTTP: every route flags what the model was not trained for."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtests.servers import RunningServer
from models.prediction import Thresholds, magnification_flagged
from synthetic.tissue import render_tile
from tests.helpers import encode, fresh_tile, metric_delta, metric_samples, serve_tiny_model

pytestmark = pytest.mark.service


def out_of_scope_images() -> dict[str, bytes]:
    """Inputs no lung-tile model was trained for, each of a different kind."""
    rng = np.random.default_rng(5)
    tile = np.asarray(render_tile("lung_scc", 256, 17))
    yy, xx = np.mgrid[0:240, 0:320]
    landscape = np.stack([90 + 60 * np.sin(xx / 40), 140 + 50 * np.cos(yy / 30), 60 + 30 * np.sin((xx + yy) / 60)], -1)
    return {
        "blank glass": encode(Image.new("RGB", (400, 400), (244, 243, 246)), "PNG"),
        "noise": encode(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)), "PNG"),
        "grey-scale tissue": encode(Image.fromarray(tile.mean(axis=2).astype(np.uint8)), "JPEG"),
        "green landscape": encode(Image.fromarray(landscape.clip(0, 255).astype(np.uint8)), "JPEG"),
    }


def post(url: str, route: str, files: list[tuple[str, tuple[str, bytes, str]]], **data: str) -> httpx.Response:
    return httpx.post(f"{url}{route}", files=files, data=data, timeout=60)


def one(data: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", ("upload.bin", data, "application/octet-stream"))]


def assert_matches_reference(body: dict, data: bytes, reference, threshold: float) -> None:
    """The answer's trust fields are exactly what the gate and the score give in-process."""
    expected = reference.expect(data)
    assert body["quality"] == expected["quality"].model_dump()
    assert body["ood_score"] == pytest.approx(expected["ood_score"], abs=1e-3)
    assert body["ood_threshold"] == pytest.approx(threshold, abs=1e-4)
    assert body["out_of_distribution"] == (expected["ood_score"] > threshold)
    flagged = ["out_of_distribution"] * body["out_of_distribution"] + expected["quality"].failed_checks
    # The magnification check, on the estimate the answer shows, with the card's limits (models.prediction).
    limits = Thresholds.resolve(reference.stored.card).magnification
    estimate = math.nan if body["magnification"] is None else body["magnification"]
    flagged += ["magnification"] * bool(magnification_flagged(estimate, limits))
    assert [reason for reason in body["reasons"] if reason != "low_confidence"] == flagged
    assert body["uncertain"] == bool(body["reasons"])


def test_every_route_flags_inputs_the_model_was_not_trained_for(server, reference):
    threshold = reference.stored.card.out_of_distribution.threshold
    images = out_of_scope_images()
    for name, data in images.items():
        response = post(server.url, "/predict", one(data))
        assert response.status_code == 200, (name, response.text)
        body = response.json()
        assert body["uncertain"], name
        assert set(body["reasons"]) - {"low_confidence"}, (name, body["reasons"])  # flagged for what it is
        assert_matches_reference(body, data, reference, threshold)

    tile = fresh_tile("lung_aca", 900)
    batch = [tile, images["blank glass"], images["noise"]]
    response = post(server.url, "/predict_batch", [("file", (f"{i}.bin", d, "image/png")) for i, d in enumerate(batch)])
    assert response.status_code == 200, response.text
    for body, data in zip(response.json(), batch, strict=True):
        assert_matches_reference(body, data, reference, threshold)  # each part judged on its own
    assert "background" in response.json()[1]["reasons"]

    response = post(server.url, "/explain", one(images["blank glass"]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["uncertain"] and "background" in body["reasons"] and body["overlay_png"]
    assert_matches_reference(body, images["blank glass"], reference, threshold)


def test_flagged_answers_are_counted_by_reason(server):
    glass = out_of_scope_images()["blank glass"]
    before = metric_samples(server.url)
    for _ in range(3):
        assert "background" in post(server.url, "/predict", one(glass)).json()["reasons"]
    after = metric_samples(server.url)
    assert metric_delta(before, after, "histopathology_flagged_total", reason="background") == 3
    assert metric_delta(before, after, "histopathology_uncertain_total") == 3


@pytest.fixture(scope="module")
def lenient_server(tiny_model_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The tiny model with an operator's out-of-distribution threshold far above any score."""
    yield from serve_tiny_model(tiny_model_tag, tmp_path_factory, "lenient", HISTO_OOD_THRESHOLD="1000000",
                                HISTO_WORKERS="1")


@pytest.fixture(scope="module")
def gate_off_server(tiny_model_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The tiny model with the gate and the score switched off (how the benchmark measures their cost)."""
    yield from serve_tiny_model(tiny_model_tag, tmp_path_factory, "gate-off", HISTO_OOD_GATE="off", HISTO_WORKERS="1")


def test_an_operator_threshold_replaces_the_cards(lenient_server, reference):
    noise = out_of_scope_images()["noise"]
    body = post(lenient_server.url, "/predict", one(noise)).json()
    assert body["ood_threshold"] == 1_000_000 and body["out_of_distribution"] is False
    assert "out_of_distribution" not in body["reasons"]
    assert body["ood_score"] == pytest.approx(reference.expect(noise)["ood_score"], abs=1e-3)  # still measured


def test_with_the_gate_off_answers_say_so_and_keep_the_probabilities(gate_off_server, server, reference):
    glass = out_of_scope_images()["blank glass"]
    off = post(gate_off_server.url, "/predict", one(glass)).json()
    assert off["out_of_distribution"] is None and off["ood_score"] is None and off["quality"] is None
    assert set(off["reasons"]) <= {"low_confidence"}
    on = post(server.url, "/predict", one(glass)).json()
    assert off["probabilities"] == pytest.approx(on["probabilities"], abs=1e-5)
