"""Decoding uploads on a worker's decode threads, before anything joins a batch.

Each upload is decoded and validated by `models.preprocessing` on a thread of
this worker's small decode pool, so a bad file gets its 4xx alone and never
fails the requests it would have shared a batch with. An ordinary tile takes
one hop (header check and decode on one thread); a heavy one (many bytes or
many JPEG scan pixels) a second hop, to a single "heavy" thread, so cheap
tiles never queue behind it. The threads bound the memory and CPU decoding
can take in a worker (with HISTO_MAX_DECODE_BYTES and the pixel cap).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from typing import TypeVar

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

T = TypeVar("T")

# A decode over either goes to the heavy thread (a 768 px JPEG tile: ~4 MB and 6 M scan-pixels; these
# are ~50 ms of decoding and up).
HEAVY_DECODE_BYTES = 32 * 1024 * 1024
HEAVY_DECODE_SCAN_PIXELS = 20_000_000


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

        def timed(step: Callable[..., T], *args: object) -> T:
            nonlocal spent
            started = time.perf_counter()
            try:
                return step(*args)
            finally:
                spent += time.perf_counter() - started

        try:
            result = await loop.run_in_executor(self._pool, timed, self._start, path, size, deadline, budget, mpp)
            if isinstance(result, PreparedDecode):
                result = await loop.run_in_executor(self._heavy_pool, timed, self._finish, result, deadline)
            return result
        finally:
            self._observe_seconds(spent)

    async def decode(self, path: Path, full_size: bool = False, budget: PixelBudget | None = None,
                     part: str = "file", mpp: float | None = None) -> np.ndarray:
        """The upload as RGB uint8 (the model's input size, resampled to its pixel size when `mpp` is given
        and the card has one; or its own size with `full_size`); a failure is raised as the problem it
        answers with, naming `part`."""
        try:
            return await self._decode(path, full_size, budget, mpp)
        except ImageDecodeError as exc:
            raise Problem.from_error(exc, part) from None
        except DecodeAbandonedError as exc:  # its deadline passed: the guard has answered 504 already
            raise not_answered_in_time(exc) from None
