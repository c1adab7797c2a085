"""Request tracing: BentoML's OpenTelemetry spans, only when they go somewhere.

BentoML 1.4 wraps every request in an OpenTelemetry span and *records* it
even when no exporter is configured (its sampler is "always recording", so
span ids can double as request ids). With nothing to export, that costs about
1 core-ms per upload, roughly 8% of this service's throughput on 2 cores
(BENCHMARKS.md). The service logs its own `X-Request-ID` per request, so it
skips the spans then, and keeps BentoML's tracing untouched as soon as a
tracing exporter is configured (`BENTOML_CONFIG`, e.g.
deploy/bentoml-tracing.yaml).
"""

from __future__ import annotations

from typing import Any

EVERY_URL = "."  # BentoML matches excluded_urls as regular expressions searched in the URL


def configured_exporter() -> str | None:
    """The tracing exporter BentoML's configuration names (zipkin, jaeger, otlp, ...), or None."""
    # BentoML loads BENTOML_CONFIG before it imports the service; its container is the only
    # place the effective setting lives (pinned BentoML version, see requirements/serving.txt).
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.config.tracing.exporter_type.get()


def service_tracing_config(exporter: str | None) -> dict[str, Any]:
    """The `tracing` argument of `@bentoml.service`: no spans unless an exporter is configured.

    A service-level value overrides the user's configuration file, so with an
    exporter this returns nothing at all and BentoML's own settings apply.
    """
    return {} if exporter else {"excluded_urls": [EVERY_URL]}
