"""The BentoML service: lifecycle and the API methods of docs/http-contract.md (routes in README.md).

Each upload is decoded and validated on a decode thread first
(`serving.inference.decoding`), so a bad one is answered with its 4xx and
never joins a batch. Valid images are queued to an in-process micro-batcher
that runs the model, the quality gate and the out-of-distribution score on
the stacked batch, and each tile is answered by the one answer rule
(`models.prediction`). The plain GET routes and the slide routes are in
`serving.http.handlers`; whole slides are analysed on the Dask engine
(`serving.slide_analyses`); the middleware is in `serving.http.stack`.

Run it with `make serve`, or `bentoml serve` from this folder.
"""

import asyncio
import base64
import logging
import time
from http import HTTPStatus
from pathlib import Path

import bentoml
import numpy as np

from config.settings import load_settings_or_exit
from models.prediction import ExplainedPrediction, Prediction, Rescaling, Thresholds, TileClassifier, TileEvidence
from models.resampling import ModelScale, check_microns_per_pixel
from models.store import ModelLoadError, StoredModel, load_model
from models.tf_environment import prefer_onednn
from serving.admission.capacity import Admission
from serving.admission.connections import bound_header_time, raise_open_file_limit
from serving.http.handlers import plain_routes
from serving.http.response_types import fix_response_media_types
from serving.http.stack import install_middleware
from serving.inference.batcher import BatchTimeoutError, MicroBatcher
from serving.inference.decoding import Decoder, PixelBudget, not_answered_in_time
from serving.inference.model_check import check_model_can_serve
from serving.observability.error_tracking import init_error_tracking
from serving.observability.logs import configure_logging
from serving.observability.metrics import ServiceMetrics, service_metrics
from serving.observability.request_log import add_log_fields
from serving.problems import Problem, answers_problems
from serving.server_options import server_options
from serving.slide_analyses import SlideAnalyses

logger = logging.getLogger(__name__)

# Read when BentoML imports this module: the decorators below need them.
SETTINGS = load_settings_or_exit(bento_arguments=vars(bentoml.use_arguments()))
MODEL = bentoml.models.BentoModel(SETTINGS.model_tag)
UI_FOLDER = Path(__file__).resolve().parent / "ui"
# Per worker process: what it has admitted, shared by the front door, the guard and the batcher.
ADMISSION = Admission(
    SETTINGS.max_in_flight, SETTINGS.max_open_uploads, SETTINGS.max_queue_delay_ms / 1000, SETTINGS.max_buffered_bytes
)
PLAIN_ROUTES = plain_routes(SETTINGS, UI_FOLDER)
# Take effect when BentoML builds the worker's server, after this module is imported.
bound_header_time(SETTINGS.header_timeout_ms / 1000)
raise_open_file_limit()  # thousands of half-open connections must not exhaust a 1,024-descriptor default


@bentoml.asgi_app(PLAIN_ROUTES, path="/")
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
        thresholds = Thresholds.resolve(card, SETTINGS.abstain_threshold, SETTINGS.ood_threshold)
        self.classifier = TileClassifier(self.stored, thresholds, trust_checks=SETTINGS.ood_gate)
        self.grad_cam: GradCam = GradCam(self.stored.model, card.architecture, card.input_size)
        # One explanation at a time: a gradient pass costs several predictions, and /predict comes first.
        self._explaining = asyncio.Semaphore(1)
        # Slides run on the Dask engine (an embedded cluster of niced workers unless HISTO_DASK_SCHEDULER
        # names one), never in this process: /predict keeps its cores; state lives in the slide store.
        self.slides = SlideAnalyses(SETTINGS, str(self.stored.tag))
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
        # An upload's `mpp` is resampled to the model's pixel size (the card's field of view).
        self.decoder = Decoder(ModelScale.of(card), SETTINGS.decode_limits, SETTINGS.decode_threads,
                               self.metrics.decode_seconds.observe)
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
        size = self.classifier.input_size
        await asyncio.to_thread(self.grad_cam.heat_map, np.zeros((size, size, 3), np.uint8), 0)
        self._warm.set()
        logger.info("warmed up for batch sizes 1..%d", SETTINGS.max_batch_size)

    @bentoml.on_startup
    async def start_slide_reconciler(self) -> None:
        self.slides.start()

    @bentoml.on_shutdown
    async def stop_batcher(self) -> None:
        await self.batcher.close()
        self.decoder.close()
        await self.slides.close()

    def __is_ready__(self) -> bool:
        return self._warm.is_set()

    def _run_model(self, images: np.ndarray) -> list[TileEvidence]:
        started = time.perf_counter()
        evidence = self.classifier.evidence(images)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        return evidence

    def _answers(self, evidence: list[TileEvidence], rescaling: Rescaling | None = None) -> list[Prediction]:
        """The answer for each tile (with what its `mpp` did), counted in the metrics once per request."""
        predictions = [self.classifier.answer(row) for row in evidence]
        if rescaling is not None:
            predictions = [p.model_copy(update={"rescaling": rescaling}) for p in predictions]
        self.metrics.count_answers(predictions)
        return predictions

    async def _evidence(self, images: list[np.ndarray]) -> list[TileEvidence]:
        try:
            return await asyncio.gather(*(self.batcher.submit(image) for image in images))
        except BatchTimeoutError as exc:
            raise not_answered_in_time(exc) from None

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
        image = await self.decoder.decode(file, mpp=mpp)
        [prediction] = self._answers(await self._evidence([image]), rescaling)
        return image, prediction

    @bentoml.api(route="/predict")
    @answers_problems
    async def predict(self, file: Path, mpp: float | None = None) -> Prediction:
        """Classify one tissue tile (multipart field `file`: JPEG, PNG, WebP or TIFF). `mpp`: its microns per
        pixel, to resample it to the model's pixel size (see `rescaling` in the answer)."""
        _, prediction = await self._classify(file, mpp)
        add_log_fields(predicted_class=prediction.predicted_class, uncertain=prediction.uncertain,
                       **_reasons(prediction))
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
        budget = PixelBudget(SETTINGS.max_pixels)
        decoded = await self.decoder.decode_parts(file, budget, mpp)  # the first bad part, in order, names it
        predictions = self._answers(await self._evidence(decoded), rescaling)
        add_log_fields(predicted_class=",".join(p.predicted_class for p in predictions))
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

        class_names = self.classifier.class_names
        if target_class is not None and target_class not in class_names:
            raise Problem(HTTPStatus.BAD_REQUEST, f"target_class {target_class!r} is not one of {class_names}")
        image, prediction = await self._classify(file, mpp)
        # The upload at its own size, for the overlay (it decoded once already); resampled, what the model saw.
        rescaled = prediction.rescaling is not None and prediction.rescaling.rescaled
        full_image = image if rescaled else await self.decoder.decode(file, full_size=True)
        explained = target_class or prediction.predicted_class
        async with self._explaining:
            explanation = await asyncio.to_thread(
                explain, self.grad_cam, image, full_image, class_names.index(explained)
            )
        add_log_fields(predicted_class=prediction.predicted_class, explained_class=explained, **_reasons(prediction))
        return ExplainedPrediction(
            **prediction.model_dump(),
            explained_class=explained,
            overlay_png=base64.b64encode(explanation.overlay_png).decode("ascii"),
            heat_map=explanation.heat_map.round(4).tolist() if include_map else None,
        )


def _reasons(prediction: Prediction) -> dict[str, str]:
    """The log line's `reasons` field, when the answer was flagged."""
    return {"reasons": ",".join(prediction.reasons)} if prediction.reasons else {}


# Take effect when BentoML builds the worker's app, after this module is imported.
install_middleware(Histopathology, PLAIN_ROUTES, SETTINGS, ADMISSION)
fix_response_media_types(Histopathology.apis.values())
