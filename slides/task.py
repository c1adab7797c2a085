"""The one task the engine runs: analyse one slide of the store, into the store.

It runs on a Dask worker (or in any process) and takes only strings and
numbers: the model is loaded by tag once per process (:func:`loaded_model`),
never shipped. Progress goes to the store after every batch (on S3, where each
write is a PUT, at most once a second), with a heartbeat,
and the summary is written last, so its presence means done. A bad slide
(:class:`~slides.reader.SlideError`) ends ``failed`` with its reason and is
never retried; any other error is raised for Dask to retry, up to
``max_attempts`` runs in all (a run cut by a lost worker counts too).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slides.analysis import DEFAULT_MIN_TISSUE
from slides.reader import SlideError
from slides.store import Progress, SlideStore
from slides.yielding import HostYield

if TYPE_CHECKING:  # TensorFlow loads only when a slide is analysed
    from models.prediction import TileClassifier

logger = logging.getLogger(__name__)

REMOTE_PROGRESS_EVERY_S = 1.0  # progress after every batch, but on S3 (each write a PUT) at most this often


@dataclass(frozen=True)
class SlideJob:
    """What one analysis needs, small enough to send anywhere."""

    store_url: str
    slide_id: str
    model_tag: str
    tile_size: int | None = None
    min_tissue: float = DEFAULT_MIN_TISSUE
    max_attempts: int = 3


LOWEST_NICE = 19  # at this niceness slides also take Linux's idle scheduling class (SCHED_IDLE)


def lower_priority(nice: int) -> None:
    """Give every thread of this process at least `nice` (Linux niceness is per thread; threads started
    later inherit their creator's), so slides yield the CPU to the service on a shared host.

    At LOWEST_NICE the threads also join SCHED_IDLE: niceness 19 still takes about 1.5% of a busy core
    per thread and waits for its time slice before yielding; an idle-class thread is preempted the moment
    a service thread wakes, so slides run on the CPU time /predict leaves (batching gaps, I/O)."""
    if nice <= 0:
        return
    tasks = Path("/proc/self/task")
    threads = [int(tid.name) for tid in tasks.iterdir()] if tasks.is_dir() else [0]
    idle = nice >= LOWEST_NICE and hasattr(os, "SCHED_IDLE")
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            if idle and os.sched_getscheduler(tid) != os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # the thread ended meanwhile
            continue


@functools.cache
def loaded_model(tag: str) -> TileClassifier:
    """The stored model's classifier, loaded once per process, with the thresholds and TensorFlow threads
    the settings say (the same HISTO_* variables as the service: a tile is answered as /predict answers it)."""
    from models.tf_environment import prefer_onednn

    prefer_onednn()  # as the service's workers: about 35% more tiles/s on one AVX2 core (before TensorFlow loads)
    from config.settings import load_settings
    from models.inference import configure_threads
    from models.prediction import Thresholds, TileClassifier
    from models.store import load_model
    from slides.analysis import BATCH_SIZE

    settings = load_settings()
    configure_threads(settings.tf_intra_op_threads, settings.tf_inter_op_threads)
    stored = load_model(tag)
    thresholds = Thresholds.resolve(stored.card, settings.abstain_threshold, settings.ood_threshold)
    classifier = TileClassifier(stored, thresholds, trust_checks=settings.ood_gate)
    # Every batch size a slide forms (its last batch is smaller), as the service warms up: TensorFlow sets up
    # per shape, and without this a worker's first slides paid it inside their analysis.
    classifier.predictor.warm_up(range(1, BATCH_SIZE + 1))
    logger.info("model %s loaded and warmed up in process %d", stored.tag, os.getpid())
    return classifier


def _whoami() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def analyse_slide(job: SlideJob, nice: int = 0, busy_duty: float = 1.0) -> str:
    """Analyse `job`'s slide into its store folder; returns the final state (`done` or `failed`).

    With `nice` above 0 (a worker sharing its host with the service) the worker runs at that priority and,
    while the service (work at normal priority) keeps the host busy, computes only `busy_duty` of the
    time (:mod:`slides.yielding`).

    Safe to run twice: a slide already done or failed is left as it is.
    """
    from slides.analysis import analyze
    from slides.outputs import write_outputs

    store = SlideStore(job.store_url)
    before = store.progress(job.slide_id) or Progress("queued")
    if before.state == "failed":
        return "failed"
    if before.state == "done" or store.summary(job.slide_id) is not None:
        if before.state != "done":  # the run died between its summary and its last progress write
            store.write_progress(job.slide_id, before.beat(state="done"))
        return "done"
    attempt = before.attempt + 1
    if attempt > job.max_attempts:
        store.write_progress(job.slide_id, before.beat(
            state="failed", reason=f"gave up after {job.max_attempts} runs; last: {before.reason or 'worker lost'}"))
        return "failed"
    source = store.source(job.slide_id)
    if source is None:
        store.write_progress(job.slide_id, before.beat(state="failed", reason="no such slide in the store"))
        return "failed"
    lower_priority(nice)
    classifier = loaded_model(job.model_tag)
    stored = classifier.stored
    started = time.time()
    running = before.beat(state="running", attempt=attempt, worker=_whoami(), started=started, tiles_done=0,
                          reason=None, model=stored.tag)
    store.write_progress(job.slide_id, running)
    lock = threading.Lock()  # progress comes from the analysis' thread only, but stay safe
    written, every_s = 0.0, 0.0 if store.local else REMOTE_PROGRESS_EVERY_S
    yielding = HostYield(busy_duty) if nice > 0 else None

    def on_progress(done: int, total: int) -> None:
        nonlocal running, written
        with lock:
            running = running.beat(tiles_done=done, tiles_total=total)
            if done in (0, total) or time.monotonic() - written >= every_s:
                store.write_progress(job.slide_id, running)
                written = time.monotonic()
        if yielding is not None and done < total:  # at 0: after the tissue mask and the grid
            yielding.after_batch()

    try:
        with store.local_copy(source) as path:
            analysis = analyze(path, stored, job.tile_size, job.min_tissue, progress=on_progress,
                               classifier=classifier)
        with tempfile.TemporaryDirectory(prefix="histo-outputs-") as scratch:
            write_outputs(analysis, Path(scratch), stored.card.abstention.cancer_classes)
            store.put_outputs(job.slide_id, Path(scratch))
    except SlideError as exc:  # the slide itself: another run would fail the same way
        logger.warning("slide %s failed: %s", job.slide_id, exc)
        store.write_progress(job.slide_id, running.beat(state="failed", reason=str(exc)))
        return "failed"
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        logger.exception("slide %s, run %d of %d failed", job.slide_id, attempt, job.max_attempts)
        last = attempt >= job.max_attempts
        store.write_progress(job.slide_id, running.beat(
            state="failed" if last else "queued",
            reason=f"gave up after {attempt} runs; last: {reason}" if last else reason))
        if last:
            return "failed"
        raise  # for Dask's retries
    total = len(analysis.tiles)
    store.write_progress(job.slide_id, running.beat(state="done", tiles_done=total, tiles_total=total,
                                                    seconds=round(time.time() - started, 3)))
    if yielding is not None:  # the last batch and the outputs (the overlay's PNG is a second of CPU), once done
        yielding.after_batch()
    return "done"
