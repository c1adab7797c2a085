"""The OpenAPI document at /docs.json, as the service really answers.

BentoML generates it from the API methods alone: the plain GET routes
(`/model`, `/model/report`) are missing, and every API is said to fail with
BentoML's JSON 400/404/500. The service answers errors as
`application/problem+json` with the statuses of docs/http-contract.md, so a
generated client or a schema-driven test would be misled. This module takes
BentoML's document and corrects it; a small ASGI middleware serves it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from models.card import ModelCard
from models.store import REPORT_FILES, REPORT_MARKDOWN
from serving.problems import PROBLEM_MEDIA_TYPE, REFUSALS
from slides.analysis import DEFAULT_MIN_TISSUE, TILE_SIZE_LIMITS
from slides.outputs import OUTPUT_FILES
from slides.store import SLIDE_STATES

DOCUMENT_PATH = "/docs.json"
SCHEMAS = "#/components/schemas/{model}"
# What an upload route can answer besides 200 (README.md's error table; docs/http-contract.md).
UPLOAD_ERRORS: dict[int, str] = {int(status): refusal.meaning for status, refusal in REFUSALS.items()}
PROBLEM_SCHEMA = {
    "type": "object",
    "title": "Problem",
    "description": "RFC 9457 problem details",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "example": "about:blank"},
        "title": {"type": "string", "example": "Unsupported Media Type"},
        "status": {"type": "integer", "example": 415},
        "detail": {"type": "string", "example": "file: not a supported image; send JPEG, PNG, WebP or TIFF"},
    },
}


def _problem_responses(statuses: Mapping[int, str]) -> dict[str, dict]:
    schema = {"$ref": SCHEMAS.format(model="Problem")}
    return {
        str(status): {
            "description": f"{HTTPStatus(status).phrase}: {why}",
            "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}},
            **({"headers": {"Retry-After": {"schema": {"type": "integer"}}}} if status == 503 else {}),
        }
        for status, why in statuses.items()
    }


def _card_schema() -> tuple[dict, dict[str, dict]]:
    """The model card's JSON schema, its nested models moved to the components."""
    schema = ModelCard.model_json_schema(ref_template=SCHEMAS, mode="serialization")
    nested = schema.pop("$defs", {})
    return schema, nested


def _content(media_type: str, schema: dict) -> dict:
    return {media_type: {"schema": schema}}


def _model_routes(token_routes: Iterable[str]) -> dict[str, dict]:
    guarded = "/model" in token_routes
    errors = {401: UPLOAD_ERRORS[401]} if guarded else {}
    report_files = sorted(REPORT_FILES)
    return {
        "/model": {"get": {
            "tags": ["Service APIs"], "operationId": "model_card",
            "description": "The model card of the model being served.",
            "responses": {
                "200": {"description": "the model card",
                        "content": _content("application/json", {"$ref": SCHEMAS.format(model="ModelCard")})},
                **_problem_responses(errors),
            },
        }},
        "/model/report": {"get": {
            "tags": ["Service APIs"], "operationId": "model_report",
            "description": f"The evaluation report stored with the model as one HTML page ({REPORT_MARKDOWN} "
                           "rendered, its figures inline).",
            "responses": {
                "200": {"description": "the report page", "content": _content("text/html", {"type": "string"})},
                **_problem_responses({**errors, 404: "this model has no report"}),
            },
        }},
        "/model/report/{name}": {"get": {
            "tags": ["Service APIs"], "operationId": "model_report_file",
            "description": "One file of the evaluation report: the Markdown, its JSON and text forms, or a figure.",
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": {"type": "string", "enum": report_files}}],
            "responses": {"200": {"description": "the file", "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in sorted({media.split(";")[0] for media in REPORT_FILES.values()})
            }}, **_problem_responses({**errors, 404: "no such report file"})},
        }},
    }


PROGRESS_SCHEMA = {
    "type": "object", "required": ["state", "tiles_done", "tiles_total", "attempt", "reason"],
    "properties": {"state": {"type": "string", "enum": list(SLIDE_STATES)},
                   "tiles_done": {"type": "integer"},
                   "tiles_total": {"type": ["integer", "null"]},
                   "attempt": {"type": "integer", "description": "runs started (a lost worker's run counts)"},
                   "reason": {"type": ["string", "null"], "description": "why it failed"}}}


def _slide_routes(token_routes: Iterable[str]) -> dict[str, dict]:
    errors = {401: UPLOAD_ERRORS[401]} if "/slides" in token_routes else {}
    slide_id = {"name": "slide_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/slides": {"post": {
            "tags": ["Service APIs"], "operationId": "add_slide",
            "description": "Stream a whole-slide image into the slide store (multipart `file`), or name a file in "
                           "the service's slide folder (JSON `path`, relative to HISTO_SLIDE_ROOT); answers its "
                           "`slide_id` for `POST /slides/{slide_id}/analysis`.",
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                   "properties": {"file": {"type": "string", "format": "binary"}}}},
                "application/json": {"schema": {"type": "object", "required": ["path"], "additionalProperties": False,
                                                "properties": {"path": {"type": "string"}}}}}},
            "responses": {
                "201": {"description": "the slide's id",
                        "content": _content("application/json", {"type": "object", "required": ["slide_id"],
                                                                 "properties": {"slide_id": {"type": "string"}}})},
                **_problem_responses({**errors, 400: f"{UPLOAD_ERRORS[400]}; a path outside the slide folder",
                                      404: "no such file in the slide folder", 408: UPLOAD_ERRORS[408],
                                      413: "over HISTO_MAX_SLIDE_BYTES", 415: "not multipart or JSON, or not a slide",
                                      422: "a slide over a cap (side, stored tile, overview level) or damaged"}),
            },
        }},
        "/slides/{slide_id}/analysis": {"post": {
            "tags": ["Service APIs"], "operationId": "analyse_slide",
            "description": "Analyse the slide on the slide engine: tissue tiles through the same gate, model and "
                           "out-of-distribution score as /predict. Idempotent: a slide queued, running, done or "
                           "failed is not submitted again. Poll `/slides/{slide_id}/progress` at any replica.",
            "parameters": [slide_id],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, "properties": {
                    "tile_size": {"type": ["integer", "null"], "minimum": min(TILE_SIZE_LIMITS),
                                  "maximum": max(TILE_SIZE_LIMITS),
                                  "description": "level-0 pixels a side (default: from the model card)"},
                    "min_tissue": {"type": "number", "minimum": 0, "maximum": 1, "default": DEFAULT_MIN_TISSUE,
                                   "description": "the tissue share that admits a tile"}}}}}},
            "responses": {
                "202": {"description": "submitted (or already on its way, or finished): its progress",
                        "content": _content("application/json", PROGRESS_SCHEMA)},
                **_problem_responses({**errors, 400: "not a slide id, or options out of range",
                                      404: "no such slide", 415: "a body that is not JSON",
                                      503: "the slide engine (HISTO_DASK_SCHEDULER) cannot be reached"}),
            },
        }},
        "/slides/{slide_id}/progress": {"get": {
            "tags": ["Service APIs"], "operationId": "slide_progress",
            "description": "The analysis' state, tiles done of the total, the run's attempt and, when failed, why.",
            "parameters": [slide_id],
            "responses": {
                "200": {"description": "the state", "content": _content("application/json", PROGRESS_SCHEMA)},
                **_problem_responses({**errors, 400: "not a slide id", 404: "no such slide"}),
            },
        }},
        "/slides/{slide_id}/tile": {"get": {
            "tags": ["Service APIs"], "operationId": "slide_tile",
            "description": "A square of the slide as PNG, starting inside it (the part past its edge is glass): at "
                           "full (level-0) resolution to look at, or with as_analysed=true the pixels the analysis "
                           "gave the model (its level, resized to the model's input), to send to /explain.",
            "parameters": [slide_id, *({"name": key, "in": "query", "required": True,
                                        "schema": {"type": "integer", "minimum": minimum}}
                                       for key, minimum in (("x", 0), ("y", 0), ("size", 1))),
                           {"name": "as_analysed", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["true", "false"], "default": "false"}}],
            "responses": {
                "200": {"description": "the tile", "content": {"image/png": {
                    "schema": {"type": "string", "format": "binary"}}}},
                **_problem_responses({**errors, 400: "not a slide id, or a square not starting inside the slide",
                                      404: "no such slide", 422: "the slide is damaged there"}),
            },
        }},
        "/slides/{slide_id}/{name}": {"get": {
            "tags": ["Service APIs"], "operationId": "slide_output",
            "description": "A finished analysis: the QuPath GeoJSON, the overlay PNG or the summary.",
            "parameters": [
                slide_id,
                {"name": "name", "in": "path", "required": True,
                 "schema": {"type": "string", "enum": sorted(OUTPUT_FILES)}},
            ],
            "responses": {
                "200": {"description": "the file", "content": {
                    media: {"schema": {"type": "string", "format": "binary"}} for media in OUTPUT_FILES.values()}},
                **_problem_responses({**errors, 400: "not a slide id", 404: "no such slide or output"}),
            },
        }},
    }


def corrected_document(
    bentoml_document: dict, upload_routes: Iterable[str], token_routes: Iterable[str], json_routes: Iterable[str] = ()
) -> dict:
    """BentoML's document with the model and slide routes added and every error answered as a problem."""
    document = copy.deepcopy(bentoml_document)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for bentoml_error in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(bentoml_error, None)
    schemas["Problem"] = PROBLEM_SCHEMA
    card, nested = _card_schema()
    schemas.update({"ModelCard": card, **nested})
    uploads, json_bodies = set(upload_routes), set(json_routes)
    problem = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": SCHEMAS.format(model="Problem")}}}
    for path, item in document["paths"].items():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = {str(status): response for status, response in operation["responses"].items()}
            if path in uploads:
                responses = {"200": responses["200"], **_problem_responses(UPLOAD_ERRORS)}
            elif path in json_bodies:  # the guard refuses any other body
                responses |= _problem_responses({415: "not a JSON body"})
            for status, response in responses.items():
                if int(status) >= 400:  # every error leaves as problem+json (serving/http/guard.py)
                    response["content"] = problem
            operation["responses"] = responses
    document["paths"].update(_model_routes(token_routes))
    document["paths"].update(_slide_routes(token_routes))
    return document


class OpenAPIDocument:
    """ASGI middleware: answers GET /docs.json with the corrected document (built once, on first use)."""

    def __init__(self, app: ASGIApp, build: Callable[[], dict]) -> None:
        self.app = app
        self.build = build
        self._body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != DOCUMENT_PATH or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if self._body is None:
            self._body = json.dumps(self.build()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self._body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self._body if scope["method"] == "GET" else b""})
