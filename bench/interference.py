"""What one tenant's largest allowed requests do to another tenant's latency: per-pass budgets and fair places.

Server: a real `softserve serve` process (the `tiny` model, the engine in its own process, as deployed) with
API keys for two tenants and per-tenant rate limits (`--rate-limit-requests-per-s 50`,
`--rate-limit-tokens-per-s 50000`: every attack below is within them).

The victim runs, in every sample, one streamed generate request (32 new tokens, `ignore_eos`) and, while it
streams, 4-token requests one after another. Measured: the gaps between the streamed tokens as they arrive
(p90 and p99), and the 4-token requests' latency (median). A sample runs with the server otherwise idle, or
while the attacker, on two connections, sends one kind of attack request after another:
- `beam`: the largest beam request (`num_beams` 4 x 256 new tokens = `max_beam_tokens`, `ignore_eos`);
- `classify`: the largest classify (64 labels of 250 tokens: just under `max_batch_tokens`);
- `ensemble`: generate on a 16-member ensemble of random prompts whose members disagree (tie-break scoring);
- `flood`: 64 inputs x 256 new tokens with `ignore_eos`.
Idle and attack samples alternate (ABBA); each ratio is the attack's median (or p90) over the idle one's.
Targets: inter-token gap p90 <= 3x idle, 4-token median <= 5x idle, for every kind of attack.
`--threads N` runs the server with `--cpu-threads N` and writes `interference-threadsN.json`.

A `--quick` run sends the same attacks with fewer new tokens (`QUICK`: 32 for beam and flood, 8 for ensemble)
and gives each a shorter lead, so that it does not wait seconds for the attacks in flight at each sample's end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (before torch: the server's OpenMP wait policy, see common.py)
import httpx
from common import markdown_table, parser, percentile, publish, random_prompts, results_file

from prompt_store import PromptFormat, dump_prompt
from server.tenancy.keys import ApiKeys
from server.testing.processes import server_process

GAP_TARGET = 3.0
SHORT_TARGET = 5.0
ATTACKS = ("beam", "classify", "ensemble", "flood")
D_MODEL = 64  # the tiny model's
ENSEMBLE = 16
STREAM_TOKENS = 32
ATTACKERS = 2


@dataclass(frozen=True)
class Pace:
    """How long the attacks run: the new tokens of a beam or flood request (an ensemble's: a quarter of them),
    and how long an attack runs before the victim measures."""

    new_tokens: int
    lead_s: float


FULL = Pace(new_tokens=256, lead_s=1.0)  # beam: 4 x 256 = `max_beam_tokens`
QUICK = Pace(new_tokens=32, lead_s=0.25)


class Victim:
    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    async def sample(self) -> tuple[list[float], list[float]]:
        """One stream's token gaps and the latencies of the 4-token requests sent while it streamed."""
        streaming = asyncio.create_task(self._stream_gaps())
        latencies: list[float] = []
        while not streaming.done():
            started = time.perf_counter()
            body = {"task_id": "v", "inputs": "a short one", "parameters": {"max_new_tokens": 4, "ignore_eos": True}}
            (await self.http.post("/v1/generate", json=body)).raise_for_status()
            latencies.append(time.perf_counter() - started)
        return await streaming, latencies

    async def _stream_gaps(self) -> list[float]:
        body = {
            "task_id": "v",
            "inputs": "a streamed one",
            "stream": True,
            "parameters": {"max_new_tokens": STREAM_TOKENS, "ignore_eos": True},
        }
        arrivals: list[float] = []
        async with self.http.stream("POST", "/v1/generate", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data:") and '"token"' in line:
                    arrivals.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(arrivals)]


class Attacker:
    def __init__(self, url: str, key: str, new_tokens: int) -> None:
        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        self.statuses: dict[str, dict[int, int]] = {kind: {} for kind in ATTACKS}
        self.new_tokens = new_tokens

    def request(self, kind: str) -> tuple[str, dict[str, object]]:
        if kind == "beam":
            params = {"max_new_tokens": self.new_tokens, "num_beams": 4, "ignore_eos": True}
            return "/v1/generate", {"task_id": "x", "inputs": "beam me", "parameters": params}
        if kind == "classify":
            labels = [f"{i:02d}" + "y" * 247 for i in range(64)]
            return "/v1/classify", {"task_id": "x", "inputs": "classify me", "labels": labels}
        if kind == "ensemble":
            params = {"max_new_tokens": self.new_tokens // 4, "do_sample": True, "temperature": 2.0}
            return "/v1/generate", {"task_id": "e", "inputs": "vote", "ensemble": True, "parameters": params}
        params = {"max_new_tokens": self.new_tokens, "ignore_eos": True}
        return "/v1/generate", {"task_id": "x", "inputs": [f"flood {i}" for i in range(64)], "parameters": params}

    async def attack(self, kind: str, stop: asyncio.Event) -> None:
        path, body = self.request(kind)
        while not stop.is_set():
            status = (await self.http.post(path, json=body)).status_code
            self.statuses[kind][status] = self.statuses[kind].get(status, 0) + 1
            if status == 429:
                await asyncio.sleep(0.2)


async def measure(url: str, victim_key: str, attacker_key: str, rounds: int, pace: Pace) -> dict[str, object]:
    victim, attacker = Victim(url, victim_key), Attacker(url, attacker_key, pace.new_tokens)
    idle: dict[str, list[list[float]]] = {"gaps": [], "short": []}
    attacked = {kind: {"gaps": [], "short": []} for kind in ATTACKS}

    async def sample_into(store: dict[str, list[list[float]]], kind: str | None) -> None:
        stop = asyncio.Event()
        attacks = [asyncio.create_task(attacker.attack(kind, stop)) for _ in range(ATTACKERS)] if kind else []
        if attacks:
            await asyncio.sleep(pace.lead_s)  # the attack is under way before the victim measures
        gaps, short = await victim.sample()
        stop.set()
        await asyncio.gather(*attacks)
        store["gaps"].append(gaps)
        store["short"].append(short)

    await victim.sample()  # warm-up
    for round_ in range(rounds):
        for kind in ATTACKS:
            pair: list[Callable[[], Awaitable[None]]] = [
                lambda: sample_into(idle, None),
                lambda kind=kind: sample_into(attacked[kind], kind),
            ]
            for run in pair if round_ % 2 == 0 else reversed(pair):
                await run()
    return summarise(idle, attacked, attacker.statuses)


def summarise(
    idle: dict[str, list[list[float]]], attacked: dict[str, dict[str, list[list[float]]]], statuses: object
) -> dict[str, object]:
    def flat(samples: list[list[float]]) -> list[float]:
        return [value for sample in samples for value in sample]

    idle_gap_p90 = percentile(flat(idle["gaps"]), 90)
    idle_short = statistics.median(flat(idle["short"]))
    kinds: dict[str, dict[str, float | int]] = {}
    for kind, samples in attacked.items():
        gaps, short = flat(samples["gaps"]), flat(samples["short"])
        kinds[kind] = {
            "gap_p90_ratio": round(percentile(gaps, 90) / idle_gap_p90, 3),
            "gap_p99_ratio": round(percentile(gaps, 99) / percentile(flat(idle["gaps"]), 99), 3),
            "short_median_ratio": round(statistics.median(short) / idle_short, 3),
            "gap_p90_ms": round(1000 * percentile(gaps, 90), 2),
            "short_median_ms": round(1000 * statistics.median(short), 2),
            "gap_samples": len(gaps),
            "short_samples": len(short),
        }
    meets = all(k["gap_p90_ratio"] <= GAP_TARGET and k["short_median_ratio"] <= SHORT_TARGET for k in kinds.values())
    return {
        "idle_gap_p90_ms": round(1000 * idle_gap_p90, 2),
        "idle_short_median_ms": round(1000 * idle_short, 2),
        "idle_gap_samples": len(flat(idle["gaps"])),
        "idle_short_samples": len(flat(idle["short"])),
        "attacks": kinds,
        "attacker_statuses": statuses,
        "meets_target": meets,
    }


def set_up(url: str, victim_key: str, attacker_key: str) -> None:
    """The victim's task, the attacker's task and its ensemble of 16 random prompts."""
    prompts = random_prompts(ENSEMBLE + 2, D_MODEL, seed=0)

    def put(key: str, task: str, index: int) -> None:
        data = dump_prompt(prompts[index], PromptFormat.SAFETENSORS)
        headers = {"Authorization": f"Bearer {key}"}
        httpx.put(f"{url}/v1/prompts/{task}", files={"file": ("p.safetensors", data)}, headers=headers, timeout=60)

    put(victim_key, "v", 0)
    put(attacker_key, "x", 1)
    for i in range(ENSEMBLE):
        put(attacker_key, "e", 2 + i)
    headers = {"Authorization": f"Bearer {attacker_key}"}
    body = {"versions": list(range(1, ENSEMBLE + 1))}
    httpx.put(f"{url}/v1/prompts/e/ensemble", json=body, headers=headers, timeout=60).raise_for_status()


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.split("\n")[0], repeats=4)
    args.add_argument("--pass-budget-tokens", type=int, default=None, help="the server's (default: its default)")
    options = args.parse_args(argv)
    rounds = 1 if options.quick else options.repeats
    with tempfile.TemporaryDirectory() as workdir:
        data = Path(workdir) / "data"
        keys = ApiKeys(data / "api_keys.json")
        victim_key, attacker_key = keys.add("victim"), keys.add("attacker")
        flags: tuple[str, ...] = (
            "--model", "tiny", "--rate-limit-requests-per-s", "50", "--rate-limit-tokens-per-s", "50000",
        )  # fmt: skip
        if options.pass_budget_tokens is not None:
            flags += ("--pass-budget-tokens", str(options.pass_budget_tokens))
        if options.threads is not None:  # the server's torch threads (`--cpu-threads`)
            flags += ("--cpu-threads", str(options.threads))
        with server_process(data, *flags, timeout_s=300) as (_, url):
            set_up(url, victim_key, attacker_key)
            result = asyncio.run(measure(url, victim_key, attacker_key, rounds, QUICK if options.quick else FULL))
    rows = [
        [kind, k["gap_p90_ratio"], k["gap_p99_ratio"], k["short_median_ratio"], k["gap_p90_ms"], k["short_median_ms"]]
        for kind, k in result["attacks"].items()  # type: ignore[union-attr]
    ]
    print(
        markdown_table(
            ["attack", "gap p90 ÷ idle", "gap p99 ÷ idle", "4-token median ÷ idle", "gap p90 ms", "4-token ms"], rows
        )
    )
    print(f"idle: gap p90 {result['idle_gap_p90_ms']} ms, 4-token median {result['idle_short_median_ms']} ms")
    print("attacker's answers:", json.dumps(result["attacker_statuses"]))
    worst = max(k["gap_p90_ratio"] for k in result["attacks"].values())  # type: ignore[union-attr]
    head = {"bench": "interference", "ratio": worst, "target": GAP_TARGET, "short_median_target": SHORT_TARGET}
    settings = {
        "model": "tiny",
        "rounds": rounds,
        "pass_budget_tokens": options.pass_budget_tokens or "default",
        "server_torch_threads": options.threads or "default",
    }
    variant = [f"threads{options.threads}"] if options.threads is not None else []
    publish(head | settings | result | {"quick": options.quick}, results_file(options, "interference", *variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
