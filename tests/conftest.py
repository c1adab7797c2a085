"""Shared fixtures: a temporary BentoML home, tiny datasets, image factories."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from loadtests.servers import REPO_ROOT, RunningServer, start_server, stop_server
from tests.helpers import (
    STRICT_ORIGIN,
    STRICT_TOKEN,
    TINY_MODEL_EPOCHS,
    TINY_MODEL_NAME,
    TINY_TILE,
    encode,
    gradient_image,
    serve_tiny_model,
)

if TYPE_CHECKING:  # TensorFlow loads only in tests that use the model
    from models.inference import Predictor
    from models.store import StoredModel

# The tiny model's training seed. Every test passes whatever its value: service tests compare the
# server with the same model in-process, and accuracy bounds hold over a measured spread of seeds.
TEST_MODEL_SEED = int(os.environ.get("TEST_MODEL_SEED", "1"))


def pytest_configure(config: pytest.Config) -> None:
    # Before anything imports bentoml: never touch the developer's real store.
    os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentoml-home-test-")
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Mark every test that needs the tiny model (a server, the in-process reference): `-m "not tiny_model"`
    # leaves the fast groups, which is what `make mutation` runs once per mutant.
    for item in items:
        if "tiny_model_tag" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.tiny_model)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic LC25000-layout dataset (60 tiles per class) from four sites, without the default
    ambiguity and label noise: 80 training tiles at 64 px learn little from those (measured: 33-76% test
    accuracy over seeds 1-6), and the tests here check the pipeline, not the data's difficulty
    (tests/test_synthetic.py checks that; `make model` measures it)."""
    from dataclasses import replace

    from synthetic.tiles import generate_dataset
    from synthetic.variation import EASY

    difficulty = replace(EASY, sites=4, site_shift=1.0)
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), per_class=60, size=TINY_TILE, seed=7,
                            difficulty=difficulty)


@pytest.fixture(scope="session")
def tiny_model_tag(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real (tiny: 64 px input, up to 30 epochs, ~20 s) model trained once into the test store,
    with the seed TEST_MODEL_SEED (training is deterministic: same seed, same model)."""
    from training.train import TrainSettings, train

    settings = TrainSettings(
        data=synthetic_root,
        input_size=64,
        epochs=TINY_MODEL_EPOCHS,
        patience=4,
        batch_size=16,
        seed=TEST_MODEL_SEED,
        name=TINY_MODEL_NAME,
        out=tmp_path_factory.mktemp("runs"),
        verbose=0,
    )
    return train(settings)


@dataclass(frozen=True)
class Reference:
    """The served model in this process: what the server must answer for given bytes."""

    stored: StoredModel
    predictor: Predictor

    def expect(self, data: bytes, mpp: float | None = None) -> dict[str, object]:
        """probabilities, ood_score, quality and estimated magnification the service should report for an
        upload (sent with `mpp`: resampled to the card's pixel size)."""
        from models.preprocessing import DecodeLimits, finish_decode, prepare_decode
        from models.quality import assess
        from models.resampling import ModelScale

        card = self.stored.card
        image = finish_decode(prepare_decode(data, card.input_size, DecodeLimits(), mpp,
                                             ModelScale.of(card).field_microns))
        outputs = self.predictor.outputs(image[None])
        magnification = card.magnification.estimate(outputs.features)[0] if card.magnification else None
        return {
            "probabilities": outputs.probabilities[0],
            "ood_score": float(self.stored.ood_scorer(outputs.features)[0]),
            "quality": assess(image, card.quality_gate),
            "magnification": magnification,
            "flagged_magnification": magnification is not None and card.magnification.flags(magnification),
        }

    def predicted_class(self, data: bytes) -> str:
        """The class the service must answer for an upload."""
        probabilities = self.expect(data)["probabilities"]
        return self.stored.card.class_names[int(np.argmax(probabilities))]


@pytest.fixture(scope="session")
def reference(tiny_model_tag: str) -> Reference:
    """The tiny model loaded in-process, with the served graph (features included)."""
    from models.inference import Predictor
    from models.store import load_model

    stored = load_model(tiny_model_tag)
    card = stored.card
    predictor = Predictor(
        stored.model, card.input_size, card.calibration_temperature, card.out_of_distribution.feature_layers
    )
    return Reference(stored, predictor)


@pytest.fixture(scope="session")
def server(tiny_model_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A real `bentoml serve service:Histopathology` serving the tiny model."""
    yield from serve_tiny_model(tiny_model_tag, tmp_path_factory, "server")


@pytest.fixture(scope="session")
def bento_tag(tiny_model_tag: str) -> str:
    """`make build` for the tiny model; its last line of output is the Bento tag."""
    result = subprocess.run(
        ["make", "-s", "build", f"MODEL_NAME={TINY_MODEL_NAME}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tag = result.stdout.strip().splitlines()[-1]
    assert tag.startswith("histopathology:"), result.stdout
    return tag


@pytest.fixture(scope="session")
def strict_server(tiny_model_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A second server: API token, a CORS origin, a 1 MB body cap, 2 requests in flight, JSON logs,
    and BentoML tracing configured (spans kept in memory)."""
    folder = tmp_path_factory.mktemp("strict")
    tracing_config = folder / "bentoml-tracing.yaml"
    tracing_config.write_text("tracing:\n  exporter_type: in_memory\n  sample_rate: 1.0\n")
    running = start_server(
        "service:Histopathology",
        folder / "serve.log",
        env={
            "BENTOML_CONFIG": str(tracing_config),
            "HISTO_MODEL_TAG": tiny_model_tag,
            "HISTO_API_TOKEN": STRICT_TOKEN,
            "HISTO_CORS_ORIGINS": STRICT_ORIGIN,
            "HISTO_MAX_BODY_BYTES": str(1_000_000),
            "HISTO_MAX_IN_FLIGHT": "2",
            "HISTO_LOG_FORMAT": "json",
        },
    )
    yield running
    stop_server(running)


@pytest.fixture
def tile_image() -> Image.Image:
    """An RGB tissue-like tile with no symmetry (so rotations are detectable)."""
    from synthetic.tissue import render_tile

    return render_tile("lung_aca", TINY_TILE, seed=3)


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    """Encode a gradient test image of the given mode and format."""

    def factory(mode: str = "RGB", fmt: str = "PNG", size: tuple[int, int] = (64, 48), **save_args: object) -> bytes:
        image = gradient_image(size)
        if mode != "RGB":
            image = image.convert(mode)
        return encode(image, fmt, **save_args)

    return factory
