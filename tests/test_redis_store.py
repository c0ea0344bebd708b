"""The Redis backend on a real redis-server: records, versions, atomicity, notices, durability, the disk
mirror and the rebuild from it, and behaviour while Redis is down."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import torch

from prompt_store import (
    DiskStore,
    RedisStore,
    SoftPrompt,
    StoreUnavailable,
    TaskMetadata,
    TaskNotFound,
    TaskRecord,
    VersionNotFound,
)
from server.testing.reference import random_prompt
from tests.redis_server import RedisServer

D = 16


def prompt(seed: int, length: int = 4) -> SoftPrompt:
    return SoftPrompt(random_prompt(length, D, seed=seed))


@pytest.fixture
def mirror(tmp_path: Path) -> DiskStore:
    return DiskStore(tmp_path / "mirror")


@pytest.fixture
def store(redis_server: RedisServer, mirror: DiskStore) -> Iterator[RedisStore]:
    store = RedisStore(redis_server.url, mirror, retry_interval_s=0.2)
    store.ensure_populated()
    yield store
    store.close()


def assert_same_prompt(a: SoftPrompt, b: SoftPrompt) -> None:
    assert a.sha256 == b.sha256
    assert torch.equal(a.embeddings, b.embeddings)


def snapshot(store: RedisStore | DiskStore) -> dict[tuple[str, str], TaskRecord]:
    return {(t, r.task_id): r for t in store.list_tenants() for r in store.list_tasks(t)}


def fill(store: RedisStore) -> dict[tuple[str, str, int], SoftPrompt]:
    """Two tenants, three tasks, several versions, one activation back: returns every stored prompt."""
    written = {}
    plan = [("acme", "sst2", 3), ("acme", "rte", 2), ("globex", "sst2", 2)]
    for seed, (tenant, task_id, versions) in enumerate(plan):
        for v in range(1, versions + 1):
            p = prompt(seed * 10 + v, length=v + 2)
            meta = TaskMetadata(labels=["yes", "no"], description=f"{task_id} v{v}") if v == 1 else None
            store.add_version(tenant, task_id, p, meta, model="tiny")
            written[(tenant, task_id, v)] = p
    store.activate("acme", "sst2", 2)
    return written


def test_versions_active_version_and_metadata(store: RedisStore) -> None:
    first, second, third = prompt(1, 3), prompt(2, 5), prompt(3, 7)
    meta = TaskMetadata(labels=["positive", "negative"], input_template="sentence: {input}", parameters={"x": 1})
    record = store.add_version("acme", "sst2", first, meta, model="tiny")
    assert record.active_version == 1 and [v.version for v in record.versions] == [1]
    store.add_version("acme", "sst2", second, TaskMetadata(description="v2"))
    record = store.add_version("acme", "sst2", third, activate=False)
    assert record.active_version == 2
    assert [(v.version, v.length, v.d_model) for v in record.versions] == [(1, 3, D), (2, 5, D), (3, 7, D)]
    assert [v.sha256 for v in record.versions] == [first.sha256, second.sha256, third.sha256]
    assert record.versions[0].model == "tiny"
    # Metadata merges field by field, as the disk store does.
    assert record.metadata == TaskMetadata(
        labels=["positive", "negative"], description="v2", input_template="sentence: {input}", parameters={"x": 1}
    )
    assert store.get_task("acme", "sst2") == record
    for version, expected in enumerate([first, second, third], start=1):
        assert_same_prompt(store.load_prompt("acme", "sst2", version), expected)
    assert store.activate("acme", "sst2", 1).active_version == 1
    assert store.get_task("acme", "sst2").updated_at > record.updated_at


def test_unknown_tasks_and_versions(store: RedisStore) -> None:
    store.add_version("acme", "sst2", prompt(1))
    with pytest.raises(TaskNotFound):
        store.get_task("acme", "nope")
    with pytest.raises(TaskNotFound):
        store.load_prompt("acme", "nope", 1)
    with pytest.raises(VersionNotFound):
        store.load_prompt("acme", "sst2", 2)
    with pytest.raises(VersionNotFound):
        store.activate("acme", "sst2", 2)
    with pytest.raises(TaskNotFound):
        store.activate("acme", "nope", 1)
    with pytest.raises(TaskNotFound):
        store.delete_task("acme", "nope")
    with pytest.raises(TaskNotFound):
        store.get_task("acme", "bad:id")


def test_tenants_are_separate_namespaces(store: RedisStore, redis_server: RedisServer) -> None:
    store.add_version("acme", "sst2", prompt(1))
    store.add_version("globex", "sst2", prompt(2))
    assert store.load_prompt("acme", "sst2", 1).sha256 != store.load_prompt("globex", "sst2", 1).sha256
    store.delete_task("acme", "sst2")
    with pytest.raises(TaskNotFound):
        store.get_task("acme", "sst2")
    assert store.get_task("globex", "sst2").active_version == 1
    assert [r.task_id for r in store.list_tasks("globex")] == ["sst2"]
    assert store.list_tasks("acme") == []
    # Another namespace on the same Redis sees nothing of this one.
    other = RedisStore(redis_server.url, namespace="other")
    other.ensure_populated()
    assert other.list_tasks("globex") == []
    other.close()
    keys = {k.decode() for k in redis_server.client().keys("*")}
    assert keys == {
        "other:populated",
        "softserve:populated",
        "softserve:tenants",
        "softserve:tasks:globex",
        "softserve:task-index:globex",
        "softserve:task:globex:sst2",
        "softserve:prompts:globex:sst2",
    }


def test_prompt_bytes_are_stored_exactly(store: RedisStore) -> None:
    """Binary-safe: every float bit pattern (zeros, negative zero, tiny, huge, bytes like \\r\\n) survives."""
    values = torch.tensor([0.0, -0.0, 1e-45, 3.4e38, -1234.5, 1.0e3, float.fromhex("0x1.0d0a0dp-3"), 7.0])
    p = SoftPrompt(torch.cat([values.view(2, 4).repeat(1, 4), random_prompt(3, D, seed=9, scale=1000.0)]))
    store.add_version("acme", "bits", p)
    loaded = store.load_prompt("acme", "bits", 1)
    assert loaded.embeddings.numpy().tobytes() == p.embeddings.numpy().tobytes()


def test_concurrent_writers_on_two_replicas_never_share_a_version(
    redis_server: RedisServer, mirror: DiskStore, store: RedisStore
) -> None:
    other = RedisStore(redis_server.url, mirror)
    prompts = [prompt(100 + i) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(lambda i: (store, other)[i % 2].add_version("acme", "race", prompts[i]), range(24)))
    other.close()
    record = store.get_task("acme", "race")
    assert [v.version for v in record.versions] == list(range(1, 25))
    by_sha = {v.sha256: v.version for v in record.versions}
    for returned, p in zip(records, prompts, strict=True):
        version = by_sha[p.sha256]
        assert returned.version_info(version) is not None  # each caller got back the record with its version
        assert_same_prompt(store.load_prompt("acme", "race", version), p)
    # The shared mirror ends equal to Redis whatever order the writers mirrored in.
    assert mirror.get_task("acme", "race") == record
    for v in range(1, 25):
        assert_same_prompt(mirror.load_prompt("acme", "race", v), store.load_prompt("acme", "race", v))


def test_every_change_is_written_through_to_the_mirror(store: RedisStore, mirror: DiskStore) -> None:
    written = fill(store)
    assert snapshot(mirror) == snapshot(store)
    for (tenant, task_id, version), p in written.items():
        assert_same_prompt(mirror.load_prompt(tenant, task_id, version), p)
    store.delete_task("acme", "rte")
    with pytest.raises(TaskNotFound):
        mirror.get_task("acme", "rte")
    assert snapshot(mirror) == snapshot(store)


def test_every_change_is_published(store: RedisStore, redis_server: RedisServer) -> None:
    pubsub = redis_server.client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(store.channel)
    assert pubsub.get_message(timeout=1) is None  # the subscribe confirmation is skipped
    added = store.add_version("acme", "sst2", prompt(1))
    store.add_version("acme", "sst2", prompt(2))
    activated = store.activate("acme", "sst2", 1)
    store.delete_task("acme", "sst2")
    notices = []
    while len(notices) < 4 and (message := pubsub.get_message(timeout=2)) is not None:
        notices.append(json.loads(message["data"]))
    pubsub.close()
    assert [(n["event"], n.get("version")) for n in notices] == [
        ("version", 1),
        ("version", 2),
        ("activate", 1),
        ("delete", None),
    ]
    assert all((n["tenant"], n["task_id"]) == ("acme", "sst2") for n in notices)
    # The stamp in a notice is the record's updated_at, so a replica can tell whether it is already current.
    assert float(notices[0]["updated_at"]) == added.updated_at
    assert float(notices[2]["updated_at"]) == activated.updated_at


def test_everything_survives_a_redis_restart(store: RedisStore, redis_server: RedisServer) -> None:
    written = fill(store)
    before = snapshot(store)
    redis_server.restart()  # AOF on, RDB off: only the append-only file can bring the data back
    assert snapshot(store) == before
    for (tenant, task_id, version), p in written.items():
        source_prompt, source = store.load_prompt_traced(tenant, task_id, version)
        assert source == "redis"
        assert_same_prompt(source_prompt, p)
    assert store.add_version("acme", "rte", prompt(99)).active_version == 3


def test_a_crash_loses_at_most_the_last_second(store: RedisStore, redis_server: RedisServer) -> None:
    fill(store)
    before = snapshot(store)
    time.sleep(1.5)  # appendfsync everysec
    redis_server.kill()
    redis_server.start()
    assert snapshot(store) == before


def test_redis_is_rebuilt_from_the_mirror_when_it_lost_its_data(
    store: RedisStore, redis_server: RedisServer, mirror: DiskStore
) -> None:
    written = fill(store)
    before = snapshot(store)
    store.delete_task("globex", "sst2")
    del before[("globex", "sst2")]
    redis_server.client().flushall()
    assert store.ensure_populated() == 2
    assert snapshot(store) == before
    for (tenant, task_id, version), p in written.items():
        if tenant == "acme":
            assert_same_prompt(store.load_prompt(tenant, task_id, version), p)
    # Versions continue after the restored ones; a second rebuild changes nothing.
    assert [v.version for v in store.add_version("acme", "sst2", prompt(50)).versions] == [1, 2, 3, 4]
    assert store.ensure_populated() == 0
    assert snapshot(mirror) == snapshot(store)


def test_a_write_to_an_emptied_redis_rebuilds_it_first(store: RedisStore, redis_server: RedisServer) -> None:
    fill(store)
    redis_server.client().flushall()
    record = store.add_version("acme", "sst2", prompt(77))
    assert [v.version for v in record.versions] == [1, 2, 3, 4]  # never restarts at 1 over lost history
    assert store.get_task("acme", "rte").active_version == 2


@pytest.mark.timing
def test_while_redis_is_down_reads_use_the_mirror_and_writes_are_refused(
    store: RedisStore, redis_server: RedisServer
) -> None:
    written = fill(store)
    before = snapshot(store)
    redis_server.stop()
    assert store.get_task("acme", "sst2") == before[("acme", "sst2")]
    assert [r.task_id for r in store.list_tasks("acme")] == ["rte", "sst2"]
    loaded, source = store.load_prompt_traced("globex", "sst2", 2)
    assert source == "disk"
    assert_same_prompt(loaded, written[("globex", "sst2", 2)])
    started = time.monotonic()
    for write in (
        lambda: store.add_version("acme", "sst2", prompt(5)),
        lambda: store.activate("acme", "sst2", 1),
        lambda: store.delete_task("acme", "rte"),
    ):
        with pytest.raises(StoreUnavailable, match="Redis is unavailable"):
            write()
    assert time.monotonic() - started < 1.0  # refused at once, not after connection retries
    assert not store.available
    redis_server.start()
    deadline = time.monotonic() + 3
    while not store.ping() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.add_version("acme", "sst2", prompt(5)).versions[-1].version == 4
    assert store.load_prompt_traced("acme", "sst2", 4)[1] == "redis"


def test_without_a_mirror_reads_fail_too_while_redis_is_down(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    store.add_version("acme", "sst2", prompt(1))  # the first write marks an empty Redis as populated
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        store.get_task("acme", "sst2")
    store.close()


def test_a_full_redis_refuses_writes_as_unavailable(store: RedisStore, redis_server: RedisServer) -> None:
    store.add_version("acme", "sst2", prompt(1))
    client = redis_server.client()
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used)  # noeviction: any write that needs memory is refused
    try:
        with pytest.raises(StoreUnavailable, match="refuses writes"):
            store.add_version("acme", "sst2", SoftPrompt(random_prompt(500, D, seed=2)))
        assert store.get_task("acme", "sst2").active_version == 1
    finally:
        client.config_set("maxmemory", 0)


def test_records_read_while_writing_are_never_half_written(store: RedisStore) -> None:
    """Readers on another thread see each task before or after a change, never in between."""
    store.add_version("acme", "sst2", prompt(0))
    stop = threading.Event()
    seen: list[TaskRecord] = []

    def read() -> None:
        while not stop.is_set():
            seen.append(store.get_task("acme", "sst2"))

    reader = threading.Thread(target=read)
    reader.start()
    for seed in range(1, 15):
        store.add_version("acme", "sst2", prompt(seed))
    stop.set()
    reader.join()
    for record in seen:
        assert record.active_version == record.versions[-1].version == len(record.versions)


@pytest.mark.timing
def test_unreachable_redis_fails_fast(tmp_path: Path) -> None:
    store = RedisStore("redis://127.0.0.1:1/0", DiskStore(tmp_path / "m"))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.add_version("acme", "sst2", prompt(1))
    with pytest.raises(TaskNotFound):  # the read falls back to the (empty) mirror
        store.get_task("acme", "sst2")
    assert time.monotonic() - started < 1.0
    with pytest.raises(redis.ConnectionError):
        store.client.ping()


def test_reads_use_the_mirror_while_redis_is_being_rebuilt(store: RedisStore, redis_server: RedisServer) -> None:
    """A Redis that lost its data must not answer "no such task" for tasks the mirror holds."""
    written = fill(store)
    redis_server.client().flushall()
    assert store.get_task("acme", "rte").active_version == 2
    assert [r.task_id for r in store.list_tasks("acme")] == ["rte", "sst2"]
    loaded, source = store.load_prompt_traced("acme", "rte", 2)
    assert source == "disk"
    assert_same_prompt(loaded, written[("acme", "rte", 2)])
    with pytest.raises(StoreUnavailable, match="rebuilt"):
        store.task_stamps([("acme", "rte")])
    store.ensure_populated()
    assert store.load_prompt_traced("acme", "rte", 2)[1] == "redis"
    assert store.task_stamps([("acme", "rte"), ("acme", "nope")])[1] is None
