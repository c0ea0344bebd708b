"""The Kubernetes topology without a cluster: redis-server and two API replicas (`softserve serve`, each with its
engine process and its own data directory, as pods with an emptyDir), and a client that picks the replica of
each request from their `/metrics` as the inference gateway's endpoint picker does with the configuration of
`deploy/kubernetes/base/endpoint-picker.yaml` (queue-scorer 2, kv-cache-utilization-scorer 2,
lora-affinity-scorer 3, the highest score wins). A task's requests go to the replica already running it; once
that one queues, elsewhere, and that replica loads the prompt from Redis once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.serving.model import FrozenT5
from server.testing.reference import random_prompt
from tests.prometheus import metric, wait_for_metric
from tests.redis_server import RedisServer
from tests.serving import server_process
from tests.test_engine_http import UNENDING
from tests.test_hostile_inference import generate_body, pending_request
from tests.test_inference_api import upload

WEIGHTS = {"queue": 2, "cache": 2, "affinity": 3}  # base/endpoint-picker.yaml's scheduling profile


@dataclass(frozen=True)
class Endpoint:
    """What the picker reads of one replica: the protocol's metrics under the names the mapping gives."""

    queued: float
    cache_usage: float
    running_tasks: set[str]
    waiting_tasks: set[str]
    max_tasks: int

    @classmethod
    def scrape(cls, client: httpx.Client) -> Endpoint:
        text = client.get("/metrics").text
        (info,) = [
            sample.labels
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "softserve_engine_tasks_info"
        ]
        return cls(
            queued=metric(text, "softserve_engine_waiting_rows"),
            cache_usage=metric(text, "softserve_engine_cache_usage_ratio"),
            running_tasks=names(info["running_lora_adapters"]),
            waiting_tasks=names(info["waiting_lora_adapters"]),
            max_tasks=int(info["max_lora"]),
        )


def names(csv: str) -> set[str]:
    return {name.strip() for name in csv.split(",") if name.strip()}


def affinity(endpoint: Endpoint, task: str) -> float:
    """The picker's lora-affinity-scorer: running here, then room for one more task, then waiting here."""
    if task in endpoint.running_tasks:
        return 1.0
    if len(endpoint.running_tasks) + len(endpoint.waiting_tasks) < endpoint.max_tasks:
        return 0.8
    return 0.6 if task in endpoint.waiting_tasks else 0.0


def pick(replicas: list[httpx.Client], task: str) -> int:
    """The index of the replica the picker sends a request for `task` to."""
    endpoints = [Endpoint.scrape(replica) for replica in replicas]
    low, high = min(e.queued for e in endpoints), max(e.queued for e in endpoints)

    def score(e: Endpoint) -> float:
        queue = 1.0 if high == low else (high - e.queued) / (high - low)  # queue-scorer: the shortest scores 1
        return (
            WEIGHTS["queue"] * queue + WEIGHTS["cache"] * (1 - e.cache_usage) + WEIGHTS["affinity"] * affinity(e, task)
        )

    scores = [score(e) for e in endpoints]
    return scores.index(max(scores))


@contextmanager
def replica(redis: RedisServer, data_dir: Path) -> Iterator[httpx.Client]:
    flags = ["--store", "redis", "--redis-url", redis.url, "--max-active-rows", "2", "--cpu-threads", "1"]
    flags += ["--engine", "thread"]  # the protocol's gauges are the engine's wherever it runs
    flags += ["--max-new-tokens", "8192", "--max-beam-tokens", "8192"]
    with server_process(data_dir, *flags) as (_, url), httpx.Client(base_url=url, timeout=60) as client:
        yield client


def test_a_picker_reading_the_protocol_keeps_a_task_on_its_replica_until_it_queues(
    redis_server: RedisServer, tmp_path: Path, tiny: FrozenT5
) -> None:
    with ExitStack() as stack:
        replicas = [stack.enter_context(replica(redis_server, tmp_path / name)) for name in ("a", "b")]
        a, b = replicas
        upload(a, "alpha", random_prompt(5, tiny.d_model, seed=1))
        body = generate_body("alpha", ["x"], **UNENDING)
        held: list[int] = []

        def send(expected: int, running: int, queued: int = 0) -> None:
            """A request for alpha where the picker says; the test waits for its row to show in the metrics, as
            the picker's next scrape would see it."""
            chosen = pick(replicas, "alpha")
            assert chosen == expected, [Endpoint.scrape(r) for r in replicas]
            stack.enter_context(pending_request(replicas[chosen], "/v1/generate", body))
            held.append(chosen)
            wait_for_metric(replicas[chosen], "softserve_engine_running_rows", running)
            wait_for_metric(replicas[chosen], "softserve_engine_waiting_rows", queued)

        send(expected=0, running=1)  # a tie but for the order: the first replica
        assert Endpoint.scrape(a).running_tasks == {"alpha"}
        send(expected=0, running=2)  # alpha runs on A: affinity outweighs A's fuller cache
        send(expected=0, running=2, queued=1)  # A's step is full, but nothing waits yet: still A
        send(expected=1, running=1)  # A queues: B, which has room for a task, wins
        send(expected=1, running=2)  # and now B runs alpha too
        loads = {source: metric(b, "softserve_prompt_loads_total", source=source) for source in ("redis", "cache")}
        assert loads["redis"] == 1 and loads["cache"] >= 1, loads  # B loaded the prompt once, from Redis
        assert metric(a, "softserve_prompt_loads_total", source="redis") == 1  # A too, for its three requests
        assert held == [0, 0, 0, 1, 1]
