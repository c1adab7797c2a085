"""Adaptive micro-batching inside one service worker.

Requests are decoded and validated first (a bad image never joins a batch),
then queued here. One consumer runs the model on everything queued, up to
`max_batch_size`, in a worker thread; while it runs, new requests queue up
and form the next batch. So a lone request runs at once (no batching delay)
and batches grow with load. A request that waits longer than `max_wait_s`
in total gets :class:`BatchTimeoutError` and leaves the queue.

Deadlines are kept without a timer per image: every image waits the same
`max_wait_s`, so they fall due in the order they were queued, and ONE timer
per batcher, set for the oldest image still waiting, expires them in that
order; the consumer skips expired images when it forms a batch.

BentoML's own batching dispatcher only serves `@bentoml.api(batchable=True)`
endpoints; calling such a method from another endpoint of the same service
goes through BentoML's in-process HTTP proxy with JSON serialisation of every
150 KB image array, which costs more than the model. Hence this in-process
batcher, fed with uint8 arrays directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

Row = TypeVar("Row")
BatchFunction = Callable[[np.ndarray], Sequence[Row]]  # stacked images -> one result per image, in order
BatchObserver = Callable[[int], None]
DelayObserver = Callable[[float], None]


class BatchTimeoutError(TimeoutError):
    """A request waited longer than the batcher's `max_wait_s`."""


class MicroBatcher(Generic[Row]):
    """Queue single images; run `function` on stacked batches; return each image's row."""

    def __init__(
        self,
        function: BatchFunction[Row],
        max_batch_size: int,
        max_wait_s: float | None = None,
        observe_batch_size: BatchObserver | None = None,
        observe_queue_delay: DelayObserver | None = None,
    ) -> None:
        self._function = function
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._observe = observe_batch_size or (lambda size: None)
        self._observe_delay = observe_queue_delay or (lambda seconds: None)
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[Row], float]] | None = None
        self._consumer: asyncio.Task[None] | None = None
        # (loop time it falls due, future) of each image not yet answered, oldest first.
        self._waiting: deque[tuple[float, asyncio.Future[Row]]] = deque()
        self._expiry: asyncio.TimerHandle | None = None

    async def submit(self, image: np.ndarray) -> Row:
        """The function's result for one image, computed within a batch.

        Raises:
            BatchTimeoutError: no result within `max_wait_s` (queue wait included).
        """
        loop = asyncio.get_running_loop()
        if self._queue is None:  # created lazily on the serving event loop
            self._queue = asyncio.Queue()
            self._consumer = asyncio.create_task(self._consume())
        future: asyncio.Future[Row] = loop.create_future()
        self._queue.put_nowait((image, future, time.monotonic()))
        if self._max_wait_s is not None:
            self._waiting.append((loop.time() + self._max_wait_s, future))
            if self._expiry is None:
                self._expiry = loop.call_at(self._waiting[0][0], self._expire)
        return await future

    def _expire(self) -> None:
        """The timer: fail every image whose time is up (oldest first), then wait for the next one's."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = self._waiting
        while waiting and (waiting[0][1].done() or waiting[0][0] <= now):
            _, future = waiting.popleft()
            if not future.done():
                future.set_exception(BatchTimeoutError(f"no result within {self._max_wait_s:g} s"))
        self._expiry = loop.call_at(waiting[0][0], self._expire) if waiting else None

    async def _consume(self) -> None:
        assert self._queue is not None
        while True:
            queued = [await self._queue.get()]
            while len(queued) < self._max_batch_size and not self._queue.empty():
                queued.append(self._queue.get_nowait())
            # How long the oldest image waited: what admission control reacts to.
            self._observe_delay(time.monotonic() - min(enqueued for _, _, enqueued in queued))
            items = [(image, future) for image, future, _ in queued if not future.done()]  # expired or cancelled
            if not items:
                continue
            self._observe(len(items))
            try:
                outputs = await asyncio.to_thread(self._function, np.stack([image for image, _ in items]))
            except Exception as exc:  # every waiter must hear about a failed batch
                logger.exception("batch of %d failed", len(items))
                for _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), row in zip(items, outputs, strict=True):
                if not future.done():
                    future.set_result(row)
            waiting = self._waiting
            while waiting and waiting[0][1].done():  # answered: no longer kept for the timer
                waiting.popleft()

    async def close(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
