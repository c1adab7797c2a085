"""Optional Sentry error tracking (`SENTRY_DSN`; `pip install sentry-sdk`).

Events never carry what a client sent: request bodies, cookies, query
strings, headers that identify people (Authorization, Cookie, X-Forwarded-For)
and user data are removed before sending.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_SENSITIVE_HEADERS = frozenset({"authorization", "cookie", "x-forwarded-for", "x-real-ip", "x-api-key"})


def scrub_event(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sentry `before_send`: drop request bodies and personal data from an event."""
    request = event.get("request")
    if isinstance(request, dict):
        for key in ("data", "cookies", "query_string", "env"):
            request.pop(key, None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            request["headers"] = {k: v for k, v in headers.items() if k.lower() not in _SENSITIVE_HEADERS}
    event.pop("user", None)
    return event


def init_error_tracking(dsn: str | None, release: str) -> bool:
    """Start Sentry when a DSN is set and the SDK is installed; return whether it started."""
    if not dsn:
        return False
    try:
        import sentry_sdk
    except ImportError:
        logger.warning("SENTRY_DSN is set but sentry-sdk is not installed; error tracking is off")
        return False
    sentry_sdk.init(
        dsn=dsn,
        release=release,
        send_default_pii=False,
        max_request_body_size="never",
        include_local_variables=False,  # locals may hold image bytes
        before_send=scrub_event,
        traces_sample_rate=0.0,  # tracing goes through BentoML's OpenTelemetry instead
    )
    logger.info("error tracking: Sentry on")
    return True
