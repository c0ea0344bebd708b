"""Listings that scale, over real HTTP (the disk store, and Redis on a real redis-server): `/v1/prompts` and
`/v1/models` page through the stores' index of task ids and read only their own records; every authenticated
route draws from a rate limit; tenants have a task quota by default; `similar` keeps task embeddings per tenant.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
import redis

from prompt_store import DiskStore, RedisStore, SoftPrompt, TaskRecord
from prompt_store.disk import TASK_FILE
from server.client import LIST_PAGE_SIZE, AsyncSoftserveClient, SoftserveClient
from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.testing.reference import random_prompt
from tests.redis_server import RedisServer
from tests.serving import running_server

LARGE_TENANT_TASKS = 1500
PAGE = 100


class CountingDiskStore(DiskStore):
    """A real disk store that counts the records and prompts it reads (every store a server opens is kept in
    `opened`, so a test can read the counts of its server's)."""

    opened: ClassVar[list[CountingDiskStore]] = []

    def __init__(self, root: Path | str) -> None:
        super().__init__(root)
        self.records_read = 0
        self.prompts_read = 0
        CountingDiskStore.opened.append(self)

    def get_task(self, tenant: str, task_id: str) -> TaskRecord:
        self.records_read += 1
        return super().get_task(tenant, task_id)

    def load_prompt(self, tenant: str, task_id: str, version: int) -> SoftPrompt:
        self.prompts_read += 1
        return super().load_prompt(tenant, task_id, version)


@pytest.fixture
def counting_store(monkeypatch: pytest.MonkeyPatch) -> Callable[[], CountingDiskStore]:
    """Servers started in the test open `CountingDiskStore`s; returns the last one opened."""
    CountingDiskStore.opened = []
    monkeypatch.setattr("server.backend.DiskStore", CountingDiskStore)
    return lambda: CountingDiskStore.opened[-1]


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeding thousands of tasks need not wait for the disk: durability is not what these tests measure."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def seed(store: DiskStore | RedisStore, tenant: str, task_ids: list[str], d_model: int) -> None:
    for i, task_id in enumerate(task_ids):
        store.add_version(tenant, task_id, SoftPrompt(random_prompt(2, d_model, seed=i)))


def seed_records(store: DiskStore, tenant: str, task_ids: list[str]) -> None:
    """Tasks with a record and no version yet, written straight into the disk store's layout: 10,000 of them in
    about a second (through `add_version`, each also writes and hashes a prompt file)."""
    for task_id in task_ids:
        directory = store.root / tenant / task_id
        directory.mkdir(parents=True)
        (directory / TASK_FILE).write_text(TaskRecord(tenant=tenant, task_id=task_id).model_dump_json())


def task_names(count: int, prefix: str = "task") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(count)]


def prompt_file(seed_: int, d_model: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, random_prompt(2, d_model, seed=seed_).numpy())
    return buffer.getvalue()


def store_settings(tmp_path: Path, store: str, redis_url: str, **overrides: Any) -> Settings:
    fields = {"data_dir": tmp_path / "data", "max_wait_ms": 2, "store": store, "redis_url": redis_url}
    return Settings(**(fields | overrides))


def seeding_store(settings: Settings) -> DiskStore | RedisStore:
    """A store on the server's own data (its disk, or its Redis and mirror), for seeding before it starts."""
    disk = DiskStore(settings.data_dir / "prompts")
    return RedisStore(settings.redis_url, disk, settings.redis_namespace) if settings.store == "redis" else disk


@pytest.fixture(params=["disk", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def redis_url(store_kind: str, request: pytest.FixtureRequest) -> str:
    """A real redis-server for the Redis runs (none is started for the disk ones)."""
    if store_kind != "redis":
        return "redis://127.0.0.1:1/0"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


# Pages


def walk(client: httpx.Client, path: str, items: str, key: str, limit: int, between: Callable[[], None]) -> list[str]:
    """Every page of a listing, following `next_cursor`; `between` runs between two pages."""
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        response = client.get(path, params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body[items]) <= limit
        seen += [item[key] for item in body[items]]
        cursor = body["next_cursor"]
        assert body["has_more"] == (cursor is not None)
        if cursor is None:
            return seen
        between()


@pytest.mark.parametrize(
    ("path", "items", "key"), [("/v1/prompts", "prompts", "task_id"), ("/v1/models", "data", "id")]
)
def test_pages_walk_every_task_once_while_tasks_are_added(
    tmp_path: Path, tiny: FrozenT5, no_fsync: None, store_kind: str, redis_url: str, path: str, items: str, key: str
) -> None:
    settings = store_settings(tmp_path, store_kind, redis_url, rate_limit_management_cost_per_s=0)
    stored = task_names(230, "m")
    seed(seeding_store(settings), "default", stored, tiny.d_model)
    added: list[str] = []
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as client:

        def add_before_and_after_the_cursor() -> None:
            for name in (f"a{len(added):03d}", f"z{len(added):03d}"):
                response = client.put(f"/v1/prompts/{name}", files={"file": ("p.npy", prompt_file(1, tiny.d_model))})
                assert response.status_code == 201, response.text
                added.append(name)

        seen = walk(client, path, items, key, 40, add_before_and_after_the_cursor)
    assert len(seen) == len(set(seen)), "a task was listed twice"
    assert seen == sorted(seen)
    assert set(stored) <= set(seen)  # every task that existed throughout, exactly once
    assert {name for name in added if name.startswith("z")} <= set(seen)  # those added ahead of the cursor too
    assert not {name for name in added if name.startswith("a")} & set(seen)  # those behind it wait for a new walk


def test_a_page_reads_only_its_own_records_from_a_disk_store(
    tmp_path: Path, tiny: FrozenT5, no_fsync: None, counting_store: Callable[[], CountingDiskStore]
) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2)
    seed(DiskStore(settings.data_dir / "prompts"), "default", task_names(LARGE_TENANT_TASKS), tiny.d_model)
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as client:
        store = counting_store()
        first = client.get("/v1/prompts", params={"limit": PAGE}).json()
        assert (len(first["prompts"]), store.records_read) == (PAGE, PAGE)
        second = client.get("/v1/models", params={"limit": PAGE, "cursor": first["next_cursor"]}).json()
        assert [card["id"] for card in second["data"]] == task_names(2 * PAGE)[PAGE:]
        assert store.records_read == 2 * PAGE
        client.get("/v1/models", params={"limit": PAGE})  # records listed before are the registry's, kept current
        assert store.records_read == 2 * PAGE


def test_a_page_reads_only_its_own_records_from_redis(
    tmp_path: Path, tiny: FrozenT5, no_fsync: None, redis_server: RedisServer
) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2, store="redis", redis_url=redis_server.url)
    seed(seeding_store(settings), "default", task_names(LARGE_TENANT_TASKS), tiny.d_model)
    watcher = redis_server.client()
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_until_synced(client)
        watcher.config_resetstat()
        page = client.get("/v1/prompts", params={"limit": PAGE}).json()
        assert len(page["prompts"]) == PAGE and page["has_more"]
        assert hgetall_calls(watcher) == PAGE  # one record per task listed, none of the other 1,400


def wait_until_synced(client: httpx.Client, timeout_s: float = 60) -> None:
    """Until `/ready` says "ready", not "degraded": the first sync with Redis (which compares every task with the
    disk mirror) is over, so what Redis counts next is the listing's."""
    deadline = time.monotonic() + timeout_s
    while client.get("/ready").json()["status"] != "ready":
        assert time.monotonic() < deadline, "the replica never synced with Redis"
        time.sleep(0.05)


def hgetall_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


def test_an_index_written_before_it_existed_is_rebuilt_from_the_task_set(redis_server: RedisServer) -> None:
    """Redis data from before the index (or from a replica that predates it): the first listing rebuilds it."""
    store = RedisStore(redis_server.url)
    seed(store, "acme", ["b", "a", "c"], 8)
    redis_server.client().delete("softserve:task-index:acme")
    assert store.task_ids("acme") == ["a", "b", "c"]
    assert store.task_ids("acme", after="a", limit=1) == ["b"]
    assert [r.task_id for r in store.list_tasks("acme")] == ["a", "b", "c"]
    store.delete_task("acme", "b")
    assert (store.task_ids("acme"), store.count_tasks("acme")) == (["a", "c"], 2)


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "not-a-cursor"},
        {"cursor": "YWZ0ZXI6Li4v"},  # "after:../": a cursor's form around an id no task may have
        {"cursor": "x" * 201},
        {"limit": 0},
        {"limit": 1001},
        {"limit": "ten"},
    ],
)
def test_a_bad_cursor_or_limit_is_a_clear_422(client: httpx.Client, params: dict[str, Any]) -> None:
    for path in ("/v1/prompts", "/v1/models"):
        response = client.get(path, params=params)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] in ("query.cursor", "query.limit")  # as FastAPI names them


# Rate limits and quota


@pytest.fixture
def two_tenants(tmp_path: Path, tiny: FrozenT5) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """A server whose management budget is 3 a second per tenant, refusals answered after 300 ms."""
    settings = Settings(
        data_dir=tmp_path / "data", max_wait_ms=2, rate_limit_management_cost_per_s=3, shed_delay_ms=300
    )
    keys = ApiKeys(settings.keys_file)
    heavy_key, light_key = keys.add("heavy"), keys.add("light")
    seed(DiskStore(settings.data_dir / "prompts"), "heavy", ["t", "u"], tiny.d_model)
    seed(DiskStore(settings.data_dir / "prompts"), "light", ["t"], tiny.d_model)
    with running_server(settings, tiny) as url:
        clients = [
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            for key in (heavy_key, light_key)
        ]
        yield clients[0], clients[1]
        for client in clients:
            client.close()


def test_every_listing_route_draws_from_the_management_rate_limit(
    two_tenants: tuple[httpx.Client, httpx.Client],
) -> None:
    heavy, light = two_tenants
    routes = ["/v1/prompts", "/v1/models", "/v1/prompts/t/similar"] * 4  # 4 of each: more than a budget of 3 admits

    def timed_get(path: str) -> tuple[str, httpx.Response, float]:
        started = time.perf_counter()
        response = heavy.get(path)
        return path, response, time.perf_counter() - started

    with ThreadPoolExecutor(len(routes)) as pool:
        answers = list(pool.map(timed_get, routes))
    assert {response.status_code for _, response, _ in answers} == {200, 429}
    limited = [(path, response, seconds) for path, response, seconds in answers if response.status_code == 429]
    assert {path for path, _, _ in limited} == set(routes)  # each route is limited, none is exempt
    for _, response, seconds in limited:
        assert response.json()["error"]["code"] == "rate_limited"
        assert "management cost units" in response.json()["error"]["message"]
        assert int(response.headers["Retry-After"]) >= 1
        assert seconds >= 0.3  # answered after `shed_delay_ms`: a client looping on 429s waits
    assert light.get("/v1/models").status_code == 200  # another tenant's budget is its own
    body = {"task_id": "t", "inputs": "x", "parameters": {"max_new_tokens": 1}}
    assert heavy.post("/v1/generate", json=body).status_code == 200  # inference has a budget of its own


def test_tenants_have_a_task_quota_by_default(
    tmp_path: Path, tiny: FrozenT5, counting_store: Callable[[], CountingDiskStore]
) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2)
    assert settings.max_tasks_per_tenant == 10_000
    seed_records(DiskStore(settings.data_dir / "prompts"), "default", task_names(10_000))
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as client:

        def put(task_id: str) -> httpx.Response:
            return client.put(f"/v1/prompts/{task_id}", files={"file": ("p.npy", prompt_file(0, tiny.d_model))})

        refused = put("one-more")
        assert refused.status_code == 429 and "quota of 10000 tasks" in refused.json()["error"]["message"]
        assert put("task00042").status_code == 201  # a new version of a stored task is not a new task
        assert counting_store().records_read <= 3  # each upload reads its own task; the count reads none of 10,000


# Similar tasks


def test_similar_keeps_task_embeddings_per_tenant_within_its_bound(
    tmp_path: Path, tiny: FrozenT5, counting_store: Callable[[], CountingDiskStore]
) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2, similar_embeddings_per_tenant=4)
    keys = ApiKeys(settings.keys_file)
    owner_key, crowd_key = keys.add("owner"), keys.add("crowd")
    seed(DiskStore(settings.data_dir / "prompts"), "owner", task_names(3), tiny.d_model)
    seed(DiskStore(settings.data_dir / "prompts"), "crowd", task_names(10), tiny.d_model)
    with running_server(settings, tiny) as url:
        owner, crowd = (
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            for key in (owner_key, crowd_key)
        )
        store = counting_store()

        def similar(client: httpx.Client) -> tuple[int, int]:
            """How many records and prompts one ranking read from the store."""
            records, prompts = store.records_read, store.prompts_read
            response = client.get("/v1/prompts/task00000/similar", params={"k": 20})
            assert response.status_code == 200, response.text
            return store.records_read - records, store.prompts_read - prompts

        assert similar(owner) == (3, 3)
        assert similar(crowd) == (10, 10)
        assert similar(owner) == (0, 0)  # the crowd's tasks evicted none of the owner's
        assert similar(crowd) == (0, 10 - 4)  # past its bound of 4, a tenant's ranking reads its own prompts again
        owner.close()
        crowd.close()


def test_a_listing_costs_the_tasks_it_read(tmp_path: Path, tiny: FrozenT5) -> None:
    """A page of 50 tasks costs 51 of a budget of 60: the second overdraws it, the third is refused. A tenant with
    one task lists ten times meanwhile: its budget is its own, and its listings cost 2 each."""
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2, rate_limit_management_cost_per_s=60)
    keys = ApiKeys(settings.keys_file)
    large_key, small_key = keys.add("large"), keys.add("small")
    seed_records(DiskStore(settings.data_dir / "prompts"), "large", task_names(50))
    seed_records(DiskStore(settings.data_dir / "prompts"), "small", task_names(1))
    with running_server(settings, tiny) as url:
        large, small = (
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            for key in (large_key, small_key)
        )
        statuses = [large.get("/v1/prompts", params={"limit": 50}).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert {small.get("/v1/models").status_code for _ in range(10)} == {200}
        large.close()
        small.close()


def test_the_clients_and_the_cli_list_every_page(tmp_path: Path, tiny: FrozenT5) -> None:
    """More tasks than the largest page: `list_prompts()` (sync and async) and `softserve prompts list` follow the
    cursors to the last page."""
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2, rate_limit_management_cost_per_s=0)
    names = task_names(LIST_PAGE_SIZE + 200)
    seed_records(DiskStore(settings.data_dir / "prompts"), "default", names)
    with running_server(settings, tiny) as url:
        with SoftserveClient(url) as client:
            assert [p["task_id"] for p in client.list_prompts()] == names
            first = client.list_prompts_page(limit=3)
            assert [p["task_id"] for p in first["prompts"]] == names[:3] and first["has_more"]

        async def list_async() -> list[str]:
            async with AsyncSoftserveClient(url) as client:
                return [p["task_id"] for p in await client.list_prompts()]

        assert asyncio.run(list_async()) == names
        command = [sys.executable, "-m", "server.cli", "prompts", "list", "--url", url]
        listed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
        assert [p["task_id"] for p in json.loads(listed.stdout)] == names
