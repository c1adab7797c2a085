"""Dask as the slide engine: submit a slide of the store once, and resubmit what a lost scheduler dropped.

* **Where it runs**: a cluster at ``HISTO_DASK_SCHEDULER`` (``make engine``, or
  the Kubernetes workers), or else an embedded ``LocalCluster`` started on first
  use: worker processes of one thread each.
* **The model** is loaded by each worker once, by tag, from its own model store
  (:func:`slides.task.loaded_model`); :class:`ModelWarmUp` does it as a worker
  joins. Nothing but strings and numbers goes through the scheduler.
* **Idempotent submit**: a slide done, failed, or queued/running with a fresh
  heartbeat (or known to the scheduler) is not submitted again; the Dask key
  is ``histo-slide-<id>-<submission>``, so two submissions of the same state
  are one task. Tasks are fire-and-forget: they run to the end whichever
  client submitted them.
* **Reconciler** (:meth:`SlideEngine.reconcile`, to call periodically): a slide
  queued or running whose heartbeat went stale and whose task the scheduler
  no longer knows (a restarted scheduler forgets everything) is submitted
  again; a queued one the scheduler still holds gets a fresh heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from distributed.diagnostics.plugin import WorkerPlugin

from slides.analysis import DEFAULT_MIN_TISSUE
from slides.store import ACTIVE, Progress, SlideStore
from slides.task import LOWEST_NICE, SlideJob, analyse_slide, loaded_model, lower_priority

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

logger = logging.getLogger(__name__)

KEY_PREFIX = "histo-slide"
_FINISHED_TASK_STATES = frozenset({"memory", "erred", "forgotten"})
CONNECT_TIMEOUT_S = 30


def task_key(slide_id: str, submission: int) -> str:
    """The Dask key of a slide's `submission`-th submission: the same everywhere, so never run twice."""
    return f"{KEY_PREFIX}-{slide_id}-{submission}"


def _live_keys(keys: list[str], dask_scheduler: object = None) -> list[str]:
    """On the scheduler: which of `keys` are waiting or running there."""
    tasks = dask_scheduler.tasks  # type: ignore[attr-defined]
    return [key for key in keys if key in tasks and tasks[key].state not in _FINISHED_TASK_STATES]


class ModelWarmUp(WorkerPlugin):
    """A Dask worker plugin: lower the worker's priority and load the model as it joins (by tag, from the
    worker's own store), so the first slide does not wait for TensorFlow."""

    idempotent = True  # registering it again (another client, a reconnect) does nothing

    def __init__(self, model_tag: str, nice: int) -> None:
        self.model_tag = model_tag
        self.nice = nice
        self.name = f"histo-model-{model_tag}"

    async def setup(self, worker: object) -> None:
        lower_priority(self.nice)
        await asyncio.to_thread(loaded_model, self.model_tag)  # off the worker's event loop


class SlideEngine:
    """Submits slides of one store to a Dask cluster (connected, or embedded and started on first use)."""

    def __init__(self, store: SlideStore, model_tag: str, scheduler: str | None = None, workers: int = 1,
                 nice: int = LOWEST_NICE, stale_s: float = 120, max_attempts: int = 3,
                 busy_duty: float = 1.0) -> None:
        self.store = store
        self.model_tag = model_tag
        self.scheduler = scheduler
        self.workers = workers
        self.nice = nice
        self.busy_duty = busy_duty
        self.stale_s = stale_s
        self.max_attempts = max_attempts
        self._client: Client | None = None
        self._cluster: LocalCluster | None = None

    @classmethod
    def from_settings(cls, settings: object) -> SlideEngine:
        """The engine the service's settings describe (HISTO_SLIDE_STORE, HISTO_DASK_*, HISTO_SLIDE_*)."""
        s = settings
        return cls(SlideStore(s.slide_store), s.model_tag, s.dask_scheduler, s.dask_workers,  # type: ignore[attr-defined]
                   s.dask_worker_nice, s.slide_stale_s, s.slide_max_attempts,  # type: ignore[attr-defined]
                   s.slide_busy_duty)  # type: ignore[attr-defined]

    # The cluster.

    def client(self) -> Client:
        """The Dask client, connected (or the embedded cluster started) on first use."""
        if self._client is None:
            from distributed import Client, LocalCluster

            if self.scheduler:
                client = Client(self.scheduler, timeout=CONNECT_TIMEOUT_S)
            else:
                # Processes, not threads: TensorFlow and OpenSlide each hold their worker's core.
                self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                             host="127.0.0.1", dashboard_address=None)
                client = Client(self._cluster)
            client.register_plugin(ModelWarmUp(self.model_tag, self.nice))  # type: ignore[arg-type]
            self._client = client
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._client = self._cluster = None

    def __enter__(self) -> SlideEngine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def live(self, pairs: Iterable[tuple[str, Progress]]) -> set[str]:
        """The slide ids among `pairs` whose current submission the scheduler holds, waiting or running."""
        keys = {task_key(slide_id, progress.submission): slide_id for slide_id, progress in pairs}
        if not keys:
            return set()
        found = self.client().run_on_scheduler(_live_keys, list(keys))
        return {keys[key] for key in found}

    # Submitting.

    def submit(self, slide_id: str, tile_size: int | None = None, min_tissue: float = DEFAULT_MIN_TISSUE) -> Progress:
        """Have the slide analysed unless it is done, failed, or already on its way; returns its progress."""
        progress = self.store.progress(slide_id)
        if progress is not None and progress.state not in ACTIVE:
            return progress
        if progress is not None and (not progress.stale(self.stale_s) or self.live([(slide_id, progress)])):
            return progress
        if self.store.source(slide_id) is None:
            raise KeyError(f"no slide {slide_id} in the store")
        return self._submit(slide_id, progress, tile_size, min_tissue)

    def _submit(self, slide_id: str, before: Progress | None, tile_size: int | None, min_tissue: float) -> Progress:
        from distributed import fire_and_forget

        queued = Progress("queued", tile_size=tile_size, min_tissue=min_tissue) if before is None else before
        queued = queued.beat(state="queued", submission=queued.submission + 1, tiles_done=0)
        self.store.write_progress(slide_id, queued)
        job = SlideJob(self.store.url, slide_id, self.model_tag, queued.tile_size, queued.min_tissue,
                       self.max_attempts)
        # Dask's retries cover an error inside the task; a lost worker is rescheduled by the scheduler.
        future = self.client().submit(analyse_slide, job, self.nice, self.busy_duty,
                                      key=task_key(slide_id, queued.submission), retries=self.max_attempts - 1,
                                      pure=False)
        fire_and_forget(future)  # runs to the end even if this client goes
        logger.info("slide %s submitted (submission %d)", slide_id, queued.submission)
        return queued

    def reconcile(self, slide_ids: Iterable[str] | None = None) -> list[str]:
        """Resubmit the slides (of `slide_ids`, default all in the store) that are queued or running with a
        stale heartbeat and unknown to the scheduler; keep fresh the queued ones it holds. Returns the
        resubmitted ids."""
        active = [(slide_id, progress) for slide_id in (self.store.ids() if slide_ids is None else slide_ids)
                  if (progress := self.store.progress(slide_id)) is not None and progress.state in ACTIVE]
        if not active:
            return []
        self.client().register_plugin(ModelWarmUp(self.model_tag, self.nice))  # a new scheduler has none
        live = self.live(active)
        resubmitted = []
        for slide_id, progress in active:
            if slide_id in live:
                if progress.state == "queued" and progress.stale(self.stale_s / 2):
                    current = self.store.progress(slide_id)  # a worker may have taken it meanwhile
                    if current == progress:
                        self.store.write_progress(slide_id, progress.beat())
            elif progress.stale(self.stale_s):
                logger.warning("slide %s was %s with no heartbeat for %.0f s and no task: resubmitted",
                               slide_id, progress.state, self.stale_s)
                self._submit(slide_id, progress, progress.tile_size, progress.min_tissue)
                resubmitted.append(slide_id)
        return resubmitted
