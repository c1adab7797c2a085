"""The BentoML service: the HTTP contract of docs/http-contract.md (routes in README.md). Thin glue.

Each request is decoded and validated by `models.preprocessing.decode_image`
in a worker thread first, so a bad upload is answered with its 4xx and never
joins a batch. Valid images are queued to an in-process micro-batcher that
runs, on stacked uint8 arrays, the quality gate (`models.quality`, vectorised
over the batch) and the traced model (`models.inference.Predictor`), whose
pass also yields the features of the out-of-distribution score (`models.ood`).
A tile that fails the gate or scores out of distribution is answered with
`uncertain: true` and the reasons, never as a plain class.

Run it with `make serve`, or `bentoml serve` from this folder.
"""

import asyncio
import base64
import io
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from models.prediction import ExplainedPrediction, Prediction, Rescaling, Thresholds, TileClassifier, TileEvidence
from models.preprocessing import (
    DecodeAbandonedError,
    DecodeCost,
    ImageDecodeError,
    ImageTooLargeError,
    PreparedDecode,
    finish_decode,
    prepare_decode,
)
from models.resampling import ModelScale, check_microns_per_pixel
from models.store import REPORT_FILES, REPORT_MARKDOWN, ModelLoadError, StoredModel, load_model
from models.tf_environment import prefer_onednn
from serving import front_door
from serving.admission import Admission
from serving.batcher import BatchTimeoutError, MicroBatcher
from serving.connections import bound_header_time, raise_open_file_limit
from serving.error_tracking import init_error_tracking
from serving.guard import REQUEST_DEADLINE, GuardPolicy, RequestGuard
from serving.logs import configure_logging
from serving.memory import release_heap
from serving.metrics import ServiceMetrics, service_metrics
from serving.model_check import check_model_can_serve
from serving.openapi import OpenAPIDocument, corrected_document
from serving.problems import Problem, answers_problems, problem
from serving.request_log import RequestLog, note
from serving.routes import route_facts
from serving.server_options import server_options
from serving.settings import load_settings
from serving.slide_store import SLIDE_FILE, SlideStore
from slides.outputs import OUTPUT_FILES
from slides.reader import NotASlideError, SlideError

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Read when BentoML imports this module: the decorators below need them.
SETTINGS = load_settings(bento_arguments=vars(bentoml.use_arguments()))
MODEL = bentoml.models.BentoModel(SETTINGS.model_tag)
# BentoML's own routes; ours are read from the routes themselves (serving/routes.py).
BENTOML_ROUTES = {"/docs.json", "/"}
PROBES = {"/healthz", "/livez", "/readyz", "/metrics"}
BENTOML_PREFIXES = ("/static_content/",)
UI_FOLDER = Path(__file__).resolve().parent / "ui"
# A decode over either goes to the worker's single "heavy" decode thread, so cheap tiles never queue
# behind it (a 768 px JPEG tile: ~4 MB and 6 M scan-pixels; these are ~50 ms of decoding and up).
HEAVY_DECODE_BYTES = 32 * 1024 * 1024
HEAVY_DECODE_SCAN_PIXELS = 20_000_000
# Per worker process: what it has admitted, shared by the front door, the guard and the batcher.
ADMISSION = Admission(
    SETTINGS.max_in_flight, SETTINGS.max_open_uploads, SETTINGS.max_queue_delay_ms / 1000, SETTINGS.max_buffered_bytes
)
# Takes effect when BentoML builds the worker's server, after this module is imported.
bound_header_time(SETTINGS.header_timeout_ms / 1000)
raise_open_file_limit()  # thousands of half-open connections must not exhaust a 1,024-descriptor default


class _PixelBudget:
    """The decoded pixels one request may still spend (its parts decode on several threads)."""

    def __init__(self, pixels: int) -> None:
        self.limit = self.left = pixels
        self._lock = threading.Lock()

    def spend(self, pixels: int) -> None:
        with self._lock:
            self.left -= pixels
            if self.left < 0:
                raise ImageTooLargeError(f"the parts decode to over {self.limit} pixels in all")


SLIDES = SlideStore(SETTINGS.slide_dir, SETTINGS.slide_ttl_s, SETTINGS.slide_root)


@answers_problems
async def _upload_slide(request: Request) -> Response:
    """POST /slides: stream a whole-slide image to disk (multipart `file`); answers its `slide_id`."""
    from slides.analyze import check_readable

    slide_id = await SLIDES.receive(request, SETTINGS.max_slide_bytes, SETTINGS.body_idle_timeout_ms / 1000,
                                    SETTINGS.slide_upload_timeout_s)
    folder = SLIDES.folder_of(slide_id)
    try:  # only a slide inside the caps whose overview reads is kept
        await asyncio.to_thread(check_readable, folder / SLIDE_FILE)
    except SlideError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise _slide_problem(exc) from None
    return JSONResponse({"slide_id": slide_id}, status_code=HTTPStatus.CREATED)


def _slide_problem(error: SlideError) -> Problem:
    """415 for a file that is no slide; 422 for a slide over a cap or damaged."""
    if isinstance(error, NotASlideError):
        return Problem(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"not a slide: {error}")
    return Problem(HTTPStatus.UNPROCESSABLE_ENTITY, f"the slide cannot be analysed: {error}")


@answers_problems
async def _slide_progress(request: Request) -> Response:
    """GET /slides/{slide_id}/progress: the analysis' state and tiles done of the total."""
    return JSONResponse(SLIDES.progress(request.path_params["slide_id"]), headers={"Cache-Control": "no-store"})


MAX_TILE_VIEW = 4096  # level-0 pixels a side of a tile shown at full resolution
# Two tile reads at a time per worker (threads start on first use): a 4,096 px read holds about 64 MB of
# RGBA, so many requests at once wait their turn (and meet the request deadline) instead of adding up.
TILE_READERS = ThreadPoolExecutor(2, thread_name_prefix="slide-tile")


@answers_problems
async def _slide_tile(request: Request) -> Response:
    """GET /slides/{slide_id}/tile?x=&y=&size=: a square of the slide at full resolution, as PNG."""
    from slides.analyze import read_tile

    slide = SLIDES.slide_of(request.path_params["slide_id"])
    try:
        x, y, size = (int(request.query_params[key]) for key in ("x", "y", "size"))
    except (KeyError, ValueError):
        raise Problem(HTTPStatus.BAD_REQUEST, "give x, y and size as whole level-0 pixels") from None
    if not 1 <= size <= MAX_TILE_VIEW:
        raise Problem(HTTPStatus.BAD_REQUEST, f"size is 1-{MAX_TILE_VIEW} pixels")

    def png() -> bytes:
        buffer = io.BytesIO()
        read_tile(slide, x, y, size).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    try:
        return Response(await asyncio.get_running_loop().run_in_executor(TILE_READERS, png), media_type="image/png")
    except SlideError as exc:
        raise _slide_problem(exc) from None
    except ValueError as exc:
        raise Problem(HTTPStatus.BAD_REQUEST, str(exc)) from None


@answers_problems
async def _slide_output(request: Request) -> Response:
    """GET /slides/{slide_id}/{name}: a finished analysis' GeoJSON, overlay or summary."""
    folder = SLIDES.folder_of(request.path_params["slide_id"])
    name = request.path_params["name"]
    if name not in OUTPUT_FILES or not (folder / name).is_file():
        raise Problem(HTTPStatus.NOT_FOUND, f"no {name!r} for this slide (not analysed?); see {sorted(OUTPUT_FILES)}")
    return FileResponse(folder / name, media_type=OUTPUT_FILES[name])


async def _model_card(request: Request) -> Response:
    """GET /model: the model card of the model being served."""
    service: Histopathology = bentoml.get_current_service()
    return JSONResponse(service.stored.card.model_dump(mode="json"))


async def _model_report(request: Request) -> Response:
    """GET /model/report[/{name}]: the evaluation report stored with the model (Markdown, JSON, figures)."""
    service: Histopathology = bentoml.get_current_service()
    name = request.path_params.get("name", REPORT_MARKDOWN)
    path = service.stored.path / name
    if name not in REPORT_FILES or not path.is_file():
        return problem(HTTPStatus.NOT_FOUND, f"this model has no report file {name!r}; see {sorted(REPORT_FILES)}")
    return FileResponse(path, media_type=REPORT_FILES[name], headers={"Cache-Control": "no-cache"})


# Plain GET routes next to BentoML's POST APIs (BentoML APIs are POST-only).
http_routes = Starlette(
    routes=[
        Route("/model", _model_card, methods=["GET"]),
        Route("/model/report", _model_report, methods=["GET"]),
        Route("/model/report/{name}", _model_report, methods=["GET"]),
        Route("/slides", _upload_slide, methods=["POST"]),
        Route("/slides/{slide_id}/progress", _slide_progress, methods=["GET"]),
        Route("/slides/{slide_id}/tile", _slide_tile, methods=["GET"]),
        Route("/slides/{slide_id}/{name}", _slide_output, methods=["GET"]),
        # The page's relative links need the trailing slash.
        Route("/ui", lambda request: RedirectResponse("/ui/", status_code=HTTPStatus.PERMANENT_REDIRECT)),
        Mount("/ui", StaticFiles(directory=UI_FOLDER, html=True), name="ui"),
    ]
)


@bentoml.asgi_app(http_routes, path="/")
@bentoml.service(
    name="histopathology",
    labels={"task": "histopathology-tile-classification", "intended-use": "research-only"},
    **server_options(SETTINGS),  # workers, timeout, no access log, no spans without an exporter
)
class Histopathology:
    """Histopathology tile classifier with adaptive batching."""

    bento_model = MODEL

    @bentoml.on_deployment
    def check_model() -> None:
        """Refuse to start (one line, non-zero exit) unless the model can serve.

        Runs once in the main `bentoml serve` process, before any worker, so a
        missing or broken model is not a worker crash loop.
        """
        configure_logging(SETTINGS.log_format)
        try:
            logger.info("model %s can serve", check_model_can_serve(SETTINGS.model_tag))
        except ModelLoadError as exc:
            raise SystemExit(f"histopathology service cannot start: {exc}") from None

    def __init__(self) -> None:
        # TensorFlow loads here, in the worker only: the supervisor process stays small.
        prefer_onednn()
        from models.explain import GradCam
        from models.inference import configure_threads

        configure_logging(SETTINGS.log_format)
        init_error_tracking(SETTINGS.sentry_dsn, release=SETTINGS.model_tag)
        configure_threads(SETTINGS.tf_intra_op_threads, SETTINGS.tf_inter_op_threads)
        self.stored: StoredModel = load_model(str(self.bento_model.tag))
        card = self.stored.card
        self.input_size = card.input_size
        self.scale = ModelScale.of(card)  # what an upload's `mpp` is resampled to
        thresholds = Thresholds.resolve(card, SETTINGS.abstain_threshold, SETTINGS.ood_threshold)
        self.classifier = TileClassifier(self.stored, thresholds, trust_checks=SETTINGS.ood_gate)
        self.grad_cam: GradCam = GradCam(self.stored.model, card.architecture, card.input_size)
        # One explanation at a time: a gradient pass costs several predictions, and /predict comes first.
        self._explaining = asyncio.Semaphore(1)
        self._analysing = asyncio.Semaphore(1)
        self._slide_thread = ThreadPoolExecutor(1, thread_name_prefix="slide")
        self.metrics: ServiceMetrics = service_metrics()
        name, _, version = self.stored.tag.partition(":")
        self.metrics.model_info.labels(name=name, version=version, architecture=card.architecture).set(1)
        self.batcher: MicroBatcher[TileEvidence] = MicroBatcher(
            self._run_model,
            max_batch_size=SETTINGS.max_batch_size,
            max_wait_s=SETTINGS.max_latency_ms / 1000,
            observe_batch_size=self.metrics.batch_size.observe,
            observe_queue_delay=ADMISSION.record_queue_delay,
        )
        # A few decoding threads, not asyncio's default pool of cores + 4, plus one for expensive decodes:
        # with HISTO_MAX_DECODE_BYTES they bound the memory and CPU decoding can take in this worker.
        self._decoder = ThreadPoolExecutor(SETTINGS.decode_threads, thread_name_prefix="decode")
        self._heavy_decoder = ThreadPoolExecutor(1, thread_name_prefix="decode-heavy")
        self._warm = asyncio.Event()
        logger.info(
            "loaded %s (%s, %d classes); quality gate and out-of-distribution score %s (threshold %.3f)",
            self.stored.tag, card.architecture, len(card.class_names), "on" if SETTINGS.ood_gate else "OFF",
            thresholds.out_of_distribution,
        )

    @bentoml.on_startup
    async def warm_up(self) -> None:
        """Run every batch size the batcher can form once; `/readyz` stays 503 until this is done.

        Every size, not a few: TensorFlow sets up per shape, and doing it here keeps first-time
        latency spikes and memory growth out of serving.
        """
        sizes = range(1, SETTINGS.max_batch_size + 1)
        await asyncio.to_thread(self.classifier.predictor.warm_up, sizes)
        blank = np.zeros((self.input_size, self.input_size, 3), np.uint8)
        await asyncio.to_thread(self.grad_cam.heat_map, blank, 0)
        self._warm.set()
        logger.info("warmed up for batch sizes 1..%d", SETTINGS.max_batch_size)

    @bentoml.on_shutdown
    async def stop_batcher(self) -> None:
        await self.batcher.close()
        for pool in (self._decoder, self._heavy_decoder, self._slide_thread):
            pool.shutdown(wait=False, cancel_futures=True)

    def __is_ready__(self) -> bool:
        return self._warm.is_set()

    def _run_model(self, images: np.ndarray) -> list[TileEvidence]:
        started = time.perf_counter()
        evidence = self.classifier.evidence(images)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        return evidence

    def _start_decode(
        self, path: Path, size: int | None, deadline: float | None, budget: _PixelBudget | None,
        mpp: float | None = None,
    ) -> np.ndarray | PreparedDecode:
        """On a decode thread: check the header (and spend from the request's budget); decode at once
        unless it is heavy (then it is handed over as it is). With `mpp`, resampled to the model's pixel size."""
        prepared = prepare_decode(path, size, SETTINGS.decode_limits, mpp, self.scale.field_microns)
        if budget is not None:
            budget.spend(prepared.cost.pixels)
        return prepared if _heavy(prepared.cost) else self._finish_decode(prepared, deadline)

    def _finish_decode(self, prepared: PreparedDecode, deadline: float | None) -> np.ndarray:
        image = finish_decode(prepared, deadline)
        release_heap(prepared.cost.estimated_bytes)
        return image

    async def _decode(self, path: Path, full_size: bool = False, budget: _PixelBudget | None = None,
                      mpp: float | None = None) -> np.ndarray:
        """Decode an upload on the decode threads: to the model's input size (resampled to its pixel size when
        the upload's `mpp` is given and the card has one), or at its own size.

        An ordinary tile takes one hop (header check and decode on one thread); a heavy one a second,
        on the heavy thread. The decode time (both hops, not the waits) is observed once per upload.
        """
        loop = asyncio.get_running_loop()
        size = None if full_size else self.input_size
        deadline = REQUEST_DEADLINE.get()
        spent = 0.0

        def timed(step: Callable[..., T], *args: object) -> T:
            nonlocal spent
            started = time.perf_counter()
            try:
                return step(*args)
            finally:  # refused uploads cost decode time too
                spent += time.perf_counter() - started

        try:
            result = await loop.run_in_executor(
                self._decoder, timed, self._start_decode, path, size, deadline, budget, mpp
            )
            if isinstance(result, PreparedDecode):
                result = await loop.run_in_executor(
                    self._heavy_decoder, timed, self._finish_decode, result, deadline
                )
            return result
        finally:
            self.metrics.decode_seconds.observe(spent)

    def _prediction(self, evidence: TileEvidence, rescaling: Rescaling | None = None) -> Prediction:
        prediction = self.classifier.answer(evidence)
        if rescaling is not None:
            prediction = prediction.model_copy(update={"rescaling": rescaling})
        self.metrics.predictions.labels(predicted_class=prediction.predicted_class).inc()
        if prediction.uncertain:
            self.metrics.uncertain.inc()
        for reason in prediction.reasons:
            self.metrics.flagged.labels(reason=reason).inc()
        return prediction

    async def _decode_or_problem(
        self, path: Path, full_size: bool = False, budget: _PixelBudget | None = None, part: str = "file",
        mpp: float | None = None,
    ) -> np.ndarray:
        """:meth:`_decode`, its failures raised as the problem they answer with."""
        try:
            return await self._decode(path, full_size, budget, mpp)
        except ImageDecodeError as exc:
            raise Problem.from_decode_error(exc, part) from None
        except DecodeAbandonedError as exc:  # its deadline passed: the guard has answered 504 already
            raise _too_slow(exc) from None

    async def _model_rows(self, images: list[np.ndarray]) -> list[TileEvidence]:
        try:
            return await asyncio.gather(*(self.batcher.submit(image) for image in images))
        except BatchTimeoutError as exc:
            raise _too_slow(exc) from None

    def _rescaling(self, mpp: float | None) -> Rescaling | None:
        """What an upload's `mpp` does (None when none was sent); 400 outside the sane range."""
        if mpp is None:
            return None
        try:
            return Rescaling.of(self.stored.card, check_microns_per_pixel(mpp))
        except ValueError as exc:
            raise Problem(HTTPStatus.BAD_REQUEST, str(exc)) from None

    async def _classify(self, file: Path, mpp: float | None = None) -> tuple[np.ndarray, Prediction]:
        """Decode one upload and classify it through the batcher (the decoded image too)."""
        rescaling = self._rescaling(mpp)
        image = await self._decode_or_problem(file, mpp=mpp)
        [row] = await self._model_rows([image])
        return image, self._prediction(row, rescaling)

    @bentoml.api(route="/predict")
    @answers_problems
    async def predict(self, file: Path, mpp: float | None = None) -> Prediction:
        """Classify one tissue tile (multipart field `file`: JPEG, PNG, WebP or TIFF). `mpp`: its microns per
        pixel, to resample it to the model's pixel size (see `rescaling` in the answer)."""
        _, prediction = await self._classify(file, mpp)
        note(predicted_class=prediction.predicted_class, uncertain=prediction.uncertain, **_reasons(prediction))
        return prediction

    @bentoml.api(route="/predict_batch")
    @answers_problems
    async def predict_batch(self, file: list[Path], mpp: float | None = None) -> list[Prediction]:
        """Classify several tiles sent as repeated `file` parts; results in the same order. `mpp`: the
        microns per pixel of every part."""
        if not file:
            raise Problem(HTTPStatus.BAD_REQUEST, "send at least one `file` part")
        rescaling = self._rescaling(mpp)
        # All parts together may not decode more pixels than one image may have: spent as headers are read.
        budget = _PixelBudget(SETTINGS.max_pixels)
        decoded = await asyncio.gather(
            *(self._decode_or_problem(path, budget=budget, part=f"file[{i}]", mpp=mpp) for i, path in enumerate(file)),
            return_exceptions=True,
        )
        for result in decoded:  # the first bad part, in the order sent, names the problem
            if isinstance(result, BaseException):
                raise result
        predictions = [self._prediction(row, rescaling) for row in await self._model_rows(decoded)]
        note(predicted_class=",".join(p.predicted_class for p in predictions))
        return predictions

    @bentoml.api(route="/explain")
    @answers_problems
    async def explain(
        self, file: Path, target_class: str | None = None, include_map: bool = False, mpp: float | None = None
    ) -> ExplainedPrediction:
        """Classify one tile and show where the model looked: a Grad-CAM overlay (base64 PNG).

        `target_class` explains another class than the predicted one; `include_map` adds the raw map; `mpp`
        resamples the tile to the model's pixel size as /predict does (the overlay is then drawn on what the
        model saw).
        """
        from models.explain import explain

        class_names = self.stored.card.class_names
        if target_class is not None and target_class not in class_names:
            raise Problem(HTTPStatus.BAD_REQUEST, f"target_class {target_class!r} is not one of {class_names}")
        image, prediction = await self._classify(file, mpp)
        # The upload at its own size, for the overlay (it decoded once already); resampled, what the model saw.
        rescaled = prediction.rescaling is not None and prediction.rescaling.rescaled
        full_image = image if rescaled else await self._decode_or_problem(file, full_size=True)
        explained = target_class or prediction.predicted_class
        async with self._explaining:
            explanation = await asyncio.to_thread(
                explain, self.grad_cam, image, full_image, class_names.index(explained)
            )
        note(predicted_class=prediction.predicted_class, explained_class=explained, **_reasons(prediction))
        return ExplainedPrediction(
            **prediction.model_dump(),
            explained_class=explained,
            overlay_png=base64.b64encode(explanation.overlay_png).decode("ascii"),
            heat_map=explanation.heat_map.round(4).tolist() if include_map else None,
        )


    @bentoml.task(route="/analyze_slide")
    @answers_problems
    async def analyze_slide(
        self, slide_id: str | None = None, path: str | None = None, tile_size: int | None = None,
        min_tissue: float = 0.5,
    ) -> dict[str, Any]:
        """Analyse a whole slide uploaded with POST /slides (`slide_id`) or in the service's slide folder
        (`path`, relative): tissue tiles through the same gate, model and OOD score as /predict. The result
        is the summary; GeoJSON and overlay are at GET /slides/{slide_id}/analysis.geojson and overlay.png."""
        from slides.analyze import analyze, write

        if not 0.0 <= min_tissue <= 1.0 or (tile_size is not None and not 16 <= tile_size <= 16384):
            raise Problem(HTTPStatus.BAD_REQUEST, "min_tissue is a share (0-1) and tile_size 16-16384 pixels")
        slide, outputs = SLIDES.resolve(slide_id, path)

        def report(done: int, total: int) -> None:
            SLIDES.write_progress(outputs, "running", done, total)

        def run() -> dict[str, Any]:
            # The served graph taps the OOD features only with the gate on; otherwise analyze traces its own.
            analysis = analyze(slide, self.stored, tile_size, min_tissue, progress=report,
                               classifier=self.classifier)
            facts = write(analysis, outputs, self.stored.card.abstention.cancer_classes)
            SLIDES.write_progress(outputs, "done", len(analysis.tiles), len(analysis.tiles))
            return facts

        SLIDES.write_progress(outputs, "queued")
        try:  # one slide at a time per worker, on a thread of its own: /predict keeps its batcher
            async with self._analysing:
                summary = await asyncio.get_running_loop().run_in_executor(self._slide_thread, run)
        except SlideError as exc:
            failure = _slide_problem(exc)
        except Exception as exc:  # a task that raises would stay "in progress" for ever
            logger.exception("slide analysis failed")
            failure = Problem(HTTPStatus.INTERNAL_SERVER_ERROR, f"the analysis failed ({type(exc).__name__})")
        else:
            return {"slide_id": outputs.name, **summary}
        SLIDES.write_progress(outputs, "failed", detail=failure.detail)
        raise failure


def _heavy(cost: DecodeCost) -> bool:
    return cost.estimated_bytes > HEAVY_DECODE_BYTES or cost.scan_pixels > HEAVY_DECODE_SCAN_PIXELS


def _reasons(prediction: Prediction) -> dict[str, str]:
    """The log line's `reasons` field, when the answer was flagged."""
    return {"reasons": ",".join(prediction.reasons)} if prediction.reasons else {}


def _too_slow(error: BatchTimeoutError | DecodeAbandonedError) -> Problem:
    return Problem(HTTPStatus.GATEWAY_TIMEOUT, f"the image was not classified in time ({error}); retry later")


if SETTINGS.cors_origins:  # outermost, so preflight requests never need the token
    Histopathology.add_asgi_middleware(
        CORSMiddleware,
        allow_origins=list(SETTINGS.cors_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        expose_headers=["X-Request-ID"],
    )
ROUTES = route_facts(Histopathology.apis.values(), http_routes.routes, SETTINGS.max_files_per_request)
KNOWN_ROUTES = ROUTES.known_routes | BENTOML_ROUTES
# These, and everything under them, need the token when one is set.
TOKEN_ROUTES = frozenset({*ROUTES.upload_routes, "/model", "/slides", "/analyze_slide"})
# Takes effect when BentoML builds the worker's app, after this module is imported.
front_door.install(KNOWN_ROUTES | PROBES, ROUTES.served_prefixes + BENTOML_PREFIXES, ROUTES.upload_routes, ADMISSION)
Histopathology.add_asgi_middleware(RequestLog, known_routes=KNOWN_ROUTES, upload_routes=ROUTES.upload_routes)
Histopathology.add_asgi_middleware(
    OpenAPIDocument,
    build=lambda: corrected_document(
        Histopathology.openapi_spec.asdict(), ROUTES.upload_routes, TOKEN_ROUTES, ROUTES.json_routes
    ),
)
Histopathology.add_asgi_middleware(
    RequestGuard,
    policy=GuardPolicy(
        upload_routes=ROUTES.upload_routes,
        token_routes=TOKEN_ROUTES,
        max_body_bytes=SETTINGS.max_body_bytes,
        admission=ADMISSION,
        request_timeout_s=SETTINGS.request_timeout_ms / 1000,
        body_timeout_s=SETTINGS.body_timeout_ms / 1000,
        body_idle_timeout_s=SETTINGS.body_idle_timeout_ms / 1000,
        api_token=SETTINGS.api_token,
        text_fields=ROUTES.form_fields,
        json_routes=ROUTES.json_routes,
    ),
)
