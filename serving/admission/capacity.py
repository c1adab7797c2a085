"""Admission control: whether a worker takes another upload, decided before any of it is read.

One :class:`Admission` per worker process, shared by the front door (which
refuses cheaply, before BentoML's middleware runs), the request guard (which
counts what it has admitted) and the micro-batcher (which reports how long
images wait for the model). Counting only requests whose body has arrived
keeps slow or stalled clients from holding the slots fast ones need.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

QUEUE_DELAY_MEMORY_S = 1.0  # a queue-delay measurement older than this no longer counts


@dataclass
class Admission:
    max_in_flight: int  # admitted uploads (body received) being served at once
    max_open_uploads: int  # upload bodies being received at once
    max_queue_delay_s: float  # refuse while images wait longer than this for the model
    max_buffered_bytes: int = 256 * 1024 * 1024  # body bytes held for uploads still arriving
    in_flight: int = 0
    open_uploads: int = 0
    buffered_bytes: int = 0
    _queue_delay_s: float = 0.0
    _queue_delay_at: float = float("-inf")

    def record_queue_delay(self, seconds: float) -> None:
        """The batcher's report: the longest wait of the images in the batch it just took."""
        self._queue_delay_s = seconds
        self._queue_delay_at = time.monotonic()

    def queue_delay(self) -> float:
        if time.monotonic() - self._queue_delay_at > QUEUE_DELAY_MEMORY_S:
            return 0.0
        return self._queue_delay_s

    def refusal(self) -> str | None:
        """Why a new upload cannot be taken now, or None when it can."""
        if self.in_flight >= self.max_in_flight:
            return f"over capacity ({self.max_in_flight} requests in flight)"
        if self.open_uploads >= self.max_open_uploads:
            return f"over capacity ({self.max_open_uploads} uploads arriving)"
        if self.buffered_bytes >= self.max_buffered_bytes:
            return f"over capacity ({self.buffered_bytes >> 20} MiB of uploads arriving)"
        delay = self.queue_delay()
        if delay > self.max_queue_delay_s:
            return f"over capacity (images wait {delay:.1f} s for the model)"
        return None
