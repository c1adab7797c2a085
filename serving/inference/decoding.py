"""Decoding uploads on a worker's decode threads, before anything joins a batch.

Each upload is decoded and validated by `models.preprocessing` on a thread of
this worker's small decode pool, so a bad file gets its 4xx alone and never
fails the requests it would have shared a batch with. An ordinary tile takes
one hop (header check and decode on one thread); a heavy one (many bytes or
many JPEG scan pixels) a second hop, to a single "heavy" thread, so cheap
tiles never queue behind it. The threads bound the memory and CPU decoding
can take in a worker (with HISTO_MAX_DECODE_BYTES and the pixel cap).

A request's several parts (`/predict_batch`) go to the threads as at most
one job per thread, each decoding a run of consecutive parts: a hop to a
thread and back costs far more than it looks (about 0.2 ms of CPU on a
virtual machine, measured with a no-op `run_in_executor`), and one per part
made a 32-tile request pay for 32 of them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path

import numpy as np

from models.preprocessing import (
    DecodeAbandonedError,
    DecodeCost,
    DecodeLimits,
    ImageDecodeError,
    ImageTooLargeError,
    PreparedDecode,
    finish_decode,
    prepare_decode,
)
from models.resampling import ModelScale
from serving.http.deadline import REQUEST_DEADLINE
from serving.inference.heap import release_heap
from serving.problems import Problem

# A decode over either goes to the heavy thread (a 768 px JPEG tile: ~4 MB and 6 M scan-pixels; these
# are ~50 ms of decoding and up).
HEAVY_DECODE_BYTES = 32 * 1024 * 1024
HEAVY_DECODE_SCAN_PIXELS = 20_000_000

Outcome = np.ndarray | PreparedDecode | Exception  # a part's decode so far: image, heavy and pending, or refused


class PixelBudget:
    """The decoded pixels one request may still spend (its parts decode on several threads)."""

    def __init__(self, pixels: int) -> None:
        self.limit = self.left = pixels
        self._lock = threading.Lock()

    def spend(self, pixels: int) -> None:
        with self._lock:
            self.left -= pixels
            if self.left < 0:
                raise ImageTooLargeError(f"the parts decode to over {self.limit} pixels in all")


def is_heavy(cost: DecodeCost) -> bool:
    return cost.estimated_bytes > HEAVY_DECODE_BYTES or cost.scan_pixels > HEAVY_DECODE_SCAN_PIXELS


def not_answered_in_time(error: Exception) -> Problem:
    """The 504 for an image whose decode or batch outlived its request's deadline."""
    return Problem(HTTPStatus.GATEWAY_TIMEOUT, f"the image was not classified in time ({error}); retry later")


class Decoder:
    """Decodes uploads to the model's input size (or their own) on this worker's decode threads."""

    def __init__(self, scale: ModelScale, limits: DecodeLimits, threads: int,
                 observe_seconds: Callable[[float], None]) -> None:
        self.input_size = scale.input_size
        self.field_microns = scale.field_microns  # None: the card declares no pixel size
        self.limits = limits
        self._observe_seconds = observe_seconds
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self._heavy_pool = ThreadPoolExecutor(1, thread_name_prefix="decode-heavy")

    def close(self) -> None:
        for pool in (self._pool, self._heavy_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def _start(self, path: Path, size: int | None, deadline: float | None, budget: PixelBudget | None,
               mpp: float | None) -> np.ndarray | PreparedDecode:
        """On a decode thread: check the header (and spend from the request's budget); decode at once
        unless it is heavy (then it is handed over as it is). With `mpp`, resampled to the model's pixel size."""
        prepared = prepare_decode(path, size, self.limits, mpp, self.field_microns)
        if budget is not None:
            budget.spend(prepared.cost.pixels)
        return prepared if is_heavy(prepared.cost) else self._finish(prepared, deadline)

    @staticmethod
    def _finish(prepared: PreparedDecode, deadline: float | None) -> np.ndarray:
        image = finish_decode(prepared, deadline)
        release_heap(prepared.cost.estimated_bytes)
        return image

    async def _decode(self, path: Path, full_size: bool, budget: PixelBudget | None,
                      mpp: float | None) -> np.ndarray:
        """Both hops; the decode time (not the waits) is observed once per upload, refused ones too."""
        loop = asyncio.get_running_loop()
        size = None if full_size else self.input_size
        deadline = REQUEST_DEADLINE.get()
        spent = 0.0
        try:
            outcome, spent = await loop.run_in_executor(self._pool, _timed, self._start, path, size, deadline,
                                                        budget, mpp)
            if isinstance(outcome, PreparedDecode):
                outcome, finishing = await loop.run_in_executor(self._heavy_pool, _timed, self._finish, outcome,
                                                                deadline)
                spent += finishing
        finally:
            self._observe_seconds(spent)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def decode(self, path: Path, full_size: bool = False, budget: PixelBudget | None = None,
                     part: str = "file", mpp: float | None = None) -> np.ndarray:
        """The upload as RGB uint8 (the model's input size, resampled to its pixel size when `mpp` is given
        and the card has one; or its own size with `full_size`); a failure is raised as the problem it
        answers with, naming `part`."""
        try:
            return await self._decode(path, full_size, budget, mpp)
        except (ImageDecodeError, DecodeAbandonedError) as exc:
            raise _as_problem(exc, part) from None

    def _start_run(self, parts: Sequence[tuple[int, Path]], deadline: float | None, budget: PixelBudget,
                   mpp: float | None) -> list[tuple[int, Outcome, float]]:
        """On a decode thread: `_start` for consecutive parts, each with its outcome and seconds. Stops at
        the first error: a later part of the run cannot be the request's first bad part."""
        done = []
        for index, path in parts:
            outcome, spent = _timed(self._start, path, self.input_size, deadline, budget, mpp)
            done.append((index, outcome, spent))
            if isinstance(outcome, Exception):
                break
        return done

    async def decode_parts(self, paths: Sequence[Path], budget: PixelBudget,
                           mpp: float | None = None) -> list[np.ndarray]:
        """A request's parts at the model's input size, in the order sent: at most one job per decode
        thread, then the heavy parts one by one on the heavy thread. The first bad part in the order sent
        is raised as the problem it answers with, naming `file[i]`; each part's decode time is observed."""
        loop = asyncio.get_running_loop()
        deadline = REQUEST_DEADLINE.get()
        indexed = list(enumerate(paths))
        run_length = max(1, -(-len(indexed) // self._threads))  # ceil: one run per thread
        runs = await asyncio.gather(*(
            loop.run_in_executor(self._pool, self._start_run, indexed[start:start + run_length], deadline, budget,
                                 mpp)
            for start in range(0, len(indexed), run_length)))
        outcomes: dict[int, Outcome] = {}
        seconds: dict[int, float] = {}
        for index, outcome, spent in (entry for run in runs for entry in run):
            outcomes[index], seconds[index] = outcome, spent
        bad = [index for index, outcome in outcomes.items() if isinstance(outcome, Exception)]
        first_bad = min(bad, default=len(indexed))
        try:
            for index in range(first_bad):  # no part after the first bad one matters
                if isinstance(prepared := outcomes[index], PreparedDecode):
                    outcome, spent = await loop.run_in_executor(self._heavy_pool, _timed, self._finish, prepared,
                                                                deadline)
                    outcomes[index] = outcome
                    seconds[index] += spent
                    if isinstance(outcome, Exception):
                        first_bad = index
                        break
        finally:
            for spent in seconds.values():
                self._observe_seconds(spent)
        if first_bad < len(indexed):
            raise _as_problem(outcomes[first_bad], f"file[{first_bad}]")  # type: ignore[arg-type]
        return [outcomes[index] for index in range(len(indexed))]  # type: ignore[misc]


def _timed(step: Callable[..., np.ndarray | PreparedDecode], *args: object) -> tuple[Outcome, float]:
    """`step(*args)`'s result or error, and the seconds it took on this thread (not waiting for one)."""
    started = time.perf_counter()
    try:
        outcome: Outcome = step(*args)
    except Exception as exc:  # handed to the request, which raises the first bad part in the order sent
        outcome = exc
    return outcome, time.perf_counter() - started


def _as_problem(error: Exception, part: str) -> Exception:
    """What a failed decode answers with: its 4xx naming the part; a 504 once the request's deadline passed
    (the guard has answered it already); anything else as it is."""
    if isinstance(error, ImageDecodeError):
        return Problem.from_error(error, part)
    if isinstance(error, DecodeAbandonedError):
        return not_answered_in_time(error)
    return error
