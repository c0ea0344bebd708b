"""Smoke runs of the benchmarks: each prints a markdown table and one JSON line with a positive ratio.

The ratio's value is not asserted: these machines are shared and noisy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = [
    "mixed_vs_single",
    "server_vs_raw",
    "mixed_vs_per_task",
    "hot_load",
    "many_prompts",
    "overload",
    "train_vs_peft",
]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_prints_a_table_and_one_json_result(name: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=BENCH.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert any(line.startswith("| ") for line in lines), done.stdout
    assert any(line.startswith("|---") for line in lines), done.stdout
    json_lines = [line for line in lines if line.startswith("{")]
    assert len(json_lines) == 1, done.stdout
    assert lines[-1] == json_lines[0], "the JSON line comes last"
    result = json.loads(json_lines[0])
    assert result["bench"] == name
    assert result["ratio"] > 0
    assert result["quick"] is True
