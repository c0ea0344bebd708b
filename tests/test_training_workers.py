"""Training jobs with Redis: API replicas in this process, `softserve worker` processes, a real redis-server.

Workers run with a 2 s lease and a 0.5 s reaper interval, so a SIGKILLed worker's job must be back on
another worker within LOST_JOB_BOUND_S (lease + interval + time to dequeue, load the data and resume).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
from rq import Queue

from server.jobs.job_runner import JobRunner
from server.jobs.records import JobRecord, JobState
from server.jobs.redis_store import RedisJobStore
from server.jobs.rq_queue import TrainingWorker, queue_name
from server.serving.model import FrozenT5
from server.settings import Settings
from server.training import TrainingCheckpoint
from tests.prometheus import metric
from tests.redis_server import RedisServer
from tests.serving import free_port, running_server
from tests.training import (
    LABELS,
    one_torch_thread,  # noqa: F401 (an autouse fixture)
    submit,
    upload,
    wait_for,
    wait_until_ended,
    wait_until_step,
)

LEASE_S, REAPER_S = 2.0, 0.5
LOST_JOB_BOUND_S = LEASE_S + REAPER_S + 3.0  # + dequeue, claim and resume on a busy 2-core box
WORKER_START_S = 60


class Worker:
    """`softserve worker` in its own process, with its `/metrics` on a port of its own."""

    def __init__(self, redis: RedisServer, data_dir: Path, log: Path, *flags: str) -> None:
        self.metrics_port = free_port()
        command = [sys.executable, "-m", "server.cli", "worker", "--store", "redis", "--redis-url", redis.url]
        command += ["--data-dir", str(data_dir), "--worker-metrics-port", str(self.metrics_port)]
        command += ["--training-lease-s", str(LEASE_S), "--training-reaper-interval-s", str(REAPER_S)]
        command += ["--training-checkpoint-every", "20", *flags]
        self.log_path = log
        self.log = log.open("wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.name = f"{socket.gethostname()}-{self.process.pid}"

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def wait_started(self) -> None:
        def answers() -> bool:
            assert self.process.poll() is None, "the worker exited; see its log"
            try:
                return bool(self.metrics())
            except httpx.TransportError:
                return False

        wait_for(answers, WORKER_START_S, f"worker {self.name}", poll_s=0.2)

    def exit_code(self, timeout_s: float) -> int:
        """The worker's exit code once it exits; past `timeout_s` it is asked for its threads' stacks
        (`kill -USR1`) and the test fails with the end of its log."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGUSR1)
            time.sleep(1)  # faulthandler writes from the signal handler; this only lets the process get there
            tail = self.log_path.read_text(errors="replace")[-8000:]
            raise AssertionError(
                f"worker {self.name} still running after {timeout_s} s; its log ends:\n{tail}"
            ) from None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()


@contextmanager
def workers(redis: RedisServer, tmp_path: Path, count: int, *flags: str) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for _ in range(count):
            started.append(Worker(redis, tmp_path / "data", tmp_path / f"worker-{len(started)}.log", *flags))
        for worker in started:
            worker.wait_started()
        yield started
    finally:
        for worker in started:
            worker.stop()


@contextmanager
def replicas(redis: RedisServer, tmp_path: Path, model: FrozenT5, count: int) -> Iterator[list[httpx.Client]]:
    """API replicas sharing one Redis and one data dir; notices (not reconciliation) carry changes."""
    settings = Settings(
        store="redis", redis_url=redis.url, data_dir=tmp_path / "data", max_wait_ms=2, registry_reconcile_s=60
    )
    with ExitStack() as stack:
        urls = [stack.enter_context(running_server(settings, model)) for _ in range(count)]
        yield [stack.enter_context(httpx.Client(base_url=url, timeout=30)) for url in urls]


def record(redis: RedisServer, job_id: str) -> JobRecord:
    with redis.client() as client:
        return RedisJobStore(client).get(job_id)


def checkpoint_step(redis: RedisServer, job_id: str) -> int:
    with redis.client() as client:
        data = RedisJobStore(client).load_checkpoint(job_id)
    assert data is not None
    return TrainingCheckpoint.from_bytes(data).step


def test_a_worker_trains_and_another_replica_serves_the_new_version_at_once(
    redis_server: RedisServer, tmp_path: Path, tiny: FrozenT5
) -> None:
    with replicas(redis_server, tmp_path, tiny, 2) as (api, other), workers(redis_server, tmp_path, 1) as [worker]:
        upload(api, "sst2", seed=0)
        before = other.post("/v1/classify", json={"task_id": "sst2", "inputs": "a", "labels": LABELS})
        assert before.json()["prompt_version"] == 1  # now cached on the other replica

        job_id = submit(api, "sst2", steps=40)
        done = wait_until_ended(other, job_id)  # the job's record is shared: any replica answers
        assert done["state"] == "succeeded" and done["prompt_version"] == 2, done
        assert record(redis_server, job_id).worker == worker.name

        for client in (other, api):
            served = wait_for(
                lambda c=client: (
                    (r := c.post("/v1/generate", json={"task_id": "sst2", "inputs": "a"}).json())
                    and r["prompt_version"] == 2
                ),
                2.0,
                "the new version to be served",
            )
            assert served
        classified = other.post("/v1/classify", json={"task_id": "sst2", "inputs": ["sentence 3"]})
        assert classified.status_code == 200 and set(classified.json()["outputs"][0]["scores"]) == set(LABELS)
        assert metric(worker.metrics(), "softserve_training_jobs_total", state="succeeded") == 1


def running_on(redis: RedisServer, job_id: str, not_on: str) -> JobRecord | None:
    current = record(redis, job_id)
    assert current.state in (JobState.QUEUED, JobState.RUNNING), current
    return current if current.state == JobState.RUNNING and current.worker not in (None, not_on) else None


def test_a_killed_workers_job_resumes_from_its_checkpoint_on_another_worker(
    redis_server: RedisServer, tmp_path: Path, tiny: FrozenT5
) -> None:
    with replicas(redis_server, tmp_path, tiny, 1) as [api], workers(redis_server, tmp_path, 2) as pool:
        job_id = submit(api, "sst2", steps=400)
        wait_until_step(api, job_id, 30)
        holder = record(redis_server, job_id).worker
        victim, survivor = sorted(pool, key=lambda w: w.name != holder)
        victim.kill()
        killed_at = time.monotonic()
        resumed_from = checkpoint_step(redis_server, job_id)
        assert resumed_from >= 20

        moved = wait_for(lambda: running_on(redis_server, job_id, victim.name), LOST_JOB_BOUND_S, "the job to move")
        assert time.monotonic() - killed_at <= LOST_JOB_BOUND_S
        assert moved.worker == survivor.name and moved.lost == 1

        done = wait_until_ended(api, job_id)
        assert done["state"] == "succeeded" and done["prompt_version"] == 1, done
        assert [entry["step"] for entry in done["history"]] == list(range(20, 401, 20))
        # The survivor ran only the steps after the checkpoint.
        assert metric(survivor.metrics(), "softserve_training_steps_total") == 400 - resumed_from
        assert api.post("/v1/generate", json={"task_id": "sst2", "inputs": "a"}).json()["prompt_version"] == 1


def test_a_stopped_worker_checkpoints_its_job_and_hands_it_back(
    redis_server: RedisServer, tmp_path: Path, tiny: FrozenT5
) -> None:
    with replicas(redis_server, tmp_path, tiny, 1) as [api], workers(redis_server, tmp_path, 1) as [worker]:
        job_id = submit(api, "sst2", steps=100_000)
        wait_until_step(api, job_id, 5)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.exit_code(timeout_s=30) == 0
        handed_back = record(redis_server, job_id)
        assert handed_back.state == JobState.QUEUED and (handed_back.attempt, handed_back.lost) == (2, 0)
        assert handed_back.checkpoint_step == handed_back.progress.step == checkpoint_step(redis_server, job_id)
        with redis_server.client() as client:
            assert Queue(queue_name(Settings().redis_namespace), connection=client).get_job_ids() == [f"{job_id}-2"]


def test_a_stopping_worker_leaves_its_command_listener_at_once(redis_server: RedisServer) -> None:
    """The race that kept a SIGTERMed worker alive for up to a minute after its job was back in the queue: RQ's
    command listener read the unsubscribe reply before it was told to stop, then waited for a new subscription.
    Here the listener is made to read that reply first; leaving must still take about one poll, not a minute."""
    with redis_server.client() as client:
        worker = TrainingWorker([Queue("listener", connection=client)], connection=client, runner=cast(JobRunner, None))
        worker.subscribe()
        worker.pubsub.unsubscribe()
        wait_for(lambda: not worker.pubsub.subscribed, 10, "the listener to read the unsubscribe reply")
        leaving = threading.Thread(target=worker.unsubscribe, daemon=True)
        leaving.start()
        leaving.join(timeout=10)
        assert not leaving.is_alive(), "the worker is still waiting for its command listener"
        assert not worker.pubsub_thread.is_alive()


def test_a_job_that_loses_its_last_allowed_worker_fails_with_the_reason(
    redis_server: RedisServer, tmp_path: Path, tiny: FrozenT5
) -> None:
    flags = ("--training-max-attempts", "1")
    with replicas(redis_server, tmp_path, tiny, 1) as [api]:
        with workers(redis_server, tmp_path, 1, *flags) as [first]:
            job_id = submit(api, "sst2", steps=100_000)
            wait_until_step(api, job_id, 5)
            first.kill()
        assert job_id and record(redis_server, job_id).state == JobState.RUNNING  # nobody left to notice
        # A worker that starts later reaps it at once (or at its next pass, once the lease has run out).
        with workers(redis_server, tmp_path, 1, *flags):
            failed: dict[str, Any] = wait_for(
                lambda: (j := api.get(f"/v1/training-jobs/{job_id}").json())["state"] == "failed" and j,
                LOST_JOB_BOUND_S,
                "the job to fail",
            )
        assert "stopped renewing its lease" in failed["error"] and "limit is 1 attempt" in failed["error"]
        assert failed["prompt_version"] is None and failed["finished_at"] is not None
        assert api.get("/v1/prompts").json()["prompts"] == []
