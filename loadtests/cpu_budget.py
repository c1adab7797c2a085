"""`make cpu-budget`: where a request's CPU goes, sampled with py-spy under load.

Starts the service, loads it with closed-loop clients posting 768x768 JPEG
tiles, and samples every worker with py-spy (non-blocking, native frames off)
for the same window. Each sample is charged to the first frame, from the
innermost outwards, that belongs to a known part (TensorFlow, decoding, the
multipart parser, the request guard, BentoML's input handling, ...), and
samples are turned into core-ms per request and per image. TensorFlow's own
C++ threads (named `tf_*` by the kernel) run no Python, so py-spy never
samples them: their CPU is read per thread from the kernel and charged to the
model, and the samples divide the rest (with `--gil`,
only the thread holding the GIL is sampled, and the samples themselves give
the Python work per request: a thread waiting for the GIL is not counted
as busy, which the default mode cannot tell). The load generator's own CPU is
measured by the client (it runs on the same cores). Writes
cpu_budget.md, a section of BENCHMARKS.md (loadtests.report says where).

    python -m loadtests.cpu_budget [--model TAG] [--seconds 15] [--clients 32] [--batch-clients 4] [--tiles 1 32]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from loadtests.client import LevelResult, closed_loop
from loadtests.inprocess import sample_jpeg
from loadtests.report import write_section
from loadtests.servers import start_server, stop_server, worker_pids
from models.store import DEFAULT_MODEL_TAG

logger = logging.getLogger(__name__)

PY_SPY = str(Path(sys.executable).with_name("py-spy"))
SAMPLE_RATE = 250  # per second and thread
RAMP_S = 1.0
# (part, substrings of a frame's "function (file)" text), checked from the innermost frame outwards.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model (TensorFlow)", ("tensorflow/", "keras/", "models/inference.py")),
    ("trust checks (quality gate, OOD score)", ("models/quality.py", "models/ood.py")),
    ("decode (PIL, models/preprocessing.py)", ("PIL/", "models/preprocessing.py", "serving/inference/heap.py")),
    ("multipart parsing", ("multipart/", "formparsers.py")),
    ("our middleware (serving/http/, serving/admission/)", ("serving/http/", "serving/admission/")),
    ("request log and metrics", ("serving/observability/", "prometheus_client/", "logging/")),
    ("service glue (service.py, batcher, predictions)", ("service.py", "serving/inference/batcher.py",
                                                         "models/prediction.py", "serving/admission/capacity.py",
                                                         "serving/http/front_door.py", "serving/problems.py")),
    ("response (pydantic, JSON)", ("pydantic", "json/", "starlette/responses.py")),
    ("BentoML input and API handling (temporary file, validation)", ("_bentoml_sdk/", "_bentoml_impl/",
                                                                     "bentoml/", "tempfile.py", "shutil.py")),
    ("HTTP server and event loop (uvicorn, httptools, asyncio, Starlette)", ("uvicorn/", "httptools", "h11/",
                                                                              "asyncio/", "starlette/",
                                                                              "selectors.py", "anyio/")),
)
OTHER = "other"
MODEL = PARTS[0][0]
NATIVE_MODEL_THREADS = "tf_"  # the kernel's name (comm) of TensorFlow's intra- and inter-op pool threads
# Innermost frames of a thread that waits (py-spy can see a thread blocked on a lock as active): not CPU.
IDLE_FRAMES = ("_worker (concurrent/futures/thread.py", "select (selectors.py", "wait (threading.py",
               "get (queue.py", "_wait_for_tstate_lock (threading.py")


def part_of(stack: str) -> str:
    """The part a collapsed stack (root;...;leaf frames) is charged to."""
    for frame in reversed(stack.split(";")):
        for part, markers in PARTS:
            if any(marker in frame for marker in markers):
                return part
    return OTHER


def charge(collapsed: str, unknown: Counter[str] | None = None) -> Counter[str]:
    """Samples per part from py-spy's raw (collapsed) output: `stack count` per line. The innermost
    frames of stacks no part claims are counted in `unknown`, to name new parts by."""
    samples: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            if stack.split(";")[-1].startswith(IDLE_FRAMES):
                continue
            part = part_of(stack)
            samples[part] += int(count)
            if part == OTHER and unknown is not None:
                unknown[stack.split(";")[-1]] += int(count)
    return samples


@dataclass(frozen=True)
class Budget:
    level: LevelResult
    samples: Counter[str]
    cores: int
    worker_cpu_s: float  # user + system CPU of the workers over the window, from the kernel
    gil: bool = False  # samples of the GIL holder only: they are the measure, not the kernel's CPU time
    native_model_cpu_s: float = 0.0  # of worker_cpu_s: TensorFlow's C++ threads, which py-spy cannot sample

    @property
    def per_request_ms(self) -> float:
        return self.worker_cpu_s * 1000 / max(self.level.requests, 1)

    @property
    def per_image_ms(self) -> float:
        return self.per_request_ms / self.level.tiles

    def core_ms(self, part: str) -> float:
        """The part's share of the samples, applied to the CPU the kernel measured for the sampled threads:
        py-spy's samples say where the time went, not how much there was (a thread waiting for the GIL can
        look active); TensorFlow's own threads' CPU is added to the model as the kernel measured it. With
        `gil`, the part's samples as time: the GIL held in it per request."""
        requests = max(self.level.requests, 1)
        if self.gil:
            return self.samples[part] * 1000 / SAMPLE_RATE / requests
        sampled_ms = (self.worker_cpu_s - self.native_model_cpu_s) * 1000 / requests
        native_ms = self.native_model_cpu_s * 1000 / requests if part == MODEL else 0.0
        return native_ms + sampled_ms * self.samples[part] / max(sum(self.samples.values()), 1)

    @property
    def client_core_ms(self) -> float:
        elapsed = self.level.requests / max(self.level.requests_per_second, 1e-9)
        return self.level.client_cpu_share * self.cores * elapsed * 1000 / max(self.level.requests, 1)


def route_for(tiles: int) -> str:
    """One tile per request goes to /predict, more to /predict_batch as repeated parts."""
    return "/predict" if tiles == 1 else "/predict_batch"


def measure(model_tag: str, seconds: float, clients: int, workdir: Path, tiles: int = 1, gil: bool = False) -> Budget:
    from config.cpus import usable_cpus

    server = start_server("service:Histopathology", workdir / f"serve-{tiles}.log", env={"HISTO_MODEL_TAG": model_tag})
    url = f"{server.url}{route_for(tiles)}"
    try:
        payload = sample_jpeg(768)
        asyncio.run(closed_loop(url, payload, clients, 3.0, tiles=tiles))  # warm
        profiles = []
        for index, pid in enumerate(worker_pids(server)):
            out = workdir / f"worker-{tiles}-{index}.txt"
            command = [PY_SPY, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE), "--format", "raw",
                       "--duration", str(int(seconds + RAMP_S + 0.999)), "--nonblocking", "--output", str(out),
                       *(["--gil"] if gil else [])]
            profiles.append((subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out))
        time.sleep(0.5)  # py-spy attached
        workers = [psutil.Process(pid) for pid in worker_pids(server)]
        at_start: list[tuple[float, dict[tuple[int, int], float]]] = []
        level = asyncio.run(closed_loop(
            url, payload, clients, seconds, ramp_s=RAMP_S, tiles=tiles,
            on_window=lambda: at_start.append((_cpu_seconds(workers), native_model_threads(workers)))))
        worker_cpu_s = _cpu_seconds(workers) - at_start[0][0]
        native_model_cpu_s = sum(seconds - at_start[0][1].get(thread, 0.0)
                                 for thread, seconds in native_model_threads(workers).items())
        samples: Counter[str] = Counter()
        unknown: Counter[str] = Counter()
        for process, out in profiles:
            process.wait(timeout=seconds + 60)
            samples += charge(out.read_text(), unknown)
        logger.debug("unclaimed frames (for extending the charge rules): %s", unknown.most_common(12))
        return Budget(level, samples, usable_cpus(), worker_cpu_s, gil, native_model_cpu_s)
    finally:
        stop_server(server)


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def native_model_threads(processes: list[psutil.Process]) -> dict[tuple[int, int], float]:
    """{(pid, thread id): user + system CPU seconds} of the processes' TensorFlow pool threads (Linux)."""
    found = {}
    for process in processes:
        for thread in process.threads():
            try:
                name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:  # ended since listed
                continue
            if name.startswith(NATIVE_MODEL_THREADS):
                found[(process.pid, thread.id)] = thread.user_time + thread.system_time
    return found


def table(budget: Budget) -> list[str]:
    parts = [part for part, _ in PARTS] + [OTHER]
    total = sum(budget.core_ms(part) for part in parts)
    tiles = budget.level.tiles
    lines = ["| part | core-ms per request | core-ms per image | share |", "|---|---|---|---|"]
    lines += [f"| {part} | {budget.core_ms(part):.3f} | {budget.core_ms(part) / tiles:.3f} | "
              f"{100 * budget.core_ms(part) / total:.1f}% |" for part in parts if budget.samples[part]]
    what = "the GIL held, Python work" if budget.gil else "the workers' CPU time, from the kernel"
    lines += [f"| **service, all parts ({what})** | **{total:.3f}** | "
              f"**{total / tiles:.3f}** | 100% |",
              f"| load generator (same cores, not the service) | {budget.client_core_ms:.3f} | "
              f"{budget.client_core_ms / tiles:.3f} | |"]
    return lines


def heading(budget: Budget) -> str:
    level = budget.level
    what = ("one tile per request to /predict" if level.tiles == 1
            else f"{level.tiles} tiles per request to /predict_batch")
    return (f"{level.concurrency} closed-loop clients, {what}: {level.requests} requests at "
            f"{level.requests_per_second:.1f} requests/s ({level.images_per_second:.1f} images/s), "
            f"{level.errors} errors")


def write(budgets: list[Budget], model_tag: str) -> list[str]:
    lines = [
        "## Where a request's CPU goes",
        "",
        f"Latest run of `make cpu-budget` ({datetime.now(UTC).isoformat(timespec='seconds')}; model `{model_tag}`; "
        f"{budgets[0].cores} usable CPUs): every worker sampled by py-spy at {SAMPLE_RATE} Hz "
        "(active samples). Each sample goes to the innermost frame that belongs to a known part "
        "(loadtests/cpu_budget.py), and the parts' shares of the samples divide the workers' CPU time as the "
        "kernel counted it, less TensorFlow's own C++ threads (which py-spy cannot sample): the kernel's count "
        "for them goes to the model.",
        "",
    ]
    for budget in budgets:
        lines += [f"{heading(budget)}:", "", *table(budget), ""]
    return write_section("cpu_budget.md", lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_TAG, help="model tag (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=15, help="sampled window (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients (default: %(default)s)")
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    parser.add_argument("--batch-clients", type=int, default=4,
                        help="closed-loop clients when a request carries several tiles (default: %(default)s)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 32],
                        help="tiles per request, one budget each (1: /predict; more: /predict_batch; "
                        "default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from models.store import resolve_tag

    model_tag = resolve_tag(args.model)
    with tempfile.TemporaryDirectory(prefix="cpu-budget-") as tmp:
        budgets = [measure(model_tag, args.seconds, args.batch_clients if tiles > 1 else args.clients, Path(tmp),
                           tiles, args.gil) for tiles in args.tiles]
    logger.info("\n%s", "\n".join(write(budgets, model_tag)))


if __name__ == "__main__":
    main()
