"""Serving latency and throughput of one `softserve serve` process while it trains a prompt ÷ while it does not.

Server: a real `softserve serve` process with its defaults (`store: disk`, so training runs in-process;
`engine: process`), serving a random model with t5-small's shapes saved as a checkpoint (`--quick`: the
`tiny` preset's shapes). Two processes of it then compete for the cores: the engine process runs the decoder steps of
the requests, and the API process runs HTTP, tokenizing and the embedded training worker, which trains on
the API process's own copy of the weights. Each sets its torch threads from `--cpu-threads` (default: one
per usable core), so while a job trains both ask for every core.

Load: `CLIENTS` clients (this process, one asyncio loop, a minimal keep-alive HTTP client each) over `TASKS`
tasks with prompts of 20 tokens, each request one 32-token input and `max_new_tokens` 8 with `ignore_eos`,
the next request as soon as the previous answer arrives. One sample: completions `warm+1 .. warm+measured`;
their median and p99 latency, and requests per second over the time from the warm-th to the last of them.

Sides, alternating in ABBA rounds:
- idle (A): no training job; the sample checks that the server ran no training step meanwhile.
- training (B): before the sample, a job is submitted with `POST /v1/training-jobs` (`TRAINING_CONFIG`: more
  steps than any sample takes) and the sample starts once the job is `running` and has finished its first
  step; after the sample the job must still be running (it trained through the whole sample) and is
  cancelled with `DELETE /v1/training-jobs/{id}`, and the next sample waits until the server has stopped
  taking training steps. A new job for each B sample.
Ratios are medians over rounds of training ÷ idle: median latency (the `ratio`), p99 latency and requests/s.
No target: lower latency ratios (and throughput ratios nearer 1) are better. Also reported: the training
steps the job took during B samples, and the cores each server process used in each side (Linux /proc).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (before torch: the server's OpenMP wait policy, see common.py)
import httpx
from common import (
    ByteTokens,
    Comparison,
    KeepAliveConnection,
    checkpoint_server,
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
from prometheus_client.parser import text_string_to_metric_families

CLIENTS = 8
TASKS = 4
NEW_TOKENS = 8
TRAIN_TASK = "trained"
TRAIN_EXAMPLES = 64
TRAIN_LABELS = ("positive", "negative")
TRAINING_CONFIG = {
    "prompt_length": 20,
    "batch_size": 8,
    "steps": 100_000,  # far more than a sample lasts: the job is cancelled at the sample's end
    "eval_every": 100_000,  # no evaluation passes: every step the job takes is a training step
    "seed": 0,
}
WAIT_S = 300.0
SIDES = ("idle", "training")


@dataclass(frozen=True)
class Completion:
    sent: float
    done: float


async def closed_loop(url: str, bodies: list[bytes], warm: int, measured: int) -> list[Completion]:
    """`CLIENTS` clients, client c sending `bodies[c], bodies[c + CLIENTS], ...` (cycling) one at a time until
    `warm + measured` have completed; returns every completion in order of arrival (in-flight ones finish)."""
    total = warm + measured
    completions: list[Completion] = []

    async def client(index: int) -> None:
        connection = KeepAliveConnection(url)
        try:
            count = 0
            while len(completions) < total:
                sent = time.perf_counter()
                status, answer = await connection.exchange(
                    "/v1/generate", bodies[(index + count * CLIENTS) % len(bodies)]
                )
                if status != 200:
                    raise RuntimeError(f"{url} answered {status}: {answer[:300]!r}")
                if (tokens := json.loads(answer)["outputs"][0]["num_tokens"]) != NEW_TOKENS:
                    raise RuntimeError(f"an answer has {tokens} tokens, not {NEW_TOKENS}: ignore_eos not honoured")
                completions.append(Completion(sent, time.perf_counter()))
                count += 1
        finally:
            await connection.close()

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return completions


@dataclass(frozen=True)
class Sample:
    latencies: list[float]
    requests_per_s: float
    training_steps: int  # optimizer steps the server took during the whole closed loop
    api_cores: float  # CPU seconds per second of the API process (HTTP, tokenizing, the training worker)
    engine_cores: float  # the same of the engine process


def training_metrics(http: httpx.Client) -> tuple[float, float]:
    """(optimizer steps taken, seconds those steps took) from the server's training metrics."""
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(http.get("/metrics").text)
        if family.name.startswith("softserve_training_step")
        for sample in family.samples
    }
    return values["softserve_training_steps_total"], values["softserve_training_step_duration_seconds_sum"]


class Server:
    """The server under test: its URL, its processes, and the two sides' samplers."""

    def __init__(self, url: str, api_pid: int, bodies: list[bytes], examples: list[dict[str, str]]) -> None:
        self.url, self.api_pid, self.bodies, self.examples = url, api_pid, bodies, examples
        self.engine_pids = [pid for pid in descendants(api_pid) if pid != api_pid]
        self.http = httpx.Client(base_url=url, timeout=120)
        self.samples: dict[str, list[Sample]] = {side: [] for side in SIDES}
        self.training_step_s: list[float] = []  # mean seconds per step of each B sample's job

    def sample(self, side: str, warm: int, measured: int) -> Sample:
        steps_before, step_s_before = training_metrics(self.http)
        api_before, engine_before = process_cpu_s(self.api_pid), self._engine_cpu_s()
        started = time.perf_counter()
        completions = asyncio.run(closed_loop(self.url, self.bodies, warm, measured))
        wall_s = time.perf_counter() - started
        api_s, engine_s = process_cpu_s(self.api_pid) - api_before, self._engine_cpu_s() - engine_before
        steps_after, step_s_after = training_metrics(self.http)
        by_arrival = sorted(completions, key=lambda c: c.done)
        window = by_arrival[warm : warm + measured]
        sample = Sample(
            latencies=[c.done - c.sent for c in window],
            requests_per_s=measured / (window[-1].done - by_arrival[warm - 1].done),
            training_steps=int(steps_after - steps_before),
            api_cores=api_s / wall_s,
            engine_cores=engine_s / wall_s,
        )
        if side == "training" and sample.training_steps:
            self.training_step_s.append((step_s_after - step_s_before) / sample.training_steps)
        self.samples[side].append(sample)
        return sample

    def idle(self, warm: int, measured: int) -> float:
        sample = self.sample("idle", warm, measured)
        if sample.training_steps:
            raise RuntimeError(f"the server took {sample.training_steps} training steps in an idle sample")
        return statistics.median(sample.latencies)

    def training(self, warm: int, measured: int) -> float:
        job_id = self._start_job()
        sample = self.sample("training", warm, measured)
        self._stop_job(job_id)
        if not sample.training_steps:
            raise RuntimeError("the training job took no step during its sample")
        return statistics.median(sample.latencies)

    def _engine_cpu_s(self) -> float:
        return sum(process_cpu_s(pid) for pid in self.engine_pids)

    def _start_job(self) -> str:
        """Submits a job and returns once it runs and has taken its first step (set-up is not in the sample)."""
        steps, _ = training_metrics(self.http)
        body = {"task_id": TRAIN_TASK, "train": self.examples, "config": TRAINING_CONFIG, "activate": False}
        response = self.http.post("/v1/training-jobs", json=body)
        response.raise_for_status()
        job_id = response.json()["job_id"]
        self._wait(lambda: self._state(job_id) == "running" and training_metrics(self.http)[0] > steps, "a step")
        return job_id

    def _stop_job(self, job_id: str) -> None:
        """Cancels the job, which must still be running, and waits until the server takes no more steps: the
        step in progress finishes first (a step of t5-small's shapes takes about a second on this CPU)."""
        if (state := self._state(job_id)) != "running":
            raise RuntimeError(f"the training job was {state} before its sample ended; give it more steps")
        self.http.delete(f"/v1/training-jobs/{job_id}").raise_for_status()
        steps, seconds = training_metrics(self.http)
        quiet_s = max(1.0, 3 * seconds / max(steps, 1))  # three mean steps without a new one
        last_step, last_change = steps, time.monotonic()

        def stopped() -> bool:
            nonlocal last_step, last_change
            now_steps = training_metrics(self.http)[0]
            if now_steps != last_step:
                last_step, last_change = now_steps, time.monotonic()
            return time.monotonic() - last_change >= quiet_s

        self._wait(stopped, "the training worker to stop")

    def _state(self, job_id: str) -> str:
        response = self.http.get(f"/v1/training-jobs/{job_id}")
        response.raise_for_status()
        state: str = response.json()["state"]
        if state in ("failed", "succeeded"):
            raise RuntimeError(f"the training job {state}: {response.json()['error']}")
        return state

    @staticmethod
    def _wait(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {WAIT_S} s for {what}")
            time.sleep(0.1)

    def summary(self, side: str) -> dict[str, float]:
        """Medians over the side's samples."""
        samples = self.samples[side]

        def median(value: Callable[[Sample], float]) -> float:
            return statistics.median(value(s) for s in samples)

        return {
            "p50_ms": round(1000 * median(lambda s: statistics.median(s.latencies)), 2),
            "p99_ms": round(1000 * median(lambda s: percentile(s.latencies, 99)), 2),
            "requests_per_s": round(median(lambda s: s.requests_per_s), 3),
            "training_steps": round(median(lambda s: s.training_steps), 1),
            "api_process_cores": round(median(lambda s: s.api_cores), 3),
            "engine_process_cores": round(median(lambda s: s.engine_cores), 3),
        }

    def comparison(self, value: Callable[[Sample], float]) -> Comparison:
        """`value(sample)` of the training side ÷ the idle side, round by round."""
        return Comparison("training", "idle", {side: [value(s) for s in self.samples[side]] for side in SIDES})


def request_bodies(texts: list[str]) -> list[bytes]:
    """One body per (task, text) pair, in an order that spreads each client's requests over the tasks."""
    parameters = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    return [
        json.dumps({"task_id": f"task{i % TASKS}", "inputs": text, "parameters": parameters}).encode()
        for i, text in enumerate(texts)
    ]


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0], repeats=4)
    args.add_argument("--warm", type=int, default=2 * CLIENTS, help="completions before the window opens")
    args.add_argument("--measured", type=int, default=24 * CLIENTS, help="completions in the window")
    args.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="the server's torch threads (0: one per usable core)",
    )
    opts = args.parse_args(argv)
    quick = opts.quick
    repeats, warm, measured = (1, CLIENTS, 4 * CLIENTS) if quick else (opts.repeats, opts.warm, opts.measured)
    texts = input_texts(ByteTokens(), TRAIN_EXAMPLES, opts.seed)
    examples = [{"input": text, "target": TRAIN_LABELS[i % 2]} for i, text in enumerate(texts)]
    flags = ("--cpu-threads", str(opts.cpu_threads), "--request-timeout-s", "600")

    with tempfile.TemporaryDirectory() as tmp, checkpoint_server(Path(tmp), opts, *flags) as (_, pid, url):
        prompts = random_prompts(TASKS, model_config(quick).d_model, opts.seed)
        upload_prompts(url, [f"task{i}" for i in range(TASKS)], prompts)
        server = Server(url, pid, request_bodies(texts), examples)
        asyncio.run(closed_loop(url, server.bodies, 0, 2 * CLIENTS))  # warm-up: connections, the prompt cache
        server.training(CLIENTS, CLIENTS)  # warm-up: the training worker's first job (not a sample)
        server.samples["training"].clear()
        server.training_step_s.clear()
        interleaved(
            {"idle": lambda: server.idle(warm, measured), "training": lambda: server.training(warm, measured)},
            repeats,
        )

    latency = server.comparison(lambda s: statistics.median(s.latencies))
    tail = server.comparison(lambda s: percentile(s.latencies, 99))
    throughput = server.comparison(lambda s: s.requests_per_s)
    summaries = {side: server.summary(side) for side in SIDES}
    headers = ["side (medians over samples)", *next(iter(summaries.values()))]
    print(markdown_table(headers, [[side, *summary.values()] for side, summary in summaries.items()]), end="\n\n")
    ratios = [
        ["median latency", latency.ratio],
        ["p99 latency", tail.ratio],
        ["requests/s", throughput.ratio],
    ]
    print(markdown_table(["training ÷ idle (median of rounds)", "value"], ratios), end="\n\n")
    result = {
        "bench": "train_while_serving",
        "ratio": round(latency.ratio, 4),
        "target": None,
        "p99_ratio": round(tail.ratio, 4),
        "throughput_ratio": round(throughput.ratio, 4),
        **summaries,
        "training_step_s": round(statistics.median(server.training_step_s), 3),
        "p50_ms_by_round": {side: [round(1000 * v, 1) for v in latency.samples[side]] for side in SIDES},
        "rounds": repeats,
        "clients": CLIENTS,
        "tasks": TASKS,
        "new_tokens": NEW_TOKENS,
        "warm": warm,
        "measured": measured,
        "training_config": TRAINING_CONFIG,
        "train_examples": TRAIN_EXAMPLES,
        "cpu_threads": opts.cpu_threads,
        "model": model_name(quick),
        "device": opts.device,
        "dtype": opts.dtype,
        "server": "softserve serve (store disk: training in the API process; engine in its own process)",
        "quick": quick,
    }
    publish(result, results_file(opts, "train_while_serving"))


if __name__ == "__main__":
    main(sys.argv[1:])
