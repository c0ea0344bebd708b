"""The deployed topology without Docker: redis-server + 2 API replicas + 1 training worker, each its own
process, driven only over HTTP. The processes run the compose file's commands (`serve`, `worker`)
configured by the same `SOFTSERVE_*` variables."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from tests.prometheus import metric
from tests.redis_server import RedisServer
from tests.serving import free_port, wait_ready
from tests.test_training_workers import Worker
from tests.training import LABELS, submit, upload, wait_for, wait_until_ended


@contextmanager
def api_replica(redis: RedisServer, data_dir: Path, log: Path) -> Iterator[httpx.Client]:
    port = free_port()
    env = {
        **os.environ,
        "SOFTSERVE_STORE": "redis",
        "SOFTSERVE_REDIS_URL": redis.url,
        "SOFTSERVE_DATA_DIR": str(data_dir),
        "SOFTSERVE_PORT": str(port),
    }
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, stdout=out, stderr=out)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, 120)
            with httpx.Client(base_url=url, timeout=60) as client:
                yield client
        finally:
            process.kill()
            process.wait(timeout=30)


def test_upload_train_hot_load_serve_and_scrape_across_processes(redis_server: RedisServer, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with ExitStack() as stack:
        a = stack.enter_context(api_replica(redis_server, data_dir, tmp_path / "api-a.log"))
        b = stack.enter_context(api_replica(redis_server, data_dir, tmp_path / "api-b.log"))
        worker = Worker(redis_server, data_dir, tmp_path / "worker.log")
        stack.callback(worker.stop)
        worker.wait_started()

        upload(a, "sentiment", seed=1)
        served = wait_for(
            lambda: (
                (r := b.post("/v1/generate", json={"task_id": "sentiment", "inputs": "x"})).status_code == 200
                and r.json()
            ),
            5,
            "replica B to serve the upload made on A",
        )
        assert served["prompt_version"] == 1

        job_id = submit(b, "sentiment", steps=40)
        finished = wait_until_ended(a, job_id)  # the job record is shared: any replica answers
        assert finished["state"] == "succeeded", finished
        assert finished["prompt_version"] == 2

        for replica in (a, b):
            body = {"task_id": "sentiment", "inputs": "sentence 3 xxx"}
            generated = replica.post("/v1/generate", json=body).json()
            classified = replica.post("/v1/classify", json=body).json()
            assert generated["prompt_version"] == 2 and classified["prompt_version"] == 2
            assert set(classified["outputs"][0]["scores"]) == set(LABELS)  # labels learned from the targets

        for replica in (a, b):
            text = replica.get("/metrics").text
            assert metric(text, "softserve_requests_total", route="/v1/generate", status="200") >= 1
            assert metric(text, "softserve_registry_store_up") == 1
        assert metric(worker.metrics(), "softserve_training_jobs_total", state="succeeded") == 1
