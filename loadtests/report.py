"""Where benchmark results go, and BENCHMARKS.md: the latest numbers of each harness in one page.

Each harness writes its own section (`make benchmark` the HTTP table, `make
slide-benchmark` whole slides, `make runtimes` the inference-runtime table, ...)
and its records, then the page is rebuilt from the sections, so running one
never drops the other's latest numbers.

By default a run writes under artifacts/benchmarks/ (not tracked): a benchmark
on a laptop must not rewrite the repository's published figures. With
`UPDATE_DOCS=1` it writes the tracked loadtests/results/ and BENCHMARKS.md,
which the README and docs/ link to. A local page takes the sections this
machine has not run from the tracked ones, so it is always complete.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from loadtests.servers import REPO_ROOT

logger = logging.getLogger(__name__)

TRACKED_RESULTS = REPO_ROOT / "loadtests" / "results"
TRACKED_PAGE = REPO_ROOT / "BENCHMARKS.md"
LOCAL_RESULTS = REPO_ROOT / "artifacts" / "benchmarks"
SECTIONS = ("benchmark.md", "cpu_budget.md", "slides.md", "engine.md", "runtimes.md", "decoders.md")  # in page order
UPDATE_DOCS = "UPDATE_DOCS"


def update_docs() -> bool:
    """Whether this run should update the tracked results (`UPDATE_DOCS=1`)."""
    return os.environ.get(UPDATE_DOCS, "").strip().lower() in ("1", "true", "yes")


def results_dir() -> Path:
    """Where this run writes its sections and records."""
    return TRACKED_RESULTS if update_docs() else LOCAL_RESULTS


def figure_link(name: str) -> str:
    """How this run's page links a figure written beside its sections."""
    return f"loadtests/results/{name}" if update_docs() else name


def latest_record(name: str) -> Path:
    """A harness's latest record: this machine's own run when there is one, else the tracked one."""
    local = LOCAL_RESULTS / name
    return local if local.is_file() else TRACKED_RESULTS / name


def write_benchmarks_markdown(results_dir: Path, page: Path, fallback_dir: Path | None = None) -> Path:
    """Rewrite `page` from the section files in `results_dir` (missing ones from `fallback_dir`)."""
    parts = []
    for name in SECTIONS:
        found = [folder / name for folder in (results_dir, fallback_dir) if folder is not None]
        section = next((path for path in found if path.is_file()), None)
        if section is not None:
            parts.append(section.read_text().strip())
    page.write_text("\n\n".join(["# Benchmarks", *parts]) + "\n")
    return page


def write_section(name: str, lines: list[str]) -> list[str]:
    """Write one harness's section (`name` in SECTIONS) and rebuild its page; returns the lines."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(lines))
    if update_docs():
        page = write_benchmarks_markdown(folder, TRACKED_PAGE)
    else:
        page = write_benchmarks_markdown(folder, folder / "BENCHMARKS.md", fallback_dir=TRACKED_RESULTS)
    logger.info("results in %s (%s)", page.relative_to(REPO_ROOT),
                "tracked" if update_docs() else f"not tracked; {UPDATE_DOCS}=1 updates BENCHMARKS.md")
    return lines
