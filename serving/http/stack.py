"""The service's middleware, assembled in one place, in the order requests meet it.

Outermost first: the front door (in place of BentoML's traffic-metrics
middleware: cheap 503s, bounded metric labels), CORS when origins are set
(so preflight requests never need the token), the request log, the OpenAPI
document, and the request guard next to the routes. The route facts they
need (which routes take uploads, which fields, which paths exist) are read
off the service's APIs and the plain routes (:mod:`serving.http.route_table`).
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware

from config.settings import Settings
from serving.admission.capacity import Admission
from serving.http import front_door
from serving.http.guard import GuardPolicy, RequestGuard
from serving.http.openapi import OpenAPIDocument, corrected_document
from serving.http.route_table import BENTOML_PREFIXES, BENTOML_ROUTES, PROBES, route_facts
from serving.observability.request_log import RequestLog

# Besides the upload routes, these (and everything under them) need the token when one is set.
TOKEN_PREFIXES = frozenset({"/model", "/slides"})


def install_middleware(service: Any, plain_routes: Starlette, settings: Settings, admission: Admission) -> None:
    """Add the middleware to the `@bentoml.service` class `service` (before BentoML builds a worker's app)."""
    routes = route_facts(service.apis.values(), plain_routes.routes, settings.max_files_per_request)
    known_routes = routes.known_routes | BENTOML_ROUTES
    token_routes = frozenset({*routes.upload_routes, *TOKEN_PREFIXES})
    front_door.install(known_routes | PROBES, routes.served_prefixes + BENTOML_PREFIXES, routes.upload_routes,
                       admission)
    if settings.cors_origins:
        service.add_asgi_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    service.add_asgi_middleware(RequestLog, known_routes=known_routes, upload_routes=routes.upload_routes,
                                quiet_paths=PROBES)
    service.add_asgi_middleware(
        OpenAPIDocument,
        build=lambda: corrected_document(
            service.openapi_spec.asdict(), routes.upload_routes, token_routes, routes.json_routes
        ),
    )
    service.add_asgi_middleware(
        RequestGuard,
        policy=GuardPolicy(
            upload_routes=routes.upload_routes,
            token_routes=token_routes,
            max_body_bytes=settings.max_body_bytes,
            admission=admission,
            request_timeout_s=settings.request_timeout_ms / 1000,
            body_timeout_s=settings.body_timeout_ms / 1000,
            body_idle_timeout_s=settings.body_idle_timeout_ms / 1000,
            api_token=settings.api_token,
            text_fields=routes.form_fields,
            json_routes=routes.json_routes,
        ),
    )
