"""The plain (non-BentoML) routes: the model card and report, slides (:mod:`serving.http.slide_routes`), and the
web page.

BentoML APIs are POST-only and take their inputs as one schema; these GET
routes and the slide routes are a Starlette app that the service
mounts beside its APIs (`@bentoml.asgi_app`). They reach the loaded model
through `bentoml.get_current_service()`.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from config.settings import Settings
from models.store import REPORT_FILES, REPORT_MARKDOWN
from serving.http.report_page import report_page
from serving.http.slide_routes import slide_routes
from serving.problems import Problem, answers_problems


def plain_routes(settings: Settings, ui_folder: Path) -> Starlette:
    """The Starlette app of the plain routes (see the module docstring)."""
    async def model_card(request: Request) -> Response:
        """GET /model: the model card of the model being served."""
        return JSONResponse(bentoml.get_current_service().stored.card.model_dump(mode="json"))

    @answers_problems
    async def model_report(request: Request) -> Response:
        """GET /model/report: the evaluation report as HTML; /model/report/{name}: its files (Markdown, JSON,
        figures)."""
        stored = bentoml.get_current_service().stored
        name = request.path_params.get("name")
        if name is None:  # the page a browser shows; the Markdown stays at /model/report/report.md
            if not (stored.path / REPORT_MARKDOWN).is_file():
                raise Problem(HTTPStatus.NOT_FOUND, f"this model has no report file {REPORT_MARKDOWN!r}")
            page = await asyncio.to_thread(report_page, stored.path, stored.tag)
            return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
        path = stored.path / name
        if name not in REPORT_FILES or not path.is_file():
            raise Problem(HTTPStatus.NOT_FOUND, f"this model has no report file {name!r}; see {sorted(REPORT_FILES)}")
        return FileResponse(path, media_type=REPORT_FILES[name], headers={"Cache-Control": "no-cache"})

    return Starlette(
        routes=[
            Route("/model", model_card, methods=["GET"]),
            Route("/model/report", model_report, methods=["GET"]),
            Route("/model/report/{name}", model_report, methods=["GET"]),
            *slide_routes(settings),
            # The page's relative links need the trailing slash.
            Route("/ui", lambda request: RedirectResponse("/ui/", status_code=HTTPStatus.PERMANENT_REDIRECT)),
            Mount("/ui", StaticFiles(directory=ui_folder, html=True), name="ui"),
        ]
    )
