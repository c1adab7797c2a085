"""Site shift: the model on sites it never saw, beside the sites it was trained on.

Models lose accuracy on slides from another hospital's stainer and scanner.
When the dataset declares where each image was acquired (tiles.csv) and the
split held some sites out whole (`--holdout-site`), the held-out images are
classified after training and reported per site, beside the in-site test
split, with the drop in accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from models.card import SiteMetrics, SiteShift
from training import data
from training.abstention import selective_metrics
from training.bootstrap import bootstrap_intervals
from training.evaluate import compute_metrics, expected_calibration_error


def site_metrics(
    site: str,
    labels: np.ndarray,
    probabilities: np.ndarray,
    groups: np.ndarray,
    class_names: list[str],
    cancer: Sequence[str],
    resamples: int,
    seed: int,
) -> SiteMetrics:
    """Accuracy (with a group-bootstrap interval), macro-F1, worst cancer-class FNR and ECE."""
    metrics = compute_metrics(labels, probabilities, class_names)
    # Every image answered: the FNR a user meets without abstention.
    answered = selective_metrics(labels, probabilities, 0.0, class_names, cancer)
    interval = bootstrap_intervals(labels, probabilities, groups, class_names, resamples, seed=seed).accuracy
    return SiteMetrics(
        site=site,
        n_images=len(labels),
        accuracy=metrics.accuracy,
        macro_f1=metrics.macro_f1,
        worst_cancer_fnr=answered.worst_fnr(),
        expected_calibration_error=expected_calibration_error(labels, probabilities),
        accuracy_interval=interval,
    )


def evaluate_site_shift(
    manifest: data.SplitManifest,
    test_probabilities: np.ndarray,
    classify: Callable[[list], np.ndarray],
    cancer: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
) -> SiteShift | None:
    """Per-site metrics on the test split and on the held-out sites; None when no site was held out.

    `classify` maps image paths to calibrated probabilities (the model the card describes).
    """
    held_out = manifest.held_out_sites()
    if not held_out:
        return None
    names = manifest.class_names

    def measure(site: str, split: str, probabilities: np.ndarray, mask: np.ndarray) -> SiteMetrics:
        return site_metrics(site, manifest.labels(split)[mask], probabilities[mask], manifest.groups(split)[mask],
                            names, cancer, resamples, seed)

    test_sites = manifest.sites("test")
    in_site = [
        measure(site, "test", test_probabilities, test_sites == site) for site in sorted(set(test_sites.tolist()))
    ]
    held_probabilities = classify(manifest.paths(data.SITE_HOLDOUT))
    everything = np.ones(len(held_probabilities), bool)
    held = measure("+".join(held_out), data.SITE_HOLDOUT, held_probabilities, everything)
    in_site_accuracy = float((test_probabilities.argmax(1) == manifest.labels("test")).mean())
    return SiteShift(
        held_out_sites=held_out, in_site_test=in_site, held_out=held, accuracy_drop=in_site_accuracy - held.accuracy
    )
