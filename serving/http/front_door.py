"""The front door: the outermost ASGI layer of each worker, in front of BentoML's own middleware.

BentoML builds a worker's middleware stack itself; its outermost layer is its
traffic-metrics middleware (`RunnerTrafficMetricsMiddleware`), which labels
every metric with the raw request path, so each unknown URL a client invents
adds series to `/metrics` for good (2,000 random 404s took it from 0.5 to
8.4 MB). :func:`install` puts :class:`FrontDoor` in that middleware's place,
wrapping it, so that:

* a path the service does not serve reaches BentoML's metrics as one label,
  :data:`OTHER_PATH` (the app still sees the real path and answers 404);
* an upload that a full worker cannot take is refused here, with a 503 built
  once, before BentoML's metrics, timeout and our own middleware run and
  before its body is read (the connection is closed): under overload the
  worker spends its CPU on the requests it admitted, not on refusing.

Refusals here carry an `X-Request-ID`, are counted as `overload` rejections
and are logged as one summary line a second, not one line each.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.admission.capacity import Admission
from serving.http.guard import overload_response
from serving.observability.metrics import service_metrics

logger = logging.getLogger(__name__)

OTHER_PATH = "/(other)"
_ORIGINAL_PATH = "histo.original_path"  # scope key: the real path, restored under the metrics middleware
REFUSAL_LOG_INTERVAL_S = 1.0


@dataclass(frozen=True)
class FrontDoorConfig:
    known_paths: frozenset[str]
    known_prefixes: tuple[str, ...]  # e.g. "/ui/": everything under it is served
    upload_routes: frozenset[str]
    admission: Admission

    def known(self, path: str) -> bool:
        return path in self.known_paths or path.startswith(self.known_prefixes)


_config: FrontDoorConfig | None = None


class _RefusalLog:
    """One log line per interval with the number of refusals, instead of one line per refusal."""

    def __init__(self) -> None:
        self.count = 0
        self.since = time.monotonic()

    def count(self, reason: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.since >= REFUSAL_LOG_INTERVAL_S:
            logger.warning("refused %d uploads in %.1f s: %s", self.count, now - self.since, reason)
            self.count, self.since = 0, now


class _RestorePath:
    """Under BentoML's metrics middleware: give the app the real path back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _ORIGINAL_PATH in scope:
            original = scope[_ORIGINAL_PATH]
            scope = {key: value for key, value in scope.items() if key != _ORIGINAL_PATH}
            scope["path"] = original
        await self.app(scope, receive, send)


def front_door_class(metrics_middleware: type) -> type:
    """A middleware class that wraps BentoML's `metrics_middleware` (same constructor options)."""

    class FrontDoor:
        """See the module docstring."""

        histo_front_door = True

        def __init__(self, app: ASGIApp, **options: object) -> None:
            self._metrics = metrics_middleware(_RestorePath(app), **options)
            self._refusals = _RefusalLog()

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            config = _config
            if scope["type"] != "http" or config is None:
                await self._metrics(scope, receive, send)
                return
            path = scope["path"]
            is_upload = path in config.upload_routes and scope["method"] == "POST"
            if is_upload and (reason := config.admission.refusal()) is not None:
                await overload_response(reason, uuid.uuid4().hex)(scope, receive, send)
                service_metrics().reject(HTTPStatus.SERVICE_UNAVAILABLE)
                self._refusals.count(reason)
                return
            if not config.known(path):
                scope = {**scope, "path": OTHER_PATH, _ORIGINAL_PATH: path}
            await self._metrics(scope, receive, send)

    return FrontDoor


def install(known_paths: Iterable[str], known_prefixes: Iterable[str], upload_routes: Iterable[str],
            admission: Admission) -> None:
    """Put the front door in place of BentoML's traffic-metrics middleware (before BentoML builds the app).

    BentoML 1.4 imports the middleware class from its module when it builds a worker's app, after
    the service module is imported; replacing the module attribute here is therefore enough.
    Idempotent; the latest configuration wins.
    """
    global _config
    from bentoml._internal.server.http import instruments

    _config = FrontDoorConfig(frozenset(known_paths), tuple(known_prefixes), frozenset(upload_routes), admission)
    current = instruments.RunnerTrafficMetricsMiddleware
    if not getattr(current, "histo_front_door", False):
        instruments.RunnerTrafficMetricsMiddleware = front_door_class(current)
