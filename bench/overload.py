"""Overload: does throughput hold when offered more than the server can do?

A real `softserve serve` process (a random model with t5-small shapes, saved and loaded from disk)
serves 32 tasks. A calibration run (a closed loop of 2 x max-batch clients, not counted) estimates the
maximum sustained throughput, and the offered rates of the overload phases are fixed from it: 2x and 4x
that rate, open-loop (Poisson arrivals, each request one row of ~32 tokens, 4 new tokens). Then
`--repeats` rounds each run three phases in alternating order (ABBA): "max" (the closed loop again),
"offered 2x" and "offered 4x". Each phase counts the answers given in a window of `--seconds` that opens
`--warm-s` into its load and closes while the load still runs, as `server_vs_raw` does: neither the first
seconds (the queue filling) nor the drain after the last arrival (the rows left in flight, with nothing behind
them) count as the server's time. Counting from the first arrival to the last answer charged a phase for its
drain, and the open-loop phases, whose queue holds twice the closed loop's rows, drain for longer. The ratio
of an overload phase is the median over rounds of its accepted throughput (200s per second) ÷ the same round's
max; the reported ratio is the lower of the two (target >= 0.9: overload must not collapse throughput). Per phase, medians over rounds of: the p99
latency of accepted requests, the share of 503 and 429 answers and of requests whose new connection the server
closed unanswered, and the load generator's CPU time per
request (it is this process, on the same cores as the server: a lean keep-alive client over pooled connections,
a new connection whenever none is idle, as a proxy pools them). The rows in flight are bounded
(`--max-queue-size`) at a full decoder step (`max_active_rows`) and 2 batches waiting for a place in it, so
overload is shed at once with 503 + Retry-After instead of growing latency. With no rows waiting (the bound at
the step's size) short rows join and finish in cohorts, and the step runs part-empty until refused arrivals'
successors come: open-loop throughput fell to 0.67-0.70 of the maximum.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (before torch: see common.py)
from common import (
    BATCH_SIZE,
    ByteTokens,
    Comparison,
    KeepAliveConnection,
    checkpoint_server,
    input_texts,
    interleaved,
    markdown_table,
    model_config,
    model_name,
    parser,
    percentile,
    publish,
    random_prompts,
    results_file,
    upload_prompts,
)

from server.settings import Settings

TARGET = 0.9
TASKS = 32
MAX = "max (closed loop)"
FACTORS = (2, 4)
FIELDS = ["accepted_per_s", "p99_s", "share_503", "share_429", "share_dropped", "client_cpu_ms_per_request"]
DROPPED = 0  # the status of a request whose new connection was closed before any answer

Outcome = tuple[int, float, float]  # HTTP status, latency in seconds, when it was answered (`time.perf_counter()`)


class ConnectionPool:
    """Keep-alive connections handed out one request at a time, as a proxy pools them: an idle one if there is
    one, else a new one. Each is the lean client of `common.KeepAliveConnection`, whose CPU per request is a
    small share of httpx's: the client runs on the same cores as the server and must not take them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.idle: list[KeepAliveConnection] = []

    async def send(self, i: int, texts: list[str]) -> Outcome:
        """One request. A pooled connection the server has closed meanwhile (its keep-alive timeout, or its
        connection cap closing idle ones) is dropped and the request sent again on a new one, as a proxy does;
        a new connection closed before any answer is a `DROPPED` outcome."""
        body = json.dumps(
            {"task_id": f"task{i % TASKS}", "inputs": texts[i % len(texts)], "parameters": {"max_new_tokens": 4}}
        ).encode()
        started = time.perf_counter()
        while True:
            reused = bool(self.idle)
            connection = self.idle.pop() if reused else KeepAliveConnection(self.url)
            try:
                status = await connection.post("/v1/generate", body)
            except (ConnectionError, asyncio.IncompleteReadError):
                await connection.close()
                if reused:
                    continue
                status = DROPPED
            else:
                self.idle.append(connection)
            answered = time.perf_counter()
            return status, answered - started, answered

    async def close(self) -> None:
        await asyncio.gather(*(connection.close() for connection in self.idle))


@dataclass(frozen=True)
class Window:
    """A phase's measured span: `seconds` of answers, opening `warm_s` after its load starts."""

    warm_s: float
    seconds: float

    def bounds(self, started: float) -> tuple[float, float]:
        return started + self.warm_s, started + self.warm_s + self.seconds


async def closed_loop(url: str, texts: list[str], clients: int, window: Window) -> dict[str, float]:
    """`clients` clients sending back to back; the rate they get is the maximum sustained throughput."""
    started = time.perf_counter()
    stop = window.bounds(started)[1]
    outcomes: list[Outcome] = []
    pool = ConnectionPool(url)

    async def client(worker: int) -> None:
        while time.perf_counter() < stop:
            outcomes.append(await pool.send(worker, texts))

    cpu_started = time.process_time()
    await asyncio.gather(*(client(i) for i in range(clients)))
    await pool.close()
    return summarize(outcomes, window, started, time.process_time() - cpu_started)


async def open_loop(url: str, texts: list[str], rate: float, window: Window, seed: int) -> dict[str, float]:
    """Poisson arrivals at `rate` per second until the window closes; waits for every answer, but counts only
    those given inside the window (see `summarize`)."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    pool = ConnectionPool(url)

    async def one(i: int) -> None:
        outcomes.append(await pool.send(i, texts))

    cpu_started = time.process_time()
    pending = []
    started = time.perf_counter()
    end = window.bounds(started)[1]
    i = 0
    while (now := time.perf_counter()) < end:
        pending.append(asyncio.create_task(one(i)))
        i += 1
        await asyncio.sleep(max(0.0, rng.expovariate(rate) - (time.perf_counter() - now)))
    await asyncio.gather(*pending)
    await pool.close()
    return summarize(outcomes, window, started, time.process_time() - cpu_started)


def summarize(outcomes: list[Outcome], window: Window, started: float, client_cpu_s: float) -> dict[str, float]:
    """Rates and shares of the answers given inside the window, the steady state: the load has run `warm_s`
    already (rows fill the queue and the decoder step) and is still running when it closes (no drain of the
    rows left in flight, with no arrivals behind them, is counted as the server's time). The client's CPU is
    over every request of the phase."""
    opens, closes = window.bounds(started)
    client_cpu_ms = 1000 * client_cpu_s / max(1, len(outcomes))
    outcomes = [outcome for outcome in outcomes if opens <= outcome[2] < closes]
    accepted = [latency for status, latency, _ in outcomes if status == 200]
    unexpected = {status for status, _, _ in outcomes} - {200, 503, 429, DROPPED}
    if unexpected:
        raise RuntimeError(f"answers other than 200, 503 and 429: {sorted(unexpected)}")
    return {
        "accepted_per_s": len(accepted) / window.seconds,
        "p99_s": percentile(accepted, 99) if len(accepted) >= 2 else float("nan"),
        "share_503": sum(s == 503 for s, _, _ in outcomes) / max(1, len(outcomes)),
        "share_429": sum(s == 429 for s, _, _ in outcomes) / max(1, len(outcomes)),
        "share_dropped": sum(s == DROPPED for s, _, _ in outcomes) / max(1, len(outcomes)),
        "client_cpu_ms_per_request": client_cpu_ms,
    }


def offered(factor: int) -> str:
    return f"offered {factor}x"


class Phases:
    """The three phases as samplers of accepted requests per second; every run's summary is kept."""

    def __init__(self, url: str, texts: list[str], max_estimate: float, window: Window, seed: int) -> None:
        self.url, self.texts, self.window, self.seed = url, texts, window, seed
        self.rates = {offered(factor): factor * max_estimate for factor in FACTORS}
        self.runs: dict[str, list[dict[str, float]]] = {MAX: [], **{name: [] for name in self.rates}}

    def samplers(self) -> dict[str, Callable[[], float]]:
        return {name: functools.partial(self.sample, name) for name in self.runs}

    def sample(self, name: str) -> float:
        if name == MAX:
            run = closed_loop(self.url, self.texts, 2 * BATCH_SIZE, self.window)
        else:  # a new arrival stream every round and phase
            seed = self.seed + 100 * len(self.runs[name]) + list(self.rates).index(name)
            run = open_loop(self.url, self.texts, self.rates[name], self.window, seed)
        summary = asyncio.run(run)
        self.runs[name].append(summary)
        return summary["accepted_per_s"]

    def median(self, name: str, field: str) -> float:
        return statistics.median(run[field] for run in self.runs[name])


def main() -> None:
    args = parser(__doc__.splitlines()[0], repeats=3)
    args.add_argument("--seconds", type=float, default=10.0, help="length of each phase's measured window")
    args.add_argument("--warm-s", type=float, default=3.0, help="seconds of each phase's load before its window opens")
    options = args.parse_args()
    repeats, window = (
        (1, Window(0.5, 1.0)) if options.quick else (options.repeats, Window(options.warm_s, options.seconds))
    )
    texts = input_texts(ByteTokens(), 64, options.seed)
    prompts = random_prompts(TASKS, model_config(options.quick).d_model, options.seed)
    # Rows in flight: a full decoder step and 2 batches waiting for a place in it (see the module's docstring).
    in_flight = Settings().max_active_rows + 2 * BATCH_SIZE
    flags = ("--max-queue-size", str(in_flight), "--request-timeout-s", "120")
    with tempfile.TemporaryDirectory() as tmp, checkpoint_server(Path(tmp), options, *flags) as (_, _, url):
        upload_prompts(url, [f"task{i}" for i in range(TASKS)], prompts)
        asyncio.run(closed_loop(url, texts, BATCH_SIZE, Window(0.0, min(window.seconds, 5))))  # warm-up
        calibration = asyncio.run(closed_loop(url, texts, 2 * BATCH_SIZE, window))["accepted_per_s"]
        phases = Phases(url, texts, calibration, window, options.seed)
        samples = interleaved(phases.samplers(), repeats)

    ratios = {name: Comparison(name, MAX, samples).ratio for name in phases.rates}
    rows = [
        [name, phases.rates.get(name, ""), phases.median(name, FIELDS[0]), ratios.get(name, 1.0)]
        + [phases.median(name, field) for field in FIELDS[1:]]
        for name in phases.runs
    ]
    headers = ["phase (medians over rounds)", "offered req/s", "accepted req/s", "÷ max (median of rounds)"]
    print(
        markdown_table(
            [*headers, "p99 accepted s", "503 share", "429 share", "dropped share", "client CPU ms/request"], rows
        )
    )
    print()
    ratio = min(ratios.values())
    result = {
        "bench": "overload",
        "ratio": round(ratio, 4),
        **{f"ratio_{name.removeprefix('offered ')}": round(value, 4) for name, value in ratios.items()},
        "target": TARGET,
        "meets_target": ratio >= TARGET,
        "max_req_per_s": round(phases.median(MAX, "accepted_per_s"), 2),
        "calibration_req_per_s": round(calibration, 2),
        "phases": {name: {field: round(phases.median(name, field), 4) for field in FIELDS} for name in phases.runs},
        "offered_req_per_s": {name: round(rate, 2) for name, rate in phases.rates.items()},
        "accepted_req_per_s_by_round": {name: [round(v, 2) for v in values] for name, values in samples.items()},
        "rounds": repeats,
        "warm_s_per_phase": window.warm_s,
        "seconds_per_window": window.seconds,
        "model": model_name(options.quick),
        "device": options.device,
        "dtype": options.dtype,
        "quick": options.quick,
    }
    publish(result, results_file(options, "overload"))


if __name__ == "__main__":
    main()
