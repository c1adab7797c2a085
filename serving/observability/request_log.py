"""Request ids and one log line per request (ASGI middleware, outermost of ours).

Replaces BentoML's access log, which the service turns off: this one carries
the request id (taken from `X-Request-ID` when it is sane, generated
otherwise, and returned in the response header), the route, status, latency
and, for predictions, the predicted class(es); text or JSON lines per
`HISTO_LOG_FORMAT`. It never logs bodies, file names or unknown paths (a
client could put anything there), and it counts refused uploads by reason.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.observability.metrics import service_metrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

# Facts the endpoint learns (the predicted class) for the request's log line.
_request_notes: ContextVar[dict[str, object] | None] = ContextVar("request_notes", default=None)


def add_log_fields(**facts: object) -> None:
    """Attach facts to the current request's log line (no-op outside a request)."""
    notes = _request_notes.get()
    if notes is not None:
        notes.update(facts)


def request_id_from(headers: Headers) -> str:
    """The client's X-Request-ID when it is a short token, else a fresh one."""
    given = headers.get(REQUEST_ID_HEADER, "")
    return given if _SANE_REQUEST_ID.match(given) else uuid.uuid4().hex


class RequestLog:
    """ASGI middleware: request id in and out, a log line per request, refused uploads counted."""

    def __init__(self, app: ASGIApp, known_routes: Iterable[str], upload_routes: Iterable[str],
                 quiet_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.known_routes = frozenset(known_routes)
        self.upload_routes = frozenset(upload_routes)
        self.quiet_paths = frozenset(quiet_paths)  # probes: counted by BentoML, not logged

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(Headers(scope=scope))
        status = 500  # what the client sees if the app fails before answering
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        notes: dict[str, object] = {}
        token = _request_notes.set(notes)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_notes.reset(token)
            path = scope["path"]
            if path in self.upload_routes and status >= 400:
                service_metrics().reject(status)
            if path not in self.quiet_paths:
                self._log(scope["method"], path, status, time.perf_counter() - started, request_id, notes)

    def _log(self, method: str, path: str, status: int, seconds: float, request_id: str, notes: dict) -> None:
        route = path if path in self.known_routes else "(other)"
        # `extra` keys become the JSON line's fields; none may be a LogRecord attribute (name, msg, ...).
        fields = {"request_id": request_id, "method": method, "route": route, "status": status,
                  "latency_ms": round(seconds * 1000, 1), **notes}
        extra = " ".join(f"{key}={value}" for key, value in notes.items())
        logger.info("%s %s %d %.1f ms id=%s%s", method, route, status, seconds * 1000, request_id,
                    f" {extra}" if extra else "", extra=fields)
