"""How many cores this process may really use, and which thread uses them.

`usable_cores`: `os.cpu_count()` is the machine's count. A process pinned to some cores (`taskset`, a cpuset) or
limited by a cgroup CPU quota (a container's `--cpus`, a Kubernetes pod's `limits.cpu`) can use fewer, and
torch threads beyond that only wait for each other. One thread per usable core is a server's default because it
is the most throughput; a small CPU that must keep one tenant's latency steady under another's load does better
with fewer (`--cpu-threads`; the README's `interference` note).

`serial_thread`: torch's threads are OpenMP's (libgomp), and each thread that runs a parallel op gets a team of
its own. libgomp's idle threads spin briefly before they sleep (see `server/__init__.py`), but only while no
more threads are in teams than there are cores: a second team (the thread that loaded the model, besides the
one that runs it) turns spinning off for all of them, and every parallel region then wakes its threads through
the kernel. So a process that runs a model keeps its parallel work on one thread, and its other threads serial.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

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


def serial_thread() -> None:
    """From now on the calling thread runs torch's ops alone and never starts an OpenMP team: its OpenMP thread
    count is its own, set here to 1. Call it before the thread's first parallel op; the thread that runs the
    model then sets its own count (`FrozenT5.use_cpu_threads`)."""
    torch.set_num_threads(1)
    # A thread takes the process-wide count once, as it first asks for its own (every parallel op asks): here,
    # while that count is 1, and not later, after the model's thread has set the process-wide count to its own.
    torch.get_num_threads()
