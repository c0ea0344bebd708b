"""Continuous ÷ static scheduling: generated tokens per second, and short requests' latency, of three servers.

Three `softserve serve` processes serve the same checkpoint (a random model with t5-small's shapes) with the
same settings but the scheduler: `--scheduler continuous` (rows join and leave the running batch at every
decoder step; the engine in a process of its own, as deployed), the same with `--engine thread` (the engine
on a thread of the API process, sharing its GIL: what the process boundary is worth, apart from scheduling),
and `--scheduler static` (one `generate` call per batch, which runs until its longest row is done). All have
`--max-batch-size 32 --max-active-rows 32`. Each gets the same 32 prompts of 20 tokens.

The workload is long-tailed: 70% of requests ask for 2-4 new tokens, 30% for 64-128, all with `ignore_eos`
(lengths exactly as asked). One sample: a closed loop of 64 clients (this process, one asyncio loop, a
minimal keep-alive HTTP client per client) over the 32 tasks, each request one 32-token input, the next
request of the round's seeded list as soon as the previous answer arrives. Generated tokens per second =
the tokens of completions `warm+1 .. warm+measured` ÷ the time between the warm-th and the last of them
(whole static batches, as their answers arrive together); latencies are those of the same completions.
Requests still in flight then finish before the next sample, so no server carries work into the other's.

Rounds alternate (ABBA order over the three); only one server has load at a time (the idle ones' CPU time
during each sample is reported). Ratios are medians over rounds of continuous ÷ static: tokens/s (the
`ratio`, target >= 1.5) and the median latency of the short requests (target <= 0.35); the thread engine's
are reported beside them.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (before torch: the server's OpenMP wait policy, see common.py)
from common import (
    ByteTokens,
    Comparison,
    KeepAliveConnection,
    descendants,
    input_texts,
    interleaved,
    markdown_table,
    model_config,
    model_name,
    parser,
    percentile,
    process_cpu_s,
    publish,
    random_prompts,
    results_file,
    upload_prompts,
)

from server.testing.checkpoints import save_checkpoint
from server.testing.processes import server_process

TARGET = 1.5
TARGET_SHORT_LATENCY = 0.35
TASKS = 32
CLIENTS = 64
ROWS = 32  # max_batch_size of the static server, max_active_rows of the continuous one
SHORT_SHARE = 0.7
SHORT = (2, 4)
LONG = (64, 128)
QUICK_LONG = (8, 16)  # a smoke run's long requests: a static batch then takes a second or two
# Each server's name and the flags that set it apart; the ratios are of each continuous one over `static`.
SERVERS = {
    "continuous": ("--scheduler", "continuous", "--engine", "process"),
    "continuous, engine thread": ("--scheduler", "continuous", "--engine", "thread"),
    "static": ("--scheduler", "static"),
}
BASELINE = "static"


@dataclass(frozen=True)
class Ask:
    task: int
    text: int
    max_new_tokens: int

    @property
    def short(self) -> bool:
        return self.max_new_tokens <= SHORT[1]


@dataclass(frozen=True)
class Completion:
    ask: Ask
    num_tokens: int
    sent: float
    done: float


def workload(count: int, texts: int, long: tuple[int, int], seed: int) -> list[Ask]:
    """`count` requests: `SHORT_SHARE` of them ask for `SHORT` new tokens, the rest for `long` (uniform)."""
    rng = random.Random(seed)
    return [
        Ask(i % TASKS, rng.randrange(texts), rng.randint(*(SHORT if rng.random() < SHORT_SHARE else long)))
        for i in range(count)
    ]


async def closed_loop(url: str, texts: list[str], asks: list[Ask], warm: int, measured: int) -> list[Completion]:
    """`CLIENTS` clients take the next ask as soon as their previous one is answered, until `warm + measured`
    have completed; returns every completion in order of arrival (in-flight ones finish first)."""
    total = warm + measured
    pending = iter(asks)
    completions: list[Completion] = []

    async def client() -> None:
        connection = KeepAliveConnection(url)
        try:
            while len(completions) < total and (ask := next(pending, None)) is not None:
                parameters = {"max_new_tokens": ask.max_new_tokens, "ignore_eos": True}
                body = {"task_id": f"task{ask.task}", "inputs": texts[ask.text], "parameters": parameters}
                sent = time.perf_counter()
                status, answer = await connection.exchange("/v1/generate", json.dumps(body).encode())
                if status != 200:
                    raise RuntimeError(f"{url} answered {status}: {answer[:300]!r}")
                num_tokens = json.loads(answer)["outputs"][0]["num_tokens"]
                completions.append(Completion(ask, num_tokens, sent, time.perf_counter()))
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    if len(completions) < total:
        raise RuntimeError(f"the workload ran out after {len(completions)} of {total} completions")
    return completions


@dataclass(frozen=True)
class Sample:
    tokens_per_s: float
    latencies: list[float]
    short_latencies: list[float]
    short_of_asked: int  # rows that came back with fewer tokens than asked (ignore_eos not honoured)
    idle_cpu_s: float  # CPU time of the other servers (and their engines) while this one had the load


def summarize(completions: list[Completion], warm: int, measured: int, idle_cpu_s: float) -> Sample:
    by_arrival = sorted(completions, key=lambda c: c.done)
    window = by_arrival[warm : warm + measured]
    seconds = window[-1].done - by_arrival[warm - 1].done
    latencies = [c.done - c.sent for c in window]
    return Sample(
        tokens_per_s=sum(c.num_tokens for c in window) / seconds,
        latencies=latencies,
        short_latencies=[c.done - c.sent for c in window if c.ask.short],
        short_of_asked=sum(c.num_tokens < c.ask.max_new_tokens for c in window),
        idle_cpu_s=idle_cpu_s,
    )


class Side:
    """One server under test: its samples, each run on the round's workload."""

    def __init__(self, url: str, idle_pids: Callable[[], list[int]], texts: list[str], plan: Plan) -> None:
        self.url, self.idle_pids, self.texts, self.plan = url, idle_pids, texts, plan
        self.samples: list[Sample] = []

    def sample(self) -> float:
        asks = self.plan.asks(len(self.samples))
        idle = self.idle_pids()
        idle_before = sum(process_cpu_s(pid) for pid in idle)
        completions = asyncio.run(closed_loop(self.url, self.texts, asks, self.plan.warm, self.plan.measured))
        idle_cpu_s = sum(process_cpu_s(pid) for pid in idle) - idle_before
        self.samples.append(summarize(completions, self.plan.warm, self.plan.measured, idle_cpu_s))
        return self.samples[-1].tokens_per_s

    def median(self, field: Callable[[Sample], float]) -> float:
        return statistics.median(field(sample) for sample in self.samples)

    def summary(self) -> dict[str, float]:
        """Medians over rounds of each sample's figures, and the rows that came back short of their ask."""
        return {
            "tokens_per_s": self.median(lambda s: s.tokens_per_s),
            "short_p50_s": self.median(lambda s: statistics.median(s.short_latencies)),
            "short_p99_s": self.median(lambda s: percentile(s.short_latencies, 99)),
            "p50_s": self.median(lambda s: statistics.median(s.latencies)),
            "p99_s": self.median(lambda s: percentile(s.latencies, 99)),
            "idle_server_cpu_s": self.median(lambda s: s.idle_cpu_s),
            "rows_short_of_asked": sum(s.short_of_asked for s in self.samples),
        }


@dataclass(frozen=True)
class Plan:
    warm: int
    measured: int
    long: tuple[int, int]
    texts: int
    seed: int

    def asks(self, round_: int) -> list[Ask]:
        """The round's requests, the same for both sides; more than a sample can use (the closed loop stops)."""
        return workload(4 * (self.warm + self.measured) + CLIENTS, self.texts, self.long, self.seed + round_)


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0], repeats=4)
    args.add_argument("--warm", type=int, default=ROWS, help="completions before the window opens")
    args.add_argument("--measured", type=int, default=3 * ROWS, help="completions in the window")
    args.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="each server's torch threads (0: one per usable core)",
    )
    opts = args.parse_args(argv)
    quick = opts.quick
    repeats, warm, measured = (1, ROWS // 2, ROWS) if quick else (opts.repeats, opts.warm, opts.measured)
    long = QUICK_LONG if quick else LONG
    texts = input_texts(ByteTokens(), 2 * TASKS, opts.seed)
    prompts = random_prompts(TASKS, model_config(quick).d_model, opts.seed)
    plan = Plan(warm, measured, long, len(texts), opts.seed)
    common_flags = [
        *("--device", opts.device, "--dtype", opts.dtype, "--cpu-threads", str(opts.cpu_threads)),
        *("--max-batch-size", str(ROWS), "--max-active-rows", str(ROWS), "--request-timeout-s", "600"),
    ]

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        checkpoint = save_checkpoint(model_config(quick), Path(tmp) / "model")
        started = {
            name: servers.enter_context(
                server_process(Path(tmp) / str(index), "--model", str(checkpoint), *flags, *common_flags, timeout_s=300)
            )
            for index, (name, flags) in enumerate(SERVERS.items())
        }
        pids = {name: descendants(process.pid) for name, (process, _) in started.items()}
        sides: dict[str, Side] = {}
        for name, (_, url) in started.items():
            others = [n for n in SERVERS if n != name]
            upload_prompts(url, [f"task{i}" for i in range(TASKS)], prompts)
            asyncio.run(closed_loop(url, texts, plan.asks(-1), 0, CLIENTS))  # warm-up: connections, prompt cache
            sides[name] = Side(url, lambda others=others: [pid for n in others for pid in pids[n]], texts, plan)
        throughput = interleaved({name: side.sample for name, side in sides.items()}, repeats)

    short_medians = {name: [statistics.median(s.short_latencies) for s in side.samples] for name, side in sides.items()}
    continuous = [name for name in SERVERS if name != BASELINE]
    tokens = {name: Comparison(name, BASELINE, throughput).ratio for name in continuous}
    short_latency = {name: Comparison(name, BASELINE, short_medians).ratio for name in continuous}
    summaries = {name: side.summary() for name, side in sides.items()}
    headers = ["server (medians over rounds)", *next(iter(summaries.values()))]
    print(markdown_table(headers, [[name, *summary.values()] for name, summary in summaries.items()]), end="\n\n")
    ratios = [
        ["generated tokens/s", *tokens.values(), f">= {TARGET}"],
        ["short requests' median latency", *short_latency.values(), f"<= {TARGET_SHORT_LATENCY}"],
    ]
    headers = ["÷ static (median of rounds)", *continuous, "target (continuous)"]
    print(markdown_table(headers, ratios), end="\n\n")
    ratio, short_latency_ratio = tokens["continuous"], short_latency["continuous"]
    thread = "continuous, engine thread"
    result = {
        "bench": "continuous_vs_static",
        "ratio": round(ratio, 4),
        "target": TARGET,
        "short_latency_ratio": round(short_latency_ratio, 4),
        "target_short_latency": TARGET_SHORT_LATENCY,
        "meets_target": ratio >= TARGET and short_latency_ratio <= TARGET_SHORT_LATENCY,
        "ratio_engine_thread": round(tokens[thread], 4),
        "short_latency_ratio_engine_thread": round(short_latency[thread], 4),
        **{name: {key: round(value, 4) for key, value in summary.items()} for name, summary in summaries.items()},
        "tokens_per_s_by_round": {name: [round(v, 1) for v in values] for name, values in throughput.items()},
        "rounds": repeats,
        "clients": CLIENTS,
        "tasks": TASKS,
        "rows": ROWS,
        "short_share": SHORT_SHARE,
        "short_new_tokens": list(SHORT),
        "long_new_tokens": list(long),
        "warm": warm,
        "measured": measured,
        "model": model_name(quick),
        "device": opts.device,
        "dtype": opts.dtype,
        "quick": quick,
    }
    publish(result, results_file(opts, "continuous_vs_static"))


if __name__ == "__main__":
    main(sys.argv[1:])
