"""`make mutation`'s summary: the mutation score of each mutated module, from mutmut's recorded results.

Run after `mutmut run`, from the repository root: `python -m tests.mutation_score [--min 85]`. A mutant
counts as killed when a test failed on it or it timed out (a mutant that hangs the code is caught);
a mutant that no selected test reaches counts as surviving, like one that every test passed.
Exits 1 when the total score is under `--min`, or (without `--partial`) when a mutant was never run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check", "segfault"}
NOT_RUN = {"not checked", "check was interrupted by user"}


def module_of(mutant: str) -> str:
    """`models.quality.x_measure__mutmut_3` or `...xǁClassǁmethod__mutmut_1` -> `models.quality`."""
    parts = mutant.split(".")
    return ".".join(part for part in parts if not part.startswith("x"))


def tally(lines: list[str]) -> dict[str, Counter]:
    """module -> status -> count, from `mutmut results --all true` lines (`name: status`)."""
    by_module: dict[str, Counter] = defaultdict(Counter)
    for line in lines:
        name, separator, status = line.strip().rpartition(": ")
        if separator:
            by_module[module_of(name)][status] += 1
    return by_module


def table(by_module: dict[str, Counter]) -> tuple[str, float, int]:
    """A Markdown table of the score per module; also the total score (%) and the mutants not run."""
    rows = ["| module | mutants | killed | survived | no test reaches it | score |", "|---|---:|---:|---:|---:|---:|"]
    totals: Counter = Counter()
    for module in sorted(by_module):
        counts = by_module[module]
        totals.update(counts)
        rows.append(_row(f"`{module}`", counts))
    rows.append(_row("**all**", totals))
    return "\n".join(rows), _score(totals), sum(totals[s] for s in NOT_RUN)


def _score(counts: Counter) -> float:
    counted = sum(n for status, n in counts.items() if status not in NOT_RUN and status != "skipped")
    return 100.0 * sum(counts[s] for s in KILLED) / max(counted, 1)


def _row(name: str, counts: Counter) -> str:
    killed = sum(counts[s] for s in KILLED)
    return (f"| {name} | {sum(counts.values())} | {killed} | {counts['survived'] + counts['suspicious']} | "
            f"{counts['no tests']} | {_score(counts):.1f}% |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation_score", description=__doc__.splitlines()[0])
    parser.add_argument("--min", type=float, default=85.0, help="lowest total score that passes (default: 85)")
    parser.add_argument("--partial", action="store_true", help="score the mutants that were run (a chosen subset)")
    args = parser.parse_args(argv)
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    listing = subprocess.run([mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True)
    markdown, score, not_run = table(tally(listing.stdout.splitlines()))
    sys.stdout.write(f"{markdown}\n\nmutation score {score:.1f}% (at least {args.min:g}% to pass)\n")
    if not_run and not args.partial:
        sys.stdout.write(f"{not_run} mutants were never run: run `mutmut run` to the end first\n")
        return 1
    return 0 if score >= args.min else 1


if __name__ == "__main__":
    raise SystemExit(main())
