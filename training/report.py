"""The evaluation report stored with every model: Markdown, JSON, text and figures.

``report.md`` is written from the model card (so the two cannot disagree) and
links the figures that sit beside it: the confusion matrix, one-vs-rest ROC
curves, the reliability diagram before and after calibration, how often
the quality gate and the out-of-distribution score flag generated
near-out-of-distribution sets, and how the answers hold up at other
magnifications, with and without the pixel size. The service
serves them under ``/model/report``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.card import Calibration, ModelCard, SiteMetrics, TestMetrics
from models.store import (
    CONFUSION_PNG,
    DEFAULT_MODEL_TAG,
    MAGNIFICATION_PNG,
    OOD_PNG,
    RELIABILITY_PNG,
    REPORT_FILES,
    REPORT_JSON,
    REPORT_MARKDOWN,
    REPORT_TEXT,
    RISK_COVERAGE_PNG,
    ROC_PNG,
    store_entry,
)
from training.calibration import reliability_bins
from training.evaluate import roc_curve
from training.magnification import table as magnification_table


@dataclass(frozen=True)
class TestPredictions:
    """The test split's labels and probabilities before and after temperature scaling."""

    labels: np.ndarray
    uncalibrated: np.ndarray
    calibrated: np.ndarray


def text_report(metrics: TestMetrics, class_names: list[str]) -> str:
    """A fixed-width report a reviewer can read in a terminal."""
    lines = [
        f"test images: {metrics.n_images}",
        f"accuracy:    {metrics.accuracy:.4f}",
        f"macro F1:    {metrics.macro_f1:.4f}",
        f"macro AUC:   {metrics.macro_roc_auc:.4f}" if metrics.macro_roc_auc is not None else "macro AUC:   n/a",
        f"ECE:         {metrics.expected_calibration_error:.4f}",
        "",
        f"{'class':<16}{'precision':>10}{'recall':>10}{'F1':>10}{'FNR':>10}{'AUC':>10}{'support':>9}",
    ]
    for name in class_names:
        m = metrics.per_class[name]
        auc = f"{m.roc_auc:.4f}" if m.roc_auc is not None else "n/a"
        lines.append(
            f"{name:<16}{m.precision:>10.4f}{m.recall:>10.4f}{m.f1:>10.4f}"
            f"{m.false_negative_rate:>10.4f}{auc:>10}{m.support:>9}"
        )
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    width = max(len(n) for n in class_names) + 2
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in class_names))
    for name, row in zip(class_names, metrics.confusion_matrix, strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown_report(card: ModelCard) -> str:
    """The report as Markdown, from the card alone; figures are linked by file name."""
    m, data = card.metrics, card.dataset
    ci = m.confidence_intervals

    def with_ci(value: float, name: str) -> str:
        if ci is None:
            return _percent(value)
        interval = ci.recall[name] if name in ci.recall else getattr(ci, name)
        return f"{_percent(value)} ({_percent(interval.low)} to {_percent(interval.high)})"

    lines = [
        f"# Model report: {card.architecture} ({card.parameter_count:,} parameters)",
        "",
        f"*{card.intended_use}* Task: {card.task}. Created {card.created_at:%Y-%m-%d %H:%M} UTC.",
        "",
        "## Data and split",
        "",
        f"- Source `{data.source}`: {data.n_images} images, "
        + ", ".join(f"{name} {count}" for name, count in data.class_counts.items()),
        f"- Split: {data.split_policy}, seed {data.split_seed}; "
        + ", ".join(f"{split} {size}" for split, size in data.split_sizes.items()),
    ]
    if data.n_groups is not None:
        lines.append(
            f"- Near-duplicate groups: {data.n_groups} (the largest has {data.largest_group} images); "
            f"groups with members in more than one split: {data.groups_across_splits}"
        )
    level = f"{ci.level:.0%} CI" if ci else "CI"
    lines += [
        "",
        f"## Test metrics ({m.n_images} images, calibrated probabilities)",
        "",
    ]
    if ci:
        lines += [f"Intervals: {ci.method}, {ci.resamples} resamples.", ""]
    lines += [
        f"| metric | value ({level}) |",
        "|---|---|",
        f"| accuracy | {with_ci(m.accuracy, 'accuracy')} |",
        f"| macro-F1 | {with_ci(m.macro_f1, 'macro_f1')} |",
        f"| macro one-vs-rest AUC | {m.macro_roc_auc:.4f} |" if m.macro_roc_auc is not None else "| macro AUC | n/a |",
        "",
        f"| class | recall ({level}) | false-negative rate | precision | F1 | AUC | support |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in card.class_names:
        c = m.per_class[name]
        auc = f"{c.roc_auc:.4f}" if c.roc_auc is not None else "n/a"
        lines.append(
            f"| {name} | {with_ci(c.recall, name)} | {_percent(c.false_negative_rate)} | "
            f"{_percent(c.precision)} | {_percent(c.f1)} | {auc} | {c.support} |"
        )
    lines += ["", f"![Confusion matrix]({CONFUSION_PNG})", "", f"![ROC curves]({ROC_PNG})", ""]
    lines += _calibration_section(card) + _abstention_section(card) + _site_section(card)
    lines += _trust_section(card) + _magnification_section(card)
    t = card.training
    lines += [
        "## Training",
        "",
        f"{t.epochs_trained} of at most {t.epochs_max} epochs (early stopping on {t.early_stopping_monitor}), "
        f"batch {t.batch_size}, learning rate {t.learning_rate:g}, seed {t.seed}, initial weights "
        f"{t.weights or 'random'}, input {card.input_size}x{card.input_size}, {t.train_seconds:.0f} s. "
        f"Augmentation: {', '.join(t.augmentation) or 'none'}.",
        "",
    ]
    return "\n".join(lines)


def _calibration_section(card: ModelCard) -> list[str]:
    """Temperature scaling: T, and ECE and NLL before and after on test."""
    cal = card.calibration
    return [
        "## Calibration",
        "",
        _temperature_sentence(cal),
        "",
        "| test split | before | after |",
        "|---|---|---|",
        f"| expected calibration error (15 bins) | {cal.test_ece_before:.4f} | {cal.test_ece_after:.4f} |",
        f"| negative log-likelihood | {cal.test_nll_before:.4f} | {cal.test_nll_after:.4f} |",
        "",
        _calibration_effect(cal),
        "",
        f"![Reliability diagram]({RELIABILITY_PNG})",
        "",
    ]


def _temperature_sentence(cal: Calibration) -> str:
    """How T was fitted, and whether it was applied (and why not)."""
    if cal.validation_errors == 0:
        return (f"The {cal.fitted_on} split had no errors, so no temperature can be fitted (the likelihood keeps "
                "rising as T falls to 0): the network's own probabilities are kept (T = 1).")
    fitted = cal.fitted_temperature if cal.fitted_temperature is not None else cal.temperature
    sentence = f"{cal.method.capitalize()} fitted on the {cal.fitted_on} split: T = {fitted:.3f}."
    if cal.cross_validated_nll is None or cal.uncalibrated_nll is None:
        return sentence + " The service divides the logits by T."
    verdict = (
        f"applied: the service divides the logits by T = {cal.temperature:.3f}"
        if cal.temperature != 1.0 or fitted == 1.0
        else "**not applied** (T = 1): a gain under two standard errors is no evidence that the network "
        "is miscalibrated, and a T fitted to noise makes held-out calibration worse"
    )
    spread = f" (standard error {cal.gain_standard_error:.4f})" if cal.gain_standard_error is not None else ""
    return (f"{sentence} Five-fold cross-validation on that split gives an NLL of {cal.cross_validated_nll:.4f} "
            f"with T fitted on the other folds against {cal.uncalibrated_nll:.4f} without it: a gain of "
            f"{cal.uncalibrated_nll - cal.cross_validated_nll:.4f}{spread}, so it is {verdict}.")


def _calibration_effect(cal: Calibration) -> str:
    """One sentence: by how much temperature scaling helped on test, or what the unapplied T would have done."""

    def change(before: float, after: float) -> str:
        if before <= 0 or after == before:
            return "unchanged"
        relative = (before - after) / before
        return f"{abs(relative):.0%} {'lower' if relative >= 0 else 'higher'}"

    if cal.temperature != 1.0:
        return (f"On the test split, temperature scaling made the expected calibration error "
                f"{change(cal.test_ece_before, cal.test_ece_after)} ({cal.test_ece_before:.4f} to "
                f"{cal.test_ece_after:.4f}) and the negative log-likelihood "
                f"{change(cal.test_nll_before, cal.test_nll_after)} ({cal.test_nll_before:.4f} to "
                f"{cal.test_nll_after:.4f}).")
    if cal.test_ece_fitted is None or cal.test_nll_fitted is None or cal.fitted_temperature in (None, 1.0):
        return "The test split is scored with the network's own probabilities."
    return (f"Had the fitted T = {cal.fitted_temperature:.3f} been applied, the test split's expected calibration "
            f"error would have been {change(cal.test_ece_before, cal.test_ece_fitted)} ({cal.test_ece_before:.4f} "
            f"to {cal.test_ece_fitted:.4f}) and its negative log-likelihood "
            f"{change(cal.test_nll_before, cal.test_nll_fitted)} ({cal.test_nll_before:.4f} to "
            f"{cal.test_nll_fitted:.4f}).")


def _abstention_section(card: ModelCard) -> list[str]:
    """The abstain threshold: how it was chosen, its coverage and FNRs."""
    ab = card.abstention
    return [
        "## Abstention",
        "",
        f"Answers with confidence below **{ab.threshold:.3f}** are flagged `uncertain` (refer to a "
        f"pathologist). The threshold is the lowest at which each cancer class "
        f"({', '.join(ab.cancer_classes)}) has a false-negative rate of at most {_percent(ab.fnr_target)} "
        f"among answered {ab.chosen_on} images"
        + ("." if ab.target_met_on_validation else "; **no threshold met that target on validation**."),
        "",
        "| split | coverage (answered) | " + " | ".join(f"FNR {name}" for name in ab.cancer_classes) + " |",
        "|---|---|" + "---|" * len(ab.cancer_classes),
        f"| validation | {_percent(ab.validation_coverage)} | "
        + " | ".join(_percent(ab.validation_false_negative_rate[n]) for n in ab.cancer_classes)
        + " |",
        f"| test | {_percent(ab.test_coverage)} | "
        + " | ".join(_percent(ab.test_false_negative_rate[n]) for n in ab.cancer_classes)
        + " |",
        "| test, every tile answered (no abstention) | 100.0% | "
        + " | ".join(_percent(card.metrics.per_class[n].false_negative_rate) for n in ab.cancer_classes)
        + " |",
        "",
        "The risk-coverage curve shows what each threshold would give on test: the error rate and the worst "
        "cancer-class false-negative rate among the tiles answered, as fewer are answered; the dot is the "
        "chosen operating point.",
        "",
        f"![Risk-coverage curve]({RISK_COVERAGE_PNG})",
        "",
    ]


def _site_section(card: ModelCard) -> list[str]:
    """The held-out sites beside the in-site test split (nothing when no site was held out)."""
    shift = card.site_shift
    if shift is None:
        return []

    def row(metrics: SiteMetrics, where: str) -> str:
        interval = metrics.accuracy_interval
        spread = f" ({_percent(interval.low)} to {_percent(interval.high)})" if interval else ""
        return (f"| {metrics.site} | {where} | {metrics.n_images} | {_percent(metrics.accuracy)}{spread} | "
                f"{_percent(metrics.macro_f1)} | {_percent(metrics.worst_cancer_fnr)} | "
                f"{metrics.expected_calibration_error:.4f} |")

    return [
        "## Site shift",
        "",
        f"Every image of site(s) {', '.join(shift.held_out_sites)} was held out of training, validation and "
        "test (`--holdout-site`), then classified as an unseen site. Accuracy on it is "
        f"**{100 * shift.accuracy_drop:.1f} points** {'below' if shift.accuracy_drop >= 0 else 'above'} the "
        "in-site test split.",
        "",
        "| site | seen in training | images | accuracy (95% CI) | macro-F1 | worst cancer FNR | ECE |",
        "|---|---|---|---|---|---|---|",
        *(row(metrics, "yes (test split)") for metrics in shift.in_site_test),
        row(shift.held_out, "**no**"),
        "",
    ]


def _limit(low: float | None, high: float | None, digits: int = 3) -> str:
    parts = [f"{sign} {value:.{digits}f}" for sign, value in ((">=", low), ("<=", high)) if value is not None]
    return " and ".join(parts) or "none"


def _trust_section(card: ModelCard) -> list[str]:
    """The quality gate and the out-of-distribution score: method, limits, acceptance, detection."""
    gate, ood = card.quality_gate, card.out_of_distribution
    lines = [
        "## Out-of-distribution and quality gate",
        "",
        "A tile the model was not trained for gets `uncertain: true` with `reasons`, never a plain class. "
        "Both checks are fitted on the training split only, without any outlier images.",
        "",
        f"**Quality gate** ({gate.method}), measured on the {gate.input_size}x{gate.input_size} model input:",
        "",
        "| measure | passes when | check |",
        "|---|---|---|",
        f"| background_fraction | {_limit(gate.background_fraction.low, gate.background_fraction.high)} | "
        "background |",
        f"| stain_fraction | {_limit(gate.stain_fraction.low, gate.stain_fraction.high)} | stain |",
        f"| stain_distance | {_limit(gate.stain_distance.low, gate.stain_distance.high)} | stain |",
        f"| saturation | {_limit(gate.saturation.low, gate.saturation.high)} | saturation |",
        f"| focus (variance of the Laplacian) | {_limit(gate.focus.low, gate.focus.high, 1)} | blur / noise |",
        "",
        f"It passes {_percent(gate.train_pass_rate)} of training, {_percent(gate.validation_pass_rate)} of "
        f"validation and {_percent(gate.test_pass_rate)} of test tiles.",
        "",
        f"**Out-of-distribution score**: {ood.method}. Layers: {', '.join(f'`{n}`' for n in ood.feature_layers)} "
        f"({', '.join(map(str, ood.feature_dims))} features). Threshold **{ood.threshold:.3f}**, chosen on "
        f"{ood.threshold_chosen_on} to keep {_percent(ood.target_acceptance)}; it keeps "
        f"{_percent(ood.validation_acceptance)} of validation and {_percent(ood.test_acceptance)} of test tiles"
        + (f" ({_percent(ood.test_acceptance_with_gate)} of test tiles pass both checks)."
           if ood.test_acceptance_with_gate is not None else "."),
        "",
    ]
    if ood.evaluation:
        lines += [
            "Detection on generated sets (made from test tiles or drawn; never used for fitting). Detected: "
            "flagged by the gate or the score. AUROC and FPR at 95% TPR are of the score alone against the "
            "in-distribution test tiles.",
            "",
            "| set | images | detected | by the gate | score AUROC | FPR at 95% TPR |",
            "|---|---|---|---|---|---|",
            *(
                f"| {r.name}: {r.description} | {r.n_images} | {_percent(r.detection_rate)} | "
                f"{_percent(r.gate_rate)} | {r.score_auroc:.3f} | {_percent(r.fpr_at_95_tpr)} |"
                for r in ood.evaluation
            ),
            "",
            f"![Out-of-distribution detection]({OOD_PNG})",
            "",
        ]
    return lines


def _magnification_section(card: ModelCard) -> list[str]:
    """The magnification check and the test split at 0.5x-2x, with and without the pixel size."""
    check, mpp = card.magnification, card.dataset.microns_per_pixel
    if check is None:
        return []
    pixel_size = (f"The training tiles' pixel size is {mpp:g} um/px ({card.dataset.microns_per_pixel_from}): an "
                  "upload sent with its `mpp` is resampled to it." if mpp else
                  "The card declares no pixel size: an upload's `mpp` cannot be used (the rows with it are missing).")
    lines = [
        "## Magnification",
        "",
        f"{pixel_size} Without it, the magnification check estimates a tile's magnification from the model's "
        f"features ({check.method}) and flags a tile outside **{check.low:.2f}x-{check.high:.2f}x** "
        f"(reason `magnification`): it keeps {_percent(check.validation_acceptance)} of validation tiles at the "
        f"training magnification; its median error on validation tiles at 0.4x-2.5x is "
        f"{check.validation_error:.2f} octaves.",
        "",
    ]
    if check.evaluation:
        lines += [
            "Test tiles at other magnifications (above 1x: the centre enlarged; below: a mosaic of tiles of the "
            "class, shrunk), answered by the same rule as `/predict`:",
            "",
            magnification_table(check.evaluation),
            "",
            f"![Magnification]({MAGNIFICATION_PNG})",
            "",
        ]
    return lines


def plot_magnification(card: ModelCard, path: Path) -> None:
    """Right-or-uncertain, answered and flagged shares against the magnification, with and without mpp."""
    plt = _pyplot()
    rows = card.magnification.evaluation if card.magnification else None
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), sharex=True)
    for with_mpp, style in ((False, "o-"), (True, "s--")):
        chosen = sorted((r for r in rows or [] if r.with_mpp == with_mpp), key=lambda r: r.factor)
        if not chosen:
            continue
        label = "mpp sent: resampled" if with_mpp else "no mpp"
        factors = [r.factor for r in chosen]
        for ax, values in zip(axes, ([r.right_or_uncertain for r in chosen], [r.answered for r in chosen],
                                     [r.flagged for r in chosen]), strict=True):
            ax.plot(factors, [100 * v for v in values], style, label=label)
    for ax, title in zip(axes, ("right or uncertain", "answered", "flagged `magnification`"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.5, 2**-0.5, 1, 2**0.5, 2], ["0.5x", "0.71x", "1x", "1.41x", "2x"])
        ax.set_ylim(0, 102)
        ax.set_title(title)
        ax.set_xlabel("magnification / training magnification")
    axes[0].set_ylabel("test tiles (%)")
    axes[0].legend(loc="lower left", fontsize=8)
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot_confusion_matrix(metrics: TestMetrics, class_names: list[str], path: Path) -> None:
    """Save the confusion matrix as a PNG (counts and row-normalised colour)."""
    plt = _pyplot()
    matrix = np.array(metrics.confusion_matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(class_names), 1.2 + 1.2 * len(class_names)))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Test confusion matrix (accuracy {metrics.accuracy:.3f})")
    _save(fig, path)


def plot_roc_curves(test: TestPredictions, metrics: TestMetrics, class_names: list[str], path: Path) -> None:
    """One-vs-rest ROC curve of every class on the test split."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.6))
    for k, name in enumerate(class_names):
        fpr, tpr = roc_curve(test.labels == k, test.calibrated[:, k])
        auc = metrics.per_class[name].roc_auc
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate (recall)")
    ax.set_title("One-vs-rest ROC, test split")
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_reliability(test: TestPredictions, card: ModelCard, path: Path) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    temperature = card.calibration_temperature
    for probabilities, label, marker in (
        (test.uncalibrated, "before (T = 1)", "o"),
        (test.calibrated, f"after (T = {temperature:.2f})", "s"),
    ):
        bins = reliability_bins(test.labels, probabilities)
        filled = bins.count > 0
        ax.plot(bins.confidence[filled], bins.accuracy[filled], marker=marker, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (mean per bin)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram, test split")
    ax.legend(loc="upper left")
    _save(fig, path)


def plot_risk_coverage(card: ModelCard, path: Path) -> None:
    """Error and worst cancer-class FNR among answered test tiles against coverage; the operating point."""
    plt = _pyplot()
    ab = card.abstention
    curve = ab.risk_coverage
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    coverage = [100 * point.coverage for point in curve]
    ax.plot(coverage, [100 * point.error_rate for point in curve], marker=".", label="error rate")
    ax.plot(coverage, [100 * point.worst_cancer_fnr for point in curve], marker=".", label="worst cancer-class FNR")
    worst_fnr = max(ab.test_false_negative_rate.values(), default=0.0)
    ax.scatter([100 * ab.test_coverage], [100 * worst_fnr], color="black", zorder=3,
               label=f"operating point (threshold {ab.threshold:.3f})")
    ax.set_xlim(0, 102)
    ax.set_xlabel("coverage: test tiles answered (%)")
    ax.set_ylabel("among answered tiles (%)")
    ax.set_title("Risk-coverage, test split")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def plot_ood_detection(card: ModelCard, path: Path) -> None:
    """Share of each generated set flagged (gate alone, and gate or score), beside the test tiles' share."""
    plt = _pyplot()
    ood = card.out_of_distribution
    results = ood.evaluation or []
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(results) + 1.6))
    names = [r.name for r in results]
    ax.barh(names, [100 * r.detection_rate for r in results], color="tab:red", label="gate or score")
    ax.barh(names, [100 * r.gate_rate for r in results], color="tab:orange", label="gate alone")
    if ood.test_acceptance_with_gate is not None:
        ax.axvline(100 * (1 - ood.test_acceptance_with_gate), color="tab:blue", linestyle="--",
                   label="in-distribution test tiles flagged")
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("flagged (%)")
    ax.set_title("Out-of-distribution detection, generated sets")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    _save(fig, path)


def write_report(card: ModelCard, test: TestPredictions, folder: Path) -> dict[str, Path]:
    """Write every report file into `folder`; returns {file name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / name for name in REPORT_FILES}
    files[REPORT_MARKDOWN].write_text(markdown_report(card))
    files[REPORT_JSON].write_text(json.dumps(card.metrics.model_dump(mode="json"), indent=2))
    files[REPORT_TEXT].write_text(text_report(card.metrics, card.class_names))
    plot_confusion_matrix(card.metrics, card.class_names, files[CONFUSION_PNG])
    plot_roc_curves(test, card.metrics, card.class_names, files[ROC_PNG])
    plot_reliability(test, card, files[RELIABILITY_PNG])
    plot_risk_coverage(card, files[RISK_COVERAGE_PNG])
    plot_ood_detection(card, files[OOD_PNG])
    if card.magnification and card.magnification.evaluation:
        plot_magnification(card, files[MAGNIFICATION_PNG])
    return {name: path for name, path in files.items() if path.is_file()}


def export_report(tag: str, out: Path) -> Path:
    """Copy a stored model's report files into `out` (e.g. docs/ for the README); returns report.md's path."""
    entry = store_entry(tag)
    folder = Path(entry.path)
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    markdown = out / REPORT_MARKDOWN
    markdown.write_text(f"<!-- model {entry.tag}; regenerate with `make model-report` -->\n" + markdown.read_text())
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.report", description="Copy a stored model's evaluation report into a folder."
    )
    parser.add_argument("--model", default=DEFAULT_MODEL_TAG, help="model tag (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/model-report"), help="folder (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).info("report of %s written to %s", args.model, export_report(args.model, args.out))


if __name__ == "__main__":
    main()
