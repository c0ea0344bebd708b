"""Overload: does throughput hold when offered more than the server can do?

A real `softserve serve` process (a random model with t5-small shapes, saved and loaded from disk)
serves 32 tasks. Phase 1 finds the maximum sustained throughput with a closed loop of 2 x max-batch
clients. Phases 2 and 3 offer 2x and 4x that rate open-loop (Poisson arrivals, each request one row of
~32 tokens, 4 new tokens) for a fixed window. Reported per phase: accepted throughput (200s completed in
the window) / maximum (target >= 0.9: overload must not collapse throughput), p99 latency of accepted
requests, and the share of 503 and 429 answers. The queue is bounded at 2 batches
(`--max-queue-size`), so overload is shed at once with 503 + Retry-After instead of growing latency.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import safetensors.torch
from common import BATCH_SIZE, input_texts, markdown_table, parser, random_prompts

from server.tiny import build_tiny_t5
from tests.checkpoints import save_checkpoint, t5_small_config
from tests.serving import server_process

TARGET = 0.9
TASKS = 32


async def closed_loop(url: str, texts: list[str], clients: int, seconds: float) -> dict[str, object]:
    """`clients` clients sending back to back; the rate they get is the maximum sustained throughput."""
    stop = time.perf_counter() + seconds
    outcomes: list[tuple[int, float]] = []

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop:
            outcomes.append(await send(http, worker, texts))

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - started
    return summarize("max (closed loop)", outcomes, elapsed)


async def open_loop(url: str, texts: list[str], rate: float, seconds: float, seed: int) -> dict[str, object]:
    """Poisson arrivals at `rate` per second for `seconds`; waits for every answer. Accepted throughput is
    the 200s over the span from the first arrival to the last answer (so work still in flight when the
    arrivals stop is neither lost nor counted as free)."""
    rng = random.Random(seed)
    outcomes: list[tuple[int, float]] = []

    async def one(i: int) -> None:
        outcomes.append(await send(http, i, texts))

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1000)) as http:
        pending = []
        started = time.perf_counter()
        end = started + seconds
        i = 0
        while (now := time.perf_counter()) < end:
            pending.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(max(0.0, rng.expovariate(rate) - (time.perf_counter() - now)))
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - started
    return summarize(f"offered {rate:.1f} req/s", outcomes, elapsed)


async def send(http: httpx.AsyncClient, i: int, texts: list[str]) -> tuple[int, float]:
    body = {"task_id": f"task{i % TASKS}", "inputs": texts[i % len(texts)], "parameters": {"max_new_tokens": 4}}
    started = time.perf_counter()
    response = await http.post("/v1/generate", json=body)
    return response.status_code, time.perf_counter() - started


def summarize(phase: str, outcomes: list[tuple[int, float]], seconds: float) -> dict[str, object]:
    accepted = [latency for status, latency in outcomes if status == 200]
    p99 = statistics.quantiles(accepted, n=100)[98] if len(accepted) >= 2 else float("nan")
    return {
        "phase": phase,
        "accepted_per_s": len(accepted) / seconds,
        "p99_s": p99,
        "share_503": sum(s == 503 for s, _ in outcomes) / max(1, len(outcomes)),
        "share_429": sum(s == 429 for s, _ in outcomes) / max(1, len(outcomes)),
        "other": sorted({s for s, _ in outcomes} - {200, 503, 429}),
    }


def upload_tasks(url: str, d_model: int, seed: int) -> None:
    for i, prompt in enumerate(random_prompts(TASKS, d_model, seed)):
        data = safetensors.torch.save({"prompt_embeddings": prompt})
        httpx.put(f"{url}/v1/prompts/task{i}", files={"file": ("p", data)}, timeout=60).raise_for_status()


def main() -> None:
    args = parser(__doc__ or "", repeats=1)
    args.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    options = args.parse_args()
    seconds = 4.0 if options.quick else options.seconds
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(t5_small_config(), Path(tmp) / "model")
        model, tokenizer = build_tiny_t5(t5_small_config())
        texts = input_texts(_Tokenizing(tokenizer), 64, options.seed)
        flags = ("--model", str(checkpoint), "--device", options.device, "--max-batch-size", str(BATCH_SIZE))
        flags += ("--max-queue-size", str(2 * BATCH_SIZE), "--request-timeout-s", "120")
        with server_process(Path(tmp) / "data", *flags, timeout_s=300) as (_, url):
            upload_tasks(url, model.config.d_model, options.seed)
            asyncio.run(closed_loop(url, texts, BATCH_SIZE, min(seconds, 5)))  # warm-up
            phases = [asyncio.run(closed_loop(url, texts, 2 * BATCH_SIZE, seconds))]
            best = float(phases[0]["accepted_per_s"])  # type: ignore[arg-type]
            for factor in (2, 4):
                phase = asyncio.run(open_loop(url, texts, factor * best, seconds, options.seed + factor))
                phases.append(phase | {"phase": f"offered {factor}x max"})
    rows = [
        [p["phase"], p["accepted_per_s"], float(p["accepted_per_s"]) / best, p["p99_s"], p["share_503"], p["share_429"]]  # type: ignore[arg-type]
        for p in phases
    ]
    print(markdown_table(["phase", "accepted req/s", "÷ max", "p99 accepted s", "503 share", "429 share"], rows))
    print()
    ratio = min(float(p["accepted_per_s"]) for p in phases[1:]) / best  # type: ignore[arg-type]
    result = {
        "bench": "overload",
        "ratio": round(ratio, 4),
        "target": TARGET,
        "meets_target": ratio >= TARGET,
        "max_req_per_s": round(best, 2),
        "phases": phases,
        "seconds_per_phase": seconds,
        "device": options.device,
        "quick": options.quick,
    }
    print(json.dumps(result), flush=True)


class _Tokenizing:
    """What `input_texts` needs of a model: a `tokenize` that counts tokens like the server's."""

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(texts, add_special_tokens=True)["input_ids"]  # type: ignore[operator]


if __name__ == "__main__":
    main()
