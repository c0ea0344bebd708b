"""Listings under load: another tenant's generate latency while one tenant loops on every listing route ÷ idle.

A `softserve serve` process (the tiny model, disk store) holds 1,500 tasks of tenant `crowd` and one task of
tenant `quiet`. In each round, `quiet` sends generate requests one after another (4 new tokens) for
`--seconds`, once alone ("idle") and once while `crowd` keeps 8 connections looping on `GET /v1/models`,
`GET /v1/prompts` and `GET /v1/prompts/{task}/similar` ("loaded"), rounds in alternating order (ABBA).
The ratio is the median over rounds of the loaded p50 ÷ the idle p50 of the same round; the target is <= 2
(before listings paged and had a rate limit, 8 connections on `/v1/models` alone made it 31x).

The server runs twice, one after the other: with the defaults (listings page through the task index, the
management budget of `rate_limit_management_cost_per_s` answers the rest 429 after `shed_delay_ms`), the
reported `ratio`; and with that budget off (`--rate-limit-management-cost-per-s 0`), where only paging
and the cached records and task embeddings keep a listing cheap, reported beside it.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import common  # noqa: F401  (before torch: the server's OpenMP wait policy, see common.py)
import httpx
from common import interleaved, markdown_table, parser, publish, random_prompts, results_file

from prompt_store import DiskStore, SoftPrompt
from server.tenancy.keys import ApiKeys
from server.testing.processes import server_process

TARGET = 2.0  # loaded p50 ÷ idle p50, at most
CROWD_TASKS = 1500
QUICK_CROWD_TASKS = 200  # a smoke run's: still more than a listing page (100), so listings page
LOOPING_CONNECTIONS = 8
LISTING_ROUTES = ("/v1/models", "/v1/prompts", "/v1/prompts/task00000/similar")
TINY_D_MODEL = 64
IDLE, LOADED = "idle", "loaded"
VARIANTS = {"defaults": (), "no management limit": ("--rate-limit-management-cost-per-s", "0")}


def seed(data_dir: Path, crowd_tasks: int, seed_: int) -> tuple[str, str]:
    """Writes the two tenants' tasks into the disk store the server will open; returns their API keys."""
    store = DiskStore(data_dir / "prompts")
    prompts = random_prompts(crowd_tasks + 1, TINY_D_MODEL, seed_)
    for i, prompt in enumerate(prompts[:crowd_tasks]):
        store.add_version("crowd", f"task{i:05d}", SoftPrompt(prompt))
    store.add_version("quiet", "t", SoftPrompt(prompts[-1]))
    keys = ApiKeys(data_dir / "api_keys.json")
    return keys.add("crowd"), keys.add("quiet")


async def generate_latencies(url: str, key: str, seconds: float) -> list[float]:
    """Latencies of `quiet`'s generate requests sent one after another for `seconds`."""
    body = {"task_id": "t", "inputs": "how are you today", "parameters": {"max_new_tokens": 4, "ignore_eos": True}}
    latencies = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            started = time.perf_counter()
            response = await http.post("/v1/generate", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
    return latencies


async def loop_on_listings(url: str, key: str, stop: asyncio.Event, statuses: Counter[int]) -> None:
    """`crowd`'s connections, each looping over the listing routes until `stop`."""

    async def connection(http: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while not stop.is_set():
            response = await http.get(LISTING_ROUTES[i % len(LISTING_ROUTES)])
            statuses[response.status_code] += 1
            i += 1

    limits = httpx.Limits(max_connections=LOOPING_CONNECTIONS)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as http:
        await asyncio.gather(*(connection(http, i) for i in range(LOOPING_CONNECTIONS)))


async def loaded_latencies(
    url: str, keys: tuple[str, str], seconds: float, statuses: Counter[int]
) -> tuple[list[float], float]:
    """`quiet`'s latencies while `crowd` loops, and how long `crowd` looped (s)."""
    stop = asyncio.Event()
    started = time.perf_counter()
    looping = asyncio.create_task(loop_on_listings(url, keys[0], stop, statuses))
    await asyncio.sleep(0.5)  # every connection is looping before the first measured request
    try:
        return await generate_latencies(url, keys[1], seconds), time.perf_counter() - started
    finally:
        stop.set()
        await looping


class Rounds:
    """The two phases as samplers of `quiet`'s p50 latency (ms); every phase's latencies are kept."""

    def __init__(self, url: str, keys: tuple[str, str], seconds: float) -> None:
        self.url, self.keys, self.seconds = url, keys, seconds
        self.latencies: dict[str, list[list[float]]] = {IDLE: [], LOADED: []}
        self.listing_statuses: Counter[int] = Counter()
        self.listing_seconds = 0.0

    def samplers(self) -> dict[str, Callable[[], float]]:
        return {IDLE: lambda: self.sample(IDLE), LOADED: lambda: self.sample(LOADED)}

    def sample(self, phase: str) -> float:
        if phase == IDLE:
            latencies = asyncio.run(generate_latencies(self.url, self.keys[1], self.seconds))
        else:
            latencies, looped = asyncio.run(loaded_latencies(self.url, self.keys, self.seconds, self.listing_statuses))
            self.listing_seconds += looped
        self.latencies[phase].append(latencies)
        return 1000 * statistics.median(latencies)

    def forget(self) -> None:
        """Drops what the warm-up measured."""
        self.latencies = {IDLE: [], LOADED: []}
        self.listing_statuses.clear()
        self.listing_seconds = 0.0


def measure(flags: tuple[str, ...], crowd_tasks: int, seconds: float, repeats: int, seed_: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        keys = seed(data_dir, crowd_tasks, seed_)
        with server_process(data_dir, "--model", "tiny", *flags, timeout_s=300) as (_, url):
            rounds = Rounds(url, keys, seconds)
            rounds.sample(LOADED)  # warm-up: first model calls, and the listed records and embeddings cached
            rounds.forget()
            samples = interleaved(rounds.samplers(), repeats)
    ratios = [loaded / idle for loaded, idle in zip(samples[LOADED], samples[IDLE], strict=True)]
    answered = sum(rounds.listing_statuses.values())
    return {
        "ratio": statistics.median(ratios),
        "idle_p50_ms": statistics.median(samples[IDLE]),
        "loaded_p50_ms": statistics.median(samples[LOADED]),
        "ratios_by_round": ratios,
        "generate_requests": {phase: sum(map(len, runs)) for phase, runs in rounds.latencies.items()},
        "listing_requests_per_s": answered / rounds.listing_seconds,
        "listing_share_429": rounds.listing_statuses[429] / max(1, answered),
        "listing_statuses": {str(status): count for status, count in sorted(rounds.listing_statuses.items())},
    }


def rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def main() -> None:
    args = parser(__doc__.splitlines()[0], repeats=3)
    args.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    options = args.parse_args()
    quick = (1, QUICK_CROWD_TASKS, 1.0)
    repeats, crowd_tasks, seconds = quick if options.quick else (options.repeats, CROWD_TASKS, options.seconds)
    os.environ.pop("SOFTSERVE_RATE_LIMIT_MANAGEMENT_COST_PER_S", None)  # the defaults are what is measured
    results = {name: measure(flags, crowd_tasks, seconds, repeats, options.seed) for name, flags in VARIANTS.items()}
    fields = ["ratio", "idle_p50_ms", "loaded_p50_ms", "listing_requests_per_s", "listing_share_429"]
    print(markdown_table(["server", *fields], [[name, *(results[name][f] for f in fields)] for name in results]))
    print()
    ratio = float(results["defaults"]["ratio"])  # type: ignore[arg-type]
    result = {
        "bench": "listings",
        "ratio": round(ratio, 4),
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "ratio_without_management_limit": round(float(results["no management limit"]["ratio"]), 4),  # type: ignore[arg-type]
        "variants": rounded(results),
        "crowd_tasks": crowd_tasks,
        "looping_connections": LOOPING_CONNECTIONS,
        "rounds": repeats,
        "seconds_per_phase": seconds,
        "quick": options.quick,
    }
    publish(result, results_file(options, "listings"))


if __name__ == "__main__":
    main()
