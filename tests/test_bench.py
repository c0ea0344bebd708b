"""Smoke runs of the benchmarks: each prints a markdown table and one JSON line with a positive ratio, and
writes that line to its results file.

The ratio's value is not asserted: these machines are shared and noisy. The runs start without
`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`, as from a plain shell: each side must report the OpenMP policy it would
really have. Their servers run the engine on a thread (`SOFTSERVE_ENGINE=thread`; a flag a bench passes still wins): an engine
process costs each start another interpreter with torch, and the engine process has tests of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_SPIN = "GOMP_SPINCOUNT=10000"  # what `import server` sets where the environment sets no policy

BENCH = Path(__file__).resolve().parents[1] / "bench"
RESULTS = BENCH / "results"
README = BENCH.parent / "README.md"
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")  # not the 5 of `t5-small`, the 50 of `p50`, the 2 of `2x`
SCRIPTS = [
    "mixed_vs_single",
    "server_vs_raw",
    "mixed_vs_per_task",
    "hot_load",
    "many_prompts",
    "overload",
    "train_vs_peft",
    "continuous_vs_static",
    "decode_vs_generate",
    "engine_vs_ctranslate2",
    "goodput",
    "ensemble",
    "train_while_serving",
    "interference",
    "listings",
    "grammar_overhead",
]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_prints_a_table_and_one_json_result(name: str, tmp_path: Path) -> None:
    openmp = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    environment = {key: value for key, value in os.environ.items() if key not in openmp}
    environment["SOFTSERVE_ENGINE"] = "thread"
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=BENCH.parent,
        env=environment,
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
    assert (tmp_path / f"{name}.json").read_text() == json_lines[0] + "\n"
    if name == "server_vs_raw":  # the server as `softserve serve` runs, the raw side as a plain script
        assert (result["server_omp_wait_policy"], result["raw_omp_wait_policy"][:5]) == (SERVER_SPIN, "unset")
    elif "omp_wait_policy" in result:  # softserve's own model calls, as the server makes them
        assert result["omp_wait_policy"] == SERVER_SPIN


def test_a_quick_run_writes_no_result_unless_told_where(tmp_path: Path) -> None:
    """Smoke numbers must not replace the committed results of real runs."""
    before = {path: path.read_bytes() for path in RESULTS.glob("*.json")}
    done = subprocess.run(
        [sys.executable, str(BENCH / "mixed_vs_single.py"), "--quick"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert {path: path.read_bytes() for path in RESULTS.glob("*.json")} == before


def test_every_figure_in_the_readme_benchmark_table_comes_from_a_committed_result() -> None:
    """Each number in a measured column equals, at the precision shown, a value of `bench/results/NAME*.json`."""
    rows = benchmark_rows()
    assert {name for name, _ in rows} == set(SCRIPTS)
    for name, measured in rows:
        values = [v for path in RESULTS.glob(f"{name}*.json") for v in numbers(json.loads(path.read_text()))]
        for cell in measured:
            for figure in NUMBER.findall(cell):
                decimals = len(figure.partition(".")[2])
                assert any(round(v, decimals) == float(figure) for v in values), f"{name}: {figure} is in no result"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda path: path.name)
def test_a_committed_result_is_a_full_run_of_its_script(path: Path) -> None:
    result = json.loads(path.read_text())
    assert path.name.startswith(result["bench"])
    assert result["command"].split()[:2] == ["python", f"bench/{result['bench']}.py"]
    assert result["quick"] is False and "--quick" not in result["command"]


def test_a_result_older_than_the_code_it_measures_is_marked_stale_in_the_readme() -> None:
    """A figure stays in the table after the code it measured changed only marked `stale`, and a fresh one is
    never marked: each result records the commit it ran on (`revision`, with `dirty` for uncommitted code)."""
    for name, measured in benchmark_rows():
        reasons = [f"{path.name}: {why}" for path in RESULTS.glob(f"{name}*.json") if (why := staleness(path))]
        marked = any("stale" in cell for cell in measured)
        assert marked == bool(reasons), f"{name}: marked stale {marked}, but {reasons or 'every result is fresh'}"


def staleness(path: Path) -> str | None:
    """Why a committed result no longer speaks for the code it measured, or None when it does."""
    result = json.loads(path.read_text())
    if "revision" not in result:
        return "it records no revision (measured before results recorded theirs)"
    if result["dirty"]:
        return "it ran on uncommitted code"
    measured = ["server", "prompt_store", "bench/common.py", f"bench/{result['bench']}*.py"]  # with its helpers
    changes = subprocess.run(
        ["git", "rev-list", "--count", f"{result['revision']}..HEAD", "--", *measured],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
    )
    if changes.returncode != 0:
        return f"its revision {result['revision'][:10]} is not in this history"
    count = int(changes.stdout)
    return f"{count} commit(s) changed the code it measures since it ran" if count else None


def benchmark_rows() -> list[tuple[str, list[str]]]:
    """(bench, its measured cells) of each row of the README's benchmark table."""
    section = README.read_text().split("<!-- bench-table:start -->")[1].split("<!-- bench-table:end -->")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    return [(cells[0].strip(" `"), cells[3:]) for cells in rows]  # bench, what, target, then measured columns


def numbers(value: object) -> Iterator[float]:
    """Every number in a JSON value, however deep."""
    if isinstance(value, (dict, list)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield float(value)
