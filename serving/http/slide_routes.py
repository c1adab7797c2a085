"""The slide routes: upload, submit, progress, outputs and tiles, all read from and written to the slide store.

No route keeps state in the worker that answers it: a slide uploaded or
submitted at one replica is polled and fetched at any other (the store is
shared; the analysis runs on the Dask engine). They reach the worker's
:class:`~serving.slide_analyses.SlideAnalyses` through
``bentoml.get_current_service().slides``.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path

import bentoml
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.settings import Settings
from serving.admission.body import BodyLimits, capped_chunks
from serving.admission.slide_upload import UploadLimits, receive_upload, register_path
from serving.problems import Problem, answers_problems
from serving.slide_analyses import EngineUnavailableError, SlideAnalyses
from slides.analysis import DEFAULT_MIN_TISSUE, TILE_SIZE_LIMITS
from slides.outputs import OUTPUT_FILES
from slides.reader import SlideError
from slides.store import UPLOADED, Progress, SlideStore, StoreError, copy_to_scratch

MAX_TILE_VIEW = 4096  # level-0 pixels a side of a tile shown at full resolution
TILE_READERS = 2  # tile reads at a time per worker: a 4,096 px read holds about 64 MB of RGBA
MAX_JSON_BYTES = 16 * 1024  # a submission's or a path's JSON body
REMOTE_COPIES = 2  # slides of a remote store kept in local scratch for tile reads, per worker


def progress_view(progress: Progress | None) -> dict[str, object]:
    """What GET /slides/{id}/progress answers: `uploaded` before any submission."""
    if progress is None:
        return {"state": UPLOADED, "tiles_done": 0, "tiles_total": None, "attempt": 0, "reason": None}
    return {"state": progress.state, "tiles_done": progress.tiles_done, "tiles_total": progress.tiles_total,
            "attempt": progress.attempt, "reason": progress.reason}


def slide_routes(settings: Settings) -> list[Route]:
    """The Starlette routes under /slides (see the module docstring)."""
    # Threads start on first use; many tile requests at once wait their turn (and meet the request
    # deadline) instead of adding up their memory.
    tile_readers = ThreadPoolExecutor(TILE_READERS, thread_name_prefix="slide-tile")
    copies = _RemoteCopies(REMOTE_COPIES)
    upload_limits = UploadLimits(settings.max_slide_bytes, settings.body_idle_timeout_ms / 1000,
                                 settings.slide_upload_timeout_s)

    @answers_problems
    async def add_slide(request: Request) -> Response:
        """POST /slides: stream a slide into the store (multipart `file`), or name one in the slide root
        (JSON `{"path"}`); answers its `slide_id`."""
        store = _slides().store
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() == "application/json":
            body = await _json_object(request, {"path"})
            if not isinstance(body.get("path"), str):
                raise Problem(HTTPStatus.BAD_REQUEST, "give `path`, a file relative to the slide folder")
            slide_id = await asyncio.to_thread(register_path, body["path"], settings.slide_root, store)
        else:
            slide_id = await receive_upload(request.receive, content_type, store, upload_limits)
        return JSONResponse({"slide_id": slide_id}, status_code=HTTPStatus.CREATED)

    @answers_problems
    async def submit(request: Request) -> Response:
        """POST /slides/{slide_id}/analysis: analyse the slide (JSON `{tile_size?, min_tissue?}`); 202 with its
        progress. A slide queued, running, done or failed is not submitted again."""
        slides = _slides()
        slide_id = request.path_params["slide_id"]
        body = await _json_object(request, {"tile_size", "min_tissue"}, empty_ok=True)
        tile_size, min_tissue = body.get("tile_size"), body.get("min_tissue", DEFAULT_MIN_TISSUE)
        low, high = TILE_SIZE_LIMITS
        if tile_size is not None and (type(tile_size) is not int or not low <= tile_size <= high):
            raise Problem(HTTPStatus.BAD_REQUEST, f"tile_size is {low}-{high} level-0 pixels")
        if type(min_tissue) not in (int, float) or not 0.0 <= min_tissue <= 1.0:
            raise Problem(HTTPStatus.BAD_REQUEST, "min_tissue is a share of a tile, 0-1")
        await _source(slides.store, slide_id)  # 400 or 404 before anything is written
        try:
            progress = await slides.submit(slide_id, tile_size, float(min_tissue))
        except EngineUnavailableError as exc:
            raise Problem(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "5"}) from None
        return JSONResponse(progress_view(progress), status_code=HTTPStatus.ACCEPTED)

    @answers_problems
    async def progress(request: Request) -> Response:
        """GET /slides/{slide_id}/progress: the analysis' state, tiles done of the total, attempt, reason."""
        store = _slides().store
        slide_id = request.path_params["slide_id"]
        state = await _store_call(store.progress, slide_id)
        if state is None:
            await _source(store, slide_id)  # 404 when there is no such slide either
        return JSONResponse(progress_view(state), headers={"Cache-Control": "no-store"})

    @answers_problems
    async def tile(request: Request) -> Response:
        """GET /slides/{slide_id}/tile?x=&y=&size=[&as_analysed=true]: a square of the slide as PNG, at full
        resolution, or with `as_analysed` as the analysis gave it to the model (its level, resized to the input)."""
        from slides.analysis import read_analysed_tile, read_tile

        service = bentoml.get_current_service()
        source = await _source(service.slides.store, request.path_params["slide_id"])
        try:
            x, y, size = (int(request.query_params[key]) for key in ("x", "y", "size"))
        except (KeyError, ValueError):
            raise Problem(HTTPStatus.BAD_REQUEST, "give x, y and size as whole level-0 pixels") from None
        if not 1 <= size <= MAX_TILE_VIEW:
            raise Problem(HTTPStatus.BAD_REQUEST, f"size is 1-{MAX_TILE_VIEW} pixels")
        as_analysed = request.query_params.get("as_analysed", "false")
        if as_analysed not in ("true", "false"):
            raise Problem(HTTPStatus.BAD_REQUEST, "as_analysed is true or false")
        card = service.stored.card

        def png() -> bytes:
            with copies.local(source) as slide:
                image = (read_analysed_tile(slide, x, y, size, card) if as_analysed == "true"
                         else read_tile(slide, x, y, size))
            buffer = io.BytesIO()
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
    async def output(request: Request) -> Response:
        """GET /slides/{slide_id}/{name}: a finished analysis' GeoJSON, overlay or summary."""
        store = _slides().store
        slide_id, name = request.path_params["slide_id"], request.path_params["name"]
        content = await _store_call(store.read_output, slide_id, name) if name in OUTPUT_FILES else None
        if content is None:
            raise Problem(HTTPStatus.NOT_FOUND,
                          f"no {name!r} for this slide (not analysed?); see {sorted(OUTPUT_FILES)}")
        return Response(content, media_type=OUTPUT_FILES[name])

    return [
        Route("/slides", add_slide, methods=["POST"]),
        Route("/slides/{slide_id}/analysis", submit, methods=["POST"]),
        Route("/slides/{slide_id}/progress", progress, methods=["GET"]),
        Route("/slides/{slide_id}/tile", tile, methods=["GET"]),
        Route("/slides/{slide_id}/{name}", output, methods=["GET"]),
    ]


def _slides() -> SlideAnalyses:
    return bentoml.get_current_service().slides


async def _store_call(function, *args):
    """A store call off the event loop (a remote store is a network call); a bad id is a 400."""
    try:
        return await asyncio.to_thread(function, *args)
    except StoreError as exc:
        raise Problem(HTTPStatus.BAD_REQUEST, str(exc)) from None


async def _source(store: SlideStore, slide_id: str) -> str:
    """Where the slide is (its upload in the store, or its file in the slide root); 404 when unknown."""
    source = await _store_call(store.source, slide_id)
    if source is None:
        raise Problem(HTTPStatus.NOT_FOUND, f"no slide {slide_id!r}")
    return source


async def _json_object(request: Request, allowed: set[str], empty_ok: bool = False) -> dict[str, object]:
    """The request's small JSON object body, with only `allowed` keys (an empty body is `{}` if `empty_ok`)."""
    chunks = [chunk async for chunk, _ in capped_chunks(request.receive, BodyLimits(MAX_JSON_BYTES, 10, 5))]
    raw = b"".join(chunks)
    if not raw.strip() and empty_ok:
        return {}
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise Problem(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send a JSON body (application/json)")
    try:
        body = json.loads(raw)
    except ValueError:
        raise Problem(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
    if not isinstance(body, dict) or set(body) - allowed:
        raise Problem(HTTPStatus.BAD_REQUEST, f"send a JSON object with at most {sorted(allowed)}")
    return body


class _RemoteCopies:
    """Local paths to read slides from: a local source as it is (refused if a link was put in its way since
    it was recorded resolved), a remote one copied once to scratch and kept for the next tiles; the least
    recently used copy not being read goes when more than `keep` are held."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._copies: OrderedDict[str, Path] = OrderedDict()
        self._readers: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def local(self, source: str) -> Iterator[Path]:
        if "://" not in source:
            path = Path(source)
            if path.resolve() != path.absolute():  # recorded resolved: a link in its way now is refused
                raise SlideError("the slide file is no longer where it was recorded")
            yield path
            return
        with self._lock:
            self._readers[source] = self._readers.get(source, 0) + 1
        try:
            yield self._copy(source)
        finally:
            with self._lock:
                self._readers[source] -= 1
                self._trim()

    def _copy(self, source: str) -> Path:
        with self._lock:
            if source in self._copies:
                self._copies.move_to_end(source)
                return self._copies[source]
        local = copy_to_scratch(source)  # outside the lock: gigabytes
        with self._lock:
            if source in self._copies:  # another thread copied it meanwhile
                shutil.rmtree(local.parent, ignore_errors=True)
                return self._copies[source]
            self._copies[source] = local
            return local

    def _trim(self) -> None:
        for source in list(self._copies):
            if len(self._copies) <= self.keep:
                return
            if not self._readers.get(source):
                shutil.rmtree(self._copies.pop(source).parent, ignore_errors=True)
