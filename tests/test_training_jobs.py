"""Training jobs in the embedded mode (disk store, in-process worker thread), over real HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.jobs.store import DiskJobStore
from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.training import TrainingCheckpoint
from tests.prometheus import metric
from tests.serving import running_server, server_process
from tests.training import (
    LABELS,
    config,
    examples,
    job,
    jsonl,
    one_torch_thread,  # noqa: F401 (an autouse fixture)
    submit,
    upload,
    wait_until_ended,
    wait_until_step,
)


def training_settings(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=data_dir, max_wait_ms=2, training_checkpoint_every=10, **overrides)


@pytest.fixture
def http(tmp_path: Path, tiny: FrozenT5) -> Iterator[httpx.Client]:
    with running_server(training_settings(tmp_path / "data"), tiny) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def test_a_job_runs_with_visible_progress_and_its_prompt_is_served_at_once(http: httpx.Client) -> None:
    upload(http, "sst2", seed=0)
    assert http.post("/v1/generate", json={"task_id": "sst2", "inputs": "a"}).json()["prompt_version"] == 1

    job_id = submit(http, "sst2", steps=160)
    running = wait_until_step(http, job_id, 1)
    assert running["state"] == "running" and running["started_at"] is not None
    assert 0 < running["progress"]["step"] < running["progress"]["total_steps"] == 160
    assert running["progress"]["loss"] > 0 and running["prompt_version"] is None

    done = wait_until_ended(http, job_id)
    assert done["state"] == "succeeded", done
    assert done["prompt_version"] == 2 and done["error"] is None
    assert [entry["step"] for entry in done["history"]] == list(range(20, 161, 20))
    assert set(done["history"][-1]["eval"]) >= {"accuracy", "loss"}
    assert done["progress"]["step"] == 160 and done["progress"]["eval"] == done["history"][-1]["eval"]
    assert 0 <= done["progress"]["eval"]["accuracy"] <= 1 and done["progress"]["eval"]["loss"] > 0
    stamps = [datetime.fromisoformat(done[k]) for k in ("created_at", "started_at", "finished_at")]
    assert stamps == sorted(stamps)

    # Served without a restart: the registry's caches dropped v1 when the job registered v2.
    generated = http.post("/v1/generate", json={"task_id": "sst2", "inputs": "sentence 3"})
    assert generated.json()["prompt_version"] == 2
    classified = http.post("/v1/classify", json={"task_id": "sst2", "inputs": ["sentence 3"]})
    assert classified.status_code == 200, classified.text  # labels came from the train targets
    assert set(classified.json()["outputs"][0]["scores"]) == set(LABELS)

    assert [j["job_id"] for j in http.get("/v1/training-jobs").json()["jobs"]] == [job_id]
    text = http.get("/metrics").text
    assert metric(text, "softserve_training_jobs_total", state="succeeded") == 1
    assert metric(text, "softserve_training_steps_total") == 160
    assert metric(text, "softserve_training_step_duration_seconds_count") > 0


def test_cancel_a_running_and_a_queued_job(http: httpx.Client) -> None:
    running_id = submit(http, "long", steps=100_000)
    queued_id = submit(http, "never", steps=20)
    wait_until_step(http, running_id, 2)
    assert job(http, queued_id)["state"] == "queued"

    queued = http.delete(f"/v1/training-jobs/{queued_id}")
    assert queued.status_code == 200 and queued.json()["state"] == "cancelled"
    cancelled = http.delete(f"/v1/training-jobs/{running_id}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["finished_at"] is not None

    stopped_at = job(http, running_id)["progress"]["step"]
    # The worker runs one job at a time: once it has run a later job, it has left the cancelled one.
    later_id = submit(http, "later", steps=2)
    assert wait_until_ended(http, later_id)["state"] == "succeeded"
    for job_id in (running_id, queued_id):
        final = job(http, job_id)
        assert final["state"] == "cancelled" and final["prompt_version"] is None
    assert job(http, running_id)["progress"]["step"] == stopped_at
    assert job(http, queued_id)["started_at"] is None
    assert [p["task_id"] for p in http.get("/v1/prompts").json()["prompts"]] == ["later"]  # no prompt of theirs
    again = http.delete(f"/v1/training-jobs/{running_id}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"


def jsonl_with(line: int, text: str, count: int = 4) -> bytes:
    lines = jsonl(examples(count)).decode().splitlines()
    lines[line - 1] = text
    return ("\n".join(lines) + "\n").encode()


LONG_INPUT = json.dumps({"input": "y" * 200, "target": "yes"})
BAD_UPLOADS = [
    ({"train": b""}, "the train set is empty"),
    ({"train": b"\n  \n"}, "the train set is empty"),
    ({"train": jsonl_with(2, "{not json")}, "train line 2: not valid JSON"),
    (
        {"train": jsonl_with(3, '{"input": "a", "label": "yes"}')},
        "train line 3: missing target; unexpected field(s) label",
    ),
    ({"train": jsonl_with(1, '{"input": 5, "target": "yes"}')}, "train line 1: input must be a string"),
    ({"train": jsonl_with(4, '["a", "b"]')}, "train line 4: expected a JSON object"),
    ({"train": jsonl_with(2, '{"input": "a", "target": " "}')}, "train line 2: the target is empty"),
    ({"train": jsonl_with(3, LONG_INPUT)}, "train line 3: the input has 201 tokens; this server's limit is 64"),
    ({"train": b"\xff\xfe\x00"}, "train line 1: not UTF-8"),
    ({"train": jsonl(examples()), "eval": jsonl_with(2, "[")}, "eval line 2: not valid JSON"),
]
BAD_BODIES = [
    ({"train": [*examples(2), {"input": "a"}]}, 422, "train item 3: missing target"),
    ({"train": []}, 422, "the train set is empty"),
    ({"train": "not a list"}, 422, "train must be a list"),
    ({}, 422, "train is missing"),
    ({"train": examples(), "config": {"stepz": 5}}, 422, "config.stepz"),
    ({"train": examples(), "config": {"prompt_length": 10_000}}, 422, "max_prompt_length of 512"),
    ({"train": examples(), "config": {"batch_size": 1000}}, 422, "max_batch_size"),
    ({"train": examples(), "eval": [{"input": "a", "target": "other"}], "config": {"eval_metric": "rank_accuracy"}},
     422, "rank_accuracy"),
    ({"train": examples(), "task_id": "../etc"}, 422, "task_id"),
]  # fmt: skip


def test_bad_datasets_are_refused_with_line_numbers_and_nothing_is_queued(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = training_settings(tmp_path / "data", max_input_tokens=64)
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        for files, expected in BAD_UPLOADS:
            form = {"task_id": "t", "config": json.dumps(config(10))}
            sent = {name: (f"{name}.jsonl", data) for name, data in files.items()}
            response = http.post("/v1/training-jobs", files=sent, data=form)
            assert response.status_code == 422, (expected, response.text)
            assert expected in response.json()["error"]["message"], response.text
        for body, status, expected in BAD_BODIES:
            response = http.post("/v1/training-jobs", json={"task_id": "t", **body})
            assert response.status_code == status, (expected, response.text)
            assert expected in response.json()["error"]["message"], response.text
        malformed = http.post("/v1/training-jobs", content=b"{", headers={"content-type": "application/json"})
        assert malformed.status_code == 400
        plain = http.post("/v1/training-jobs", content=b"x", headers={"content-type": "text/plain"})
        assert plain.status_code == 415
        assert http.get("/v1/training-jobs").json()["jobs"] == []
    assert DiskJobStore(settings.data_dir / "jobs").active() == []


def test_a_multipart_jsonl_job_through_the_cli_without_activation(tmp_path: Path, tiny: FrozenT5) -> None:
    (tmp_path / "train.jsonl").write_bytes(jsonl(examples()))
    (tmp_path / "eval.jsonl").write_bytes(jsonl(examples(4, 100)))
    with running_server(training_settings(tmp_path / "data"), tiny) as url, httpx.Client(base_url=url) as http:
        upload(http, "sst2", seed=1)
        cli = [sys.executable, "-m", "server.cli"]
        train = [*cli, "train", "sst2", "--url", url, "--train", str(tmp_path / "train.jsonl")]
        train += ["--eval", str(tmp_path / "eval.jsonl"), "--config", json.dumps(config(40)), "--no-activate"]
        done = subprocess.run([*train, "--poll", "0.2"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["state"] == "succeeded" and result["prompt_version"] == 2
        assert "40/40" in done.stderr  # the progress bar
        task = http.get("/v1/prompts/sst2").json()
        assert task["active_version"] == 1 and [v["version"] for v in task["versions"]] == [1, 2]
        assert task["labels"] == LABELS

        listed = subprocess.run([*cli, "jobs", "--url", url, "list"], capture_output=True, text=True, timeout=60)
        assert [j["job_id"] for j in json.loads(listed.stdout)] == [result["job_id"]]
        show = subprocess.run([*cli, "jobs", "--url", url, "show", "0" * 32], capture_output=True, text=True)
        assert show.returncode == 1 and "404 not_found" in show.stderr


def test_jobs_are_per_tenant_and_capped(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = training_settings(tmp_path / "data", training_max_active_jobs=1)
    keys = ApiKeys(settings.keys_file)
    owner_key, other_key = keys.add("owner"), keys.add("other")
    with running_server(settings, tiny) as url:
        owner, other = (
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            for key in (owner_key, other_key)
        )
        job_id = submit(owner, "mine", steps=100_000)
        for method in ("GET", "DELETE"):
            response = other.request(method, f"/v1/training-jobs/{job_id}")
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        assert other.get("/v1/training-jobs").json()["jobs"] == []

        refused = owner.post("/v1/training-jobs", json={"task_id": "more", "train": examples(), "config": config(5)})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
        assert int(refused.headers["Retry-After"]) > 0
        assert submit(other, "theirs", steps=5)

        assert owner.delete(f"/v1/training-jobs/{job_id}").json()["state"] == "cancelled"
        assert submit(owner, "more", steps=5)  # the cancelled job no longer counts
        owner.close()
        other.close()


def test_a_restart_resumes_the_running_job_from_its_checkpoint_and_runs_the_queued_one(
    tmp_path: Path, tiny: FrozenT5
) -> None:
    settings = training_settings(tmp_path / "data")
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        first = submit(http, "first", steps=200)
        second = submit(http, "second", steps=30)
        wait_until_step(http, first, 15)
    # A graceful stop checkpoints the running job where it is and leaves both jobs queued.
    store = DiskJobStore(settings.data_dir / "jobs")
    left = store.get(first)
    assert left.state.value == "queued" and left.checkpoint_step == left.progress.step >= 15
    assert store.get(second).state.value == "queued"

    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        for job_id in (first, second):
            assert wait_until_ended(http, job_id)["state"] == "succeeded"
        # Steps run by this process: the rest of the first job from its checkpoint, and all of the second.
        assert metric(http.get("/metrics").text, "softserve_training_steps_total") == 200 - left.progress.step + 30
        versions = {t["task_id"]: t["active_version"] for t in http.get("/v1/prompts").json()["prompts"]}
        assert versions == {"first": 1, "second": 1}


def test_a_crashed_server_resumes_the_job_from_the_last_checkpoint(
    tmp_path: Path, tiny: FrozenT5, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = training_settings(tmp_path / "data")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = ("--training-checkpoint-every", "10", "--max-wait-ms", "2", "--engine", "thread")
    with server_process(settings.data_dir, *flags) as (process, url), httpx.Client(base_url=url, timeout=30) as http:
        job_id = submit(http, "crash", steps=200)
        wait_until_step(http, job_id, 25)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    store = DiskJobStore(settings.data_dir / "jobs")
    assert store.get(job_id).state.value == "running"
    checkpoint = store.load_checkpoint(job_id)
    assert checkpoint is not None
    resumed_from = TrainingCheckpoint.from_bytes(checkpoint).step
    assert resumed_from >= 20 and resumed_from % 10 == 0

    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        done = wait_until_ended(http, job_id)
        assert done["state"] == "succeeded" and done["prompt_version"] == 1
        assert metric(http.get("/metrics").text, "softserve_training_steps_total") == 200 - resumed_from
    assert store.get(job_id).lost == 1
