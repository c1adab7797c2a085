"""A slide worker on the service's host pauses between batches while the rest of the host is busy."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from slides.yielding import BUSY_SHARE, MAX_PAUSE_S, HostYield, pause_after


def test_the_pause_keeps_the_duty_only_while_others_are_busy():
    assert pause_after(0.1, others_share=0.9, duty=0.2) == pytest.approx(0.4)  # computes 0.1 of every 0.5 s
    assert pause_after(0.1, others_share=0.9, duty=0.5) == pytest.approx(0.1)
    assert pause_after(0.1, others_share=BUSY_SHARE, duty=0.2) == pytest.approx(0.4)
    assert pause_after(0.1, others_share=BUSY_SHARE - 0.01, duty=0.2) == 0.0  # a quiet host: never
    assert pause_after(0.1, others_share=1.0, duty=1.0) == 0.0  # duty 1: never
    assert pause_after(60, others_share=1.0, duty=0.2) == MAX_PAUSE_S


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_its_own_work_does_not_count_as_the_host_being_busy():
    # One core of this process busy: on a 2-core host that alone is half the host, which must not make it pause.
    yielding = HostYield(duty=0.2)
    _burn(0.5)
    assert yielding.others_share() < BUSY_SHARE
    assert yielding.after_batch() == 0.0


def test_it_pauses_while_other_processes_keep_every_core_busy():
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
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
