"""Overload and fairness over real HTTP against `softserve serve` in its own process.

Load loops are bounded in count and time and target only the loopback server the test started.
"""

from __future__ import annotations

import io
import multiprocessing
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.tenancy.keys import ApiKeys
from tests.prometheus import metric
from tests.serving import server_process
from tests.test_hot_loading import eventually

INPUTS = ["alpha beta", "gamma", "delta epsilon zeta", "eta"]


def upload(url: str, task_id: str, seed: int, headers: dict[str, str] | None = None) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(seed).normal(size=(4 + seed % 5, 64)).astype(np.float32))
    response = httpx.put(f"{url}/v1/prompts/{task_id}", files={"file": ("p", buffer.getvalue())}, headers=headers)
    assert response.status_code == 201


def generate(client: httpx.Client, task_id: str, inputs: list[str], tenant: str | None = None) -> httpx.Response:
    headers = {"X-Softserve-Tenant": tenant} if tenant else None
    body = {"task_id": task_id, "inputs": inputs, "parameters": {"max_new_tokens": 4}}
    return client.post("/v1/generate", json=body, headers=headers)


def test_overload_sheds_with_503_and_serves_every_accepted_request_correctly(tmp_path: Path) -> None:
    queue_rows = 16
    flags = ("--max-queue-size", str(queue_rows), "--max-batch-size", "8", "--request-timeout-s", "120")
    flags += ("--engine", "thread")  # the queue in front of the engine is tested, not the engine process
    with server_process(tmp_path, *flags) as (_, url):
        tasks = [f"task{i}" for i in range(4)]
        for seed, task in enumerate(tasks):
            upload(url, task, seed)
        with httpx.Client(base_url=url, timeout=120) as client:
            expected = {t: [o["text"] for o in generate(client, t, INPUTS).json()["outputs"]] for t in tasks}

        def client_loop(worker: int) -> list[tuple[int, str, list[str] | None, str | None]]:
            """One client sending back to back for a bounded time; 4 rows per request."""
            seen = []
            stop = time.monotonic() + 4
            with httpx.Client(base_url=url, timeout=120) as client:
                while time.monotonic() < stop and len(seen) < 200:
                    task = tasks[(worker + len(seen)) % len(tasks)]
                    response = generate(client, task, INPUTS)
                    texts = [o["text"] for o in response.json()["outputs"]] if response.status_code == 200 else None
                    seen.append((response.status_code, task, texts, response.headers.get("Retry-After")))
            return seen

        clients = 4 * queue_rows // len(INPUTS) * 4  # rows offered at once: 4x the queue capacity
        with ThreadPoolExecutor(clients) as pool:
            results = [r for batch in pool.map(client_loop, range(clients)) for r in batch]

        statuses = {status for status, *_ in results}
        assert statuses <= {200, 503}, statuses
        assert 503 in statuses and 200 in statuses
        for status, task, texts, retry_after in results:
            if status == 200:
                assert texts == expected[task]
            else:
                assert retry_after is not None and int(retry_after) >= 1
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 200
        with httpx.Client(base_url=url, timeout=60) as client:
            assert generate(client, "task0", INPUTS).status_code == 200


def flood(url: str, headers: dict[str, str], stop: EventType, sent: Queue) -> None:
    """Tenant A's flood from a process of its own, so that its clients' GIL is not the quiet client's: four
    connections sending 16-row requests (~64 of A's rows queued: 4 batches deep) until `stop`; puts how many
    requests it sent."""

    def one_connection(_: int) -> int:
        count = 0
        with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
            while not stop.is_set() and count < 500:
                generate(client, "a-task", INPUTS * 4, "flooder")
                count += 1
        return count

    with ThreadPoolExecutor(4) as pool:
        sent.put(sum(pool.map(one_connection, range(4))))


@pytest.mark.timing
def test_a_flooding_tenant_does_not_starve_a_quiet_one(tmp_path: Path) -> None:
    """The engine admits rows round-robin across tenants: B waits for at most the rows in flight and its own,
    never behind A's whole queue. Compared with B's latency on the same server when idle."""
    # One model thread: on two shared cores the flood's HTTP work and the model's threads would otherwise
    # fight over the cores and the latencies would measure that, not the batcher.
    flags = ("--max-batch-size", "16", "--max-active-rows", "16", "--max-wait-ms", "25", "--max-queue-size", "4096")
    flags += ("--cpu-threads", "1")
    admin = {"Authorization": f"Bearer {ApiKeys(tmp_path / 'api_keys.json').add('ops', admin=True)}"}  # acts as both
    with server_process(tmp_path, *flags) as (_, url):
        upload(url, "a-task", 1, {"X-Softserve-Tenant": "flooder", **admin})
        upload(url, "b-task", 2, {"X-Softserve-Tenant": "quiet", **admin})

        def quiet_latencies(count: int) -> list[float]:
            latencies = []
            with httpx.Client(base_url=url, timeout=120, headers=admin) as client:
                for _ in range(count):
                    started = time.perf_counter()
                    assert generate(client, "b-task", INPUTS[:1], "quiet").status_code == 200
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.05)
            return latencies

        quiet_latencies(3)  # warm the path
        idle = quiet_latencies(40)

        spawn = multiprocessing.get_context("spawn")
        stop, sent = spawn.Event(), spawn.Queue()
        flooder = spawn.Process(target=flood, args=(url, admin, stop, sent))
        flooder.start()
        try:
            with httpx.Client(base_url=url, timeout=30, headers=admin) as watcher:
                waiting = "softserve_engine_waiting_rows"
                eventually(lambda: metric(watcher, waiting) >= 3 * 16, 60, "the flood to be 3 batches deep")
            loaded = quiet_latencies(40)
        finally:
            stop.set()
            requests = sent.get(timeout=300)
            flooder.join(timeout=60)
        assert requests > 4

        median = statistics.median
        summary = (
            f"idle: median {median(idle):.3f}s, p90 {p90(idle):.3f}s; flood: {median(loaded):.3f}s, {p90(loaded):.3f}s"
        )
        # Fair: B waits for at most the rows in flight (one generation: A's rows join and finish together, so a
        # place frees when they end) and then its own generation, plus the flood's HTTP work: under 3x idle.
        # Starved, B would wait behind A's whole queue, 4 generations deep: 5x or more. The median says which;
        # the p90 of 40 samples is printed, not bounded: with a core taken by another process it moved 3-4x
        # idle from run to run on a fair engine.
        print(summary)
        assert median(loaded) <= 3 * median(idle), summary


def p90(values: list[float]) -> float:
    """The 90th percentile, the highest one 40 samples support: it lies between the 36th and 37th smallest
    (inclusive method), with 4 samples above it. A "p99" of 40 samples (`quantiles(n=100)[98]`, exclusive
    method) sits at rank 40.6, past the largest sample: an extrapolation from the two largest, no statistic."""
    return statistics.quantiles(values, n=10, method="inclusive")[8]
