"""In-process throughput: the limit a server on this machine can approach.

Measures, without HTTP: the traced model alone at batch sizes 1..64, the
shared decode function on a 768x768 JPEG, and ``model.predict`` on one image
(what a per-request server pays). Uses the stored model when there is one,
otherwise the default architecture with random weights (same speed).

    python -m loadtests.inprocess [--model TAG] [--seconds 2]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from models.tf_environment import prefer_onednn

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class InProcessResult:
    architecture: str
    input_size: int
    images_per_second: dict[int, float]  # traced model, by batch size
    best_batch_size: int
    decode_ms: float  # one 768x768 JPEG through models.preprocessing
    predict_single_ms: float  # keras model.predict on one image
    pipeline_images_per_second: float  # decode + traced model at the best batch, serial


@dataclass(frozen=True)
class ServedModel:
    tag: str | None  # name:version in the store; None for random weights
    model: keras.Model
    input_size: int
    architecture: str
    temperature: float


def served_model(model_tag: str | None = None) -> ServedModel:
    """The stored model (default: the latest lung_histopathology), or, when there is none, the
    default architecture with random weights (the same speed)."""
    from models.architectures import build_model
    from models.store import ModelLoadError, load_model

    try:
        stored = load_model(model_tag) if model_tag else load_model()
    except ModelLoadError as exc:
        logger.info("%s; measuring the default architecture with random weights", exc)
        return ServedModel(None, build_model("cnn", 3, 128), 128, "cnn", 1.0)
    card = stored.card
    return ServedModel(stored.tag, stored.model, card.input_size, card.architecture, card.calibration_temperature)


def rate(run: Callable[[], None], items: int, seconds: float) -> float:
    """Items per second of `run` over at least `seconds` (after one warm-up)."""
    run()
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        run()
        done += items
    return done / elapsed


def sample_jpeg(size: int = 768, class_name: str = "lung_aca", seed: int = 1) -> bytes:
    """A realistic synthetic tile, JPEG-encoded as clients would send it."""
    from synthetic.tissue import render_tile

    buffer = io.BytesIO()
    render_tile(class_name, size, seed=seed).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def measure(model_tag: str | None = None, seconds: float = 2.0) -> InProcessResult:
    """The limit, with the service's TensorFlow settings (call before TensorFlow is imported)."""
    prefer_onednn()
    from models.inference import Predictor
    from models.preprocessing import decode_image

    served = served_model(model_tag)
    model, size, arch = served.model, served.input_size, served.architecture
    predictor = Predictor(model, size, served.temperature)
    rng = np.random.default_rng(0)
    rates = {}
    for batch_size in BATCH_SIZES:
        batch = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
        rates[batch_size] = rate(lambda b=batch: predictor(b), batch_size, seconds)
        logger.info("batch %3d: %7.1f images/s", batch_size, rates[batch_size])
    best = max(rates, key=rates.get)

    jpeg = sample_jpeg()
    decode_rate = rate(lambda: decode_image(jpeg, size), 1, seconds)
    one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8).astype(np.float32)
    predict_rate = rate(lambda: model.predict(one, verbose=0), 1, seconds)
    best_batch = rng.integers(0, 256, (best, size, size, 3), dtype=np.uint8)

    def pipeline() -> None:
        for i in range(best):
            best_batch[i] = decode_image(jpeg, size)
        predictor(best_batch)

    return InProcessResult(
        architecture=arch,
        input_size=size,
        images_per_second={k: round(v, 1) for k, v in rates.items()},
        best_batch_size=best,
        decode_ms=round(1000 / decode_rate, 2),
        predict_single_ms=round(1000 / predict_rate, 2),
        pipeline_images_per_second=round(rate(pipeline, best, seconds), 1),
    )


def _one_core_pipeline(model_tag: str | None, seconds: float, batch_size: int, start: Any, results: Any) -> None:
    """In a process of its own: decode + traced model at `batch_size` on ONE TensorFlow thread."""
    prefer_onednn()
    from models.inference import Predictor, configure_threads
    from models.preprocessing import decode_image

    configure_threads(1, 1)
    served = served_model(model_tag)
    predictor = Predictor(served.model, served.input_size, served.temperature)
    jpeg = sample_jpeg()
    batch = np.zeros((batch_size, served.input_size, served.input_size, 3), np.uint8)

    def pipeline() -> None:
        for i in range(batch_size):
            batch[i] = decode_image(jpeg, served.input_size)
        predictor(batch)

    pipeline()  # traced and warm before the common start
    start.wait()
    results.put(rate(pipeline, batch_size, seconds))


def all_core_limit(model_tag: str | None, seconds: float, batch_size: int, processes: int | None = None) -> float:
    """The machine's compute limit: one single-threaded decode + model process per usable core, all at
    once, their images/s summed. A single process leaves a core idle while it decodes."""
    import multiprocessing

    from config.cpus import usable_cpus

    count = processes or usable_cpus()
    context = multiprocessing.get_context("spawn")  # a fresh TensorFlow per process
    start, results = context.Barrier(count), context.Queue()
    workers = [
        context.Process(target=_one_core_pipeline, args=(model_tag, seconds, batch_size, start, results))
        for _ in range(count)
    ]
    for worker in workers:
        worker.start()
    try:
        rates = [results.get(timeout=300) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=60)
    logger.info("all-core limit: %d processes, %s images/s each", count, [round(r, 1) for r in rates])
    return round(sum(rates), 1)


def format_table(result: InProcessResult) -> str:
    lines = [
        f"in-process throughput: {result.architecture} at {result.input_size}x{result.input_size}",
        f"{'batch':>6} {'images/s':>10}",
    ]
    lines += [f"{b:>6} {r:>10.1f}" for b, r in result.images_per_second.items()]
    lines += [
        f"best batch size:                 {result.best_batch_size}",
        f"decode 768x768 JPEG:             {result.decode_ms:.2f} ms",
        f"model.predict, one image:        {result.predict_single_ms:.2f} ms",
        f"traced, one image:               {1000 / result.images_per_second[1]:.2f} ms",
        f"decode + model (serial, best bs): {result.pipeline_images_per_second:.1f} images/s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="store tag to measure (default: the latest lung_histopathology)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per point (default: 2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = measure(args.model, args.seconds)
    # The table is this command's output, not a log line.
    print(json.dumps(asdict(result), indent=2) if args.json else format_table(result))


if __name__ == "__main__":
    main()
