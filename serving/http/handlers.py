"""The plain (non-BentoML) routes: the model card and report, slides, and the web page.

BentoML APIs are POST-only and take their inputs as one schema; these GET
routes and the streamed slide upload are a Starlette app that the service
mounts beside its APIs (`@bentoml.asgi_app`). They reach the loaded model
through `bentoml.get_current_service()`.
"""

from __future__ import annotations

import asyncio
import io
import shutil
from concurrent.futures import ThreadPoolExecutor
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
from serving.problems import Problem, answers_problems
from serving.slide_store import SLIDE_FILE, SlideStore
from slides.outputs import OUTPUT_FILES
from slides.reader import SlideError

MAX_TILE_VIEW = 4096  # level-0 pixels a side of a tile shown at full resolution
TILE_READERS = 2  # tile reads at a time per worker: a 4,096 px read holds about 64 MB of RGBA


def plain_routes(settings: Settings, slides: SlideStore, ui_folder: Path) -> Starlette:
    """The Starlette app of the plain routes (see the module docstring)."""
    # Threads start on first use; many tile requests at once wait their turn (and meet the request
    # deadline) instead of adding up their memory.
    tile_readers = ThreadPoolExecutor(TILE_READERS, thread_name_prefix="slide-tile")

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

    @answers_problems
    async def upload_slide(request: Request) -> Response:
        """POST /slides: stream a whole-slide image to disk (multipart `file`); answers its `slide_id`."""
        from slides.analysis import check_readable

        slide_id = await slides.receive(request, settings.max_slide_bytes, settings.body_idle_timeout_ms / 1000,
                                        settings.slide_upload_timeout_s)
        folder = slides.folder_of(slide_id)
        try:  # only a slide inside the caps whose overview reads is kept
            await asyncio.to_thread(check_readable, folder / SLIDE_FILE)
        except SlideError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise Problem.from_error(exc) from None
        return JSONResponse({"slide_id": slide_id}, status_code=HTTPStatus.CREATED)

    @answers_problems
    async def slide_progress(request: Request) -> Response:
        """GET /slides/{slide_id}/progress: the analysis' state and tiles done of the total."""
        return JSONResponse(slides.progress(request.path_params["slide_id"]), headers={"Cache-Control": "no-store"})

    @answers_problems
    async def slide_tile(request: Request) -> Response:
        """GET /slides/{slide_id}/tile?x=&y=&size=[&as_analysed=true]: a square of the slide as PNG, at full
        resolution, or with `as_analysed` as the analysis gave it to the model (its level, resized to the input)."""
        from slides.analysis import read_analysed_tile, read_tile

        slide = slides.slide_of(request.path_params["slide_id"])
        try:
            x, y, size = (int(request.query_params[key]) for key in ("x", "y", "size"))
        except (KeyError, ValueError):
            raise Problem(HTTPStatus.BAD_REQUEST, "give x, y and size as whole level-0 pixels") from None
        if not 1 <= size <= MAX_TILE_VIEW:
            raise Problem(HTTPStatus.BAD_REQUEST, f"size is 1-{MAX_TILE_VIEW} pixels")
        as_analysed = request.query_params.get("as_analysed", "false")
        if as_analysed not in ("true", "false"):
            raise Problem(HTTPStatus.BAD_REQUEST, "as_analysed is true or false")
        card = bentoml.get_current_service().stored.card

        def png() -> bytes:
            buffer = io.BytesIO()
            image = (read_analysed_tile(slide, x, y, size, card) if as_analysed == "true"
                     else read_tile(slide, x, y, size))
            image.save(buffer, format="PNG", compress_level=1)
            return buffer.getvalue()

        try:
            return Response(await asyncio.get_running_loop().run_in_executor(tile_readers, png),
                            media_type="image/png")
        except SlideError as exc:
            raise Problem.from_error(exc) from None
        except ValueError as exc:
            raise Problem(HTTPStatus.BAD_REQUEST, str(exc)) from None

    @answers_problems
    async def slide_output(request: Request) -> Response:
        """GET /slides/{slide_id}/{name}: a finished analysis' GeoJSON, overlay or summary."""
        folder = slides.folder_of(request.path_params["slide_id"])
        name = request.path_params["name"]
        if name not in OUTPUT_FILES or not (folder / name).is_file():
            raise Problem(HTTPStatus.NOT_FOUND,
                          f"no {name!r} for this slide (not analysed?); see {sorted(OUTPUT_FILES)}")
        return FileResponse(folder / name, media_type=OUTPUT_FILES[name])

    return Starlette(
        routes=[
            Route("/model", model_card, methods=["GET"]),
            Route("/model/report", model_report, methods=["GET"]),
            Route("/model/report/{name}", model_report, methods=["GET"]),
            Route("/slides", upload_slide, methods=["POST"]),
            Route("/slides/{slide_id}/progress", slide_progress, methods=["GET"]),
            Route("/slides/{slide_id}/tile", slide_tile, methods=["GET"]),
            Route("/slides/{slide_id}/{name}", slide_output, methods=["GET"]),
            # The page's relative links need the trailing slash.
            Route("/ui", lambda request: RedirectResponse("/ui/", status_code=HTTPStatus.PERMANENT_REDIRECT)),
            Mount("/ui", StaticFiles(directory=ui_folder, html=True), name="ui"),
        ]
    )
