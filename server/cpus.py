"""How many cores this process may really use: a server's default torch threads, one per usable core.

`os.cpu_count()` is the machine's count. A process pinned to some cores (`taskset`, a cpuset) or limited by a
cgroup CPU quota (a container's `--cpus`, a Kubernetes pod's `limits.cpu`) can use fewer, and torch threads
beyond that only wait for each other.

One thread per usable core is the default because it is the most throughput: on two cores, a server whose engine
took one thread (leaving the other core to the API process) answered 0.602 of the raw model's rows/s in
`bench/server_vs_raw`, against 0.893 with two. A small CPU that must keep one tenant's latency steady under
another's load does better with fewer (`--cpu-threads`; the README's `interference` note).
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
