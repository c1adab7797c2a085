"""`make build` makes a Bento that pins its model and serves it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import bentoml
import httpx
import pytest
import yaml

from loadtests.servers import REPO_ROOT, start_server, stop_server
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


def test_building_again_without_changes_reuses_the_bento_and_a_change_builds_a_new_one(bento_tag, tmp_path):
    from deploy.bento_build import source_digest

    again = subprocess.run(["make", "-s", "build", f"MODEL_NAME={TINY_MODEL_NAME}"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300, check=True)
    assert again.stdout.strip().splitlines()[-1] == bento_tag
    assert "nothing changed" in again.stdout
    digests = [bento.info.labels.get("source_digest") for bento in bentoml.list("histopathology")]
    assert len(digests) == len(set(digests))  # never two Bentos of the same sources and model
    # Any change to what the Bento ships, or another model, is another digest (so another Bento).
    model_tag = bentoml.bentos.get(bento_tag).info.args["model_tag"]
    assert source_digest(model_tag) != source_digest(model_tag + "x")
    copy = tmp_path / "repo"
    shutil.copytree(REPO_ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "data", "artifacts", "build",
                                                                  "__pycache__", ".*cache"))
    assert source_digest(model_tag, copy) == source_digest(model_tag)
    (copy / "config" / "settings.py").write_text((copy / "config" / "settings.py").read_text() + "\n")
    assert source_digest(model_tag, copy) != source_digest(model_tag)


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
