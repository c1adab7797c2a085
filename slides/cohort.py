"""Analyse a cohort of slides on Dask, resumable: slides already done (or failed) in the store are skipped.

    python -m slides.cohort SLIDE_OR_URL [...] --out DIR_OR_URL [--scheduler tcp://host:8786] [--workers N]

Each slide gets the store folder ``<out>/<name>/`` (its file name without the
extension), with its progress and outputs. Without ``--scheduler`` a
``LocalCluster`` of ``--workers`` processes (default: one per usable core)
runs the slides. A progress bar goes to stderr, one JSON line per slide
finished in this run to stdout, and ``<out>/cohort.csv`` gets one row per
slide at the end. The exit status is the number of failed slides (at most 100).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from slides.analysis import DEFAULT_MIN_TISSUE
from slides.engine import SlideEngine
from slides.store import ACTIVE, SLIDE_ID, Progress, SlideStore

logger = logging.getLogger(__name__)

COHORT_TABLE = "cohort.csv"
POLL_S = 0.5
MAX_EXIT_STATUS = 100


def slide_name(source: str) -> str:
    """The slide's id in the store: its file name without the extensions (`a/B-12.ome.tiff` -> `B-12`)."""
    name = source.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    if not SLIDE_ID.match(name):
        raise ValueError(f"{source}: {name!r} cannot name a slide folder (letters, digits, '.', '_', '-')")
    return name


def absolute(source: str) -> str:
    """A URL as given; a local path made absolute, so the record means the same file from any folder."""
    return source if "://" in source else str(Path(source).absolute())


def row(slide_id: str, store: SlideStore) -> dict[str, object]:
    """The cohort table's row for one slide: state, then the summary's facts when it is done."""
    progress = store.progress(slide_id) or Progress("queued")
    facts: dict[str, object] = {"id": slide_id, "source": store.source(slide_id), "status": progress.state,
                                "reason": progress.reason or "", "seconds": progress.seconds,
                                "model": progress.model}
    summary = store.summary(slide_id) if progress.state == "done" else None
    if summary is not None:
        facts["tissue_tiles"] = summary["tiles_analysed"]
        facts["uncertain"] = summary["tiles_uncertain"]
        facts["flagged"] = sum(1 for flags in summary["tiles"]["flags"] if flags)
        facts["model"] = summary["model"]
        for label, share in summary["tissue_area_fraction"].items():
            facts[f"area_{label}"] = share
        for key, value in summary.items():  # tissue coverage, when the analysis reports it
            if "coverage" in key:
                items = value.items() if isinstance(value, dict) else [("", value)]
                for name, number in items:
                    if not isinstance(number, (dict, list)):
                        facts[f"{key}_{name}" if name else key] = number
    return facts


def table(rows: list[dict[str, object]]) -> str:
    """The rows as CSV, with every column any row has (fixed ones first)."""
    columns = ["id", "source", "status", "reason", "tissue_tiles", "uncertain", "flagged", "seconds", "model"]
    for facts in rows:
        columns += [key for key in facts if key not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class ProgressBar:
    """One line on stderr: slides finished of the cohort, failures, and tiles of the slides running."""

    def __init__(self, total: int, finished: int) -> None:
        self.total, self.finished, self.failed = total, finished, 0
        self._last = ""

    def show(self, running: Iterable[Progress]) -> None:
        running = list(running)
        tiles = f", running {sum(p.tiles_done for p in running)}/{sum(p.tiles_total or 0 for p in running)} tiles" \
            if running else ""
        filled = round(30 * self.finished / self.total) if self.total else 30
        line = (f"\rcohort: [{'#' * filled}{'.' * (30 - filled)}] {self.finished}/{self.total} slides, "
                f"{self.failed} failed{tiles}")
        if line != self._last:
            sys.stderr.write(line.ljust(len(self._last)))
            sys.stderr.flush()
            self._last = line

    def end(self) -> None:
        sys.stderr.write("\n")


def run(sources: list[str], engine: SlideEngine, tile_size: int | None, min_tissue: float, reconcile_s: float) -> int:
    """Analyse the cohort with `engine` into its store; returns how many slides failed."""
    store = engine.store
    ids = [slide_name(source) for source in sources]
    for slide_id, source in zip(ids, sources, strict=True):
        store.add_source(slide_id, absolute(source))
    states = {slide_id: store.progress(slide_id) for slide_id in ids}
    pending = [slide_id for slide_id in ids if states[slide_id] is None or states[slide_id].state in ACTIVE]
    logger.info("%d slides: %d already finished, %d to analyse", len(ids), len(ids) - len(pending), len(pending))
    bar = ProgressBar(len(ids), len(ids) - len(pending))
    with engine:
        for slide_id in pending:
            engine.submit(slide_id, tile_size, min_tissue)
        last_reconcile = time.monotonic()
        while pending:
            time.sleep(POLL_S)
            running = []
            for slide_id in list(pending):
                progress = store.progress(slide_id)
                if progress is None or progress.state in ACTIVE:
                    running += [progress] if progress is not None and progress.state == "running" else []
                    continue
                pending.remove(slide_id)
                bar.finished += 1
                bar.failed += progress.state == "failed"
                facts = row(slide_id, store)
                sys.stdout.write(json.dumps({k: v for k, v in facts.items() if v not in ("", None)}) + "\n")
                sys.stdout.flush()
            bar.show(running)
            if pending and time.monotonic() - last_reconcile > reconcile_s:
                engine.reconcile(pending)  # a restarted scheduler forgot them
                last_reconcile = time.monotonic()
    bar.end()
    rows = [row(slide_id, store) for slide_id in ids]
    store.fs.pipe_file(f"{store.root.rstrip('/')}/{COHORT_TABLE}", table(rows).encode())
    return sum(facts["status"] == "failed" for facts in rows)


def main(argv: list[str] | None = None) -> None:
    from config.cpus import usable_cpus
    from config.settings import load_settings

    settings = load_settings()
    parser = argparse.ArgumentParser(prog="python -m slides.cohort", description=__doc__.splitlines()[0])
    parser.add_argument("slides", nargs="+", help="whole-slide images: paths or fsspec URLs (s3://...)")
    parser.add_argument("--out", required=True, help="the store: a folder or an fsspec URL (s3://bucket/cohort)")
    parser.add_argument("--scheduler", default=settings.dask_scheduler,
                        help="a Dask scheduler, tcp://host:port (default: HISTO_DASK_SCHEDULER; none: a LocalCluster)")
    parser.add_argument("--workers", type=int, default=usable_cpus(),
                        help="LocalCluster workers, one thread each (default: one per usable core, %(default)s)")
    parser.add_argument("--model", default=settings.model_tag, help="model tag (default: %(default)s)")
    parser.add_argument("--tile-size", type=int, default=None, help="as for python -m slides.analyze")
    parser.add_argument("--min-tissue", type=float, default=DEFAULT_MIN_TISSUE, help="as for python -m slides.analyze")
    parser.add_argument("--reconcile-s", type=float, default=settings.slide_reconcile_s,
                        help="how often to look for slides a lost scheduler dropped (default: %(default)s s)")
    parser.add_argument("--stale-s", type=float, default=settings.slide_stale_s,
                        help="a slide without a heartbeat this long may be resubmitted (default: %(default)s s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = [slide_name(source) for source in args.slides]
    if len(set(names)) != len(names):
        parser.error("several slides share a name: their store folders would collide")
    engine = SlideEngine(SlideStore(args.out), args.model, args.scheduler, args.workers, settings.dask_worker_nice,
                         args.stale_s, settings.slide_max_attempts, settings.slide_busy_duty)
    failed = run(args.slides, engine, args.tile_size, args.min_tissue, args.reconcile_s)
    if failed:
        sys.stderr.write(f"{failed} of {len(args.slides)} slides failed ({COHORT_TABLE} says why)\n")
    raise SystemExit(min(failed, MAX_EXIT_STATUS))


if __name__ == "__main__":
    main()
