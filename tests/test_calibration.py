"""Temperature scaling, ECE, abstention thresholds and group bootstrap on constructed data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from training.abstention import cancer_classes, choose_threshold, selective_metrics
from training.bootstrap import bootstrap_intervals
from training.calibration import (
    calibrated_probabilities,
    choose_temperature,
    fit_temperature,
    negative_log_likelihood,
)
from training.evaluate import compute_metrics, expected_calibration_error

CLASSES = ["lung_aca", "lung_n", "lung_scc"]


def well_calibrated(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution (labels drawn from it)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(logits, axis=1)])
    return logits, labels


def test_temperature_scaling_undoes_known_over_confidence():
    logits, labels = well_calibrated(4000)
    over_confident = logits * 3.0  # the classic failure: logits too large
    before = expected_calibration_error(labels, calibrated_probabilities(over_confident, 1.0))
    temperature = fit_temperature(over_confident, labels)
    after = expected_calibration_error(labels, calibrated_probabilities(over_confident, temperature))
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert before > 0.1 and after < 0.03 and after < before / 4
    assert negative_log_likelihood(over_confident, labels, temperature) < negative_log_likelihood(
        over_confident, labels, 1.0
    )
    # Scaling never changes the predicted class.
    assert np.array_equal(calibrated_probabilities(over_confident, temperature).argmax(1), over_confident.argmax(1))


def test_under_confident_logits_get_a_temperature_below_one():
    logits, labels = well_calibrated(4000, seed=1)
    assert fit_temperature(logits / 2.0, labels) == pytest.approx(0.5, rel=0.1)


def test_a_temperature_is_applied_only_when_it_helps_held_out_folds():
    logits, labels = well_calibrated(600, seed=2)
    over = choose_temperature(logits * 3.0, labels)  # clearly over-confident: the gain survives cross-validation
    assert over.applied == over.fitted == pytest.approx(3.0, rel=0.2)
    assert over.cross_validated_nll < over.uncalibrated_nll
    # A few confidently wrong labels in an otherwise well-separated set: the fitted T chases them.
    separable = np.zeros((200, 3))
    truth = np.arange(200) % 3
    separable[np.arange(200), truth] = 6.0
    flipped = truth.copy()
    flipped[:3] = (truth[:3] + 1) % 3
    choice = choose_temperature(separable, flipped)
    assert choice.fitted > 1.0  # softening is all the whole split asks for ...
    # Three flipped labels among 200 are no evidence of miscalibration: the gain is within its noise.
    assert choice.gain < 2 * choice.gain_standard_error and choice.applied == 1.0
    for seed in range(3):  # the rule, whatever the fold assignment
        again = choose_temperature(separable, flipped, seed=seed)
        clear = again.gain > 2 * again.gain_standard_error
        assert again.applied == (again.fitted if clear else 1.0)


def test_separable_validation_keeps_the_networks_own_probabilities():
    logits = np.array([[4.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.5, 2.0]])
    assert fit_temperature(logits, np.array([0, 1, 2])) == 1.0  # NLL would fall forever as T -> 0


def test_cancer_classes_by_name_or_given():
    assert cancer_classes(CLASSES) == ["lung_aca", "lung_scc"]
    assert cancer_classes(["glioma", "meningioma", "notumor", "pituitary"]) == ["glioma", "meningioma", "pituitary"]
    assert cancer_classes(CLASSES, ["lung_scc"]) == ["lung_aca", "lung_n"]
    with pytest.raises(ValueError, match="not among"):
        cancer_classes(CLASSES, ["colon_n"])


def test_selective_fnr_by_hand():
    labels = np.array([0, 0, 0, 0, 2, 2])
    probabilities = np.array(
        [
            [0.90, 0.05, 0.05],  # aca right, confident
            [0.30, 0.60, 0.10],  # aca missed at 0.60
            [0.45, 0.40, 0.15],  # aca right, unsure
            [0.20, 0.75, 0.05],  # aca missed at 0.75
            [0.10, 0.10, 0.80],  # scc right
            [0.05, 0.85, 0.10],  # scc missed at 0.85
        ]
    )
    at_half = selective_metrics(labels, probabilities, 0.5, CLASSES, ["lung_aca", "lung_scc"])
    assert at_half.coverage == pytest.approx(5 / 6)
    assert at_half.false_negative_rate == {"lung_aca": pytest.approx(2 / 3), "lung_scc": pytest.approx(1 / 2)}
    choice = choose_threshold(labels, probabilities, CLASSES, ["lung_aca", "lung_scc"], fnr_target=0.0)
    # Every threshold up to 0.85 answers a confidently missed scc; at 0.90 one right answer remains.
    assert choice.target_met and choice.threshold == pytest.approx(0.90)
    assert choice.validation.coverage == pytest.approx(1 / 6)
    # A looser target lets the lowest threshold that meets it answer more.
    loose = choose_threshold(labels, probabilities, CLASSES, ["lung_aca", "lung_scc"], fnr_target=0.5)
    # At 0.75: aca answered twice (one miss), scc twice (one miss); at 0.60 aca misses 2 of 3.
    assert loose.target_met and loose.threshold == pytest.approx(0.75)
    assert loose.validation.coverage == pytest.approx(4 / 6)


def test_unreachable_target_is_reported():
    labels = np.array([0, 0])
    probabilities = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0]])  # every aca missed, confidently
    choice = choose_threshold(labels, probabilities, CLASSES, ["lung_aca"], fnr_target=0.05)
    assert not choice.target_met


def grouped_predictions(n_groups: int, copies: int, accuracy: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), copies)
    labels = np.repeat(rng.integers(0, 3, n_groups), copies)
    right = np.repeat(rng.random(n_groups) < accuracy, copies)  # copies share their fate, as near-duplicates do
    predicted = np.where(right, labels, (labels + 1) % 3)
    return labels, np.eye(3)[predicted] * 0.8 + 0.2 / 3, groups


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_data():
    labels, probabilities, groups = grouped_predictions(60, 1, 0.8)
    small = bootstrap_intervals(labels, probabilities, groups, CLASSES, resamples=1000)
    point = compute_metrics(labels, probabilities, CLASSES)
    assert small.accuracy.estimate == pytest.approx(point.accuracy)
    assert small.macro_f1.estimate == pytest.approx(point.macro_f1)
    for interval in (small.accuracy, small.macro_f1, *small.recall.values()):
        assert interval.low <= interval.estimate <= interval.high and interval.width > 0
    labels, probabilities, groups = grouped_predictions(1500, 1, 0.8)
    large = bootstrap_intervals(labels, probabilities, groups, CLASSES, resamples=1000)
    assert large.accuracy.width < small.accuracy.width / 3  # ~1/sqrt(25) of the width


def test_resampling_groups_is_wider_than_pretending_copies_are_independent():
    labels, probabilities, groups = grouped_predictions(40, 10, 0.8)
    by_group = bootstrap_intervals(labels, probabilities, groups, CLASSES, resamples=1000)
    by_image = bootstrap_intervals(labels, probabilities, np.arange(len(labels)), CLASSES, resamples=1000)
    assert by_group.accuracy.width > 2 * by_image.accuracy.width
