"""The server's default torch threads follow the cores the process may use: its affinity and its cgroup quota."""

from __future__ import annotations

import os
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
