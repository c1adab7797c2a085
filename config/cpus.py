"""How many CPUs this process may really use: the default number of workers.

`os.cpu_count()` is the host's count: in a container limited to 2 CPUs on a
64-core node it says 64, and 64 workers would each load the model and fight
over 2 CPUs. The usable count is the affinity mask (`taskset`, Kubernetes'
static CPU manager), capped by the cgroup CPU quota (`--cpus`, a pod's CPU
limit), rounded up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit(root: Path = Path("/")) -> float | None:
    """The cgroup's CPU quota in CPUs (e.g. 2.5), or None when there is none."""

    def read(path: Path) -> str | None:
        target = root / path.relative_to("/")
        try:
            return target.read_text().strip()
        except OSError:
            return None

    v2 = read(CGROUP_V2_CPU_MAX)
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100_000)
    quota, period = read(CGROUP_V1_QUOTA), read(CGROUP_V1_PERIOD)
    if quota is None or period is None or int(quota) <= 0:
        return None
    return int(quota) / int(period)


def usable_cpus(root: Path = Path("/")) -> int:
    """CPUs in the affinity mask, capped by the cgroup quota rounded up; at least 1."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        available = min(available, math.ceil(limit))
    return max(1, available)
