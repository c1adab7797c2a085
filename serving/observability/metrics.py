"""Prometheus metrics the service adds to BentoML's `/metrics`.

`prometheus_client` is imported when the metrics are first used, inside the
worker: BentoML sets up its multi-process registry after the service module
is imported, and metrics made earlier would never reach `/metrics`.

Labels are bounded: class names come from the model card, reasons from
:data:`serving.problems.REFUSALS`; nothing from clients (file names, ids) is a label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

from serving.problems import REFUSALS

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

METRIC_NAMES = (
    "histopathology_predictions_total",
    "histopathology_uncertain_total",
    "histopathology_flagged_total",
    "histopathology_rejected_total",
    "histopathology_decode_seconds",
    "histopathology_inference_seconds",
    "histopathology_batch_size",
    "histopathology_model_info",
)


class Answer(Protocol):
    """What the metrics count of an answer (models.prediction.Prediction)."""

    predicted_class: str
    uncertain: bool
    reasons: list[str]


@dataclass(frozen=True)
class ServiceMetrics:
    predictions: Any  # Counter{predicted_class}
    uncertain: Any  # Counter
    flagged: Any  # Counter{reason}: why answers were uncertain (models.prediction reasons)
    rejected: Any  # Counter{reason}
    decode_seconds: Any  # Histogram
    inference_seconds: Any  # Histogram, per model call
    batch_size: Any  # Histogram
    model_info: Any  # Gauge{name, version, architecture} = 1
    # Labelled children by label value, looked up once (a `labels()` call takes a lock and builds a key).
    _children: dict[tuple[str, str], Any] = field(default_factory=dict)

    def _child(self, metric: str, value: str) -> Any:
        key = (metric, value)
        child = self._children.get(key)
        if child is None:
            family = getattr(self, metric)
            child = self._children[key] = (family.labels(predicted_class=value) if metric == "predictions"
                                           else family.labels(reason=value))
        return child

    def count_answers(self, answers: Iterable[Answer]) -> None:
        """Count a request's answers: one increment per class and per reason, not one per answer."""
        classes: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        uncertain = 0
        for answer in answers:
            classes[answer.predicted_class] += 1
            uncertain += answer.uncertain
            reasons.update(answer.reasons)
        for name, count in classes.items():
            self._child("predictions", name).inc(count)
        for reason, count in reasons.items():
            self._child("flagged", reason).inc(count)
        if uncertain:
            self.uncertain.inc(uncertain)

    def reject(self, status: int) -> None:
        """Count a refused upload under the reason its status stands for (others are not counted)."""
        refusal = REFUSALS.get(status)
        if refusal is not None and refusal.reason is not None:
            self.rejected.labels(reason=refusal.reason).inc()


@cache
def service_metrics() -> ServiceMetrics:
    """The service's metrics, created once per worker process on first use."""
    import prometheus_client as prom

    return ServiceMetrics(
        predictions=prom.Counter(
            "histopathology_predictions", "Images classified, by predicted class.", ["predicted_class"]
        ),
        uncertain=prom.Counter(
            "histopathology_uncertain", "Images answered as uncertain (any reason: see histopathology_flagged)."
        ),
        flagged=prom.Counter(
            "histopathology_flagged",
            "Answers flagged uncertain, by reason (low_confidence, out_of_distribution, and each failed quality "
            "check: background, stain, saturation, blur, noise); one answer may count under several.",
            ["reason"],
        ),
        rejected=prom.Counter(
            "histopathology_rejected", "Uploads refused, by reason (format, corrupt, too_large, ...).", ["reason"]
        ),
        decode_seconds=prom.Histogram(
            "histopathology_decode_seconds", "Time to decode and validate one upload.", buckets=SECONDS_BUCKETS
        ),
        inference_seconds=prom.Histogram(
            "histopathology_inference_seconds", "Time of one model call (a whole batch).", buckets=SECONDS_BUCKETS
        ),
        batch_size=prom.Histogram(
            "histopathology_batch_size",
            "Images per model call, as formed by the service's micro-batcher.",
            buckets=BATCH_SIZE_BUCKETS,
        ),
        model_info=prom.Gauge(
            "histopathology_model_info",
            "The model being served (value 1).",
            ["name", "version", "architecture"],
            multiprocess_mode="max",
        ),
    )
