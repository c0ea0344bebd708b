"""End-to-end HTTP throughput of the server ÷ the raw model's throughput on the same batches.

Each side runs as it really would. The server side is a real `softserve serve` process serving a random
model with t5-small's shapes, saved as a checkpoint: like every `softserve serve` it sets
`OMP_WAIT_POLICY=PASSIVE` before torch loads and sets its torch threads from `--cpu-threads` (default:
one per core). The raw side is this process, a plain script: it loads torch before anything imports
`server` (the first import below), so its OpenMP threads keep the policy of the environment the bench was
started in (usually unset), and torch's default threads (one per core); it loads the same checkpoint
with `FrozenT5.load` and calls `FrozenT5.generate` directly. Both policies are in the JSON result.

Server side: 32 prompts of 20 tokens uploaded with `PUT /v1/prompts/{task_id}` as safetensors, and a
closed loop of 64 clients (client c always asks for task c mod 32), each with one request of one
32-token input and `max_new_tokens=4` in flight at a time; with `max_batch_size=32` every batch is
32 rows of (typically) 25-30 different tasks.

The load generator is a separate process (multiprocessing, spawn): one asyncio loop (uvloop when
installed) running the 64 clients, each on a keep-alive connection of its own. It shares the cores with
the server, so its CPU time is part of the measured cost; the default `--client lean` (a minimal
HTTP/1.1 client in this file) keeps that cost small, `--client httpx` uses an `httpx.AsyncClient` pool
of 64 connections instead. In the raw rounds it sleeps, as the server does.
One server sample: issue requests until `--warm + --measured` have completed, and divide
`--measured` by the time between the warm-th and the last counted completion (responses come back a
batch at a time, so this window spans whole batches in steady state); requests still in flight then
finish before the next sample.

Raw side: `FrozenT5.generate` on a batch of 32 rows with the same prompts and inputs, `--measured / 32`
calls per sample, on a dedicated thread as the server's model runs (see common.py).

Rounds alternate (ABBA); the ratio is the median over rounds of server ÷ raw. Target: >= 0.85.
Where the difference goes is reported too: the server's batches from its metrics (rows, distinct
tasks, model time per batch against the raw time per batch), and CPU time per row of each process
(Linux /proc): the server, the load generator, and this process (the raw side's model).
"""

from __future__ import annotations

import torch  # isort: skip  (first, before `server` sets the server's OpenMP wait policy: see above)

import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
from common import (
    BATCH_SIZE,
    MAX_NEW_TOKENS,
    TORCH_LOADED_BEFORE_SERVER,
    KeepAliveConnection,
    checkpoint_server,
    compare,
    environment,
    generate_throughput,
    input_texts,
    markdown_table,
    on_model_thread,
    parser,
    random_prompts,
    report,
    results_file,
    rows_for,
    upload_prompts,
    warm_up,
)
from prometheus_client.parser import text_string_to_metric_families

from server.serving.model import FrozenT5, Row
from server.settings import Settings

TARGET = 0.85
TASKS = 32
CLIENTS = 64


@dataclass(frozen=True)
class LoadPlan:
    base_url: str
    task_ids: list[str]
    texts: list[str]
    clients: int
    client: str  # "lean" | "httpx"


@dataclass(frozen=True)
class LoadResult:
    throughput: float  # requests (= rows) per second in the measured window
    completed: int
    failures: int
    median_latency_s: float
    cpu_s: float  # the load generator's own CPU time


Post = Callable[[bytes], Awaitable[int]]  # sends one JSON body to /v1/generate, returns the HTTP status


@contextlib.asynccontextmanager
async def posters(plan: LoadPlan) -> AsyncIterator[list[Post]]:
    """One `Post` per client: a connection of its own (lean), or a shared httpx pool of `clients` connections."""
    if plan.client == "httpx":
        limits = httpx.Limits(max_connections=plan.clients, max_keepalive_connections=plan.clients)
        async with httpx.AsyncClient(base_url=plan.base_url, limits=limits, timeout=300) as http:

            async def post(body: bytes) -> int:
                response = await http.post("/v1/generate", content=body, headers={"content-type": "application/json"})
                return response.status_code

            yield [post] * plan.clients
        return
    connections = [KeepAliveConnection(plan.base_url) for _ in range(plan.clients)]
    try:
        yield [functools.partial(connection.post, "/v1/generate") for connection in connections]
    finally:
        for connection in connections:
            await connection.close()


async def closed_loop(plan: LoadPlan, warm: int, measured: int) -> LoadResult:
    """Each client sends a request as soon as its previous one is answered, until enough have completed."""
    total = warm + measured
    done: list[float] = []
    latencies: list[float] = []
    failures = issued = 0
    cpu_started = time.process_time()

    async def client(post: Post, index: int) -> None:
        nonlocal failures, issued
        task_id = plan.task_ids[index % len(plan.task_ids)]
        while len(done) < total:
            text = plan.texts[issued % len(plan.texts)]
            issued += 1
            body = {"task_id": task_id, "inputs": text, "parameters": {"max_new_tokens": MAX_NEW_TOKENS}}
            sent = time.perf_counter()
            if await post(json.dumps(body).encode()) != 200:
                failures += 1
            done.append(time.perf_counter())
            latencies.append(done[-1] - sent)

    async with posters(plan) as posts:
        await asyncio.gather(*(client(post, i) for i, post in enumerate(posts)))
    done.sort()
    window = done[total - 1] - done[warm - 1]
    latencies.sort()
    cpu_s = time.process_time() - cpu_started
    return LoadResult(measured / window, len(done), failures, latencies[len(latencies) // 2], cpu_s)


def load_process(conn: Connection, plan: LoadPlan) -> None:
    """The load generator's process: runs one closed loop per `(warm, measured)` message until `None`."""
    try:
        from uvloop import run  # the server's loop too (uvicorn picks it when installed)
    except ImportError:
        run = asyncio.run
    while (message := conn.recv()) is not None:
        conn.send(run(closed_loop(plan, *message)))


class LoadGenerator:
    """A separate process, so the client's CPU time is not spent under the server's GIL."""

    def __init__(self, plan: LoadPlan) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that runs a server thread
        self._conn, child = context.Pipe()
        self._process = context.Process(target=load_process, args=(child, plan), daemon=True)
        self._process.start()
        self.results: list[LoadResult] = []

    def run(self, warm: int, measured: int) -> LoadResult:
        self._conn.send((warm, measured))
        result: LoadResult = self._conn.recv()
        if result.failures:
            raise RuntimeError(f"{result.failures} of {result.completed} requests failed")
        self.results.append(result)
        return result

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)


CPU_GROUPS = ["server process", "client process", "bench process (raw model)"]


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) that process `pid` has used (Linux /proc; 0 elsewhere)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


class CpuMeter:
    """Where one side's CPU time went, summed over its samples, per row served."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.seconds: Counter[str] = Counter()
        self.wall_s = 0.0
        self.rows = 0

    def measure(self, sample: Callable[[], tuple[float, int, float]]) -> float:
        """Runs `sample() -> (throughput, rows, client CPU s)`, books its CPU time, returns the throughput."""
        server, bench, started = process_cpu_s(self.server_pid), time.process_time(), time.perf_counter()
        throughput, rows, client_s = sample()
        self.wall_s += time.perf_counter() - started
        self.seconds.update(
            {
                "server process": process_cpu_s(self.server_pid) - server,
                "client process": client_s,
                "bench process (raw model)": time.process_time() - bench,
            }
        )
        self.rows += rows
        return throughput

    def per_row_ms(self) -> dict[str, float]:
        return {group: round(1000 * self.seconds[group] / self.rows, 3) for group in CPU_GROUPS}

    def row(self, side: str) -> list[object]:
        per_row = list(self.per_row_ms().values())
        wall = 1000 * self.wall_s / self.rows
        return [side, *per_row, sum(per_row), wall, sum(per_row) / wall]


def batch_means(base_url: str) -> dict[str, float]:
    """Means over every batch the server ran, from its Prometheus metrics (warm-up batches included)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.endswith(("_sum", "_count"))
    }

    def mean(metric: str) -> float:
        count = values.get(f"softserve_{metric}_count", 0.0)
        return values[f"softserve_{metric}_sum"] / count if count else 0.0

    # With the continuous engine a "batch" is one decoder step; with the static path, one `generate` call.
    return {
        "rows": mean("batch_size"),
        "tasks": mean("batch_tasks"),
        "model_s": mean("inference_duration_seconds") or mean("decoder_step_duration_seconds"),
        "queue_wait_s": mean("queue_wait_seconds"),
    }


def server_sample(load: LoadGenerator, warm: int, measured: int) -> tuple[float, int, float]:
    result = load.run(warm, measured)
    return result.throughput, result.completed, result.cpu_s


def raw_sample(model: FrozenT5, rows: list[Row], calls: int) -> tuple[float, int, float]:
    return generate_throughput(model, rows, calls), len(rows) * calls, 0.0


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0], repeats=6)
    args.add_argument("--warm", type=int, default=2 * BATCH_SIZE, help="completions before the window opens")
    args.add_argument("--measured", type=int, default=8 * BATCH_SIZE, help="completions in the window")
    args.add_argument("--max-wait-ms", type=float, default=Settings().max_wait_ms, help="the batcher's wait")
    args.add_argument("--cpu-threads", type=int, default=Settings().cpu_threads, help="the server's (0: one per core)")
    args.add_argument("--client", choices=["lean", "httpx"], default="lean", help="the load generator's HTTP client")
    opts = args.parse_args(argv)
    repeats, warm, measured = (1, BATCH_SIZE, BATCH_SIZE) if opts.quick else (opts.repeats, opts.warm, opts.measured)
    if not TORCH_LOADED_BEFORE_SERVER:
        raise RuntimeError("torch must load before `server` here, or the raw side runs under the server's policy")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    flags = ("--max-wait-ms", str(opts.max_wait_ms), "--cpu-threads", str(opts.cpu_threads))

    with tempfile.TemporaryDirectory() as tmp, checkpoint_server(Path(tmp), opts, *flags) as (checkpoint, pid, url):
        model = FrozenT5.load(str(checkpoint), opts.device, opts.dtype)
        prompts = random_prompts(TASKS, model.d_model, opts.seed)
        texts = input_texts(model, BATCH_SIZE, opts.seed)
        task_ids = [f"task-{i:02d}" for i in range(TASKS)]
        rows = rows_for(model, prompts, texts)
        warm_up(model, rows)
        raw_threads = on_model_thread(torch.get_num_threads)
        raw_calls = max(1, measured // BATCH_SIZE)
        meters = (CpuMeter(pid), CpuMeter(pid))
        upload_prompts(url, task_ids, prompts)
        load = LoadGenerator(LoadPlan(url, task_ids, texts, CLIENTS, opts.client))
        try:
            load.run(warm, BATCH_SIZE)  # warm-up: connections, prompt cache, first batches
            comparison = compare(
                ("server (HTTP)", lambda: meters[0].measure(lambda: server_sample(load, warm, measured))),
                ("raw generate", lambda: meters[1].measure(lambda: raw_sample(model, rows, raw_calls))),
                repeats,
            )
        finally:
            load.close()
        batches = batch_means(url)
    server_threads = opts.cpu_threads or os.cpu_count()  # what `FrozenT5.use_cpu_threads` sets

    latency = sorted(r.median_latency_s for r in load.results)[len(load.results) // 2]
    raw_batch_s = BATCH_SIZE / comparison.median("raw generate")
    setup = markdown_table(
        [
            "clients",
            "client",
            "tasks",
            "max_batch_size",
            "max_wait_ms",
            "torch threads: raw, server",
            "median latency s",
        ],
        [[CLIENTS, opts.client, TASKS, BATCH_SIZE, opts.max_wait_ms, f"{raw_threads}, {server_threads}", latency]],
    )
    server_batches = markdown_table(
        ["server batches (means)", "rows", "distinct tasks", "model s/batch", "queue wait s", "raw s/batch (median)"],
        [["", batches["rows"], batches["tasks"], batches["model_s"], batches["queue_wait_s"], raw_batch_s]],
    )
    cpu = markdown_table(
        ["CPU ms per row", *CPU_GROUPS, "CPU total", "wall", "cores busy"],
        [meters[0].row("server (HTTP)"), meters[1].row("raw generate")],
    )
    environment_fields = environment(model, opts.quick)
    report(
        "server_vs_raw",
        [setup, server_batches, cpu, comparison.table("rows/s")],
        comparison,
        TARGET,
        results_file(opts, "server_vs_raw"),
        clients=CLIENTS,
        client=opts.client,
        tasks=TASKS,
        batch_size=BATCH_SIZE,
        max_wait_ms=opts.max_wait_ms,
        raw_torch_threads=raw_threads,
        server_torch_threads=server_threads,
        median_latency_s=round(latency, 3),
        server_mean_batch_rows=round(batches["rows"], 2),
        server_mean_model_s_per_batch=round(batches["model_s"], 4),
        raw_s_per_batch=round(raw_batch_s, 4),
        server_cpu_ms_per_row=meters[0].per_row_ms(),
        raw_cpu_ms_per_row=meters[1].per_row_ms(),
        server_omp_wait_policy=os.environ["OMP_WAIT_POLICY"],  # the server inherits this process's environment
        raw_omp_wait_policy=environment_fields.pop("omp_wait_policy"),
        **environment_fields,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
