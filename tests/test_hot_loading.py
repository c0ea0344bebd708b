"""Replicas sharing one Redis, over real HTTP: hot-loading, missed notices, Redis outages, the device cache.

Replicas share one data dir, as API replicas share one volume in docker-compose: the disk mirror then
holds every replica's writes, so any replica can serve any task from it while Redis is down.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from prompt_store import DiskStore, RedisStore, SoftPrompt
from server.components import preload_task_keys
from server.serving.model import FrozenT5
from server.settings import Settings
from server.testing.reference import random_prompt
from tests.prometheus import metric
from tests.redis_server import RedisServer
from tests.serving import running_server

INPUT = "sentence: a gorgeous, witty film"
LABELS = ["positive", "negative", "neutral"]
HOT_LOAD_LIMIT_S = 1.0


def replica(tmp_path: Path, redis: RedisServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "store": "redis",
        "redis_url": redis.url,
        "data_dir": tmp_path / "data",
        "max_wait_ms": 2,
        "registry_reconcile_s": 60,
        **overrides,
    }
    return Settings(**values)


@contextmanager
def serving(model: FrozenT5, *settings: Settings) -> Iterator[list[httpx.Client]]:
    with ExitStack() as stack:
        clients = []
        for s in settings:
            url = stack.enter_context(running_server(s, model))
            clients.append(stack.enter_context(httpx.Client(base_url=url, timeout=30)))
        yield clients


def upload(client: httpx.Client, task_id: str, tensor: torch.Tensor, **metadata: Any) -> httpx.Response:
    buffer = io.BytesIO()
    np.save(buffer, tensor.numpy())
    data = {"metadata": json.dumps(metadata)} if metadata else None
    return client.put(f"/v1/prompts/{task_id}", files={"file": ("prompt.npy", buffer.getvalue())}, data=data)


def new_prompt(model: FrozenT5, seed: int, length: int = 8) -> torch.Tensor:
    return random_prompt(length, model.d_model, seed=seed)


def classify(client: httpx.Client, task_id: str, version: int | None = None) -> httpx.Response:
    return client.post("/v1/classify", json={"task_id": task_id, "inputs": INPUT, "labels": LABELS, "version": version})


def served(client: httpx.Client, task_id: str) -> tuple[int | None, dict[str, float] | None]:
    """(version, scores) the replica serves for the task now; (None, None) once it is gone (404)."""
    response = classify(client, task_id)
    if response.status_code == 404:
        return None, None
    assert response.status_code == 200, response.text
    body = response.json()
    return body["prompt_version"], body["outputs"][0]["scores"]


def eventually(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Polls until `check()` holds; returns the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def assert_same_scores(a: dict[str, float] | None, b: dict[str, float] | None) -> None:
    assert a is not None and b is not None
    assert a == pytest.approx(b, abs=1e-5)


def silent_writer(redis: RedisServer, tmp_path: Path) -> RedisStore:
    """A writer whose notices nobody hears: what a replica misses while its subscription is down."""
    store = RedisStore(redis.url, DiskStore(tmp_path / "data" / "prompts"))
    store.channel = "nobody-listens"
    return store


def test_uploads_activations_and_deletes_reach_the_other_replica_within_a_second(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = replica(tmp_path, redis_server)
    with serving(tiny, settings, settings) as (a, b):
        assert upload(a, "sst2", new_prompt(tiny, 1)).status_code == 201
        version, first = served(b, "sst2")
        assert version == 1  # cached on B from now on

        assert upload(a, "sst2", new_prompt(tiny, 2), labels=LABELS).json()["version"] == 2
        took = eventually(lambda: served(b, "sst2")[0] == 2, HOT_LOAD_LIMIT_S, "B serves version 2")
        assert_same_scores(served(b, "sst2")[1], served(a, "sst2")[1])
        assert served(b, "sst2")[1] != first
        assert b.get("/v1/prompts/sst2").json()["labels"] == LABELS

        assert a.post("/v1/prompts/sst2/activate", json={"version": 1}).status_code == 200
        took = max(took, eventually(lambda: served(b, "sst2")[0] == 1, HOT_LOAD_LIMIT_S, "B rolls back to 1"))
        assert_same_scores(served(b, "sst2")[1], first)

        assert a.delete("/v1/prompts/sst2").status_code == 204
        took = max(took, eventually(lambda: served(b, "sst2")[0] is None, HOT_LOAD_LIMIT_S, "B stops serving"))
        assert b.get("/v1/prompts/sst2").status_code == 404
        assert metric(b, "softserve_registry_refreshes_total", cause="notice") >= 3
    print(f"slowest propagation: {took * 1000:.0f} ms")


def test_a_replica_that_missed_notices_converges_when_it_reconnects(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    with serving(tiny, replica(tmp_path, redis_server)) as (b,):
        writer = silent_writer(redis_server, tmp_path)
        heard = RedisStore(redis_server.url, DiskStore(tmp_path / "data" / "prompts"))  # its notices reach B
        writer.add_version("default", "sst2", SoftPrompt(new_prompt(tiny, 1)))
        heard.add_version("default", "other", SoftPrompt(new_prompt(tiny, 3)))
        assert served(b, "sst2")[0] == 1 and served(b, "other")[0] == 1
        writer.add_version("default", "sst2", SoftPrompt(new_prompt(tiny, 2)))
        # A notice sent after, which B acts on: a notice of sst2's new version would have been acted on first.
        heard.add_version("default", "other", SoftPrompt(new_prompt(tiny, 4)))
        eventually(lambda: served(b, "other")[0] == 2, 3.0, "B acts on the later notice")
        heard.close()
        assert served(b, "sst2")[0] == 1  # no notice reached B; its periodic check is a minute away
        before = metric(b, "softserve_registry_reconciles_total", trigger="connect")
        killed = redis_server.client().client_kill_filter(_type="pubsub")
        assert killed >= 1
        eventually(lambda: served(b, "sst2")[0] == 2, 3.0, "B reconciles after reconnecting")
        assert metric(b, "softserve_registry_reconciles_total", trigger="connect") == before + 1
        assert metric(b, "softserve_registry_refreshes_total", cause="reconcile") == 1
        writer.close()


def test_a_replica_that_missed_notices_converges_by_periodic_reconciliation(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    with serving(tiny, replica(tmp_path, redis_server, registry_reconcile_s=0.3)) as (b,):
        writer = silent_writer(redis_server, tmp_path)
        writer.add_version("default", "sst2", SoftPrompt(new_prompt(tiny, 1)))
        writer.add_version("default", "rte", SoftPrompt(new_prompt(tiny, 2)))
        assert served(b, "sst2")[0] == 1 and served(b, "rte")[0] == 1
        writer.add_version("default", "sst2", SoftPrompt(new_prompt(tiny, 3)))
        writer.delete_task("default", "rte")
        eventually(lambda: served(b, "sst2")[0] == 2, 3.0, "B picks up the new version")
        eventually(lambda: served(b, "rte")[0] is None, 3.0, "B drops the deleted task")
        assert metric(b, "softserve_registry_reconciles_total", trigger="periodic") >= 1
        writer.close()


def test_redis_down_mid_traffic_serves_reads_refuses_writes_and_recovers(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = replica(tmp_path, redis_server)
    with serving(tiny, settings, settings) as (a, b):
        for seed, task in enumerate(["cached", "mirrored"]):
            assert upload(a, task, new_prompt(tiny, seed)).status_code == 201
        expected = {task: served(a, task)[1] for task in ("cached", "mirrored")}
        assert served(b, "cached")[0] == 1  # "mirrored" is never asked of B before the outage

        failures: list[str] = []
        answered = [0]
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=str(b.base_url), timeout=30) as client:
                while not stop.is_set():
                    response = classify(client, "cached")
                    if response.status_code != 200:
                        failures.append(response.text)
                    answered[0] += 1

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            eventually(lambda: answered[0] > 0, 10.0, "traffic to flow")
            redis_server.stop()
            answered_before_outage = answered[0]
            for client in (a, b):
                eventually(lambda c=client: c.get("/ready").json()["status"] == "degraded", 3.0, "degraded")
                ready = client.get("/ready")
                assert ready.status_code == 200  # still serving: a load balancer keeps it
                assert "Redis" in ready.json()["reason"]
            assert_same_scores(served(b, "mirrored")[1], expected["mirrored"])  # from the disk mirror
            assert metric(b, "softserve_prompt_loads_total", source="disk") == 1
            refused = upload(a, "cached", new_prompt(tiny, 9))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "store_unavailable"
            assert "Retry-After" in refused.headers
            assert a.post("/v1/prompts/cached/activate", json={"version": 1}).status_code == 503
            assert a.delete("/v1/prompts/mirrored").status_code == 503
            assert_same_scores(served(a, "cached")[1], expected["cached"])
            eventually(lambda: answered[0] > answered_before_outage, 10.0, "traffic to flow while Redis is down")
            redis_server.start()
            for client in (a, b):
                eventually(lambda c=client: c.get("/ready").json()["status"] == "ready", 5.0, "ready again")
        finally:
            stop.set()
            worker.join()
        assert failures == []

        eventually(lambda: upload(a, "cached", new_prompt(tiny, 9)).status_code == 201, 3.0, "uploads work again")
        eventually(lambda: served(b, "cached")[0] == 2, HOT_LOAD_LIMIT_S, "B serves the new version")
        assert_same_scores(served(b, "cached")[1], served(a, "cached")[1])
        assert metric(b, "softserve_registry_store_up") == 1


def test_a_replica_started_without_redis_serves_the_mirror_then_rebuilds_a_redis_that_lost_its_data(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = replica(tmp_path, redis_server)
    with serving(tiny, settings) as (a,):
        for version in (1, 2):
            assert upload(a, "sst2", new_prompt(tiny, version)).status_code == 201
        expected = served(a, "sst2")
    redis_server.stop()
    for path in redis_server.data_dir.glob("appendonlydir/*"):
        path.unlink()  # Redis comes back empty
    with serving(tiny, settings) as (b,):
        assert b.get("/ready").json()["status"] == "degraded"
        assert served(b, "sst2") == expected  # from the disk mirror
        assert upload(b, "sst2", new_prompt(tiny, 3)).status_code == 503
        redis_server.start()
        eventually(lambda: b.get("/ready").json()["status"] == "ready", 5.0, "ready once Redis is back")
        assert redis_server.client().exists("softserve:task:default:sst2")  # rebuilt from the mirror
        assert upload(b, "sst2", new_prompt(tiny, 3)).json()["version"] == 3  # history continues
        assert served(b, "sst2")[0] == 3


def test_preload_tasks_name_a_tenant_or_the_default_one() -> None:
    settings = Settings(preload_tasks=" sst2, acme/rte ,")
    assert preload_task_keys(settings) == [("default", "sst2"), ("acme", "rte")]


def test_a_small_cache_evicts_yet_every_task_answers_as_with_a_large_one(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    """~4 prompts fit in the small cache; 12 tasks of several lengths take turns; "t0" is pinned."""
    tasks = [f"t{i}" for i in range(12)]
    large = replica(tmp_path, redis_server)
    small = replica(tmp_path, redis_server, prompt_cache_mb=4 * 20 * tiny.d_model * 4 / 2**20, preload_tasks="t0")
    with serving(tiny, large) as (a,):
        for i, task in enumerate(tasks):
            assert upload(a, task, new_prompt(tiny, seed=i, length=5 + i)).status_code == 201
        expected = {task: served(a, task) for task in tasks}
        with serving(tiny, small) as (b,):
            assert metric(b, "softserve_prompt_cache_prompts") == 1  # t0, preloaded before any request
            for _ in range(2):
                for task in tasks:
                    version, scores = served(b, task)
                    assert version == expected[task][0]
                    assert_same_scores(scores, expected[task][1])
            evictions = metric(b, "softserve_prompt_cache_evictions_total")
            loads = metric(b, "softserve_prompt_loads_total", source="redis")
            assert evictions >= 11 and loads >= 22
            assert metric(b, "softserve_prompt_cache_bytes") <= 4 * 20 * tiny.d_model * 4
            served(b, "t0")  # pinned: still resident after all that traffic
            assert metric(b, "softserve_prompt_loads_total", source="redis") == loads
            served(b, "t1")  # not pinned: evicted long ago
            assert metric(b, "softserve_prompt_loads_total", source="redis") == loads + 1

            # A new version of a pinned task is loaded (and pinned) as soon as the notice arrives.
            assert upload(a, "t0", new_prompt(tiny, seed=50)).status_code == 201
            eventually(
                lambda: metric(b, "softserve_prompt_loads_total", source="redis") == loads + 2, 1.0, "t0 reloaded"
            )
            assert served(b, "t0")[0] == 2
            assert metric(b, "softserve_prompt_loads_total", source="redis") == loads + 2
