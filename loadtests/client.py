"""The HTTP load generator the benchmarks share: aiohttp, closed loop or open loop.

aiohttp rather than httpx: it costs the shared CPU less per request, and
httpx's pool slows down badly with thousands of waiting requests, which is
what an overload test creates.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import numpy as np

RAMP_S = 1.0  # closed-loop clients connect over this long before measuring
Outcome = tuple[str, float, float]  # status code or error name, latency s, finish time


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    requests_per_second: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu_share: float  # of all cores: the generator shares them with the server
    tiles: int = 1  # images per request (repeated `file` parts)

    @property
    def images_per_second(self) -> float:
        return self.requests_per_second * self.tiles

    def server_core_ms(self, cores: int) -> float:
        return server_core_ms(cores, self.requests_per_second, self.client_cpu_share)


def server_core_ms(cores: int, requests_per_second: float, client_cpu_share: float) -> float:
    """CPU time the server spent per request: the cores the load generator left, over the rate."""
    return cores * (1 - client_cpu_share) * 1000 / max(requests_per_second, 1e-9)


def session(connections: int, timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections), timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


async def post_file(client: aiohttp.ClientSession, url: str, payload: bytes, headers: dict | None = None,
                    tiles: int = 1) -> Outcome:
    """POST the tile as the multipart `file` field of `url` (`tiles` times: repeated parts, for /predict_batch)."""
    form = aiohttp.FormData()
    for index in range(tiles):
        form.add_field("file", payload, filename=f"tile-{index}.jpeg", content_type="image/jpeg")
    started = time.perf_counter()
    try:
        async with client.post(url, data=form, headers=headers) as response:
            await response.read()
            outcome = str(response.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome = type(exc).__name__
    finished = time.perf_counter()
    return outcome, finished - started, finished


async def closed_loop(
    url: str,
    payload: bytes,
    concurrency: int,
    seconds: float,
    ramp_s: float = RAMP_S,
    on_window: Callable[[], object] | None = None,
    tiles: int = 1,
) -> LevelResult:
    """`concurrency` clients, each posting again as soon as it has its answer, for `seconds`.

    The clients connect one after another over `ramp_s` and the measured window
    starts once all are connected. Connections opened in one burst can all land
    on one worker of a multi-worker server (each asyncio worker accepts up to its
    whole backlog in one go), which is not how traffic arrives and made the
    two-worker figures swing between runs. `on_window` is called as the measured
    window starts (e.g. to read the server's CPU counters). Each request carries `tiles` copies of
    `payload` as repeated `file` parts.
    """
    outcomes: list[Outcome] = []
    async with session(concurrency, 60) as client:
        connected = asyncio.Barrier(concurrency + 1)
        go = asyncio.Event()
        deadline = 0.0

        async def one_client(index: int) -> None:
            await asyncio.sleep(ramp_s * index / concurrency)
            await post_file(client, url, payload, tiles=tiles)  # connects and warms up; not counted
            await connected.wait()
            await go.wait()
            while time.perf_counter() < deadline:
                outcomes.append(await post_file(client, url, payload, tiles=tiles))

        clients = [asyncio.create_task(one_client(i)) for i in range(concurrency)]
        await connected.wait()
        if on_window is not None:
            on_window()
        cpu_started, started = time.process_time(), time.perf_counter()
        deadline = started + seconds
        go.set()
        await asyncio.gather(*clients)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    latencies_ms = np.array([latency for _, latency, _ in outcomes]) * 1000
    p50, p95, p99 = np.percentile(latencies_ms, [50, 95, 99]) if len(outcomes) else (np.nan,) * 3
    return LevelResult(
        concurrency=concurrency,
        requests=len(outcomes),
        errors=sum(status != "200" for status, _, _ in outcomes),
        requests_per_second=len(outcomes) / elapsed,
        p50_ms=float(p50),
        p95_ms=float(p95),
        p99_ms=float(p99),
        client_cpu_share=cpu / elapsed / (os.cpu_count() or 1),
        tiles=tiles,
    )


async def open_loop(url: str, payload: bytes, rate: float, seconds: float) -> tuple[list[Outcome], float]:
    """Requests arriving at `rate` per second whatever the answers (how overload really looks).

    Returns the outcomes and the arrival rate achieved (the generator shares the CPU).
    """
    async with session(1000, 15) as client:
        started = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post_file(client, url, payload)))
        sent_rate = len(tasks) / (time.perf_counter() - started)
        return await asyncio.gather(*tasks), sent_rate
