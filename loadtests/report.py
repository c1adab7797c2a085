"""BENCHMARKS.md: the latest numbers of each harness, assembled in one page.

Each harness writes its own section under loadtests/results/ (`make benchmark`
the HTTP table, `make slide-benchmark` whole slides, `make runtimes` the
inference-runtime table) and then calls
:func:`write_benchmarks_markdown`, so running one never drops the other's
latest numbers.
"""

from __future__ import annotations

from pathlib import Path

from loadtests.servers import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "loadtests" / "results"
SECTIONS = ("benchmark.md", "cpu_budget.md", "slides.md", "engine.md", "runtimes.md", "decoders.md")  # in page order
BENCHMARKS_PAGE = REPO_ROOT / "BENCHMARKS.md"


def write_benchmarks_markdown(results_dir: Path = RESULTS_DIR, page: Path = BENCHMARKS_PAGE) -> Path:
    """Rewrite `page` from the section files present in `results_dir`."""
    parts = [(results_dir / name).read_text().strip() for name in SECTIONS if (results_dir / name).is_file()]
    page.write_text("\n\n".join(["# Benchmarks", *parts]) + "\n")
    return page


def write_section(name: str, lines: list[str], results_dir: Path = RESULTS_DIR) -> list[str]:
    """Write one harness's section (`name` in SECTIONS) and rebuild BENCHMARKS.md; returns the lines."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / name).write_text("\n".join(lines))
    write_benchmarks_markdown(results_dir)
    return lines
