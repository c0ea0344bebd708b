"""How many cores this process may really use, and how many torch threads a server takes by default.

`os.cpu_count()` is the machine's count. A process pinned to some cores (`taskset`, a cpuset) or limited by a
cgroup CPU quota (a container's `--cpus`, a Kubernetes pod's `limits.cpu`) can use fewer, and torch threads
beyond that only wait for each other.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in µs, or "max <period>"


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may run on, capped by its cgroup's CPU quota rounded up; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: the affinity stands
    return max(1, cores)


def default_torch_threads(cores: int | None = None) -> int:
    """One torch thread per usable core, less one: the process that serves HTTP (the API process beside an
    engine process, or the event loop beside an engine thread) needs a core of its own, and on a small CPU a
    second intra-op thread buys the model little (see the README's `interference` note). At least 1."""
    return max(1, (cores or usable_cores()) - 1)
