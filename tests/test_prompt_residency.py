"""Prompt residency over real HTTP: pins that survive a cache flood, pin quotas, warm-up of the most used prompts at
start (disk and a real Redis), and the `loaded` / `pinned` flags of `/v1/prompts` and `/v1/models`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from prompt_store.residency import DiskResidency, RedisResidency, ResidencyStore
from server.serving.model import FrozenT5
from server.settings import Settings
from tests.prometheus import metric
from tests.redis_server import RedisServer
from tests.serving import running_server
from tests.test_hot_loading import classify, new_prompt, upload

PROMPT_LENGTH = 8


def prompt_bytes(model: FrozenT5) -> int:
    return PROMPT_LENGTH * model.d_model * 4  # float32 on the device


def cache_mb(model: FrozenT5, prompts: float) -> float:
    """A `prompt_cache_mb` that holds this many prompts."""
    return prompts * prompt_bytes(model) / 2**20


@contextmanager
def serving(settings: Settings, model: FrozenT5) -> Iterator[httpx.Client]:
    with running_server(settings, model) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def entries(client: httpx.Client) -> dict[str, dict[str, Any]]:
    response = client.get("/v1/prompts")
    assert response.status_code == 200, response.text
    return {entry["task_id"]: entry for entry in response.json()["prompts"]}


def lookups(client: httpx.Client, tier: str, result: str) -> float:
    return metric(client, "softserve_prompt_lookups_total", tier=tier, result=result)


def upload_tasks(client: httpx.Client, model: FrozenT5, task_ids: list[str]) -> None:
    for seed, task_id in enumerate(task_ids):
        assert upload(client, task_id, new_prompt(model, seed, PROMPT_LENGTH)).status_code == 201


def test_pinned_prompt_survives_a_flood_that_evicts_every_other_prompt(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2, prompt_cache_mb=cache_mb(tiny, 3))
    flood = [f"flood-{i}" for i in range(8)]
    with serving(settings, tiny) as client:
        upload_tasks(client, tiny, ["kept", *flood])
        pinned = client.put("/v1/prompts/kept/pin")
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["pinned"] and pinned.json()["loaded"]
        for task_id in flood:
            assert classify(client, task_id).status_code == 200
        listed = entries(client)
        assert listed["kept"]["loaded"] and listed["kept"]["pinned"]
        # room for 2 unpinned prompts beside the pinned one: every flood prompt but the last 2 was evicted
        assert [t for t in flood if listed[t]["loaded"]] == flood[-2:]
        assert metric(client, "softserve_prompt_cache_evictions_total") == len(flood) - 2
        hits = lookups(client, "device", "hit")
        assert classify(client, "kept").status_code == 200
        assert lookups(client, "device", "hit") == hits + 1
        assert metric(client, "softserve_prompt_cache_pinned_prompts") == 1

        assert client.delete("/v1/prompts/kept/pin").json()["pinned"] is False
        for task_id in flood[:3]:
            assert classify(client, task_id).status_code == 200
        assert not entries(client)["kept"]["loaded"]  # unpinned: evicted like any other


def test_pin_quota_and_cache_budget_refusals(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        max_wait_ms=2,
        prompt_cache_mb=cache_mb(tiny, 2.5),
        max_pinned_per_tenant=2,
        preload_tasks=["configured"],
    )
    with serving(settings, tiny) as client:
        upload_tasks(client, tiny, ["a", "b", "c"])
        assert client.put("/v1/prompts/a/pin").status_code == 200
        assert client.put("/v1/prompts/a/pin").status_code == 200  # pinning again is no new pin
        assert client.put("/v1/prompts/b/pin").status_code == 200
        refused = client.put("/v1/prompts/c/pin")
        assert refused.status_code == 429, refused.text
        assert "quota of 2 pinned tasks" in refused.text
        assert not entries(client)["c"]["pinned"]

        assert client.delete("/v1/prompts/b/pin").status_code == 200
        assert upload(client, "big", new_prompt(tiny, 9, length=2 * PROMPT_LENGTH)).status_code == 201
        too_big = client.put("/v1/prompts/big/pin")  # 2 prompts' bytes; 1.5 left beside `a`
        assert too_big.status_code == 422, too_big.text
        assert "bytes left beside the prompts pinned already" in too_big.text
        assert client.put("/v1/prompts/c/pin").status_code == 200

        assert client.put("/v1/prompts/missing/pin").status_code == 404
        assert client.delete("/v1/prompts/a").status_code == 204
        assert upload(client, "a", new_prompt(tiny, 8)).status_code == 201
        assert entries(client)["a"]["pinned"] is False  # deleting a task unpinned it
        assert upload(client, "configured", new_prompt(tiny, 7)).status_code == 201
        assert client.delete("/v1/prompts/configured/pin").status_code == 422  # the settings pin it


def test_models_loaded_flag_flips_when_a_request_loads_the_prompt(tmp_path: Path, tiny: FrozenT5) -> None:
    with serving(Settings(data_dir=tmp_path / "data", max_wait_ms=2, warmup_prompts=0), tiny) as client:
        upload_tasks(client, tiny, ["sentiment"])

        def card() -> dict[str, Any]:
            cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
            single = client.get("/v1/models/sentiment").json()
            assert (single["loaded"], single["pinned"]) == (cards["sentiment"]["loaded"], cards["sentiment"]["pinned"])
            return cards["sentiment"]

        assert (card()["loaded"], card()["pinned"]) == (False, False)
        assert classify(client, "sentiment").status_code == 200
        assert (card()["loaded"], card()["pinned"]) == (True, False)
        assert client.put("/v1/prompts/sentiment/pin").status_code == 200
        assert card()["pinned"] is True


def test_restarted_replica_serves_its_most_used_prompts_from_the_cache(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2, warmup_prompts=2)
    with serving(settings, tiny) as client:
        upload_tasks(client, tiny, ["busy", "steady", "rare"])
        for task_id, uses in (("busy", 3), ("steady", 2), ("rare", 1)):
            for _ in range(uses):
                assert classify(client, task_id).status_code == 200
    # stopping flushed the use counts to the store; the new replica warms the 2 most used before /ready
    with serving(settings, tiny) as client:
        assert lookups(client, "disk", "hit") == 2  # the warm-up's loads
        hits, misses = lookups(client, "device", "hit"), lookups(client, "device", "miss")
        listed = entries(client)
        assert {t for t, e in listed.items() if e["loaded"]} == {"busy", "steady"}
        assert classify(client, "busy").status_code == 200
        assert classify(client, "steady").status_code == 200
        assert (lookups(client, "device", "hit"), lookups(client, "device", "miss")) == (hits + 2, misses)
        assert classify(client, "rare").status_code == 200
        assert (lookups(client, "device", "miss"), lookups(client, "disk", "hit")) == (misses + 1, 3)


def test_pins_and_warm_up_are_shared_through_redis(tmp_path: Path, tiny: FrozenT5, redis_server: RedisServer) -> None:
    def replica(name: str) -> Settings:
        return Settings(
            store="redis",
            redis_url=redis_server.url,
            data_dir=tmp_path / name,  # nothing shared but Redis
            max_wait_ms=2,
            warmup_prompts=1,
            prompt_cache_mb=cache_mb(tiny, 4),
        )

    with serving(replica("first"), tiny) as first:
        upload_tasks(first, tiny, ["pinned", "used", "idle"])
        assert first.put("/v1/prompts/pinned/pin").status_code == 200
        for _ in range(2):
            assert classify(first, "used").status_code == 200
    with serving(replica("second"), tiny) as second:
        listed = entries(second)
        assert (listed["pinned"]["pinned"], listed["pinned"]["loaded"]) == (True, True)
        assert (listed["used"]["pinned"], listed["used"]["loaded"]) == (False, True)
        assert listed["idle"]["loaded"] is False
        assert lookups(second, "redis", "hit") == 2  # the pin's preload and the warm-up
        hits, misses = lookups(second, "device", "hit"), lookups(second, "device", "miss")
        assert classify(second, "used").status_code == 200
        assert (lookups(second, "device", "hit"), lookups(second, "device", "miss")) == (hits + 1, misses)


@pytest.fixture(params=["disk", "redis"])
def residency(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResidencyStore]:
    if request.param == "disk":
        yield DiskResidency(tmp_path / "residency")
        return
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield RedisResidency(server.client(), "softserve")
    finally:
        server.stop()


def test_residency_store_round_trip_and_bounded_use_counts(
    residency: ResidencyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert residency.pins() == set() and residency.most_used(5) == []
    residency.pin("acme", "a")
    residency.pin("acme", "b")
    residency.unpin("acme", "a")
    assert residency.pins() == {("acme", "b")}

    monkeypatch.setattr("prompt_store.residency.MAX_USAGE_ENTRIES", 2)
    residency.add_usage({("acme", "a"): 1, ("acme", "b"): 5})
    residency.add_usage({("acme", "a"): 3, ("beta", "c"): 2})
    assert residency.most_used(5) == [("acme", "b"), ("acme", "a")]  # `c` was the least used past 2 entries
    assert residency.most_used(1) == [("acme", "b")]
    assert residency.most_used(0) == []
