"""Evaluation metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import (
    binary_roc_auc,
    compute_metrics,
    confusion_matrix,
    expected_calibration_error,
    roc_curve,
)
from training.report import text_report

CLASSES = ["lung_aca", "lung_n", "lung_scc"]
# 6 images: true labels and predicted probabilities.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # aca -> aca
        [0.4, 0.5, 0.1],  # aca -> n   (a false negative for aca)
        [0.2, 0.1, 0.7],  # aca -> scc (a false negative for aca)
        [0.1, 0.8, 0.1],  # n -> n
        [0.3, 0.6, 0.1],  # n -> n
        [0.1, 0.1, 0.8],  # scc -> scc
    ]
)


def test_confusion_matrix_by_hand():
    assert confusion_matrix(Y_TRUE, PROBS.argmax(1), 3).tolist() == [[1, 1, 1], [0, 2, 0], [0, 0, 1]]


def test_per_class_metrics_by_hand():
    m = compute_metrics(Y_TRUE, PROBS, CLASSES)
    aca, normal, scc = (m.per_class[c] for c in CLASSES)
    # aca: TP=1, FN=2, FP=0 -> recall 1/3, FNR 2/3, precision 1
    assert aca.recall == pytest.approx(1 / 3)
    assert aca.false_negative_rate == pytest.approx(2 / 3)
    assert aca.precision == pytest.approx(1.0)
    assert aca.f1 == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))
    assert aca.support == 3
    # normal: TP=2, FP=1 -> precision 2/3, recall 1
    assert normal.precision == pytest.approx(2 / 3)
    assert normal.recall == pytest.approx(1.0)
    # scc: TP=1, FP=1 -> precision 1/2, recall 1
    assert scc.precision == pytest.approx(0.5)
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.macro_f1 == pytest.approx(np.mean([aca.f1, normal.f1, scc.f1]))
    assert m.n_images == 6


def test_roc_auc_by_hand():
    # positives score 0.9 and 0.4; negatives 0.5 and 0.1: 3 of 4 pairs ordered right.
    assert binary_roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1])) == pytest.approx(0.75)
    # ties count one half
    assert binary_roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert binary_roc_auc(np.array([1, 1]), np.array([0.2, 0.3])) is None


def test_roc_auc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) + labels * 0.3, 2)  # rounded: many ties
    assert binary_roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_expected_calibration_error_by_hand():
    # Two predictions at confidence 0.9, one right and one wrong: gap 0.4 over all samples.
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(np.array([0, 1]), probs) == pytest.approx(0.4)
    # Perfectly calibrated: confidence 1.0 and always right.
    assert expected_calibration_error(np.array([0, 1]), np.eye(2)) == pytest.approx(0.0)


def test_roc_curve_matches_scikit_learn():
    from sklearn.metrics import roc_curve as sklearn_roc_curve

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + labels * 0.4, 2)
    fpr, tpr = roc_curve(labels, scores)
    expected_fpr, expected_tpr, _ = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(fpr, expected_fpr) and np.allclose(tpr, expected_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(binary_roc_auc(labels, scores))


def test_text_report():
    metrics = compute_metrics(Y_TRUE, PROBS, CLASSES)
    text = text_report(metrics, CLASSES)
    assert "lung_aca" in text and "0.6667" in text  # aca FNR
