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
from dataclasses import asdict

from loadtests.client import closed_loop

logger = logging.getLogger(__name__)


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

    payload = sample_jpeg(args.size)
    url = f"{args.url.rstrip('/')}{args.route}"
    results = [asyncio.run(closed_loop(url, payload, level, args.seconds)) for level in args.concurrency]
    logger.info("%8s %9s %7s %10s %8s %8s %8s %10s", "clients", "requests", "errors", "req/s", "p50 ms", "p95 ms",
                "p99 ms", "client cpu")
    for r in results:
        logger.info(
            "%8d %9d %7d %10.1f %8.1f %8.1f %8.1f %9.0f%%",
            r.concurrency, r.requests, r.errors, r.requests_per_second, r.p50_ms, r.p95_ms, r.p99_ms,
            100 * r.client_cpu_share,
        )
    if len(results) > 1:
        logger.info("ratio req/s %d vs %d clients: %.2f", results[-1].concurrency, results[0].concurrency,
                    results[-1].requests_per_second / results[0].requests_per_second)
    logger.info("%s", json.dumps([asdict(r) for r in results]))


if __name__ == "__main__":
    main()
