"""Goodput under a retry storm: successful requests/s with 8x the queue's worth of connections ÷ with the queue's worth.

A `softserve serve` process (a random model with t5-small's shapes, saved as a checkpoint) with a small queue
(`--max-queue-size 32`, 16 rows per batch or decoder step) serves 4 tasks. wrk (`bench/wrk_generate.lua`) drives
it with N keep-alive connections, each sending `POST /v1/generate` (one 32-token input, 4 new tokens,
`ignore_eos`) as soon as its previous answer arrives: at N = 32 (the queue's worth) nothing is refused;
at N = 256 (8x) most requests are refused with 503 and sent again at once, ignoring Retry-After, as
impatient clients do. Refusing must stay cheap enough that the accepted requests still get the model:
the goodput ratio (successful requests/s at 8x ÷ at 1x, median over ABBA rounds) should be >= 0.9.

The server is measured three times, one after the other (only one alive at a time): with the default
`--scheduler continuous` (the engine in its own process, so HTTP work and the model do not share one GIL),
the reported `ratio`; the same with `--shed-delay-ms 0` (every 503 sent at once, so each refused client
retries at once: what the default delay of the refusal buys); and with `--scheduler static` for comparison
(the model runs on a thread of the API process: every 503 answered takes the GIL from it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import common  # noqa: F401  (before torch: the server's OpenMP wait policy, see common.py)
from common import (
    ByteTokens,
    Comparison,
    WrkRun,
    input_texts,
    interleaved,
    markdown_table,
    model_config,
    model_name,
    parser,
    publish,
    random_prompts,
    require_wrk,
    results_file,
    settle,
    upload_prompts,
    write_bodies,
    wrk,
)

from server.testing.checkpoints import save_checkpoint
from server.testing.processes import server_process

TARGET = 0.9
TASKS = 4
QUEUE = 32
ROWS = 16  # max_batch_size (static) and max_active_rows (continuous)
STORM = 8  # connections: this many times the queue's worth
NEW_TOKENS = 4
# The servers measured, one after the other: their names and the flags that set them apart. The reported ratio is
# the first's; a 503 sent at once (`--shed-delay-ms 0`) shows what the delay buys against clients retrying at once.
SERVERS = {
    "continuous": ("--scheduler", "continuous"),
    "continuous, shed delay 0": ("--scheduler", "continuous", "--shed-delay-ms", "0"),
    "static": ("--scheduler", "static"),
}


class Phases:
    """The two connection counts of one server as samplers of successful requests/s; every run is kept."""

    def __init__(self, url: str, bodies: Path, seconds: int) -> None:
        self.url, self.bodies, self.seconds = url, bodies, seconds
        self.probe = json.loads(bodies.read_text().splitlines()[0])
        self.connections = {"1x": QUEUE, f"{STORM}x": STORM * QUEUE}
        self.runs: dict[str, list[WrkRun]] = {name: [] for name in self.connections}

    def sample(self, name: str) -> float:
        settle(self.url, self.probe)
        run = wrk(self.url, self.bodies, self.connections[name], self.seconds)
        if run.other or run.socket_errors or run.timeouts:
            raise RuntimeError(f"{name}: answers other than 200 and 503, or socket errors: {run}")
        if name == "1x" and not run.ok:  # the ratio's denominator
            raise RuntimeError(f"no request succeeded in {self.seconds} s at 1x; give the runs more --seconds")
        self.runs[name].append(run)
        return run.ok_per_s

    def samplers(self) -> dict[str, Callable[[], float]]:
        return {name: (lambda name=name: self.sample(name)) for name in self.connections}

    def comparison(self, a: str, b: str) -> Comparison:
        return Comparison(a, b, {name: [run.ok_per_s for run in runs] for name, runs in self.runs.items()})

    def median(self, name: str, field: str) -> float:
        return statistics.median(getattr(run, field) for run in self.runs[name])


def measure(
    server: str, checkpoint: Path, data_dir: Path, bodies: Path, options: argparse.Namespace, repeats: int
) -> Phases:
    """Starts the server named `server` (see `SERVERS`), runs the rounds, stops it."""
    flags = [
        *("--model", str(checkpoint), *SERVERS[server], "--device", options.device, "--dtype", options.dtype),
        *("--max-queue-size", str(QUEUE), "--max-batch-size", str(ROWS), "--max-active-rows", str(ROWS)),
        *("--request-timeout-s", "60", "--engine", options.engine),
    ]
    with server_process(data_dir, *flags, timeout_s=300) as (_, url):
        prompts = random_prompts(TASKS, model_config(options.quick).d_model, options.seed)
        upload_prompts(url, [f"task{i}" for i in range(TASKS)], prompts)
        phases = Phases(url, bodies, options.seconds)
        wrk(url, bodies, QUEUE, 1 if options.quick else 3)  # warm-up: connections, prompt cache, first batches
        interleaved(phases.samplers(), repeats)
    return phases


def main(argv: list[str] | None = None) -> None:
    require_wrk("goodput")
    args = parser(__doc__.splitlines()[0], repeats=4)
    args.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    args.add_argument(
        "--engine",
        choices=["process", "thread"],
        default=os.environ.get("SOFTSERVE_ENGINE", "process"),
        help="where the continuous engine runs (default: `SOFTSERVE_ENGINE`, else its own process)",
    )
    options = args.parse_args(argv)
    repeats = 1 if options.quick else options.repeats
    if options.quick:
        options.seconds = 1  # the tiny model answers many requests in a second, even on a loaded machine

    texts = input_texts(ByteTokens(), 4 * TASKS, options.seed)
    parameters = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    with tempfile.TemporaryDirectory() as tmp:
        bodies = write_bodies(
            Path(tmp) / "bodies.jsonl",
            [{"task_id": f"task{i % TASKS}", "inputs": text, "parameters": parameters} for i, text in enumerate(texts)],
        )
        checkpoint = save_checkpoint(model_config(options.quick), Path(tmp) / "model")
        phases = {
            name: measure(name, checkpoint, Path(tmp) / f"server{i}", bodies, options, repeats)
            for i, name in enumerate(SERVERS)
        }

    storm = f"{STORM}x"
    ratios = {name: p.comparison(storm, "1x").ratio for name, p in phases.items()}
    rows = [
        [
            name,
            key,
            p.connections[key],
            p.median(key, "ok_per_s"),
            p.median(key, "share_503"),
            p.median(key, "latency_p99_ms"),
            ratios[name] if key == storm else "",
        ]
        for name, p in phases.items()
        for key in p.connections
    ]
    headers = ["server", "load", "connections", "200s/s (median)", "503 share", "p99 ms (all answers)"]
    print(markdown_table([*headers, f"{storm} ÷ 1x (median of rounds)"], rows), end="\n\n")
    ratio = ratios["continuous"]
    result = {
        "bench": "goodput",
        "ratio": round(ratio, 4),
        "target": TARGET,
        "meets_target": ratio >= TARGET,
        "ratio_shed_delay_0": round(ratios["continuous, shed delay 0"], 4),
        "ratio_static": round(ratios["static"], 4),
        **{
            name: {
                key: {
                    "connections": p.connections[key],
                    "ok_per_s": round(p.median(key, "ok_per_s"), 2),
                    "share_503": round(p.median(key, "share_503"), 4),
                    "ok_per_s_by_round": [round(run.ok_per_s, 2) for run in p.runs[key]],
                }
                for key in p.connections
            }
            for name, p in phases.items()
        },
        "queue": QUEUE,
        "rows": ROWS,
        "tasks": TASKS,
        "new_tokens": NEW_TOKENS,
        "seconds_per_run": options.seconds,
        "rounds": repeats,
        "model": model_name(options.quick),
        "device": options.device,
        "dtype": options.dtype,
        "engine": options.engine,
        "quick": options.quick,
    }
    publish(result, results_file(options, "goodput"))


if __name__ == "__main__":
    main(sys.argv[1:])
