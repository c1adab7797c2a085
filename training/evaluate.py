"""Clinical evaluation: per-class recall and false-negative rate, AUC, calibration.

Metrics are computed with NumPy from the true labels and predicted
probabilities, and written as JSON, a text report and a confusion-matrix PNG.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.card import ClassMetrics, TestMetrics

REPORT_JSON = "report.json"
REPORT_TEXT = "report.txt"
CONFUSION_PNG = "confusion_matrix.png"


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def binary_roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney U statistic (ties count one half).

    Returns None when only one class is present (AUC is undefined).
    """
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    start = 0
    for end in range(1, len(scores) + 1):
        if end == len(scores) or sorted_scores[end] != sorted_scores[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """ECE: confidence-weighted gap between confidence and accuracy per bin."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def _safe_ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def compute_metrics(y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> TestMetrics:
    """All test metrics the model card carries."""
    n = len(class_names)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, n)
    per_class: dict[str, ClassMetrics] = {}
    aucs: list[float] = []
    for k, name in enumerate(class_names):
        tp = matrix[k, k]
        fn = matrix[k].sum() - tp
        fp = matrix[:, k].sum() - tp
        precision = _safe_ratio(tp, tp + fp)
        recall = _safe_ratio(tp, tp + fn)
        auc = binary_roc_auc(y_true == k, probabilities[:, k])
        if auc is not None:
            aucs.append(auc)
        per_class[name] = ClassMetrics(
            precision=precision,
            recall=recall,
            f1=_safe_ratio(2 * precision * recall, precision + recall),
            false_negative_rate=_safe_ratio(fn, tp + fn),
            support=int(tp + fn),
            roc_auc=auc,
        )
    return TestMetrics(
        n_images=len(y_true),
        accuracy=float((y_pred == y_true).mean()),
        macro_f1=float(np.mean([m.f1 for m in per_class.values()])),
        macro_roc_auc=float(np.mean(aucs)) if aucs else None,
        per_class=per_class,
        confusion_matrix=matrix.tolist(),
        expected_calibration_error=expected_calibration_error(y_true, probabilities),
    )


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


def plot_confusion_matrix(metrics: TestMetrics, class_names: list[str], path: Path) -> None:
    """Save the confusion matrix as a PNG (counts and row-normalised colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    text: Path
    confusion_png: Path

    def as_dict(self) -> dict[str, Path]:
        return {p.name: p for p in (self.json, self.text, self.confusion_png)}


def write_report(metrics: TestMetrics, class_names: list[str], folder: Path) -> ReportFiles:
    """Write the JSON, text and PNG report files into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(folder / REPORT_JSON, folder / REPORT_TEXT, folder / CONFUSION_PNG)
    files.json.write_text(json.dumps(metrics.model_dump(mode="json"), indent=2))
    files.text.write_text(text_report(metrics, class_names))
    plot_confusion_matrix(metrics, class_names, files.confusion_png)
    return files
