"""A slide worker that shares a host with the service pauses between batches while the service keeps it busy.

Scheduling priority alone does not keep /predict's throughput: on a 2-core VM, two
busy loops in Linux's idle scheduling class still took 20-40% of /predict's
requests/s at 32 clients (the hypervisor, the shared caches and the cores' clocks
do not see Linux priorities), and slides at that class took 15-30%. So after each
batch the worker looks at how busy the host's foreground (processes at normal
priority: the service) kept the cores meanwhile; at BUSY_SHARE of the host or more,
it sleeps so that it computes only `duty` of the time. Niced work, its own and other
slide workers', does not count: on a host of slide workers alone it never pauses.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import psutil

BUSY_SHARE = 0.5  # of the host's cores kept busy by foreground work during a batch: the service is loaded
MAX_PAUSE_S = 10.0  # one pause at most: the heartbeat goes on, and a slow batch does not stall a slide


def pause_after(work_s: float, others_share: float, duty: float) -> float:
    """Seconds to pause after `work_s` of work while foreground work kept `others_share` of the host busy."""
    if duty >= 1 or others_share < BUSY_SHARE:
        return 0.0
    return min(work_s * (1 / duty - 1), MAX_PAUSE_S)


def _busy_and_total(times: NamedTuple) -> tuple[float, float]:
    """CPU seconds of the host's foreground work, and of all its time, from psutil.cpu_times().

    Niced work is not foreground: the kernel counts the user time of processes above niceness 0 as `nice`,
    so this worker's own computing, its sibling slide workers' and any other batch job's are left out (two
    slide workers sharing a host must not yield to each other). Steal is time the hypervisor gave elsewhere,
    and guest time is already inside user: neither counts.
    """
    busy = sum(getattr(times, field, 0.0) for field in ("user", "system", "irq", "softirq"))
    return busy, busy + times.nice + times.idle + getattr(times, "iowait", 0.0)


class HostYield:
    """Call :meth:`after_batch` after each batch; it pauses when foreground work kept the host busy."""

    def __init__(self, duty: float) -> None:
        self.duty = duty
        self._mark()

    def _mark(self) -> None:
        self._host = _busy_and_total(psutil.cpu_times())
        self._own = os.times().system  # its kernel time counts as `system`; its user time, niced, as `nice`
        self._started = time.monotonic()

    def others_share(self) -> float:
        """The share of the host's CPU time that other processes at normal priority used since the last mark."""
        busy, total = _busy_and_total(psutil.cpu_times())
        own = os.times().system - self._own
        spent = total - self._host[1]
        return max(0.0, busy - self._host[0] - own) / spent if spent > 0 else 0.0

    def after_batch(self) -> float:
        """Pause if foreground work kept the host busy during the last batch; returns the seconds paused."""
        pause = pause_after(time.monotonic() - self._started, self.others_share(), self.duty)
        if pause:
            time.sleep(pause)
        self._mark()  # the pause is not work: the next batch is measured from here
        return pause
