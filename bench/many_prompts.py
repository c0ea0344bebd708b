"""Throughput with 10,000 registered prompts and a device cache for 256 ÷ the same traffic with all prompts cached.

Registry: a real redis-server started here (AOF on), 10,000 tasks of one prompt each, `[20, d_model]` fp32
(t5-small shapes: d_model 512, 40 KiB; `--model tiny`: 64, 5 KiB), registered straight through `RedisStore`
(registration is not what is measured). Two replicas of the server run in this process on one `FrozenT5`
and share that Redis:
- "cache 256": `prompt_cache_mb` sized for 256 prompts. Each request's task is drawn uniformly from
  1,000 of the tasks, so about 3 requests in 4 miss the device cache and load their prompt from Redis.
- "all cached": a cache for every traffic task, each loaded once before measuring.
Both replicas first see every traffic task once, so task records are warm on both (records are small
and never evicted); the difference measured is the device prompt cache.

Load: a closed loop of 64 clients in a separate process (one 32-token input, `max_new_tokens=4` each;
`max_batch_size` 32); both sides get the same task sequence in a round. One sample: `--warm` completions,
then the throughput of the next `--measured`. Rounds alternate (ABBA); the ratio is the median over
rounds of cache-256 ÷ all-cached. Target: >= 0.9.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import common  # noqa: F401  (before torch: the server's OpenMP wait policy, see common.py)
import httpx
import torch
from common import (
    BATCH_SIZE,
    MAX_NEW_TOKENS,
    build_model,
    compare,
    environment,
    input_texts,
    load_model,
    markdown_table,
    on_model_thread,
    parser,
    report,
    results_file,
    rows_for,
    warm_up,
)
from prometheus_client.parser import text_string_to_metric_families

from prompt_store import RedisStore, SoftPrompt
from server.serving.model import Decoding
from server.settings import Settings
from server.testing.processes import running_server
from server.testing.redis_server import RedisServer

TARGET = 0.9
CLIENTS = 64
PROMPT_LENGTH = 20


@dataclass(frozen=True)
class Plan:
    base_url: str
    task_ids: list[str]
    texts: list[str]


async def closed_loop(plan: Plan, warm: int, measured: int, seed: int, in_order: bool) -> tuple[float, int]:
    """Requests per second over the last `measured` of `warm + measured` completions, and failures."""
    total = warm + measured
    rng = random.Random(seed)
    tasks = [plan.task_ids[i % len(plan.task_ids)] if in_order else rng.choice(plan.task_ids) for i in range(total)]
    done: list[float] = []
    failures = 0
    issued = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures, issued
        while issued < total:
            i, issued = issued, issued + 1
            body = {"task_id": tasks[i], "inputs": plan.texts[i % len(plan.texts)]}
            response = await http.post("/v1/generate", json=body | {"parameters": {"max_new_tokens": MAX_NEW_TOKENS}})
            failures += response.status_code != 200
            done.append(time.perf_counter())

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=plan.base_url, limits=limits, timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
    done.sort()
    return measured / (done[-1] - done[max(warm, 1) - 1]), failures


def run_loop(plan: Plan, warm: int, measured: int, seed: int, in_order: bool = False) -> tuple[float, int]:
    return asyncio.run(closed_loop(plan, warm, measured, seed, in_order))


class Side:
    """One replica and the load generator's process aimed at it."""

    def __init__(self, pool: ProcessPoolExecutor, plan: Plan) -> None:
        self.pool = pool
        self.plan = plan
        self.rounds = 0

    def run(self, warm: int, measured: int, in_order: bool = False) -> float:
        seed = self.rounds  # the same task sequence for both sides in round r
        self.rounds += 0 if in_order else 1
        throughput, failures = self.pool.submit(run_loop, self.plan, warm, measured, seed, in_order).result()
        if failures:
            raise RuntimeError(f"{failures} requests failed on {self.plan.base_url}")
        return throughput

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.plan.base_url}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


def register(url: str, count: int, d_model: int, seed: int) -> list[str]:
    store = RedisStore(url)  # Redis alone: the disk mirror is not what this measures
    store.ensure_populated()
    generator = torch.Generator().manual_seed(seed)
    task_ids = [f"task-{i:05d}" for i in range(count)]
    for task_id in task_ids:
        prompt = SoftPrompt(torch.randn(PROMPT_LENGTH, d_model, generator=generator) * 3.0)
        store.add_version("default", task_id, prompt)
    store.close()
    return task_ids


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0], repeats=6)
    args.add_argument("--prompts", type=int, default=10_000, help="registered prompts")
    args.add_argument("--traffic-tasks", type=int, default=1_000, help="tasks the traffic is spread over")
    args.add_argument("--cache-prompts", type=int, default=256, help="prompts the small cache holds")
    args.add_argument("--model", choices=["t5-small", "tiny"], default="t5-small", help="t5-small shapes, or `tiny`")
    args.add_argument("--warm", type=int, default=2 * BATCH_SIZE)
    args.add_argument("--measured", type=int, default=12 * BATCH_SIZE)
    opts = args.parse_args(argv)
    if opts.quick:  # as in a full run, a cache for about a quarter of the traffic tasks: 3 requests in 4 miss it
        opts.prompts, opts.traffic_tasks, opts.cache_prompts = 300, 100, 26
        opts.repeats, opts.warm, opts.measured = 1, BATCH_SIZE, 2 * BATCH_SIZE

    model = build_model(opts.device, quick=opts.quick) if opts.model == "t5-small" else load_model("tiny", opts.device)
    texts = input_texts(model, BATCH_SIZE, opts.seed)
    rows = rows_for(model, [torch.randn(PROMPT_LENGTH, model.d_model) * 3.0] * BATCH_SIZE, texts)
    if opts.model == "t5-small":
        warm_up(model, rows)  # also checks that every row decodes all MAX_NEW_TOKENS steps
    else:
        on_model_thread(model.generate, rows, Decoding(), [MAX_NEW_TOKENS] * len(rows))
    prompt_bytes = PROMPT_LENGTH * model.d_model * torch.finfo(model.dtype).bits // 8
    cache_mb = {
        "small": opts.cache_prompts * prompt_bytes / 2**20,
        "large": 2 * opts.traffic_tasks * prompt_bytes / 2**20,
    }

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        stack.callback(redis.stop)
        started = time.perf_counter()
        task_ids = register(redis.url, opts.prompts, model.d_model, opts.seed)
        registration_s = time.perf_counter() - started
        traffic = sorted(random.Random(opts.seed).sample(task_ids, opts.traffic_tasks))
        pool = stack.enter_context(ProcessPoolExecutor(1, mp_context=get_context("spawn")))
        pool.submit(int)  # its process starts now (a spawn imports this script, seconds) while the replicas start
        sides = {}
        for name, mb in cache_mb.items():
            settings = Settings(
                store="redis",
                redis_url=redis.url,
                data_dir=Path(tmp) / name,
                max_batch_size=BATCH_SIZE,
                prompt_cache_mb=mb,
                registry_reconcile_s=3600,
            )
            sides[name] = Side(pool, Plan(stack.enter_context(running_server(settings, model)), traffic, texts))
            sides[name].run(0, len(traffic), in_order=True)  # every task once: records warm, the large cache full
        small, large = sides["small"], sides["large"]
        before = {k: small.metric(f"softserve_prompt_cache_{k}_total") for k in ("hits", "misses", "evictions")}
        comparison = compare(
            (f"cache {opts.cache_prompts}", lambda: small.run(opts.warm, opts.measured)),
            ("all cached", lambda: large.run(opts.warm, opts.measured)),
            opts.repeats,
        )
        after = {k: small.metric(f"softserve_prompt_cache_{k}_total") for k in ("hits", "misses", "evictions")}
        loads = small.metric("softserve_prompt_loads_total", source="redis")

    delta = {k: after[k] - before[k] for k in after}
    miss_rate = delta["misses"] / max(1.0, delta["hits"] + delta["misses"])
    setup = markdown_table(
        ["registered", "traffic tasks", "cache (prompts)", "prompt bytes", "miss rate", "evictions", "redis loads"],
        [[opts.prompts, opts.traffic_tasks, opts.cache_prompts, prompt_bytes, miss_rate, delta["evictions"], loads]],
    )
    report(
        "many_prompts",
        [setup, comparison.table("requests/s")],
        comparison,
        TARGET,
        results_file(opts, "many_prompts", *(["tiny"] if opts.model == "tiny" else [])),
        prompts=opts.prompts,
        traffic_tasks=opts.traffic_tasks,
        cache_prompts=opts.cache_prompts,
        miss_rate=round(miss_rate, 3),
        registration_s=round(registration_s, 1),
        clients=CLIENTS,
        **(environment(model, opts.quick) | {"model": model.model_id}),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
