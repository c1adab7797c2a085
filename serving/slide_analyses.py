"""The service's side of the slide engine: one :class:`~slides.engine.SlideEngine` per worker process.

Every slide's state lives in the store (:mod:`slides.store`), so any worker of
any replica answers for any slide; this worker only submits to the engine (the
embedded ``LocalCluster``, started on the first submission, or the cluster at
``HISTO_DASK_SCHEDULER``) and, every ``HISTO_SLIDE_RECONCILE_S``, resubmits
what a lost scheduler or worker dropped and removes slides past
``HISTO_SLIDE_TTL_S``. Dask's client calls block, so they run on one thread of
their own, one at a time (two at once could start two embedded clusters).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from config.settings import Settings
from slides.engine import SlideEngine
from slides.store import Progress, SlideStore

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineUnavailableError(RuntimeError):
    """The Dask scheduler could not be reached."""


class SlideAnalyses:
    """Submissions, reconciliation and expiry for one service worker (see the module docstring)."""

    def __init__(self, settings: Settings, model_tag: str) -> None:
        # The tag the service loaded (`name:version`), never `latest`: workers answer with the same model.
        self.engine = SlideEngine.from_settings(dataclasses.replace(settings, model_tag=model_tag))
        self.store: SlideStore = self.engine.store
        self.ttl_s = settings.slide_ttl_s
        self.reconcile_s = settings.slide_reconcile_s
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="slide-engine")
        self._loop_task: asyncio.Task[None] | None = None

    async def _call(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._calls, function, *args)

    async def submit(self, slide_id: str, tile_size: int | None, min_tissue: float) -> Progress:
        """Have the slide analysed unless it is done, failed or on its way (idempotent); its progress."""
        try:
            return await self._call(self.engine.submit, slide_id, tile_size, min_tissue)
        except (OSError, TimeoutError) as exc:  # no scheduler at HISTO_DASK_SCHEDULER
            raise EngineUnavailableError(f"the slide engine cannot be reached ({type(exc).__name__})") from exc

    def start(self) -> None:
        """Start the background reconciler (call from the worker's event loop)."""
        self._loop_task = asyncio.create_task(self._reconcile_forever(), name="slide-reconciler")

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_s)
            await self.reconcile_once()

    async def reconcile_once(self) -> None:
        """Resubmit what was dropped and expire what is old; an error is logged and tried again next round."""
        try:
            resubmitted = await self._call(self.engine.reconcile)
            if resubmitted:
                logger.warning("resubmitted %d slides: %s", len(resubmitted), ", ".join(resubmitted))
            expired = await self._call(self.store.expire, self.ttl_s)
            if expired:
                logger.info("removed %d slides older than %d s", len(expired), self.ttl_s)
        except Exception:  # a store or scheduler hiccup must not end the loop
            logger.exception("slide reconciliation failed; trying again in %d s", self.reconcile_s)

    async def close(self) -> None:
        """Stop the reconciler and the engine (an embedded cluster's workers end with it)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await self._call(self.engine.close)
        self._calls.shutdown(wait=False)
