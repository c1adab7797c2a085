"""Architectures, the traced predictor, the model card and the model store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from pydantic import ValidationError

from models.architectures import LOGITS_LAYER, OOD_FEATURE_LAYERS, apply_phase, build_model, fine_tune_schedule
from models.card import CARD_FILE, ModelCard
from models.explain import GradCam
from models.inference import Predictor, probability_function
from models.ood import OOD_FILE, OutOfDistribution
from models.quality import QualityGate
from models.store import ModelLoadError, load_model, save_model
from tests.helpers import rendered_tile
from training.evaluate import compute_metrics
from training.trust import fit_ood, fit_quality_gate

CLASSES = ["lung_aca", "lung_n", "lung_scc"]
SIZE = 48


@cache
def trust_parts() -> tuple[QualityGate, OutOfDistribution, Path]:
    """A quality gate and OOD scorer fitted (for real) on synthetic tiles and a fixed random CNN."""
    keras.utils.set_random_seed(0)
    model = build_model("cnn", len(CLASSES), SIZE)
    images = np.stack([np.asarray(rendered_tile(CLASSES[i % 3], 96, i).resize((SIZE, SIZE))) for i in range(24)])
    labels = np.arange(24) % 3
    predictor = Predictor(model, SIZE, 1.0, OOD_FEATURE_LAYERS["cnn"])
    features = predictor.outputs(images).features
    sizes = {name: model.get_layer(name).output.shape[-1] for name in OOD_FEATURE_LAYERS["cnn"]}
    folder = Path(tempfile.mkdtemp(prefix="trust-"))
    gate = fit_quality_gate(images[:12], images[12:])
    _, ood = fit_ood((features[:12], labels[:12]), features[12:], features[12:], sizes, 3, folder)
    return gate, ood, folder / OOD_FILE


def save_with_trust(model: keras.Model, card: ModelCard, name: str) -> str:
    """save_model with the OOD parameters the card names."""
    return save_model(model, card, name=name, extra_files={OOD_FILE: trust_parts()[2]})


def make_card(classes: list[str] = CLASSES, **overrides: object) -> ModelCard:
    rng = np.random.default_rng(0)
    y = np.arange(12) % len(classes)
    probs = rng.dirichlet(np.ones(len(classes)), size=12)
    gate, ood, _ = trust_parts()
    fields = dict(
        quality_gate=gate,
        out_of_distribution=ood,
        task="test",
        class_names=classes,
        input_size=SIZE,
        architecture="cnn",
        parameter_count=1000,
        training=dict(
            epochs_max=1,
            epochs_trained=1,
            batch_size=4,
            learning_rate=0.01,
            seed=0,
            augmentation=[],
            early_stopping_monitor="val_loss",
            train_seconds=1.0,
        ),
        dataset=dict(
            source="unit",
            fingerprint="0" * 64,
            class_counts={c: 4 for c in classes},
            n_images=12,
            split_policy="none",
            split_seed=0,
            split_sizes={"train": 4, "validation": 4, "test": 4},
        ),
        metrics=compute_metrics(y, probs, classes),
        calibration=dict(
            temperature=1.3, validation_errors=2, test_ece_before=0.1, test_ece_after=0.05,
            test_nll_before=0.5, test_nll_after=0.4,
        ),
        abstention=dict(
            threshold=0.6, fnr_target=0.05, cancer_classes=classes[:1], target_met_on_validation=True,
            validation_coverage=0.9, validation_false_negative_rate={classes[0]: 0.0}, test_coverage=0.8,
            test_false_negative_rate={classes[0]: 0.1},
        ),
        framework_versions={"keras": keras.__version__},
        created_at=datetime.now(UTC),
    )
    fields.update(overrides)
    return ModelCard.model_validate(fields)


@pytest.fixture(scope="module")
def cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_model("cnn", len(CLASSES), SIZE)


def test_cnn_takes_any_image_size_and_outputs_probabilities(cnn):
    for side in (SIZE, 97):
        out = cnn(np.random.default_rng(0).integers(0, 255, (2, side, side, 3)).astype("float32"))
        assert out.shape == (2, 3)
        assert np.allclose(np.sum(out, axis=1), 1.0, atol=1e-5)
    assert cnn.get_layer(LOGITS_LAYER).output.shape[-1] == 3


def test_efficientnet_builds_offline_and_phases_unfreeze_progressively():
    model = build_model("efficientnetb0", 4, 64, weights=None)
    assert model.outputs[0].shape[-1] == 4
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    # Random init (offline): everything trains, BatchNorm included; phases are for pretrained weights.
    assert backbone.trainable and all(layer.trainable for layer in backbone.layers)
    # Grad-CAM reaches into the nested backbone's last activation (2x2 at 64 px).
    heat = GradCam(model, "efficientnetb0", 64).heat_map(np.full((64, 64, 3), 128, np.uint8), 1)
    assert heat.shape == (2, 2) and heat.min() >= 0 and heat.max() <= 1
    counts = []
    for phase in fine_tune_schedule(1e-3):
        apply_phase(model, phase)
        counts.append(len(backbone.trainable_weights))
    assert counts[0] == 0 < counts[1] < counts[2]
    rates = [p.learning_rate for p in fine_tune_schedule(1e-3)]
    assert rates == sorted(rates, reverse=True)
    # BatchNorm stays frozen even when everything else trains.
    assert all(not layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))


def test_predictor_matches_keras_and_applies_temperature(cnn):
    images = np.random.default_rng(1).integers(0, 255, (5, SIZE, SIZE, 3), dtype=np.uint8)
    expected = cnn.predict(images.astype("float32"), verbose=0)
    assert np.allclose(Predictor(cnn, SIZE)(images), expected, atol=1e-5)
    # The card's temperature divides the logits before the softmax: computed here from the logits alone.
    logits = keras.Model(cnn.inputs, cnn.get_layer(LOGITS_LAYER).output).predict(images.astype("float32"), verbose=0)
    for temperature in (0.25, 1.7):
        scaled = logits / temperature
        softmax = np.exp(scaled - scaled.max(1, keepdims=True))
        softmax /= softmax.sum(1, keepdims=True)
        assert not np.allclose(softmax, expected, atol=1e-3)  # the temperature changes these images' answers
        calibrated = Predictor(cnn, SIZE, temperature=temperature, feature_layers=OOD_FEATURE_LAYERS["cnn"])
        np.testing.assert_allclose(calibrated(images), softmax, atol=1e-5)
        np.testing.assert_allclose(calibrated.outputs(images).probabilities, softmax, atol=1e-5)
        np.testing.assert_allclose(probability_function(cnn, SIZE, temperature)(images).numpy(), softmax, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        Predictor(cnn, SIZE)(images.astype("float32"))
    # Evaluation in batches gives the rows of one pass, in order, features included.
    tapped = Predictor(cnn, SIZE, 1.7, OOD_FEATURE_LAYERS["cnn"])
    whole = tapped.outputs(images)
    for batch_size in (2, 5, 64):
        batched = tapped.outputs_in_batches(images, batch_size=batch_size)
        np.testing.assert_allclose(batched.probabilities, whole.probabilities, atol=1e-6)
        np.testing.assert_allclose(batched.features, whole.features, rtol=1e-5, atol=1e-5)
    assert whole.features.shape == (5, sum(cnn.get_layer(n).output.shape[-1] for n in OOD_FEATURE_LAYERS["cnn"]))
    assert Predictor(cnn, SIZE).outputs(images).features.shape == (5, 0)  # no layer tapped: no features
    for wrong in (images[0], images[:, :-1], np.repeat(images[..., :1], 4, axis=3)):
        with pytest.raises(ValueError, match=f"expected uint8 images of shape \\(batch, {SIZE}, {SIZE}, 3\\)"):
            tapped.outputs(wrong)
    with pytest.raises(ValueError, match=r"^temperature must be positive$"):
        Predictor(cnn, SIZE, temperature=0.0)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"^temperature must be positive$"):
            probability_function(cnn, SIZE, temperature=temperature)
    # The graph other runtimes are converted from: uint8 images in (they are fed the decoder's bytes), and
    # without a temperature the model's own softmax.
    plain = probability_function(cnn, SIZE)
    assert [(spec.dtype, spec.shape.as_list()) for spec in plain.input_signature] == [(tf.uint8, [None, SIZE, SIZE, 3])]
    np.testing.assert_allclose(plain(images).numpy(), expected, atol=1e-5)
    tapped.warm_up([1, 3])  # every batch size the batcher can form runs once, as the service does at start


def test_feature_maps_are_averaged_over_space_and_flat_layers_tapped_as_they_are(cnn):
    images = np.random.default_rng().integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    features = Predictor(cnn, SIZE, 1.0, ("block4_relu", "gap")).outputs(images).features
    as_float = images.astype("float32")
    block = keras.Model(cnn.inputs, cnn.get_layer("block4_relu").output).predict(as_float, verbose=0)
    flat = keras.Model(cnn.inputs, cnn.get_layer("gap").output).predict(as_float, verbose=0)
    assert block.ndim == 4 and flat.ndim == 2
    np.testing.assert_allclose(features, np.concatenate([block.mean(axis=(1, 2)), flat], axis=1), rtol=1e-4, atol=1e-5)


def test_thread_pools_are_set_as_asked():
    # In a fresh process: TensorFlow takes pool sizes only before its first operation.
    script = ("import tensorflow as tf; from models.inference import configure_threads; configure_threads(3, 2); "
              "print(tf.config.threading.get_intra_op_parallelism_threads(), "
              "tf.config.threading.get_inter_op_parallelism_threads())")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["3", "2"]


def test_card_validation_rejects_inconsistent_cards():
    assert make_card().class_names == CLASSES
    with pytest.raises(ValidationError, match="unique"):
        make_card(class_names=["a", "a", "b"])
    with pytest.raises(ValidationError, match="per_class"):
        make_card(class_names=["x", "y", "z"])
    good = make_card().model_dump()
    good["metrics"]["confusion_matrix"] = [[1, 2], [3, 4]]
    with pytest.raises(ValidationError, match="confusion_matrix"):
        ModelCard.model_validate(good)
    with pytest.raises(ValidationError, match="threshold"):
        make_card(abstention={**good["abstention"], "threshold": 1.5})
    with pytest.raises(ValidationError, match="cancer_classes"):
        make_card(abstention={**good["abstention"], "cancer_classes": ["colon_aca"]})
    with pytest.raises(ValidationError):
        ModelCard.model_validate({**make_card().model_dump(), "surprise": 1})
    # A card from before the gate existed asks for retraining, rather than listing missing fields.
    old = {k: v for k, v in make_card().model_dump().items() if k not in ("quality_gate", "out_of_distribution")}
    with pytest.raises(ValidationError, match="must be retrained"):
        ModelCard.model_validate({**old, "schema_version": 1})


def test_a_version_2_card_is_migrated_and_its_copies_must_agree():
    card = make_card()
    assert card.calibration_temperature == 1.3 and card.abstain_threshold == 0.6  # one value each, read through
    stored = card.model_dump(mode="json")
    assert "calibration_temperature" not in stored and "abstain_threshold" not in stored
    version_2 = {**stored, "schema_version": 2, "calibration_temperature": 1.3, "abstain_threshold": 0.6}
    assert ModelCard.model_validate(version_2) == card
    with pytest.raises(ValidationError, match="differs from calibration_temperature"):
        ModelCard.model_validate({**version_2, "calibration_temperature": 1.0})
    with pytest.raises(ValidationError, match="differs from abstain_threshold"):
        ModelCard.model_validate({**version_2, "abstain_threshold": 0.9})


def test_store_round_trip_gives_identical_predictions(cnn):
    tag = save_with_trust(cnn, make_card(), name="unit_roundtrip")
    loaded = load_model(tag)
    assert loaded.tag == tag
    assert loaded.card == make_card().model_copy(update={"created_at": loaded.card.created_at})
    images = np.random.default_rng(2).integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
    assert np.array_equal(Predictor(cnn, SIZE)(images), Predictor(loaded.model, SIZE)(images))
    import bentoml

    entry = bentoml.models.get(tag)
    assert entry.info.labels["classes"] == ",".join(CLASSES)
    assert entry.info.metadata["class_names"] == CLASSES


def test_store_refuses_bad_or_mismatched_cards(cnn):
    with pytest.raises(ModelLoadError, match="outputs"):
        save_model(cnn, make_card(classes=["a", "b", "c", "d"]), name="unit_mismatch")
    tag = save_with_trust(cnn, make_card(), name="unit_tamper")
    folder = load_model(tag).path
    ood_path = folder / OOD_FILE
    original = ood_path.read_bytes()
    ood_path.write_bytes(original[:-8] + bytes(8))  # tampered parameters: the card's hash no longer matches
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(tag)
    ood_path.unlink()
    with pytest.raises(ModelLoadError, match="out-of-distribution scorer"):
        load_model(tag)
    ood_path.write_bytes(original)
    card_path = folder / CARD_FILE
    card = json.loads(card_path.read_text())
    card["class_names"] = ["lung_aca", "lung_n"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="invalid"):
        load_model(tag)
    card_path.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(tag)
    with pytest.raises(ModelLoadError, match="not in the BentoML model store"):
        load_model("no_such_model:latest")


def _prefer_onednn_in_a_fresh_process(preset: str | None, import_tensorflow_first: bool) -> list[str]:
    script = (
        ("import tensorflow\n" if import_tensorflow_first else "")
        + "import logging, os\nlogging.basicConfig(level=logging.WARNING)\n"
        + "from models.tf_environment import prefer_onednn\n"
        + "print(prefer_onednn(), os.environ['TF_ENABLE_ONEDNN_OPTS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if preset is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = preset
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=True)
    return [done.stdout.strip(), done.stderr]


def test_onednn_kernels_are_asked_for_unless_the_environment_already_chose():
    assert _prefer_onednn_in_a_fresh_process(None, False) == ["True 1", ""]
    assert _prefer_onednn_in_a_fresh_process("0", False)[0] == "False 0"  # the operator's choice stands
    _, stderr = _prefer_onednn_in_a_fresh_process(None, True)
    assert "too late" in stderr
