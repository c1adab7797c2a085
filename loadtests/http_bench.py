"""Closed-loop HTTP throughput of a running service at several concurrencies.

Each of N clients posts a tile to `/predict`, waits for the answer, and posts
again, for a fixed time. Reports requests/s, latency percentiles and errors
per concurrency, in one run, so the ratios are comparable.

    python -m loadtests.http_bench --url http://127.0.0.1:3000 --concurrency 1 32 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass

import httpx
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpResult:
    concurrency: int
    requests: int
    errors: int
    requests_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


async def _client(
    client: httpx.AsyncClient, route: str, payload: bytes, deadline: float, latencies: list[float]
) -> int:
    errors = 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        response = await client.post(route, files={"file": ("tile.jpeg", payload, "image/jpeg")})
        latencies.append(time.perf_counter() - started)
        errors += response.status_code != 200
    return errors


async def run_level(url: str, payload: bytes, concurrency: int, seconds: float, route: str = "/predict") -> HttpResult:
    """Keep `concurrency` requests in flight on `route` for `seconds`; return the counts."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await client.post(route, files={"file": ("tile.jpeg", payload, "image/jpeg")})  # warm the connection
        started = time.perf_counter()
        errors = await asyncio.gather(
            *(_client(client, route, payload, started + seconds, latencies) for _ in range(concurrency))
        )
        elapsed = time.perf_counter() - started
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return HttpResult(concurrency, len(latencies), sum(errors), len(latencies) / elapsed, p50, p95, p99)


def main(argv: list[str] | None = None) -> None:
    from loadtests.inprocess import sample_jpeg

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="service base URL (default: %(default)s)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="client counts to measure (default: 1 32)"
    )
    parser.add_argument("--route", default="/predict", help="endpoint taking a multipart `file` (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=15, help="duration of each level (default: %(default)s)")
    parser.add_argument("--size", type=int, default=768, help="tile size in pixels (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    payload = sample_jpeg(args.size)
    results = [asyncio.run(run_level(args.url, payload, level, args.seconds, args.route)) for level in args.concurrency]
    logger.info("%8s %9s %7s %10s %8s %8s %8s", "clients", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms")
    for r in results:
        logger.info(
            "%8d %9d %7d %10.1f %8.1f %8.1f %8.1f",
            r.concurrency, r.requests, r.errors, r.requests_per_second, r.p50_ms, r.p95_ms, r.p99_ms,
        )
    if len(results) > 1:
        logger.info("ratio req/s %d vs %d clients: %.2f", results[-1].concurrency, results[0].concurrency,
                    results[-1].requests_per_second / results[0].requests_per_second)
    logger.info("%s", json.dumps([asdict(r) for r in results]))


if __name__ == "__main__":
    main()
