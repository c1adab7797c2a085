"""BentoML's own floor for the service's contract: what a request costs before the service does anything.

Two routes on one BentoML server with the service's server settings (workers,
no access log, no spans): `POST /predict` is a BentoML API with the service's
exact input signature (`file: Path`, multipart) that answers a constant;
`POST /asgi_predict` is a plain Starlette route mounted in the same server
that parses the same multipart body. `make benchmark` loads both: the first
is the floor the service stands on, the second the floor of the ASGI stack
below BentoML's API layer.

    bentoml serve loadtests.floor_service:Floor
"""

from __future__ import annotations

from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from config.settings import load_settings
from serving.server_options import server_options

SETTINGS = load_settings()
ASGI_ROUTE = "/asgi_predict"


async def plain_multipart(request: Request) -> JSONResponse:
    """The same multipart upload, parsed by Starlette alone."""
    async with request.form() as form:
        upload = form["file"]
        size = len(await upload.read())
    return JSONResponse({"predicted_class": "floor", "bytes": size})


@bentoml.asgi_app(Starlette(routes=[Route(ASGI_ROUTE, plain_multipart, methods=["POST"])]), path="/")
@bentoml.service(name="floor", **server_options(SETTINGS))
class Floor:
    """A constant answer behind the service's input handling."""

    @bentoml.api(route="/predict")
    async def predict(self, file: Path) -> dict[str, object]:
        return {"predicted_class": "floor", "bytes": file.stat().st_size}
