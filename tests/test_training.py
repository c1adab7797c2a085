"""Data splitting and real (tiny) training runs into a temporary model store."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from PIL import Image

from models.architectures import build_model
from models.inference import logits_model
from models.preprocessing import decode_image
from models.store import (
    CONFUSION_PNG,
    RELIABILITY_PNG,
    REPORT_FILES,
    REPORT_MARKDOWN,
    RISK_COVERAGE_PNG,
    ROC_PNG,
    load_model,
)
from tests.helpers import TINY_MODEL_EPOCHS, temperature_text
from training import data
from training.abstention import selective_metrics
from training.calibration import calibrated_probabilities, negative_log_likelihood
from training.train import TrainSettings, train

# The tiny end-to-end run must reach this on its 21 test tiles, whatever TEST_MODEL_SEED is: measured
# 81-100% over seeds 1-8 (0.857, 0.905 x3, 0.952 x2, 1.0 and 0.81); chance is 33%. The bound leaves four
# tiles below the worst seed.
TINY_RUN_MIN_ACCURACY = 0.6


def test_split_is_stratified_disjoint_and_reproducible(synthetic_root, tmp_path):
    manifest = data.split_dataset(synthetic_root, seed=3)
    assert manifest.class_names == ["lung_aca", "lung_n", "lung_scc"]
    assert sum(manifest.sizes().values()) == 180
    for label, name in enumerate(manifest.class_names):  # every class in every split, in its share
        in_class = len(list((synthetic_root / name).glob("*.jpeg")))
        for split, share in (("test", 0.15), ("validation", 0.15), ("early_stopping", 0.1)):
            assert (manifest.labels(split) == label).sum() == round(in_class * share), (name, split)
    splits = {s: set(manifest.paths(s)) for s in data.SPLITS}
    for i, one in enumerate(data.SPLITS):  # disjoint
        for other in data.SPLITS[i + 1 :]:
            assert not splits[one] & splits[other], (one, other)
    assert data.split_dataset(synthetic_root, seed=3).examples == manifest.examples
    assert data.split_dataset(synthetic_root, seed=4).examples != manifest.examples
    manifest.save(tmp_path / "m.json")
    assert data.SplitManifest.load(tmp_path / "m.json", synthetic_root).examples == manifest.examples
    assert len(manifest.fingerprint()) == 64


def test_training_path_and_serving_path_give_the_same_array(synthetic_root):
    path = next((synthetic_root / "lung_scc").glob("*.jpeg"))
    from_training = data.load_images([path], 64)[0]
    from_upload = decode_image(path.read_bytes(), 64)  # what the service does with an upload
    assert np.array_equal(from_training, from_upload)


def _orientations(image: np.ndarray) -> list[np.ndarray]:
    """The eight flips and rotations of a square image (H, W, C)."""
    turned = [image, image.transpose(1, 0, 2)]
    return [view[::v, ::h] for view in turned for v in (1, -1) for h in (1, -1)]


def test_augmentation_preserves_content_and_range():
    count = 32
    images = np.random.default_rng(0).integers(0, 255, (count, 32, 32, 3), dtype=np.uint8)
    augmented, labels = data.augment(images, np.arange(count), seed=1)
    augmented = augmented.numpy()
    assert augmented.shape == (count, 32, 32, 3) and augmented.min() >= 0 and augmented.max() <= 255
    assert labels.tolist() == list(range(count))
    used = set()
    for source, result in zip(images.astype(np.float64), augmented.astype(np.float64), strict=True):
        # Each result is one of its source's eight orientations under mild colour jitter: it correlates
        # with exactly that one (noise images: the other seven are unrelated) and stays close to it.
        correlations = [np.corrcoef(view.ravel(), result.ravel())[0, 1] for view in _orientations(source)]
        best = int(np.argmax(correlations))
        assert correlations[best] > 0.9 and sorted(correlations)[-2] < 0.2, correlations
        assert np.abs(_orientations(source)[best] - result).mean() < 0.15 * 255
        used.add(best)
    assert len(used) >= 6  # every flip and the transpose happen (all eight are equally likely)


@pytest.mark.training
def test_overfits_one_batch():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 64, 64, 3)).astype("float32")
    labels = np.arange(16) % 3
    model = build_model("cnn", 3, 64)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    for _ in range(60):
        model.train_on_batch(images, labels)
    model.trainable = False  # evaluate in inference mode (BatchNorm moving statistics)
    accuracy = (model.predict(images, verbose=0).argmax(1) == labels).mean()
    assert accuracy == 1.0


@pytest.mark.training
def test_tiny_end_to_end_run_lands_in_the_store(tiny_model_tag):
    # tiny_model_tag (conftest) is a real run at 64 px, shared with the service tests.
    tag = tiny_model_tag
    stored = load_model(tag)
    card = stored.card
    assert card.class_names == ["lung_aca", "lung_n", "lung_scc"]
    assert card.input_size == 64 and card.architecture == "cnn"
    assert card.parameter_count == stored.model.count_params()
    assert card.metrics.accuracy >= TINY_RUN_MIN_ACCURACY, card.metrics
    # One site of four is held out whole by default (--holdout-site auto); the rest is split 60/10/15/15.
    assert sum(card.dataset.split_sizes.values()) == 180
    assert card.dataset.split_sizes["site_holdout"] == 45 and card.dataset.split_sizes["test"] in range(18, 24)
    assert 0 < card.training.epochs_trained <= TINY_MODEL_EPOCHS
    for name in (*REPORT_FILES, "split_manifest.json", "card.json"):
        assert (stored.path / name).is_file(), name
    report = json.loads((stored.path / "report.json").read_text())
    assert report["accuracy"] == card.metrics.accuracy


@pytest.mark.training
def test_tiny_run_is_calibrated_grouped_and_reported(tiny_model_tag, synthetic_root):
    stored = load_model(tiny_model_tag)
    card = stored.card
    # Split by near-duplicate group: the synthetic tiles are all distinct originals.
    assert card.dataset.n_groups == 180 and card.dataset.largest_group == 1
    # The held-out site is reported beside the sites trained on, from its own images only.
    shift = card.site_shift
    assert shift is not None and shift.held_out_sites == ["site3"] and shift.held_out.n_images == 45
    assert {m.site for m in shift.in_site_test} == {"site0", "site1", "site2"}
    assert sum(m.n_images for m in shift.in_site_test) == card.metrics.n_images
    assert shift.accuracy_drop == pytest.approx(card.metrics.accuracy - shift.held_out.accuracy)
    assert shift.held_out.accuracy_interval.low <= shift.held_out.accuracy <= shift.held_out.accuracy_interval.high
    assert card.dataset.groups_across_splits == 0 and "group" in card.dataset.split_policy
    # Calibration from the validation split travels in the card and is what the service applies.
    assert card.calibration is not None and card.calibration.temperature == card.calibration_temperature
    # The temperature minimises the validation NLL: no other temperature (1.0, i.e. none, included) does better.
    manifest = data.SplitManifest.load(stored.path / "split_manifest.json", synthetic_root)
    logits = logits_model(stored.model).predict(
        data.load_images(manifest.paths("validation"), card.input_size), verbose=0
    )
    labels = manifest.labels("validation")
    assert card.calibration.validation_errors == int((logits.argmax(1) != labels).sum())
    cal = card.calibration
    if cal.validation_errors == 0:  # no optimum exists (T -> 0): the network's own T = 1 is kept
        assert card.calibration_temperature == 1.0
    else:
        fitted = negative_log_likelihood(logits, labels, cal.fitted_temperature)
        for other in (1.0, cal.fitted_temperature * 1.25, cal.fitted_temperature / 1.25):
            assert fitted <= negative_log_likelihood(logits, labels, other) + 1e-6, other
        # Applied only when cross-validation on the split shows a clear gain (two standard errors).
        clear = cal.uncalibrated_nll - cal.cross_validated_nll > 2 * cal.gain_standard_error
        assert card.calibration_temperature == (cal.fitted_temperature if clear else 1.0)
        assert cal.uncalibrated_nll == pytest.approx(negative_log_likelihood(logits, labels, 1.0), abs=1e-6)
    # Abstention from the validation split; its threshold is the card's, and the record says whether the
    # target was met, truthfully.
    abstention = card.abstention
    assert abstention is not None and abstention.threshold == card.abstain_threshold >= 0.5
    assert abstention.cancer_classes == ["lung_aca", "lung_scc"]
    worst_fnr = max(abstention.validation_false_negative_rate.values())
    assert abstention.target_met_on_validation == (worst_fnr <= abstention.fnr_target)
    on_validation = selective_metrics(
        labels, calibrated_probabilities(logits, card.calibration_temperature), abstention.threshold,
        card.class_names, abstention.cancer_classes,
    )
    assert on_validation.coverage == pytest.approx(abstention.validation_coverage, abs=1e-6)
    assert on_validation.worst_fnr() == pytest.approx(worst_fnr, abs=1e-6)
    # The risk-coverage curve falls from every tile answered to none, on the test split.
    curve = abstention.risk_coverage
    assert curve[0].coverage == 1.0 and curve[-1].coverage <= 1 / card.metrics.n_images
    assert curve[0].error_rate == pytest.approx(1 - card.metrics.accuracy)
    assert [p.coverage for p in curve] == sorted((p.coverage for p in curve), reverse=True)
    # Bootstrap intervals around the test metrics.
    intervals = card.metrics.confidence_intervals
    assert intervals is not None and intervals.accuracy.estimate == pytest.approx(card.metrics.accuracy)
    assert intervals.accuracy.low <= card.metrics.accuracy <= intervals.accuracy.high
    assert set(intervals.recall) == set(card.class_names)
    # The Markdown report is the card's numbers, with its figures beside it.
    markdown = (stored.path / REPORT_MARKDOWN).read_text()
    assert temperature_text(card) in markdown
    assert f"{card.abstain_threshold:.3f}" in markdown and "Not for diagnosis" in markdown
    assert "## Site shift" in markdown and "## Calibration" in markdown
    for figure in (CONFUSION_PNG, ROC_PNG, RELIABILITY_PNG, RISK_COVERAGE_PNG):
        assert f"({figure})" in markdown
        assert (stored.path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.training
def test_tiny_run_declares_its_pixel_size_and_flags_other_magnifications(tiny_model_tag, synthetic_root):
    from models.prediction import TileClassifier
    from models.store import MAGNIFICATION_PNG
    from training.magnification import evaluate
    from training.trust import MAGNIFICATION_FIT_SIDE, magnified_features

    stored = load_model(tiny_model_tag)
    card = stored.card
    # The generator's 256 px tiles show what its 768 px tiles show at 0.5 um: dataset.json says 1.5.
    assert card.dataset.microns_per_pixel == pytest.approx(1.5)
    assert card.dataset.microns_per_pixel_from == "dataset.json"
    check = card.magnification
    assert check is not None and check.low < 1 < check.high
    assert len(check.weights) == sum(card.out_of_distribution.feature_dims)
    manifest = data.SplitManifest.load(stored.path / "split_manifest.json", synthetic_root)
    paths, labels = manifest.paths("test"), manifest.labels("test")
    classifier = TileClassifier(stored)
    # The estimate follows the magnification the test tiles are shown at.
    features_at = magnified_features(classifier.predictor, paths, labels)
    medians = [float(np.median(check.estimate(features_at(np.full(len(paths), factor))))) for factor in (0.5, 1, 2)]
    assert medians[0] < medians[1] < medians[2], medians
    # The report's table is what the answer rule gives on the test split, again.
    def load():
        side = MAGNIFICATION_FIT_SIDE * card.input_size
        return [Image.fromarray(a) for a in data.load_images(paths, side)], labels

    assert evaluate(classifier, load, seed=card.training.seed) == check.evaluation
    assert {(row.factor, row.with_mpp) for row in check.evaluation} == {
        (round(f, 4), m) for f in (0.5, 2**-0.5, 1.0, 2**0.5, 2.0) for m in (False, True)}
    markdown = (stored.path / REPORT_MARKDOWN).read_text()
    assert "## Magnification" in markdown and f"({MAGNIFICATION_PNG})" in markdown
    assert (stored.path / MAGNIFICATION_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _four_class_folder(root):
    """A brain-MRI-like layout: four classes that differ by simple shapes (PNG)."""
    rng = np.random.default_rng(0)
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    yy, xx = np.mgrid[0:48, 0:48]
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(40):
            base = rng.normal(90, 12, (48, 48))
            cx, cy = rng.uniform(14, 34, 2)
            blob = np.hypot(xx - cx, yy - cy) < 9
            if k == 0:
                base[blob] += 110  # bright mass
            elif k == 1:
                base[np.abs(np.hypot(xx - cx, yy - cy) - 9) < 2] += 120  # ring
            elif k == 3:
                base[::4] += 80  # stripes
            Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "L").save(root / name / f"{i}.png")
    return classes


@pytest.mark.training
def test_any_class_folder_dataset_trains(tmp_path):
    classes = _four_class_folder(tmp_path / "brain")
    settings = TrainSettings(
        data=tmp_path / "brain",
        input_size=48,
        epochs=15,
        patience=6,
        batch_size=16,
        learning_rate=3e-3,
        name="tiny_brain",
        task="brain MRI",
        out=tmp_path / "runs",
        verbose=0,
    )
    stored = load_model(train(settings))
    assert stored.card.class_names == classes
    assert stored.model.outputs[0].shape[-1] == 4
    assert stored.card.metrics.accuracy > 0.5  # well above the 0.25 of chance
