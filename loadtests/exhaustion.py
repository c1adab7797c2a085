"""`make resilience`'s resource-exhaustion sections: a normal client's latency under hostile load.

Each section keeps a hostile load going against a running service while one
normal client posts tiles, and reports that client's latency and errors:

* 200 stalled uploads (half a body sent, then a byte every 2 s, as a slowloris does);
* 8 decode bombs in flight: JPEGs of thousands of scans (refused from the header) and the
  most expensive JPEG the limits still accept (a 16-megapixel progressive photograph of noise);
* the worst accepted memory inputs, 16 at a time: each worker's peak resident memory above its
  start, and where it settles afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aiohttp
import numpy as np
import psutil
from PIL import Image

from loadtests.client import post_file, session
from loadtests.hostile import large_flat_webp, scan_bomb_jpeg, stalled_upload


@dataclass(frozen=True)
class NormalClient:
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    max_ms: float

    def line(self) -> str:
        return (f"{self.requests} requests, {self.errors} errors, p50 {self.p50_ms:.0f} ms, "
                f"p95 {self.p95_ms:.0f} ms, max {self.max_ms:.0f} ms")


async def normal_client(url: str, payload: bytes, seconds: float, clients: int = 2) -> NormalClient:
    """`clients` closed-loop clients posting a tile for `seconds`."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def loop(client: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            status, latency, _ = await post_file(client, f"{url}/predict", payload)
            latencies.append(latency)
            errors += status != "200"

    async with session(clients, 30) as client:
        await asyncio.gather(*(loop(client) for _ in range(clients)))
    values = np.array(latencies) * 1000
    return NormalClient(len(values), errors, float(np.median(values)), float(np.percentile(values, 95)),
                        float(values.max()))


@contextlib.contextmanager
def stalled_uploads(url: str, payload: bytes, count: int = 200) -> Iterator[None]:
    """`count` uploads that sent half their body and then trickle a byte every 2 s."""
    connections = [stalled_upload(url, payload) for _ in range(count)]

    def trickle(stop: threading.Event) -> None:
        while not stop.wait(2.0):
            for connection in connections:
                with contextlib.suppress(OSError):
                    connection.send(b"x")

    try:
        with _thread_until_done(trickle):
            yield
    finally:
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()


def expensive_accepted_jpeg(side: int = 4000) -> bytes:
    """A progressive JPEG of noise: about the most decoding work the default limits accept (0.4 s here)."""
    noise = np.random.default_rng(2).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=85, progressive=True)
    return buffer.getvalue()


@contextlib.contextmanager
def _thread_until_done(work: Callable[[threading.Event], None]) -> Iterator[None]:
    """Run `work(stop)` in a thread while the block runs; set `stop` and wait for it at the end."""
    stop = threading.Event()
    thread = threading.Thread(target=work, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def background(make: Callable[[], asyncio.Future]) -> Iterator[None]:
    """Run the coroutine `make()` builds in its own thread and event loop until the block ends."""

    async def runner(stop: threading.Event) -> None:
        task = asyncio.ensure_future(make())
        while not stop.is_set():
            await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with _thread_until_done(lambda stop: asyncio.run(runner(stop))):
        yield


async def keep_posting(url: str, payloads: list[bytes], in_flight: int) -> None:
    """`in_flight` clients posting the payloads round-robin, forever (until cancelled)."""
    async with session(in_flight, 60) as client:
        async def loop(offset: int) -> None:
            index = offset
            while True:
                await post_file(client, f"{url}/predict", payloads[index % len(payloads)])
                index += 1

        await asyncio.gather(*(loop(i) for i in range(in_flight)))


def peak_memory(url: str, workers: list[int], payload: bytes, concurrent: int = 16, rounds: int = 4
                ) -> tuple[dict[int, float], dict[int, float]]:
    """Per worker: (peak resident MB above the start, resident MB above the start 2 s after) while
    `concurrent` clients post `payload` `rounds` times each."""
    start = {pid: psutil.Process(pid).memory_info().rss for pid in workers}
    peak = dict(start)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in workers:
                peak[pid] = max(peak[pid], psutil.Process(pid).memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def post_all() -> None:
        async with session(concurrent, 60) as client:
            async def loop() -> None:
                for _ in range(rounds):
                    await post_file(client, f"{url}/predict", payload)

            await asyncio.gather(*(loop() for _ in range(concurrent)))

    asyncio.run(post_all())
    done.set()
    sampler.join()
    time.sleep(2)
    after = {pid: psutil.Process(pid).memory_info().rss for pid in workers}
    megabyte = 2**20
    return ({pid: (peak[pid] - start[pid]) / megabyte for pid in workers},
            {pid: (after[pid] - start[pid]) / megabyte for pid in workers})


def run_sections(url: str, workers: list[int], tile: bytes, seconds: float = 8) -> dict[str, object]:
    """Every section; returns the figures by name (and logs nothing itself)."""
    figures: dict[str, object] = {}
    figures["baseline"] = asyncio.run(normal_client(url, tile, seconds)).line()
    with stalled_uploads(url, tile):
        time.sleep(0.5)
        figures["200 stalled uploads"] = asyncio.run(normal_client(url, tile, seconds)).line()
    bombs = [scan_bomb_jpeg(), expensive_accepted_jpeg()]
    with background(lambda: keep_posting(url, bombs, 8)):
        time.sleep(0.5)
        figures["8 decode bombs in flight"] = asyncio.run(normal_client(url, tile, seconds)).line()
    peaks, after = peak_memory(url, workers, large_flat_webp(5000))
    figures["worst accepted memory input (5000x5000 lossless WebP, 16 at a time)"] = (
        "peak per worker +" + ", +".join(f"{mb:.0f}" for mb in peaks.values()) + " MB; 2 s later +"
        + ", +".join(f"{mb:.0f}" for mb in after.values()) + " MB"
    )
    return figures
