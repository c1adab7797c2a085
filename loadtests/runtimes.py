"""`make runtimes`: the served model under other inference runtimes, next to TensorFlow.

The served graph (`models.inference.probability_function`: uint8 images in,
calibrated probabilities out) is converted to LiteRT (XNNPACK), ONNX Runtime
and OpenVINO. Each runtime must agree with TensorFlow on synthetic tiles
decoded as the service decodes them (identical argmax, max |dp| <= 1e-4), and
is timed at batch 1 and at its best batch, with 1 and with 2 threads.
TensorFlow's thread pools are fixed per process, so each thread count runs in
a child process.

The decision rule: serve another runtime only if it makes the service at
least 1.25x faster end to end. A runtime changes only the model's share of a
request's CPU; decode, HTTP and BentoML's input handling stay. So the gain is
bounded by the service's CPU per request (at 32 clients, from the latest
`make benchmark`, loadtests.report.latest_record) over that CPU less what
the runtime saves per image. Without a benchmark record, the worker pipeline
(decode + model at one thread, per image) stands in for the request.

    python -m loadtests.runtimes [--model TAG] [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loadtests.client import server_core_ms
from loadtests.inprocess import rate, sample_jpeg, served_model
from loadtests.report import latest_record, results_dir, write_section
from models.tf_environment import prefer_onednn
from synthetic.tissue import LUNG_CLASSES

if TYPE_CHECKING:  # TensorFlow loads only after prefer_onednn()
    from tensorflow.types.experimental import PolymorphicFunction

logger = logging.getLogger(__name__)

RUNTIMES = ("tensorflow", "litert", "onnxruntime", "openvino")
THREAD_COUNTS = (1, 2)
BATCH_SIZES = (1, 8, 16, 32)
AGREEMENT_TILES_PER_CLASS = 8
MAX_ABS_DIFFERENCE = 1e-4
REQUIRED_END_TO_END_GAIN = 1.25
BENCHMARK_RECORD = "benchmark.json"  # `make benchmark`'s record (loadtests.report.latest_record)
SERVICE_ROW = "service (defaults"  # the benchmark row whose CPU per request is the end-to-end base
SERVICE_CLIENTS = 32
ONNX_OPSET = 17
COMMAND = "make runtimes"

Runner = Callable[[np.ndarray], np.ndarray]  # uint8 (batch, S, S, 3) -> probabilities (batch, classes)


@dataclass(frozen=True)
class RuntimeResult:
    runtime: str
    threads: int
    images_per_second: dict[int, float]  # by batch size
    convert_seconds: float
    artifact_bytes: int  # the converted model (0 for TensorFlow: it runs the stored .keras file)
    max_abs_difference: float  # against TensorFlow's probabilities on the agreement tiles
    argmax_agrees: bool

    @property
    def best_batch_size(self) -> int:
        return max(self.images_per_second, key=self.images_per_second.get)

    @property
    def best_images_per_second(self) -> float:
        return self.images_per_second[self.best_batch_size]

    @property
    def agrees(self) -> bool:
        return self.argmax_agrees and self.max_abs_difference <= MAX_ABS_DIFFERENCE


def _litert_runner(probabilities: PolymorphicFunction, threads: int) -> tuple[Runner, int]:
    """LiteRT flatbuffer run by the XNNPACK delegate; the runner and the flatbuffer's size."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    concrete = probabilities.get_concrete_function()
    content = tf.lite.TFLiteConverter.from_concrete_functions([concrete], probabilities).convert()
    interpreters: dict[int, Interpreter] = {}  # one per batch size: resizing re-plans the graph

    def run(images: np.ndarray) -> np.ndarray:
        interpreter = interpreters.get(len(images))
        if interpreter is None:
            interpreter = Interpreter(model_content=content, num_threads=threads)
            interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], images.shape)
            interpreter.allocate_tensors()
            interpreters[len(images)] = interpreter
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    return run, len(content)


def _onnxruntime_runner(probabilities: PolymorphicFunction, threads: int) -> tuple[Runner, int]:
    """ONNX graph (tf2onnx) in an ONNX Runtime CPU session; the runner and the graph's size."""
    import onnxruntime
    import tf2onnx

    proto, _ = tf2onnx.convert.from_function(
        probabilities, input_signature=probabilities.input_signature, opset=ONNX_OPSET
    )
    content = proto.SerializeToString()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return (lambda images: session.run(None, {input_name: images})[0]), len(content)


def _openvino_runner(probabilities: PolymorphicFunction, threads: int) -> tuple[Runner, int]:
    """OpenVINO IR compiled for the CPU in fp32; the runner and the IR's size on disk."""
    import openvino

    converted = openvino.convert_model(probabilities)
    compiled = openvino.Core().compile_model(
        converted,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            # OpenVINO pins its threads to cores by default: two workers would then share one core.
            "ENABLE_CPU_PINNING": False,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    request = compiled.create_infer_request()
    with tempfile.TemporaryDirectory() as folder:  # the size of the IR the store entry would carry
        openvino.save_model(converted, Path(folder) / "model.xml", compress_to_fp16=False)
        artifact_bytes = sum(path.stat().st_size for path in Path(folder).iterdir())
    return (lambda images: request.infer({0: images})[0]), artifact_bytes


CONVERTERS: dict[str, Callable[[PolymorphicFunction, int], tuple[Runner, int]]] = {
    "litert": _litert_runner,
    "onnxruntime": _onnxruntime_runner,
    "openvino": _openvino_runner,
}


def agreement_tiles(input_size: int) -> np.ndarray:
    """Synthetic lung tiles, JPEG-encoded and decoded exactly as the service decodes uploads."""
    from models.preprocessing import decode_image

    tiles = [
        decode_image(sample_jpeg(384, class_name, seed=100 + i), input_size)
        for class_name in LUNG_CLASSES
        for i in range(AGREEMENT_TILES_PER_CLASS)
    ]
    return np.stack(tiles)


def measure_runtimes(
    model_tag: str | None, threads: int, seconds: float, runtimes: tuple[str, ...] = RUNTIMES
) -> list[RuntimeResult]:
    """Convert, check and time each runtime in this process (TensorFlow set up as the service does it)."""
    prefer_onednn()
    from models.inference import configure_threads, probability_function

    configure_threads(threads, 1)
    served = served_model(model_tag)
    probabilities = probability_function(served.model, served.input_size, served.temperature)
    tiles = agreement_tiles(served.input_size)
    reference = probabilities(tiles).numpy()
    rng = np.random.default_rng(0)
    results = []
    for runtime in runtimes:
        started = time.perf_counter()
        if runtime == "tensorflow":
            infer, artifact_bytes = (lambda images: probabilities(images).numpy()), 0
        else:
            infer, artifact_bytes = CONVERTERS[runtime](probabilities, threads)
        convert_seconds = time.perf_counter() - started
        answers = infer(tiles)
        rates = {}
        for batch_size in BATCH_SIZES:
            batch = rng.integers(0, 256, (batch_size, served.input_size, served.input_size, 3), dtype=np.uint8)
            rates[batch_size] = round(rate(lambda b=batch, f=infer: f(b), batch_size, seconds), 1)
        results.append(
            RuntimeResult(
                runtime=runtime,
                threads=threads,
                images_per_second=rates,
                convert_seconds=round(convert_seconds, 2),
                artifact_bytes=artifact_bytes,
                max_abs_difference=float(np.abs(answers - reference).max()),
                argmax_agrees=bool((answers.argmax(axis=1) == reference.argmax(axis=1)).all()),
            )
        )
        logger.info("%s, %d thread(s): %s images/s", runtime, threads, rates)
    return results


def _measure_in_child(model_tag: str | None, threads: int, seconds: float) -> list[RuntimeResult]:
    command = [
        sys.executable,
        "-m",
        "loadtests.runtimes",
        "--threads",
        str(threads),
        "--seconds",
        str(seconds),
        "--json",
    ]
    if model_tag:
        command += ["--model", model_tag]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring with {threads} thread(s) failed:\n{done.stderr[-4000:]}")
    rows = json.loads(done.stdout)
    return [
        RuntimeResult(**{**row, "images_per_second": {int(k): v for k, v in row["images_per_second"].items()}})
        for row in rows
    ]


@dataclass(frozen=True)
class Decision:
    best_runtime: str
    model_gain: float  # best batch, one thread, against TensorFlow
    pipeline_gain: float  # decode + model per image at one thread
    request_core_ms: float  # the service's CPU per request the gain is taken on
    end_to_end_gain: float  # that CPU over that CPU less what the runtime saves per image: the bound
    adopt: bool


def service_core_ms(record: Path | None = None) -> float | None:
    """The service's CPU per request at SERVICE_CLIENTS clients in the latest `make benchmark`, if any."""
    record = record or latest_record(BENCHMARK_RECORD)
    if not record.is_file():
        return None
    facts = json.loads(record.read_text())
    for row in facts["rows"]:
        if row["target"].startswith(SERVICE_ROW) and row["concurrency"] == SERVICE_CLIENTS:
            return server_core_ms(facts["bounds"]["cores"], row["requests_per_second"], row["client_cpu_share"])
    return None


def decide(results: list[RuntimeResult], decode_ms: float, request_core_ms: float | None = None) -> Decision:
    one_thread = {r.runtime: r for r in results if r.threads == 1}
    tensorflow = one_thread["tensorflow"]

    def model_ms(result: RuntimeResult) -> float:
        return 1000 / result.best_images_per_second

    base = request_core_ms if request_core_ms is not None else decode_ms + model_ms(tensorflow)
    candidates = [r for r in one_thread.values() if r.runtime != "tensorflow" and r.agrees]
    if not candidates:
        return Decision("tensorflow", 1.0, 1.0, base, 1.0, adopt=False)
    best = min(candidates, key=model_ms)
    end_to_end = base / max(1e-9, base - (model_ms(tensorflow) - model_ms(best)))
    return Decision(
        best_runtime=best.runtime,
        model_gain=best.best_images_per_second / tensorflow.best_images_per_second,
        pipeline_gain=(decode_ms + model_ms(tensorflow)) / (decode_ms + model_ms(best)),
        request_core_ms=base,
        end_to_end_gain=end_to_end,
        adopt=end_to_end >= REQUIRED_END_TO_END_GAIN,
    )


def markdown(results: list[RuntimeResult], decode_ms: float, decision: Decision, when: str, model: str) -> list[str]:
    tensorflow = {r.threads: r.best_images_per_second for r in results if r.runtime == "tensorflow"}
    n_tiles = len(LUNG_CLASSES) * AGREEMENT_TILES_PER_CLASS
    lines = [
        "## Inference runtimes",
        "",
        f"Latest run of `{COMMAND}` ({when}; model `{model}`): the served graph converted from TensorFlow, "
        f"checked on {n_tiles} synthetic tiles decoded as the service decodes them, "
        "timed on random batches. The worker pipeline is what one service worker does per image "
        f"(decode a 768x768 JPEG, {decode_ms:.2f} ms, then the model at its best batch on one thread).",
        "",
        "| runtime | threads | batch 1 img/s | best batch img/s | vs TensorFlow | worker pipeline ms/img | "
        "max abs dp | argmax same | convert s | artifact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r.threads, RUNTIMES.index(r.runtime))):
        pipeline = f"{decode_ms + 1000 / r.best_images_per_second:.2f}" if r.threads == 1 else ""
        artifact = f"{r.artifact_bytes / 1e6:.2f} MB" if r.artifact_bytes else "(.keras)"
        versus = f"{r.best_images_per_second / tensorflow[r.threads]:.2f}x" if r.threads in tensorflow else ""
        lines.append(
            f"| {r.runtime} | {r.threads} | {r.images_per_second[1]:.0f} | {r.best_images_per_second:.0f} "
            f"(batch {r.best_batch_size}) | {versus} | {pipeline} | "
            f"{r.max_abs_difference:.1e} | {'yes' if r.argmax_agrees else 'NO'} | "
            f"{r.convert_seconds:.1f} | {artifact} |"
        )
    verdict = (
        f"serve {decision.best_runtime}"
        if decision.adopt
        else "keep TensorFlow: no runtime can reach the required end-to-end gain"
    )
    lines += [
        "",
        f"Decision: **{verdict}**. Fastest agreeing runtime at one thread: {decision.best_runtime}, "
        f"{decision.model_gain:.2f}x TensorFlow on the model alone, {decision.pipeline_gain:.2f}x on the worker "
        f"pipeline. The service spends {decision.request_core_ms:.2f} core-ms per request (latest "
        f"`make benchmark`, {SERVICE_CLIENTS} clients), so the runtime could make it at most "
        f"{decision.end_to_end_gain:.2f}x faster end to end (required: {REQUIRED_END_TO_END_GAIN}x).",
        "",
    ]
    return lines


def run(model_tag: str | None, seconds: float) -> list[str]:
    from models.preprocessing import decode_image

    results = [row for threads in THREAD_COUNTS for row in _measure_in_child(model_tag, threads, seconds)]
    served = served_model(model_tag)  # after the children: TensorFlow's threads are fixed once it loads
    model = served.tag or "(random weights)"
    jpeg = sample_jpeg()
    decode_ms = 1000 / rate(lambda: decode_image(jpeg, served.input_size), 1, seconds)
    decision = decide(results, decode_ms, service_core_ms())
    when = datetime.now(UTC).isoformat(timespec="seconds")
    lines = markdown(results, decode_ms, decision, when, model)
    results_dir().mkdir(parents=True, exist_ok=True)
    record = {
        "when": when,
        "model": model,
        "decode_ms": round(decode_ms, 3),
        "decision": asdict(decision),
        "results": [asdict(r) for r in results],
    }
    (results_dir() / "runtimes.json").write_text(json.dumps(record, indent=2))
    return write_section("runtimes.md", lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="store tag (default: the latest lung_histopathology)")
    parser.add_argument("--seconds", type=float, default=1.5, help="timing per batch size (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="measure in this process with N threads only")
    parser.add_argument("--json", action="store_true", help="with --threads: print the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads is not None:
        results = measure_runtimes(args.model, args.threads, args.seconds)
        if args.json:
            print(json.dumps([asdict(r) for r in results]))  # the parent process reads stdout
        return
    logger.info("\n%s", "\n".join(run(args.model, args.seconds)))


if __name__ == "__main__":
    main()
