"""The classifier every path answers through (models.prediction.TileClassifier), its thresholds and the
rescaling it reports, on a real (untrained) CNN with a gate and a score fitted for real: each answer must be
the answer rule applied to the model, the gate, the score and the magnification estimate, composed by hand.
The service tests cannot show this: the server and their reference share TileClassifier."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from models.architectures import OOD_FEATURE_LAYERS, build_model
from models.inference import Predictor
from models.magnification import MagnificationCheck
from models.ood import FeatureScorer
from models.prediction import LOW_CONFIDENCE, OUT_OF_DISTRIBUTION, Rescaling, Thresholds, TileClassifier, answer
from models.quality import assess_batch
from models.store import StoredModel
from tests.test_models import CLASSES, SIZE, make_card, trust_parts

TAG = "unit:1"
NUMBERS = ("probabilities", "confidence", "ood_score", "magnification")  # compared to rounding, the rest exactly


@pytest.fixture(scope="module")
def stored() -> StoredModel:
    keras.utils.set_random_seed(0)  # the CNN the gate and the score were fitted on (tests.test_models)
    model = build_model("cnn", len(CLASSES), SIZE)
    base = make_card()
    dims = sum(base.out_of_distribution.feature_dims)
    weights = np.random.default_rng(1).normal(0, 0.05, dims).round(4).tolist()
    check = MagnificationCheck(weights=weights, intercept=0.1, low=0.9, high=1.1, validation_acceptance=0.95,
                               validation_error=0.2)
    card = make_card(magnification=check)
    scorer = FeatureScorer.load(trust_parts()[2], card.out_of_distribution.parameters_sha256)
    return StoredModel(TAG, model, card, trust_parts()[2].parent, scorer)


def _images(count: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


def test_the_answers_are_the_rule_applied_to_model_gate_score_and_magnification(stored):
    classifier = TileClassifier(stored)
    card = stored.card
    assert classifier.thresholds == Thresholds(card.abstain_threshold, card.out_of_distribution.threshold,
                                               (card.magnification.low, card.magnification.high))
    assert classifier.input_size == SIZE and classifier.class_names == CLASSES
    images = _images(5)
    outputs = Predictor(stored.model, SIZE, card.calibration_temperature,
                        OOD_FEATURE_LAYERS["cnn"]).outputs(images)
    evidence = classifier.evidence(images)
    assert len(evidence) == 5
    np.testing.assert_allclose([e.probabilities for e in evidence], outputs.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([e.ood_score for e in evidence], stored.ood_scorer(outputs.features), rtol=1e-5)
    assert [e.quality for e in evidence] == assess_batch(images, card.quality_gate)
    np.testing.assert_allclose([e.magnification for e in evidence], card.magnification.estimate(outputs.features),
                               rtol=1e-5)
    # Batches of 2 over 5 images: every image answered once, in order, as the rule answers its evidence.
    expected = [answer(e, CLASSES, classifier.thresholds, TAG).model_dump() for e in evidence]
    answers = [p.model_dump() for p in classifier.classify(images, batch_size=2)]
    assert len(answers) == 5
    for got, want in zip(answers, expected, strict=True):
        assert got["probabilities"] == pytest.approx(want["probabilities"], rel=1e-5, abs=1e-6)
        assert {k: v for k, v in got.items() if k not in NUMBERS} == {k: v for k, v in want.items() if k not in NUMBERS}
        assert got["ood_score"] == pytest.approx(want["ood_score"], abs=2e-4)
        assert got["model"] == TAG and got["magnification"] == pytest.approx(want["magnification"], rel=1e-4)


def test_the_operators_thresholds_change_the_answers(stored):
    images = _images(3)
    strict = TileClassifier(stored, Thresholds(abstain=1.0, out_of_distribution=1e-6, magnification=(50.0, 60.0)))
    for prediction in strict.classify(images):
        assert prediction.reasons[:2] == [LOW_CONFIDENCE, OUT_OF_DISTRIBUTION] and "magnification" in prediction.reasons
        assert prediction.uncertain and prediction.out_of_distribution is True
    lenient = TileClassifier(stored, Thresholds(abstain=0.0, out_of_distribution=1e9))
    for prediction in lenient.classify(images):
        assert LOW_CONFIDENCE not in prediction.reasons and OUT_OF_DISTRIBUTION not in prediction.reasons
        assert "magnification" not in prediction.reasons  # no limits: no check


def test_a_card_without_a_magnification_check_estimates_none(stored):
    unchecked = StoredModel(TAG, stored.model, make_card(), stored.path, stored.ood_scorer)
    assert unchecked.card.magnification is None
    classifier = TileClassifier(unchecked)
    images = _images(3)
    evidence = classifier.evidence(images)
    assert len(evidence) == 3 and all(math.isnan(e.magnification) for e in evidence)
    assert all(e.quality is not None and not math.isnan(e.ood_score) for e in evidence)  # the rest still checked
    for prediction in classifier.classify(images):
        assert prediction.magnification is None and "magnification" not in prediction.reasons
        assert prediction.ood_score is not None


def test_without_trust_checks_only_the_model_answers(stored):
    plain = TileClassifier(stored, trust_checks=False)
    images = _images(3)
    assert plain.predictor.outputs(images).features.shape == (3, 0)  # no feature layer tapped
    evidence = plain.evidence(images)
    assert all(math.isnan(e.ood_score) and e.quality is None and math.isnan(e.magnification) for e in evidence)
    reference = Predictor(stored.model, SIZE, stored.card.calibration_temperature, ()).outputs(images)
    np.testing.assert_allclose([e.probabilities for e in evidence], reference.probabilities, rtol=1e-5, atol=1e-6)
    for prediction in plain.classify(images):
        assert prediction.out_of_distribution is None and prediction.quality is None
        assert prediction.magnification is None


def test_thresholds_are_the_cards_unless_the_operator_sets_one():
    card = make_card()
    assert Thresholds.resolve(card) == Thresholds(card.abstain_threshold, card.out_of_distribution.threshold, None)
    assert Thresholds.resolve(card, abstain=0.3) == Thresholds(0.3, card.out_of_distribution.threshold, None)
    assert Thresholds.resolve(card, out_of_distribution=7.5) == Thresholds(card.abstain_threshold, 7.5, None)
    assert Thresholds.resolve(card, 0.0, 0.5) == Thresholds(0.0, 0.5, None)  # 0 is a value, not "unset"


def test_the_rescaling_reported_follows_the_cards_pixel_size():
    card = make_card()
    declared = card.model_copy(update={"dataset": card.dataset.model_copy(
        update={"microns_per_pixel": 0.5, "tile_size": 768})})
    assert Rescaling.of(declared, 0.25) == Rescaling(mpp=0.25, model_mpp=0.5, rescaled=True, scale=0.5)
    assert Rescaling.of(declared, 0.5123456).scale == 1.0247
    assert Rescaling.of(card, 0.25) == Rescaling(mpp=0.25, model_mpp=None, rescaled=False, scale=None)
    no_size = card.model_copy(update={"dataset": card.dataset.model_copy(update={"microns_per_pixel": 0.5})})
    assert Rescaling.of(no_size, 0.25) == Rescaling(mpp=0.25, model_mpp=0.5, rescaled=False, scale=None)
