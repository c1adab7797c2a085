"""POST /explain (Grad-CAM) over real HTTP, and the Grad-CAM pieces in-process."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from models.explain import GradCam, jet, overlay
from models.preprocessing import decode_image
from models.store import load_model
from synthetic.tissue import LUNG_CLASSES
from tests.helpers import TINY_TILE, assert_problem, encode, fresh_tile

pytestmark = pytest.mark.service


def post_explain(url: str, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/explain", files={"file": ("tile.jpeg", data, "image/jpeg")}, data=fields, timeout=60)


def overlay_image(body: dict) -> Image.Image:
    png = base64.b64decode(body["overlay_png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(png))


def test_explain_returns_the_prediction_and_an_overlay_of_the_inputs_size(server, reference):
    for class_name in LUNG_CLASSES:
        tile = fresh_tile(class_name, 40)
        response = post_explain(server.url, tile, include_map="true")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["predicted_class"] == body["explained_class"] == reference.predicted_class(tile)
        predicted = httpx.post(f"{server.url}/predict", files={"file": ("t.jpeg", tile, "image/jpeg")}, timeout=60)
        assert body["probabilities"] == pytest.approx(predicted.json()["probabilities"], abs=1e-6)
        assert overlay_image(body).size == (TINY_TILE, TINY_TILE)
        heat = np.array(body["heat_map"])
        assert heat.ndim == 2 and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
        assert heat.std() > 0.05, "the map must not be constant"


def test_overlay_keeps_a_non_square_uploads_size_and_the_map_is_optional(server):
    wide = Image.open(io.BytesIO(fresh_tile("lung_scc", 41))).resize((300, 180))
    body = post_explain(server.url, encode(wide, "PNG")).json()
    assert overlay_image(body).size == (300, 180)
    assert body["heat_map"] is None  # only when asked for


def test_same_input_gives_the_same_map_and_another_class_gives_another(server):
    tile = fresh_tile("lung_aca", 42)
    first = post_explain(server.url, tile, include_map="true").json()
    second = post_explain(server.url, tile, include_map="true").json()
    assert first["heat_map"] == second["heat_map"] and first["overlay_png"] == second["overlay_png"]
    another = next(name for name in LUNG_CLASSES if name != first["predicted_class"])
    other = post_explain(server.url, tile, target_class=another, include_map="true").json()
    assert other["explained_class"] == another and other["predicted_class"] == first["predicted_class"]
    assert other["heat_map"] != first["heat_map"]


def test_bad_explain_requests_get_their_4xx(server):
    assert_problem(post_explain(server.url, b""), 400)
    assert_problem(post_explain(server.url, b"just some text, not an image"), 415)
    assert_problem(post_explain(server.url, fresh_tile("lung_n", 43)[:700]), 422)
    body = assert_problem(post_explain(server.url, fresh_tile("lung_n", 43), target_class="colon_aca"), 400)
    assert "lung_aca" in body["detail"]
    assert_problem(post_explain(server.url, fresh_tile("lung_n", 43), explain_everything="yes"), 400)
    assert_problem(post_explain(server.url, fresh_tile("lung_n", 43), include_map="perhaps"), 400)
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_grad_cam_points_at_the_evidence(tiny_model_tag):
    """A tile that is half normal lung, half adenocarcinoma: the aca map is hotter on the aca half."""
    stored = load_model(tiny_model_tag)
    cam = GradCam(stored.model, stored.card.architecture, stored.card.input_size)
    normal = decode_image(fresh_tile("lung_n", 44), TINY_TILE)
    cancer = decode_image(fresh_tile("lung_aca", 44), TINY_TILE)
    half = TINY_TILE // 2
    mixed = np.concatenate([normal[:, :half], cancer[:, half:]], axis=1)
    small = np.asarray(Image.fromarray(mixed).resize((stored.card.input_size,) * 2, Image.Resampling.BILINEAR))
    heat = cam.heat_map(small, stored.card.class_names.index("lung_aca"))
    middle = heat.shape[1] // 2
    assert heat[:, middle:].mean() > heat[:, :middle].mean()


def test_overlay_and_colour_map():
    image = np.full((20, 30, 3), 128, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    assert np.array_equal(overlay(image, heat), image)  # no heat, no colour
    heat[0, 0] = 1.0
    blended = overlay(image, heat)
    assert blended.shape == image.shape and not np.array_equal(blended, image)
    assert jet(np.array([0.0]))[0].tolist() == [0, 0, 127] and jet(np.array([1.0]))[0].tolist() == [127, 0, 0]
