"""A slide worker on the service's host pauses between batches while the rest of the host is busy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slides.yielding import BUSY_SHARE, MAX_PAUSE_S, HostYield, pause_after


def test_the_pause_keeps_the_duty_only_while_others_are_busy():
    assert pause_after(0.1, others_share=0.9, duty=0.2) == pytest.approx(0.4)  # computes 0.1 of every 0.5 s
    assert pause_after(0.1, others_share=0.9, duty=0.5) == pytest.approx(0.1)
    assert pause_after(0.1, others_share=BUSY_SHARE, duty=0.2) == pytest.approx(0.4)
    assert pause_after(0.1, others_share=BUSY_SHARE - 0.01, duty=0.2) == 0.0  # a quiet host: never
    assert pause_after(0.1, others_share=1.0, duty=1.0) == 0.0  # duty 1: never
    assert pause_after(60, others_share=1.0, duty=0.2) == MAX_PAUSE_S


def _busy_loops(nice: int) -> list[subprocess.Popen]:
    """One busy process per core, at `nice`."""
    return [subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 1)]


def test_niced_work_its_own_and_other_slide_workers_does_not_make_it_pause():
    # Other slide workers (niced) on every core: a host of slide workers alone must not throttle itself.
    loops = _busy_loops(19)
    try:
        time.sleep(0.3)
        yielding = HostYield(duty=0.2)
        time.sleep(0.5)
        assert yielding.others_share() < BUSY_SHARE
        assert yielding.after_batch() == 0.0
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    # Its own work, niced as a slide worker is: in a child, since a lowered priority cannot be raised again.
    script = ("import os, time\nfrom slides.yielding import HostYield\nos.nice(19)\ny = HostYield(0.2)\n"
              "end = time.process_time() + 0.5\nwhile time.process_time() < end: pass\nprint(y.others_share())")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                            capture_output=True, text=True, timeout=60, check=True)
    assert float(result.stdout) < BUSY_SHARE


def test_it_pauses_while_other_processes_keep_every_core_busy():
    loops = _busy_loops(0)  # the service, at normal priority
    try:
        time.sleep(0.3)  # the loops are running
        yielding = HostYield(duty=0.5)
        time.sleep(0.5)  # "a batch" of 0.5 s, while the loops take the cores
        started = time.monotonic()
        paused = yielding.after_batch()
        assert paused == pytest.approx(0.5, abs=0.15)  # duty 0.5: as long again as the batch
        assert time.monotonic() - started >= paused
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
