"""`make build` makes a Bento that pins its model and serves it."""

from __future__ import annotations

from pathlib import Path

import bentoml
import httpx
import pytest
import yaml

from loadtests.servers import start_server, stop_server
from models.store import load_model, save_model
from tests.helpers import TINY_MODEL_NAME, fresh_tile

pytestmark = [pytest.mark.bento, pytest.mark.service]


def test_bento_pins_the_model_version_and_ships_serving_code_only(bento_tag, tiny_model_tag):
    bento_dir = Path(bentoml.bentos.get(bento_tag).path)
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["args"]["model_tag"] == tiny_model_tag
    assert [model["tag"] for model in info["services"][0]["models"]] == [tiny_model_tag]
    assert not tiny_model_tag.endswith(":latest")

    source = bento_dir / "src"
    shipped = {path.relative_to(source).as_posix() for path in source.rglob("*.py")}
    assert "service.py" in shipped and "models/preprocessing.py" in shipped
    assert not [path for path in shipped if path.startswith(("training/", "tests/", "loadtests/"))], shipped

    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text().lower()
    assert "tensorflow_cpu==" in requirements or "tensorflow-cpu==" in requirements
    for training_only in ("scikit-learn", "matplotlib", "scipy", "locust", "pytest"):
        assert training_only not in requirements, training_only
    envs = {env["name"]: env["value"] for env in info["envs"]}
    assert envs["CUDA_VISIBLE_DEVICES"] == ""


def test_built_bento_serves_its_pinned_model_even_when_a_newer_one_exists(
    bento_tag, tiny_model_tag, reference, tmp_path
):
    stored = load_model(tiny_model_tag)
    newer = save_model(stored.model, stored.card, name=TINY_MODEL_NAME)  # now `tiny_lung:latest`
    assert newer != tiny_model_tag
    server = start_server(bento_tag, tmp_path / "bento.log")
    try:
        tile = fresh_tile("lung_scc", 80)
        response = httpx.post(f"{server.url}/predict", files={"file": ("t.jpeg", tile, "image/jpeg")}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == tiny_model_tag
        assert response.json()["probabilities"] == pytest.approx(
            dict(zip(stored.card.class_names, reference.expect(tile)["probabilities"].tolist(), strict=True)), abs=1e-5
        )
        assert httpx.get(f"{server.url}/model", timeout=10).json()["class_names"] == stored.card.class_names
    finally:
        stop_server(server)
        bentoml.models.delete(newer)
