"""End-to-end HTTP throughput of the server ÷ the raw model's best throughput on the same rows (batch 32 or 64).

Each side runs as it really would. The server side is a real `softserve serve` process serving a random
model with t5-small's shapes, saved as a checkpoint: like every `softserve serve` it sets a short OpenMP
spin (`GOMP_SPINCOUNT`) before torch loads and sets its torch threads from `--cpu-threads` (default: one
per usable core). The raw side is this process, a plain script: it loads torch before anything imports
`server` (the first import below), so its OpenMP threads keep the policy of the environment the bench was
started in (usually unset), and one thread per usable core; it loads the same checkpoint with
`FrozenT5.load` and calls `FrozenT5.generate` directly, both on the model thread (common.py). Both policies
are in the JSON result.

Server side: 32 prompts of 20 tokens uploaded with `PUT /v1/prompts/{task_id}` as safetensors; wrk, the C
load generator (`bench/wrk_generate.lua`, one thread), keeps 64 keep-alive connections busy, each sending the
next of 64 bodies (body i: task i mod 32, its own 32-token input, `max_new_tokens=4`) as soon as its previous
answer arrives. One sample: the server's 200 answers to `/v1/generate` (its `softserve_requests_total`) per
second in a window of `--seconds` that opens `--warm-s` into a wrk run that outlasts it, so that neither the
first passes (64 rows arriving at once) nor the answers cut off when wrk stops count against the server;
requests wrk leaves in flight finish before the next sample.

Raw side: `FrozenT5.generate` on the same 64 rows, at batch 32 (the first 32: 32 tasks) and at batch 64
(all of them), `--raw-rows` rows per sample, on a dedicated thread as the server's model runs (see
common.py). The server is measured against the better of the two: the one with the higher median.

Rounds alternate (server, raw 32, raw 64, then back); the ratio is the median over rounds of server ÷ the
better raw side. Target: >= 0.85. A run with a server setting other than the default (`--cpu-threads`,
`--pass-budget-tokens`) writes `server_vs_raw-threadsN.json` / `server_vs_raw-budgetN.json`. Where the
difference goes is reported too: the server's passes from its metrics over the measured runs (decoder steps,
rows per step, the tokens of each pass's work budget spent),
and CPU time per row of each process (Linux /proc): the API process, the engine process, wrk, and this
process (the raw side's model).
"""

from __future__ import annotations

import torch  # isort: skip  (first, before `server` sets the server's OpenMP wait policy: see above)

import statistics
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

import httpx
from common import (
    BATCH_SIZE,
    MAX_NEW_TOKENS,
    SERVER_WAIT_POLICY,
    TORCH_LOADED_BEFORE_SERVER,
    Comparison,
    Wrk,
    WrkRun,
    checkpoint_server,
    descendants,
    environment,
    generate_throughput,
    input_texts,
    interleaved,
    load_model,
    markdown_table,
    on_model_thread,
    parser,
    process_cpu_s,
    random_prompts,
    report,
    require_wrk,
    results_file,
    rows_for,
    settle,
    upload_prompts,
    warm_up,
    write_bodies,
    wrk,
)
from prometheus_client.parser import text_string_to_metric_families

from server.cpus import usable_cores
from server.serving.model import FrozenT5, Row
from server.settings import Settings

TARGET = 0.85
TASKS = 32
CONNECTIONS = 64
RAW_BATCHES = (BATCH_SIZE, 2 * BATCH_SIZE)
SERVER = "server (HTTP, wrk)"
RAW = {batch: f"raw generate, batch {batch}" for batch in RAW_BATCHES}
GENERATE_200 = {"route": "/v1/generate", "status": "200"}
LATE_S = 120  # how long a window may stay open past `--seconds` on a busy machine
CPU_GROUPS = ["API process", "engine process", "wrk", "bench process (raw model)"]
PASS_METRICS = {  # histogram -> what its mean over the measured runs is called here
    "decoder_step_duration_seconds": "s per decoder step",
    "batch_size": "rows per step",
    "batch_tasks": "tasks per step",
    "engine_pass_budget_spent_tokens": "budget tokens spent per pass",
}


class CpuMeter:
    """Where one side's CPU time went, summed over its samples, per row served."""

    def __init__(self, server_pid: int) -> None:
        self.api_pid = server_pid
        self.engine_pids = [pid for pid in descendants(server_pid) if pid != server_pid]
        self.seconds: Counter[str] = Counter()
        self.wall_s = 0.0
        self.rows = 0

    def reading(self) -> Counter[str]:
        """CPU seconds used so far by the server's processes and this one, and the wall clock."""
        return Counter(
            {
                "API process": process_cpu_s(self.api_pid),
                "engine process": sum(process_cpu_s(pid) for pid in self.engine_pids),
                "bench process (raw model)": time.process_time(),
                "wall": time.perf_counter(),
            }
        )

    def book(self, before: Counter[str], after: Counter[str], rows: int, wrk_s: float = 0.0) -> None:
        """Books the CPU time between two readings, and wrk's, to `rows` rows served."""
        spent = Counter({key: after[key] - before[key] for key in before})
        self.wall_s += spent.pop("wall")
        self.seconds.update(spent | {"wrk": wrk_s})
        self.rows += rows

    def per_row_ms(self) -> dict[str, float]:
        return {group: round(1000 * self.seconds[group] / max(1, self.rows), 3) for group in CPU_GROUPS}

    def row(self, side: str) -> list[object]:
        per_row = list(self.per_row_ms().values())
        wall = 1000 * self.wall_s / max(1, self.rows)
        return [side, *per_row, sum(per_row), wall, sum(per_row) / wall]


ANSWERED = "generate answered 200"


def server_totals(base_url: str) -> Counter[str]:
    """The `_sum` and `_count` of every histogram the server exports, and its 200 answers to `/v1/generate`."""
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                totals[sample.name] += sample.value
            elif sample.name == "softserve_requests_total" and sample.labels == GENERATE_200:
                totals[ANSWERED] += sample.value
    return totals


class ServerSide:
    """wrk runs against the server, measured in their steady state; every run is kept, with what the server's
    histograms gained in the measured windows."""

    def __init__(self, url: str, bodies: Path, warm_s: int, seconds: int, meter: CpuMeter) -> None:
        self.url, self.bodies, self.warm_s, self.seconds, self.meter = url, bodies, warm_s, seconds, meter
        self.probe = {"task_id": "task-00", "inputs": "x", "parameters": {"max_new_tokens": 1}}
        self.runs: list[WrkRun] = []
        self.window: Counter[str] = Counter()

    def sample(self) -> float:
        """Answers per second in a window of `seconds` that opens `warm_s` into a wrk run (which outlasts it):
        the rows of the first passes and those cut off when wrk stops are outside it. On a machine too busy to
        answer each connection once in `seconds`, the window stays open until it has (at most `LATE_S` more)."""
        settle(self.url, self.probe)
        run = Wrk(self.url, self.bodies, CONNECTIONS, self.warm_s + self.seconds + LATE_S + 5)
        time.sleep(self.warm_s)
        cpu_before, before = self.meter.reading(), server_totals(self.url)
        time.sleep(self.seconds)
        cpu_after, gained = self.meter.reading(), server_totals(self.url) - before
        while gained[ANSWERED] < CONNECTIONS and cpu_after["wall"] - cpu_before["wall"] < self.seconds + LATE_S:
            time.sleep(0.5)
            cpu_after, gained = self.meter.reading(), server_totals(self.url) - before
        run.stop()
        done = run.result()
        if done.rejected or done.other or done.socket_errors or done.timeouts or not gained[ANSWERED]:
            raise RuntimeError(f"answers other than 200, socket errors, or none in the window: {done}")
        answered = int(gained[ANSWERED])
        self.meter.book(cpu_before, cpu_after, answered, wrk_s=done.cpu_s * answered / done.ok)  # wrk: its mean
        self.runs.append(done)
        self.window.update(gained)
        return answered / (cpu_after["wall"] - cpu_before["wall"])

    def pass_means(self) -> dict[str, float]:
        """Means over the measured windows."""

        def mean(metric: str) -> float:
            count = self.window[f"softserve_{metric}_count"]
            return self.window[f"softserve_{metric}_sum"] / count if count else 0.0

        passes = self.window["softserve_decoder_step_duration_seconds_count"]
        return {"decoder steps": passes, **{name: mean(metric) for metric, name in PASS_METRICS.items()}}


def raw_sample(meter: CpuMeter, model: FrozenT5, rows: list[Row], calls: int) -> float:
    before = meter.reading()
    throughput = generate_throughput(model, rows, calls)
    meter.book(before, meter.reading(), len(rows) * calls)
    return throughput


def main(argv: list[str] | None = None) -> None:
    require_wrk("server_vs_raw")
    args = parser(__doc__.splitlines()[0], repeats=6)
    args.add_argument("--warm-s", type=int, default=5, help="seconds of each wrk run before its window opens")
    args.add_argument("--seconds", type=int, default=10, help="length of the window in each wrk run")
    args.add_argument("--raw-rows", type=int, default=8 * BATCH_SIZE, help="rows of each raw sample (a multiple of 64)")
    args.add_argument("--max-wait-ms", type=float, default=Settings().max_wait_ms, help="the batcher's wait")
    args.add_argument(
        "--cpu-threads",
        type=int,
        default=Settings().cpu_threads,
        help="the server's (0: one per usable core)",
    )
    args.add_argument("--pass-budget-tokens", type=int, default=None, help="the server's (default: its default)")
    opts = args.parse_args(argv)
    quick = (1, 1, 1, max(RAW_BATCHES))
    repeats, warm_s, seconds, raw_rows = (
        quick if opts.quick else (opts.repeats, opts.warm_s, opts.seconds, opts.raw_rows)
    )
    if raw_rows % max(RAW_BATCHES):
        args.error(f"--raw-rows must be a multiple of {max(RAW_BATCHES)}")
    if not TORCH_LOADED_BEFORE_SERVER:
        raise RuntimeError("torch must load before `server` here, or the raw side runs under the server's policy")
    flags = ("--max-wait-ms", str(opts.max_wait_ms), "--cpu-threads", str(opts.cpu_threads))
    variant = [f"threads{opts.cpu_threads}"] if opts.cpu_threads != Settings().cpu_threads else []
    if opts.pass_budget_tokens is not None:
        flags += ("--pass-budget-tokens", str(opts.pass_budget_tokens))
        variant.append(f"budget{opts.pass_budget_tokens}")

    with tempfile.TemporaryDirectory() as tmp, checkpoint_server(Path(tmp), opts, *flags) as (checkpoint, pid, url):
        model = load_model(str(checkpoint), opts.device, opts.dtype, opts.threads)
        prompts = random_prompts(TASKS, model.d_model, opts.seed)
        texts = input_texts(model, CONNECTIONS, opts.seed)
        task_ids = [f"task-{i:02d}" for i in range(TASKS)]
        rows = rows_for(model, [prompts[i % TASKS] for i in range(CONNECTIONS)], texts)
        for batch in RAW_BATCHES:
            warm_up(model, rows[:batch])
        raw_threads = on_model_thread(torch.get_num_threads)
        upload_prompts(url, task_ids, prompts)
        parameters = {"max_new_tokens": MAX_NEW_TOKENS}
        bodies = write_bodies(
            Path(tmp) / "bodies.jsonl",
            [
                {"task_id": task_ids[i % TASKS], "inputs": text, "parameters": parameters}
                for i, text in enumerate(texts)
            ],
        )
        meters = {side: CpuMeter(pid) for side in (SERVER, *RAW.values())}
        server = ServerSide(url, bodies, warm_s, seconds, meters[SERVER])
        wrk(url, bodies, CONNECTIONS, 1 if opts.quick else 3)  # warm-up: connections, prompt cache, first passes
        samplers = {SERVER: server.sample}
        for batch in RAW_BATCHES:
            samplers[RAW[batch]] = partial(raw_sample, meters[RAW[batch]], model, rows[:batch], raw_rows // batch)
        samples = interleaved(samplers, repeats)
    server_threads = opts.cpu_threads or usable_cores()  # what `FrozenT5.use_cpu_threads` sets

    best = max(RAW.values(), key=lambda side: statistics.median(samples[side]))
    comparison = Comparison(SERVER, best, {SERVER: samples[SERVER], best: samples[best]})
    against = {batch: Comparison(SERVER, RAW[batch], samples).ratio for batch in RAW_BATCHES}
    latency = statistics.median(run.latency_p50_ms for run in server.runs) / 1000
    setup = markdown_table(
        ["connections", "tasks", "max_batch_size", "max_wait_ms", "torch threads: raw, server", "median latency s"],
        [[CONNECTIONS, TASKS, BATCH_SIZE, opts.max_wait_ms, f"{raw_threads}, {server_threads}", latency]],
    )
    raw_table = markdown_table(
        ["raw side", "median rows/s", "s per batch", "server ÷ it (median of rounds)"],
        [
            [RAW[batch], statistics.median(samples[RAW[batch]]), batch / statistics.median(samples[RAW[batch]]), ratio]
            for batch, ratio in against.items()
        ],
    )
    passes = server.pass_means()
    pass_table = markdown_table(["server passes (measured runs)", *passes], [["", *passes.values()]])
    cpu = markdown_table(
        ["CPU ms per row", *CPU_GROUPS, "CPU total", "wall", "cores busy"],
        [meter.row(side) for side, meter in meters.items()],
    )
    environment_fields = environment(model, opts.quick)
    report(
        "server_vs_raw",
        [setup, raw_table, pass_table, cpu, comparison.table("rows/s")],
        comparison,
        TARGET,
        results_file(opts, "server_vs_raw", *variant),
        ratios={str(batch): round(ratio, 4) for batch, ratio in against.items()},
        raw_rows_per_s={str(batch): round(statistics.median(samples[RAW[batch]]), 2) for batch in RAW_BATCHES},
        best_raw_batch=next(batch for batch, side in RAW.items() if side == best),
        load_generator="wrk",
        connections=CONNECTIONS,
        tasks=TASKS,
        max_batch_size=BATCH_SIZE,
        max_wait_ms=opts.max_wait_ms,
        warm_s_per_run=warm_s,
        seconds_per_window=seconds,
        raw_torch_threads=raw_threads,
        server_torch_threads=server_threads,
        pass_budget_tokens=opts.pass_budget_tokens or Settings().pass_budget_tokens,
        median_latency_s=round(latency, 3),
        server_passes={name: round(value, 4) for name, value in passes.items()},
        cpu_ms_per_row={side: meter.per_row_ms() for side, meter in meters.items()},
        server_omp_wait_policy=SERVER_WAIT_POLICY,
        raw_omp_wait_policy=environment_fields.pop("omp_wait_policy"),
        **environment_fields,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
