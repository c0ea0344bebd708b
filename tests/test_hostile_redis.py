"""A Redis that stalls, pauses or loses writes, over real HTTP with a real redis-server (issue 9).

- A write's answer is the truth: a write answered 503 never takes effect later, however Redis stalls.
- The disk mirror equals Redis after any outage, so the next outage serves what Redis held, and a Redis
  rebuilt from the mirror neither resurrects deleted tasks nor loses versions.
- While Redis is unreachable, a version the mirror lacks is unknown (503), not missing (404).
- A stalled Redis (SIGSTOP: connections accepted, nothing answered) turns `/ready` degraded promptly.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from prompt_store import DiskStore, RedisStore, SoftPrompt, TaskMetadata, TaskRecord
from prompt_store.redis_scripts import MAX_DELETE_RECORDS as MAX_DELETES
from server.serving.model import FrozenT5
from server.testing.reference import random_prompt
from tests.prometheus import metric
from tests.redis_server import RedisServer
from tests.test_hot_loading import classify, eventually, new_prompt, replica, served, serving, upload

TaskState = tuple[TaskRecord, dict[int, str | None]]


def new_prompt_tensor(seed: int) -> torch.Tensor:
    return random_prompt(4, 16, seed=seed)


def redis_state(redis_server: RedisServer) -> dict[tuple[str, str], TaskState]:
    """Every task in Redis with the sha256 of each version it holds."""
    store = RedisStore(redis_server.url)
    try:
        return {
            (tenant, record.task_id): (record, {v.version: v.sha256 for v in record.versions})
            for tenant in store.list_tenants()
            for record in store.list_tasks(tenant)
        }
    finally:
        store.close()


def mirror_state(mirror: DiskStore) -> dict[tuple[str, str], TaskState]:
    """Every task in a disk mirror with the sha256 recorded in each of its version files."""
    return {
        (tenant, record.task_id): (record, mirror.version_hashes(tenant, record.task_id))
        for tenant in mirror.list_tenants()
        for record in mirror.list_tasks(tenant)
    }


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "store_unavailable"
    assert "Retry-After" in response.headers


def status(client: httpx.Client) -> str:
    return client.get("/ready").json()["status"]


def reconciliations(client: httpx.Client) -> float:
    return sum(metric(client, "softserve_registry_reconciles_total", trigger=t) for t in ("connect", "periodic"))


def wait_for_reconcile(client: httpx.Client) -> None:
    """Waits until this replica is healthy and has reconciled (mirror sync included) once more."""
    eventually(lambda: status(client) == "ready", 10.0, "ready again")
    done = reconciliations(client)
    eventually(lambda: reconciliations(client) > done, 10.0, "another reconciliation")


@contextmanager
def stalled(redis_server: RedisServer) -> Iterator[None]:
    redis_server.pause()
    try:
        yield
    finally:
        redis_server.resume()


def test_writes_during_a_redis_stall_answer_503_and_never_take_effect(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    mirror = DiskStore(tmp_path / "data" / "prompts")
    with serving(tiny, replica(tmp_path, redis_server, registry_reconcile_s=0.5)) as (a,):
        assert upload(a, "sst2", new_prompt(tiny, 1)).status_code == 201
        assert upload(a, "sst2", new_prompt(tiny, 2)).status_code == 201
        assert upload(a, "doomed", new_prompt(tiny, 3)).status_code == 201
        before = redis_state(redis_server)
        assert mirror_state(mirror) == before
        with stalled(redis_server):
            assert_refused(upload(a, "sst2", new_prompt(tiny, 4)))
            assert_refused(a.post("/v1/prompts/sst2/activate", json={"version": 1}))
            assert_refused(a.delete("/v1/prompts/doomed"))
        wait_for_reconcile(a)
        assert redis_state(redis_server) == before  # Redis ran what was buffered during the stall: no change
        assert mirror_state(mirror) == before
        assert served(a, "sst2")[0] == 2 and served(a, "doomed")[0] == 1
        # A refused upload leaves at most its staged bytes behind, and those expire by themselves.
        client = redis_server.client()
        assert all(client.pttl(key) > 0 for key in client.scan_iter("softserve:staged:*"))


def test_a_change_that_reaches_redis_after_its_deadline_is_refused(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    """CLIENT PAUSE WRITE holds every write command (scripts included) while reads still answer: the scripts
    run after the pause, past their deadline, and change nothing, although their connection stayed open."""
    mirror = DiskStore(tmp_path / "data" / "prompts")
    # No management budget here: its counter is a Redis write, which the pause would hold before the change is
    # even sent (the change would then reach Redis in time, and rightly succeed).
    settings = replica(tmp_path, redis_server, rate_limit_management_cost_per_s=0)
    with serving(tiny, settings) as (a,):
        for seed, task in enumerate(["sst2", "sst2", "doomed"]):
            assert upload(a, task, new_prompt(tiny, seed)).status_code == 201
        before = redis_state(redis_server)
        pause = redis_server.client()
        pause.client_pause(1500, all=False)  # longer than the 1 s deadline, shorter than the 2 s reply wait
        with ThreadPoolExecutor(2) as pool:
            activate = pool.submit(a.post, "/v1/prompts/sst2/activate", json={"version": 1})
            delete = pool.submit(a.delete, "/v1/prompts/doomed")
            late = [activate.result(), delete.result()]
        for response in late:  # sent, run by Redis after the pause, and refused by the script itself
            assert_refused(response)
            assert "did not answer in time" in response.json()["error"]["message"]
        pause.client_pause(1500, all=False)  # the first one is over: they were answered when it ended
        assert_refused(upload(a, "sst2", new_prompt(tiny, 9)))  # its staged bytes wait behind the pause
        assert redis_state(redis_server) == before
        assert mirror_state(mirror) == before
        activated = lambda: a.post("/v1/prompts/sst2/activate", json={"version": 1}).status_code == 200  # noqa: E731
        eventually(activated, 5.0, "writes go on once Redis answers in time")


def test_every_write_answer_is_the_truth_when_redis_stalls_mid_traffic(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Uploads keep coming while Redis stalls for longer than its timeout: afterwards Redis holds exactly
    the versions that were answered 201, whatever each upload was doing when the stall began."""
    tasks = [f"t{i}" for i in range(4)]
    answered: Counter[str] = Counter()
    stop = threading.Event()

    def uploads(client: httpx.Client, task: str) -> None:
        seed = tasks.index(task) * 10_000
        while not stop.is_set():
            seed += 1
            if upload(client, task, new_prompt(tiny, seed)).status_code == 201:
                answered[task] += 1

    mirror = DiskStore(tmp_path / "data" / "prompts")
    with serving(tiny, replica(tmp_path, redis_server, registry_reconcile_s=0.5)) as (a,):
        with ThreadPoolExecutor(len(tasks)) as pool:
            clients = [httpx.Client(base_url=str(a.base_url), timeout=30) for _ in tasks]
            running = [pool.submit(uploads, client, task) for client, task in zip(clients, tasks, strict=True)]
            eventually(lambda: sum(answered.values()) >= 8, 20.0, "uploads under way")
            with stalled(redis_server):
                time.sleep(1.5)  # past the deadline, not past the reply wait: see `redis_scripts`
            time.sleep(0.5)
            stop.set()
            for future in running:
                future.result()
            for client in clients:
                client.close()
        wait_for_reconcile(a)
        state = redis_state(redis_server)
        assert {task: len(state[("default", task)][1]) for task in tasks} == dict(answered)
        for task in tasks:
            assert sorted(state[("default", task)][1]) == list(range(1, answered[task] + 1))
        assert mirror_state(mirror) == state


def test_the_mirror_is_repaired_after_writes_it_missed_and_a_rebuild_restores_exactly_redis(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Another replica (its own volume) writes while this one's mirror hears nothing of it; reconciliation
    copies it all. The next outage then serves what Redis held, and a Redis that lost its data is rebuilt
    from this mirror without the deleted task and with every version."""
    mirror = DiskStore(tmp_path / "data" / "prompts")
    other = RedisStore(redis_server.url, DiskStore(tmp_path / "other-replica"))
    with serving(tiny, replica(tmp_path, redis_server, registry_reconcile_s=0.3)) as (a,):
        assert upload(a, "sst2", new_prompt(tiny, 1), labels=["yes", "no"]).status_code == 201
        assert upload(a, "gone", new_prompt(tiny, 2)).status_code == 201
        other.add_version("default", "sst2", SoftPrompt(new_prompt(tiny, 3)), TaskMetadata(description="v2"))
        other.add_version("default", "fresh", SoftPrompt(new_prompt(tiny, 4)))
        other.activate("default", "sst2", 1)
        other.delete_task("default", "gone")
        other.close()
        before = redis_state(redis_server)
        eventually(lambda: mirror_state(mirror) == before, 10.0, "the mirror equals Redis")
        fresh = served(a, "fresh")
        v2_scores = classify(a, "sst2", version=2).json()["outputs"][0]["scores"]

        redis_server.stop()
        eventually(lambda: status(a) == "degraded", 10.0, "degraded")
        assert served(a, "gone") == (None, None)
        assert served(a, "fresh") == fresh  # never loaded before: from the mirror
        again = classify(a, "sst2", version=2)
        assert again.status_code == 200 and again.json()["outputs"][0]["scores"] == pytest.approx(v2_scores, abs=1e-5)
        assert a.get("/v1/prompts/sst2").json()["description"] == "v2"

        for path in redis_server.data_dir.glob("appendonlydir/*"):
            path.unlink()  # Redis comes back empty: it is rebuilt from this replica's mirror
        redis_server.start()
        eventually(lambda: status(a) == "ready", 10.0, "ready after the rebuild")
        assert redis_state(redis_server) == before
        assert served(a, "gone") == (None, None)
        assert upload(a, "sst2", new_prompt(tiny, 5)).json()["version"] == 3  # the history continues


def test_a_version_the_mirror_lacks_answers_503_while_redis_is_down(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    with serving(tiny, replica(tmp_path, redis_server)) as (a,):
        assert upload(a, "sst2", new_prompt(tiny, 1)).status_code == 201
        other = RedisStore(redis_server.url, DiskStore(tmp_path / "other-replica"))
        other.add_version("default", "sst2", SoftPrompt(new_prompt(tiny, 2)), activate=False)
        other.close()
        redis_server.stop()
        eventually(lambda: status(a) == "degraded", 10.0, "degraded")
        assert_refused(classify(a, "sst2", version=2))  # in Redis, not in this mirror yet
        assert_refused(a.get("/v1/prompts/sst2/versions/2"))
        assert_refused(classify(a, "sst2", version=7))  # nobody can tell now whether it exists
        assert served(a, "sst2")[0] == 1  # what the mirror has is served
        redis_server.start()
        eventually(lambda: status(a) == "ready", 10.0, "ready again")
        assert classify(a, "sst2", version=2).status_code == 200
        assert classify(a, "sst2", version=7).status_code == 404
        assert a.get("/v1/prompts/sst2/versions/7").status_code == 404


def test_ready_turns_degraded_soon_after_redis_stalls(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Periodic reconciliation is a minute away here: only the listener's heartbeat can notice the stall."""
    with serving(tiny, replica(tmp_path, redis_server)) as (a,):
        assert upload(a, "sst2", new_prompt(tiny, 1)).status_code == 201
        assert served(a, "sst2")[0] == 1
        assert status(a) == "ready"
        with stalled(redis_server):
            eventually(lambda: status(a) == "degraded", 10.0, "degraded during the stall")
            assert "Redis" in a.get("/ready").json()["reason"]
            assert served(a, "sst2")[0] == 1  # still serving from the prompt cache
            assert_refused(upload(a, "sst2", new_prompt(tiny, 2)))
        eventually(lambda: status(a) == "ready", 10.0, "ready once Redis answers")
        assert upload(a, "sst2", new_prompt(tiny, 2)).json()["version"] == 2


def test_an_upload_the_mirror_cannot_take_is_still_answered_as_made_and_repaired_later(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The change is in Redis once the script ran: a failing disk must not turn that into an error."""
    mirror = DiskStore(tmp_path / "data" / "prompts")
    blocker = mirror.root / "default"
    blocker.write_bytes(b"not a directory")  # every write under the tenant's directory fails
    with serving(tiny, replica(tmp_path, redis_server, registry_reconcile_s=0.3)) as (a,):
        response = upload(a, "sst2", new_prompt(tiny, 1))
        assert response.status_code == 201, response.text
        assert served(a, "sst2")[0] == 1
        blocker.unlink()
        eventually(lambda: metric(a, "softserve_registry_mirror_repairs_total") >= 1, 10.0, "the mirror is repaired")
        assert mirror_state(mirror) == redis_state(redis_server)


def test_the_change_index_keeps_only_recent_deletes_and_a_mirror_behind_them_compares_everything(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A tenant that creates and deletes tasks without end cannot grow the index without end; a mirror that
    last synced before the deletes it dropped still learns of them."""
    store = RedisStore(redis_server.url, DiskStore(tmp_path / "mirror"))
    lagging = DiskStore(tmp_path / "lagging")
    behind = RedisStore(redis_server.url, lagging)
    try:
        store.ensure_populated()
        for task in ("victim", "bystander", "churn"):
            store.add_version("acme", task, SoftPrompt(new_prompt_tensor(seed=len(task))))
        behind.sync_mirror()
        store.delete_task("acme", "victim")
        client = redis_server.client()
        (_, newest), *_ = client.zrange("softserve:populated", 0, 0, withscores=True)  # victim's delete
        generation = -int(newest)
        # Deletes of many other tasks since (written straight into the index, as that many scripts would).
        client.zadd("softserve:populated", {f"deleted:acme/t{i}": -(generation + 1 + i) for i in range(MAX_DELETES)})
        store.delete_task("acme", "churn")
        assert client.zcount("softserve:populated", "-inf", "(0") <= MAX_DELETES // 2 + 1
        assert behind.sync_mirror() == 2  # victim and churn: it compared every task
        assert mirror_state(lagging) == redis_state(redis_server)
        assert [r.task_id for r in lagging.list_tasks("acme")] == ["bystander"]
    finally:
        store.close()
        behind.close()


def test_a_marker_written_before_the_change_index_is_upgraded(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis_server.client()
    client.set("softserve:populated", "1712345678.5")  # how an earlier release marked a populated Redis
    store = RedisStore(redis_server.url, DiskStore(tmp_path / "mirror"))
    try:
        assert store.ensure_populated() == 0  # populated: nothing is rebuilt
        assert store.add_version("acme", "sst2", SoftPrompt(new_prompt_tensor(seed=1))).active_version == 1
        assert store.sync_mirror() == 0  # the write-through already copied it
        assert client.zscore("softserve:populated", "epoch:1712345678.5") == 0
    finally:
        store.close()
