"""Prometheus metrics the service adds to BentoML's `/metrics`.

`prometheus_client` is imported when the metrics are created, inside the
worker: BentoML sets up its multi-process registry after the service module
is imported, and metrics made earlier would never reach `/metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class ServiceMetrics:
    batch_size: Any  # prometheus_client.Histogram


def create_metrics() -> ServiceMetrics:
    """Create the service's metrics; call once per worker process."""
    import prometheus_client

    return ServiceMetrics(
        batch_size=prometheus_client.Histogram(
            "histopathology_batch_size",
            "Images per model call, as formed by the service's micro-batcher.",
            buckets=BATCH_SIZE_BUCKETS,
        ),
    )
