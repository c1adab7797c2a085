"""The `@bentoml.service` arguments that shape the HTTP server, in one place.

Shared by the service and by the benchmark's floor service
(loadtests/floor_service.py), which must run on exactly the same server
settings to measure BentoML's own cost per request.
"""

from __future__ import annotations

from typing import Any

from config.settings import Settings
from serving.observability.tracing import configured_exporter, service_tracing_config


def server_options(settings: Settings) -> dict[str, Any]:
    return {
        "workers": settings.workers,
        # The guard answers 504 itself at HISTO_REQUEST_TIMEOUT_MS (problem+json, request id, counted);
        # BentoML's own timeout, which answers in its own shape, is only a backstop behind it. It covers
        # every route, so it must let a slide upload (gigabytes, minutes) finish: POST /slides bounds
        # itself (HISTO_SLIDE_UPLOAD_TIMEOUT_S in all, HISTO_BODY_IDLE_TIMEOUT_MS between chunks).
        "traffic": {"timeout": max(settings.request_timeout_ms // 1000, settings.slide_upload_timeout_s) + 10},
        # serving/observability/request_log.py writes one line per request (with request id and predicted class)
        # instead; BentoML's access log would double it and cost ~5-10% of throughput.
        "logging": {"access": {"enabled": False}},
        # BentoML records a span per request even with nothing to export it to (~8% of throughput).
        "tracing": service_tracing_config(configured_exporter()),
    }
