"""Slides on the Dask engine against the in-process analysis: tiles per second on the same slides.

A cohort of synthetic slides (:mod:`synthetic.slides`, generated once
under artifacts/slides/, each used under several names) is analysed twice:

* **in process**: `slides.analysis.analyze` and its outputs
  (`slides.outputs.write_outputs`) slide after slide with one traced model,
  TensorFlow's threads left to TensorFlow (what `python -m slides.analyze`
  does; a worker writes the same outputs, which on a small slide are 40% of
  its time, so timing the analysis alone favoured the in-process side);
* **engine**: a `LocalCluster` of `--workers` single-threaded workers (models
  loaded before the clock starts), every slide submitted through
  :class:`slides.engine.SlideEngine` into a scratch store, timed until the
  store says the last one is done.

Workers run at normal priority here (nothing else to yield to). Writes its
section of BENCHMARKS.md; `make slide-benchmark` runs it after
:mod:`loadtests.slide_bench`.

    python -m loadtests.engine_bench [--model TAG] [--size 12000] [--distinct 2] [--copies 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from loadtests.report import write_section
from loadtests.slide_bench import SLIDES_DIR
from models.store import DEFAULT_MODEL_TAG

logger = logging.getLogger(__name__)

COMMAND = "make slide-benchmark"
MIN_RATIO = 0.90  # engine tiles/s over in-process tiles/s
OVERNIGHT_S = 10 * 3600
COHORT = 1000


@dataclass(frozen=True)
class Run:
    tiles: int
    seconds: float

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds


def cohort_slides(size: int, distinct: int, copies: int, folder: Path) -> list[Path]:
    """`distinct` synthetic slides (generated once, kept), each linked `copies` times into `folder`."""
    from synthetic.slides import generate_slide

    SLIDES_DIR.mkdir(parents=True, exist_ok=True)
    slides = []
    for seed in range(1, distinct + 1):
        original = SLIDES_DIR / f"cohort-{size}-seed{seed}.tiff"
        if not original.is_file():
            logger.info("generating %s (once)", original.name)
            generate_slide(original, size=size, seed=seed)
        for copy in range(copies):
            link = folder / f"slide-{seed}-{copy}.tiff"
            link.symlink_to(original)
            slides.append(link)
    return slides


def in_process(slides: list[Path], model_tag: str) -> Run:
    from models.prediction import TileClassifier
    from models.store import load_model
    from slides.analysis import analyze
    from slides.outputs import write_outputs

    stored = load_model(model_tag)
    classifier = TileClassifier(stored)
    analyze(slides[0], stored, classifier=classifier)  # warm-up: the first call traces the graph
    cancer = stored.card.abstention.cancer_classes
    started = time.perf_counter()
    tiles = 0
    with tempfile.TemporaryDirectory(prefix="engine-bench-out-") as out:
        for slide in slides:  # as the CLI and a worker do: the analysis, then its outputs
            analysis = analyze(slide, stored, classifier=classifier)
            write_outputs(analysis, Path(out) / slide.stem, cancer)
            tiles += len(analysis.tiles)
    return Run(tiles, time.perf_counter() - started)


def on_engine(slides: list[Path], model_tag: str, workers: int, store_folder: Path) -> Run:
    from slides.engine import SlideEngine
    from slides.store import SlideStore

    store = SlideStore(str(store_folder))
    for slide in slides:
        store.add_source(slide.stem, str(slide))
    with SlideEngine(store, model_tag, None, workers, nice=0) as engine:
        engine.client().wait_for_workers(workers)  # the warm-up plugin has loaded the model on each
        started = time.perf_counter()
        for slide in slides:
            engine.submit(slide.stem)
        while any(store.progress(slide.stem).state in ("queued", "running") for slide in slides):
            time.sleep(0.05)
        seconds = time.perf_counter() - started
    states = {store.progress(slide.stem).state for slide in slides}
    if states != {"done"}:
        raise RuntimeError(f"the engine's slides ended {states}")
    return Run(sum(store.progress(slide.stem).tiles_total for slide in slides), seconds)


def section(model: str, size: int, count: int, workers: int, alone: Run, engine: Run) -> list[str]:
    ratio = engine.tiles_per_second / alone.tiles_per_second
    per_core = engine.tiles_per_second / workers
    per_slide = engine.tiles / count
    cores = COHORT * per_slide / (per_core * OVERNIGHT_S)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    return [
        "## Slides on the engine (Dask)",
        "",
        f"Latest run of `{COMMAND}` ({when}; {platform.machine()}, Python {platform.python_version()}; model "
        f"`{model}`). {count} synthetic {size:,} px slides ({per_slide:.0f} tissue tiles each), analysed in "
        f"process one after another, then on a `LocalCluster` of {workers} single-threaded workers through "
        "`slides.engine.SlideEngine` and a slide store in a local folder.",
        "",
        "| where | tiles | seconds | tiles/s |",
        "|---|---:|---:|---:|",
        f"| in process (`slides.analyze`) | {alone.tiles} | {alone.seconds:.1f} | {alone.tiles_per_second:.0f} |",
        f"| engine, {workers} workers | {engine.tiles} | {engine.seconds:.1f} | {engine.tiles_per_second:.0f} |",
        "",
        f"- {'met' if ratio >= MIN_RATIO else 'NOT met'}: the engine reaches {ratio:.0%} of the in-process "
        f"tiles/s (target {MIN_RATIO:.0%}).",
        f"- {per_core:.0f} tiles/s per worker core: {COHORT:,} slides like these in {OVERNIGHT_S // 3600} h need "
        f"{cores:.1f} worker cores.",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_TAG, help="model tag (default: %(default)s)")
    parser.add_argument("--size", type=int, default=12_000, help="slide side in pixels (default: %(default)s)")
    parser.add_argument("--distinct", type=int, default=2, help="distinct slides (default: %(default)s)")
    parser.add_argument("--copies", type=int, default=4, help="names each is analysed under (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from models.tf_environment import prefer_onednn

    prefer_onednn()  # in process as on the workers (slides.task.loaded_model), before TensorFlow loads
    from models.store import resolve_tag

    model = resolve_tag(args.model)
    folder = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    try:
        slides = cohort_slides(args.size, args.distinct, args.copies, folder)
        alone = in_process(slides, model)
        engine = on_engine(slides, model, args.workers, folder / "store")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = write_section("engine.md", section(model, args.size, len(slides), args.workers, alone, engine))
    logger.info("\n%s", "\n".join(lines))
    if engine.tiles_per_second < MIN_RATIO * alone.tiles_per_second:
        raise SystemExit("a target was not met (above)")


if __name__ == "__main__":
    main()
