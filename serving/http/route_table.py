"""What the middlewares must know about the routes, read from the routes themselves.

The request guard, the front door and the request log need to know which
routes take uploads (and how many `file` parts), which plain form fields each
takes, and which paths exist. BentoML describes every API's input as a
pydantic model; the plain GET routes are a Starlette app. Both are read here,
so adding a route or a field never means updating a list by hand.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.routing import BaseRoute, Mount, Route

from serving.admission.forms import BOOLEAN, FILE_FIELD, NUMBER, TEXT

_FIELD_KINDS = {str: TEXT, bool: BOOLEAN, float: NUMBER}
PROBES = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})  # BentoML's probes and metrics: always open
BENTOML_ROUTES = frozenset({"/docs.json", "/"})  # BentoML's own pages
BENTOML_PREFIXES = ("/static_content/",)


@dataclass(frozen=True)
class RouteFacts:
    upload_routes: Mapping[str, int]  # POST path -> most `file` parts it takes
    form_fields: Mapping[str, Mapping[str, str]]  # POST path -> {plain field: TEXT, BOOLEAN or NUMBER}
    known_routes: frozenset[str]  # every exact path served
    json_routes: frozenset[str]  # POST paths whose body is JSON: APIs without a file
    served_prefixes: tuple[str, ...]  # everything under these is served (mounts, path parameters)


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X."""
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return arguments[0] if is_optional and len(arguments) == 1 else annotation


def _base(annotation: Any) -> Any:
    """`Annotated[X, ...]` -> X."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation


def route_facts(apis: Iterable[Any], http_routes: Iterable[BaseRoute], max_files_per_request: int) -> RouteFacts:
    """Facts from BentoML API methods (`route`, `input_spec`) and plain Starlette routes.

    An API with a `file: Path` input takes one upload, `file: list[Path]` up to
    `max_files_per_request`; its `str`, `bool` and `float` inputs are plain form fields.
    """
    uploads: dict[str, int] = {}
    fields: dict[str, dict[str, str]] = {}
    api_routes: set[str] = set()
    json_routes: set[str] = set()
    for api in apis:
        api_routes.add(api.route)
        inputs = api.input_spec.model_fields
        if FILE_FIELD not in inputs:
            json_routes.add(api.route)
        file = _base(inputs[FILE_FIELD].annotation) if FILE_FIELD in inputs else None
        if file is Path:
            uploads[api.route] = 1
        elif typing.get_origin(file) is list and _base(typing.get_args(file)[0]) is Path:
            uploads[api.route] = max_files_per_request
        else:
            continue  # not an upload route: the guard leaves it to BentoML
        plain = {name: _without_none(info.annotation) for name, info in inputs.items() if name != FILE_FIELD}
        unknown = {name for name, kind in plain.items() if kind not in _FIELD_KINDS}
        if unknown:
            raise TypeError(f"{api.route}: no guard check for the fields {sorted(unknown)}")
        fields[api.route] = {name: _FIELD_KINDS[kind] for name, kind in plain.items()}
    known, prefixes = set(uploads) | api_routes, []
    for route in http_routes:
        if isinstance(route, Mount):
            known |= {route.path, route.path + "/"}
            prefixes.append(route.path + "/")
        elif isinstance(route, Route) and "{" in route.path:
            prefixes.append(route.path.split("{", 1)[0])
        elif isinstance(route, Route):
            known.add(route.path)
    return RouteFacts(uploads, {path: f for path, f in fields.items() if f}, frozenset(known), frozenset(json_routes),
                      tuple(prefixes))
