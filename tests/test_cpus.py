"""The server's default torch threads follow the cores the process may use (its affinity and its cgroup quota),
and a serial thread never starts an OpenMP team of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cpus import usable_cores

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", AFFINITY),
        ("50000 100000\n", 1),  # half a core rounds up to one
        ("150000 100000\n", min(AFFINITY, 2)),
        ("6400000 100000\n", AFFINITY),  # a quota above the cores the process may run on
        ("garbage\n", AFFINITY),
    ],
)
def test_a_cgroup_quota_caps_the_usable_cores(tmp_path: Path, cpu_max: str, expected: int) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text(cpu_max)
    assert usable_cores(quota) == expected


def test_without_a_cgroup_quota_the_affinity_decides(tmp_path: Path) -> None:
    assert usable_cores(tmp_path / "absent") == AFFINITY


SERIAL_THEN_MODEL_THREAD = """
import os, threading, torch
from server.cpus import serial_thread

serial_thread()
threads = lambda: len(os.listdir("/proc/self/task"))
ready, done = threading.Event(), threading.Event()

def model_thread():
    torch.set_num_threads(3)
    torch.randn(512, 512) @ torch.randn(512, 512)  # a parallel region: a team of 3
    ready.set()
    done.wait()  # a thread's team lives as long as the thread

thread = threading.Thread(target=model_thread)
thread.start()
ready.wait()
before = threads()
x = torch.randn(2048, 2048)
(x @ x).sum(), x.clone(), torch.tanh(x)  # what would be parallel regions on a thread with threads of its own
print(torch.get_num_threads(), threads() - before)
done.set()
"""


def test_a_serial_thread_keeps_one_torch_thread_and_starts_no_openmp_team_while_another_runs_the_model() -> None:
    """What the engine process's layout rests on (server/cpus.py): torch's thread count is per thread, so a thread
    that set its own count keeps it when the model thread sets another, and its large ops start no threads."""
    done = subprocess.run([sys.executable, "-c", SERIAL_THEN_MODEL_THREAD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0"]
