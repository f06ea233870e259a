"""How many CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota.

``os.cpu_count()`` counts the machine's cores. A process started under ``taskset``, in a
cpuset, or in a container given ``--cpus 2`` may use fewer, and a torch pool sized to
the machine then runs many threads per core, each waiting on the others.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["CGROUP_CPU_MAX", "usable_cores"]

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2's CPU quota: ``"<quota> <period>"`` in microseconds, or ``"max <period>"``."""


def _quota_cores(cpu_max: Path) -> int | None:
    """Cores the cgroup quota in ``cpu_max`` allows (rounded up), or ``None`` where it sets none."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: the affinity mask's size, capped by the cgroup quota.

    Parameters
    ----------
    cpu_max
        The cgroup v2 ``cpu.max`` file to read the quota from.

    Returns
    -------
    int
        At least 1.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = _quota_cores(cpu_max)
    return max(1, min(cores, quota) if quota else cores)
