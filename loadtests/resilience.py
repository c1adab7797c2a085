"""Resilience figures of a real service: overload, recovery, a killed worker, a soak.

Starts `bentoml serve service:Histopathology` on 127.0.0.1 (the model from the
store, or --model), then in one run:

1. capacity: closed-loop clients, requests/s;
2. soak: 3,000 warm-up requests, then N more; the workers' resident memory
   (summed) growth in each (a leak keeps growing after the warm-up);
3. overload: open-loop arrivals at --overload-factor x capacity; status counts,
   p99 of admitted requests, then recovery at 10 requests/s;
4. what one refusal costs the workers, in core-ms (CPU time during the overload,
   less the admitted requests at their cost during the capacity run, per refusal);
5. resource exhaustion (loadtests/exhaustion.py): a normal client's latency while
   200 stalled uploads are held and while 8 decode bombs are in flight, and each
   worker's peak memory under the worst accepted inputs;
6. worker killed (SIGKILL) under load: failed requests and the time from the
   kill to the next success.

    python -m loadtests.resilience [--model TAG] [--soak 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil

from loadtests.client import Outcome, closed_loop, open_loop, post_file, session
from loadtests.exhaustion import run_sections
from loadtests.inprocess import sample_jpeg
from loadtests.servers import RunningServer, start_server, stop_server, worker_pids
from models.store import DEFAULT_MODEL_TAG

logger = logging.getLogger(__name__)

OVERLOAD_SECONDS = 10
WARMUP_REQUESTS = 3000


@dataclass
class Figures:
    capacity_rps: float = 0.0
    warmup_requests: int = 0
    warmup_rss_growth_mb: float = 0.0
    soak_requests: int = 0
    soak_errors: int = 0
    soak_rss_before_mb: float = 0.0
    soak_rss_after_mb: float = 0.0
    soak_rss_samples_mb: list[float] = field(default_factory=list)
    overload_offered_rps: float = 0.0
    overload_sent_rps: float = 0.0
    overload_statuses: dict[str, int] = field(default_factory=dict)
    overload_admitted_p99_ms: float = 0.0
    overload_admitted_rps: float = 0.0
    overload_goodput_share: float = 0.0  # admitted requests / overload seconds / capacity (as reported before)
    overload_goodput_in_window_share: float = 0.0  # only the 200s that finished within the overload window
    capacity_core_ms_per_request: float = 0.0
    refusal_core_ms: float = 0.0
    exhaustion: dict[str, object] = field(default_factory=dict)
    recovery_statuses: dict[str, int] = field(default_factory=dict)
    recovery_p50_ms: float = 0.0
    kill_failed_requests: int = 0
    kill_recovery_s: float = 0.0
    kill_ok_requests: int = 0


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes so far."""
    times = [psutil.Process(pid).cpu_times() for pid in pids]
    return sum(t.user + t.system for t in times)


async def soak(url: str, payload: bytes, total: int, concurrency: int, sample: Callable[[], None]) -> Counter[str]:
    """`total` requests from `concurrency` clients; `sample()` is called every 1,000."""
    outcomes: Counter[str] = Counter()
    remaining = total

    async def client_loop(client: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            outcomes[(await post_file(client, f"{url}/predict", payload))[0]] += 1
            if outcomes.total() % 1000 == 0:
                sample()

    async with session(concurrency, 60) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return outcomes


async def kill_worker_under_load(server: RunningServer, payload: bytes, seconds: float) -> tuple[int, float, int]:
    """(failed requests, seconds from kill to the next success, successful requests)."""
    results: list[Outcome] = []
    stop_at = time.perf_counter() + seconds

    async def client_loop(client: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop_at:
            outcome = await post_file(client, f"{server.url}/predict", payload)
            results.append(outcome)
            if outcome[0] != "200":
                await asyncio.sleep(0.05)  # a real client backs off a little

    async with session(8, 30) as client:
        loops = [asyncio.create_task(client_loop(client)) for _ in range(8)]
        await asyncio.sleep(seconds / 4)
        killed_at = time.perf_counter()
        for pid in worker_pids(server):
            os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*loops)
    failed = sum(outcome != "200" for outcome, _, _ in results)
    # Successes of requests that finished after the kill: the first is the new worker answering.
    after = [finished for outcome, _, finished in results if outcome == "200" and finished > killed_at + 0.5]
    recovery = (min(after) - killed_at) if after else float("nan")
    return failed, recovery, sum(outcome == "200" for outcome, _, _ in results)


def run(model_tag: str | None, soak_requests: int, overload_factor: float, workdir: Path) -> Figures:
    figures = Figures()
    payload = sample_jpeg(256)
    env = {"HISTO_MODEL_TAG": model_tag} if model_tag else {}
    server = start_server("service:Histopathology", workdir / "serve.log", env=env)
    try:
        workers = worker_pids(server)
        cpu_before = cpu_seconds(workers)
        capacity = asyncio.run(closed_loop(f"{server.url}/predict", payload, 16, 10))
        figures.capacity_core_ms_per_request = 1000 * (cpu_seconds(workers) - cpu_before) / max(capacity.requests, 1)
        figures.capacity_rps = capacity.requests_per_second
        logger.info("capacity: %.1f req/s at 16 clients", figures.capacity_rps)

        # Allocators and caches grow during the first few thousand requests, then plateau; a leak
        # keeps growing. So the soak is measured from warm workers, and the warm-up growth is reported.
        # Every worker counts (their sum): connections need not spread evenly between them.
        def total_rss() -> float:
            return sum(rss_mb(pid) for pid in worker_pids(server))

        started_mb = total_rss()
        figures.warmup_requests = WARMUP_REQUESTS
        asyncio.run(soak(server.url, payload, WARMUP_REQUESTS, 16, lambda: None))
        figures.soak_rss_before_mb = total_rss()
        figures.warmup_rss_growth_mb = figures.soak_rss_before_mb - started_mb

        def sample() -> None:
            figures.soak_rss_samples_mb.append(round(total_rss(), 1))

        outcomes = asyncio.run(soak(server.url, payload, soak_requests, 16, sample))
        figures.soak_rss_after_mb = total_rss()
        figures.soak_requests = sum(outcomes.values())
        figures.soak_errors = figures.soak_requests - outcomes["200"]
        logger.info("warm-up: %d requests, workers' RSS %+.1f MB; soak: %s, workers' RSS %.1f -> %.1f MB",
                    WARMUP_REQUESTS, figures.warmup_rss_growth_mb, dict(outcomes), figures.soak_rss_before_mb,
                    figures.soak_rss_after_mb)

        figures.overload_offered_rps = overload_factor * figures.capacity_rps
        cpu_before = cpu_seconds(workers)
        results, figures.overload_sent_rps = asyncio.run(
            open_loop(f"{server.url}/predict", payload, figures.overload_offered_rps, OVERLOAD_SECONDS)
        )
        overload_cpu_ms = 1000 * (cpu_seconds(workers) - cpu_before)
        figures.overload_statuses = dict(Counter(outcome for outcome, _, _ in results))
        admitted = [latency for outcome, latency, _ in results if outcome == "200"]
        figures.overload_admitted_p99_ms = float(np.percentile(admitted, 99) * 1000) if admitted else float("nan")
        figures.overload_admitted_rps = len(admitted) / OVERLOAD_SECONDS
        figures.overload_goodput_share = figures.overload_admitted_rps / figures.capacity_rps
        first_sent = min(finished - latency for _, latency, finished in results)
        in_window = sum(1 for outcome, _, finished in results
                        if outcome == "200" and finished <= first_sent + OVERLOAD_SECONDS)
        figures.overload_goodput_in_window_share = in_window / OVERLOAD_SECONDS / figures.capacity_rps
        refused = sum(count for status, count in figures.overload_statuses.items() if status == "503")
        admitted_cpu_ms = len(admitted) * figures.capacity_core_ms_per_request
        figures.refusal_core_ms = max(0.0, overload_cpu_ms - admitted_cpu_ms) / max(refused, 1)
        logger.info("overload offered %.0f req/s (sent %.0f): %s, admitted p99 %.0f ms",
                    figures.overload_offered_rps, figures.overload_sent_rps, figures.overload_statuses,
                    figures.overload_admitted_p99_ms)

        recovery, _ = asyncio.run(open_loop(f"{server.url}/predict", payload, 10, 5))
        figures.recovery_statuses = dict(Counter(outcome for outcome, _, _ in recovery))
        figures.recovery_p50_ms = float(np.median([latency for _, latency, _ in recovery]) * 1000)
        logger.info("recovery at 10 req/s: %s, p50 %.1f ms", figures.recovery_statuses, figures.recovery_p50_ms)
        logger.info("goodput under overload %.0f%% of capacity (%.0f%% counting only answers within the window); "
                    "%.2f core-ms per admitted request at capacity, about %.2f core-ms per refusal",
                    100 * figures.overload_goodput_share, 100 * figures.overload_goodput_in_window_share,
                    figures.capacity_core_ms_per_request, figures.refusal_core_ms)

        figures.exhaustion = run_sections(server.url, worker_pids(server), sample_jpeg(768))
        for name, line in figures.exhaustion.items():
            logger.info("normal client, %s: %s", name, line)

        failed, recovered_s, ok = asyncio.run(kill_worker_under_load(server, payload, 40))
        figures.kill_failed_requests, figures.kill_recovery_s, figures.kill_ok_requests = failed, recovered_s, ok
        logger.info("worker killed: %d failed requests, next success after %.1f s, %d succeeded", failed,
                    recovered_s, ok)
    finally:
        stop_server(server)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"model tag (default: HISTO_MODEL_TAG or {DEFAULT_MODEL_TAG})")
    parser.add_argument("--soak", type=int, default=10_000, help="requests in the soak (default: %(default)s)")
    parser.add_argument("--overload-factor", type=float, default=4.0, help="offered load / capacity (default: 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polling, one line per poll otherwise
    with tempfile.TemporaryDirectory(prefix="resilience-") as workdir:
        figures = run(args.model, args.soak, args.overload_factor, Path(workdir))
    logger.info("%s", json.dumps(asdict(figures), indent=2))


if __name__ == "__main__":
    main()
