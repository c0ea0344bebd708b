"""Hostile tenants against training jobs (issue 9): no request breaks the server, another tenant or the data.

Over real HTTP (the app under uvicorn, real Redis and `softserve worker` processes where it matters):
- numbers that cannot be stored or run (NaN/Infinity literals, 1e308, 10^30 steps) are refused with a 4xx;
- an unreadable job record (on disk or in Redis) is quarantined, never fatal to a listing, a tenant, the
  reaper or start-up; every stored record round-trips (property tests);
- text that cannot be tokenized (lone surrogates) is refused naming its place; JSONL splits on `\\n` only;
- jobs run round-robin across tenants, and a long job yields its worker at the end of its time slice;
- big uploads are parsed off the event loop.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from server.jobs.reaper import Reaper
from server.jobs.records import HistoryEntry, JobProgress, JobRecord, JobState
from server.jobs.redis_store import RedisJobStore
from server.jobs.rq_queue import RQJobQueue
from server.jobs.store import DiskJobStore
from server.metrics import TrainingMetrics
from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.training import PromptTrainer, TrainingConfig, TrainingDiverged
from tests.prometheus import metric
from tests.redis_server import RedisServer
from tests.serving import running_server
from tests.test_training_workers import record, replicas, workers
from tests.training import (
    config,
    examples,
    job,
    jsonl,
    one_torch_thread,  # noqa: F401 (an autouse fixture)
    submit,
    wait_until_ended,
    wait_until_step,
)


def hostile_settings(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=data_dir, max_wait_ms=2, training_checkpoint_every=10, **overrides)


def tenant_headers(keys_file: Path, *tenants: str) -> list[dict[str, str]]:
    """An API key per tenant (made before the server starts), as request headers."""
    keys = ApiKeys(keys_file)
    return [{"Authorization": f"Bearer {keys.add(tenant)}"} for tenant in tenants]


@contextmanager
def tenant_clients(url: str, *headers: dict[str, str]) -> Iterator[list[httpx.Client]]:
    clients = [httpx.Client(base_url=url, headers=h, timeout=30) for h in headers]
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


def moment(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def post_json_text(client: httpx.Client, text: str) -> httpx.Response:
    """A body sent as written (httpx's `json=` would refuse NaN and lone surrogates on the client side)."""
    return client.post("/v1/training-jobs", content=text.encode(), headers={"content-type": "application/json"})


def assert_refused(response: httpx.Response, status: int, *expected: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for part in expected:
        assert part in message, (part, message)


# --- Findings 1, 12, 15: every number accepted is finite and bounded --------------------------------------

REFUSED_CONFIGS = [
    ({"learning_rate": 1e308}, "learning_rate"),
    ({"learning_rate": 10.5}, "learning_rate"),
    ({"weight_decay": 1e308}, "weight_decay"),
    ({"learning_rate": 5, "weight_decay": 0.5}, "learning_rate x weight_decay"),
    ({"steps": 10**30}, "steps"),
    ({"steps": 201}, "training_max_steps of 200"),
    ({"seed": 2**64}, "seed"),
    ({"eval_every": 10**12}, "eval_every"),
    ({"patience": 10**12}, "patience"),
    ({"max_input_tokens": 10**12}, "max_input_tokens"),
]
# Literal -> the status of a JSON body holding it: not JSON at all (400), or a number out of range (422).
NON_FINITE = {"Infinity": 400, "-Infinity": 400, "NaN": 400, "1e999": 422}


def test_non_finite_and_unbounded_configs_are_refused_and_nothing_is_stored(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = hostile_settings(tmp_path / "data", training_max_steps=200)
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        for overrides, expected in REFUSED_CONFIGS:
            body = {"task_id": "t", "train": examples(), "config": {**config(10), **overrides}}
            assert_refused(http.post("/v1/training-jobs", json=body), 422, expected)
        body = json.dumps({"task_id": "t", "train": examples(), "config": config(10)})
        for literal, status in NON_FINITE.items():
            sent = body.replace('"batch_size": 4', f'"learning_rate": {literal}, "batch_size": 4')
            assert post_json_text(http, sent).status_code == status, literal
            form = {
                "task_id": "t",
                "config": json.dumps(config(10)).replace("4,", f'4, "learning_rate": {literal},', 1),
            }
            response = http.post("/v1/training-jobs", files={"train": ("t.jsonl", jsonl(examples()))}, data=form)
            assert response.status_code == 422, (literal, response.text)
        assert http.get("/v1/training-jobs").json()["jobs"] == []
        job_id = submit(http, "t", steps=200)  # the cap itself is accepted
        assert wait_until_step(http, job_id, 1)["progress"]["total_steps"] == 200
    assert [r.job_id for r in DiskJobStore(settings.data_dir / "jobs").active()] == [job_id]


def test_a_diverging_run_stops_with_the_reason_instead_of_recording_nan(tiny: FrozenT5) -> None:
    # The bounds keep a job from asking for this; the trainer still stops a run that diverges anyway.
    runaway = TrainingConfig.model_construct(**{**TrainingConfig().model_dump(), **config(30), "learning_rate": 1e30})
    trainer = PromptTrainer(tiny, examples(), examples(4, 100), runaway)
    with pytest.raises(TrainingDiverged, match=r"became non-finite at step 2; lower learning_rate"):
        trainer.train()
    assert len(trainer.losses) == 1 and trainer.history == []
    with pytest.raises(ValidationError, match="finite"):
        JobProgress(total_steps=3, loss=float("nan"))


# --- Finding 1: one unreadable record never takes down a listing, a tenant, the reaper or start-up -------


def corrupt_disk_records(jobs: Path, good_id: str) -> list[str]:
    """What an older version wrote (a non-finite number stored as `null`) and a torn/garbage file."""
    poisoned = json.loads((jobs / good_id / "record.json").read_text())
    poisoned["config"]["learning_rate"] = None
    poisoned["state"] = "queued"
    nulled, garbage = "a" * 32, "b" * 32
    for job_id, text in ((nulled, json.dumps({**poisoned, "job_id": nulled})), (garbage, "{not json")):
        (jobs / job_id).mkdir()
        (jobs / job_id / "record.json").write_text(text)
    return [nulled, garbage]


def test_a_corrupt_job_record_on_disk_is_quarantined_and_the_server_restarts(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = hostile_settings(tmp_path / "data")
    jobs = settings.data_dir / "jobs"
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        good = submit(http, "good", steps=5)
        assert wait_until_ended(http, good)["state"] == "succeeded"
        bad = corrupt_disk_records(jobs, good)
        more = submit(http, "more", steps=5)  # the quota count reads every record: it skips and quarantines them
        assert wait_until_ended(http, more)["state"] == "succeeded"
        bad = corrupt_disk_records(jobs, good)
        listed = http.get("/v1/training-jobs")
        assert listed.status_code == 200 and [j["job_id"] for j in listed.json()["jobs"]] == [more, good]
        bad = corrupt_disk_records(jobs, good)
        for job_id in bad:
            assert http.get(f"/v1/training-jobs/{job_id}").status_code == 404
        bad = corrupt_disk_records(jobs, good)  # and once more, for the restart to meet
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/ready").json()["status"] == "ready"
        assert [j["job_id"] for j in http.get("/v1/training-jobs").json()["jobs"]] == [more, good]
        after = submit(http, "after", steps=5)
        assert wait_until_ended(http, after)["state"] == "succeeded"
        assert http.post("/v1/generate", json={"task_id": "good", "inputs": "a"}).status_code == 200
    quarantined = sorted(p.name.split(".")[0] for p in (jobs / "quarantine").iterdir())
    assert quarantined == sorted(bad * 4)
    assert not any((jobs / job_id).exists() for job_id in bad)


def poison_redis_records(client: Any, job_id: str, garbage_id: str) -> None:
    """A record holding what a NaN loss was stored as (`null`), and a garbage key listed as the tenant's."""
    raw = json.loads(client.get(f"softserve:job:{job_id}"))
    raw["history"] = [{"step": 1, "loss": None}]
    client.set(f"softserve:job:{job_id}", json.dumps(raw))
    client.set(f"softserve:job:{garbage_id}", b"\xff not json")
    client.sadd("softserve:jobs:active", garbage_id)
    client.zadd("softserve:jobs:default", {garbage_id: time.time()})


def test_a_corrupt_job_record_in_redis_is_quarantined(
    redis_server: RedisServer, tmp_path: Path, tiny: FrozenT5
) -> None:
    settings = Settings(
        store="redis", redis_url=redis_server.url, data_dir=tmp_path / "data", max_wait_ms=2, training_max_active_jobs=1
    )
    with (
        running_server(settings, tiny) as url,
        httpx.Client(base_url=url, timeout=30) as http,
        redis_server.client() as client,
    ):
        first = submit(http, "t", steps=5)  # no worker: it stays queued, holding the tenant's one slot
        poison_redis_records(client, first, "c" * 32)
        queue = RQJobQueue(client, settings.redis_namespace, settings.training_job_timeout_s)
        reaper = Reaper(
            RedisJobStore(client),
            queue,
            TrainingMetrics(),
            lease_s=settings.training_lease_s,
            interval_s=settings.training_reaper_interval_s,
            max_attempts=settings.training_max_attempts,
        )
        assert reaper.sweep() == []  # no exception: the pass goes on, and would requeue any lost job

        second = submit(http, "t", steps=5)  # the quarantined job no longer holds the slot
        poison_redis_records(client, second, "d" * 32)
        listed = http.get("/v1/training-jobs")
        assert listed.status_code == 200 and listed.json()["jobs"] == []
        assert http.get(f"/v1/training-jobs/{second}").status_code == 404
        third = submit(http, "t", steps=5)
        assert [j["job_id"] for j in http.get("/v1/training-jobs").json()["jobs"]] == [third]
        assert [r.job_id for r in RedisJobStore(client).active()] == [third]
        aside = [f"softserve:quarantine:job:{i}" for i in (first, second, "c" * 32, "d" * 32)]
        assert client.exists(*aside) == 4


# --- Every record that validates is stored and read back equal --------------------------------------------

EXTREME_FLOATS = st.floats() | st.sampled_from([1e308, -1e308, 5e-324, -0.0, 10.0, 10.000000000000002, 0.3])
EXTREME_INTS = st.integers() | st.sampled_from([0, 1, 2**63 - 1, 2**63, 10**30, -1])
TEXT = st.text(st.characters(exclude_categories=()), max_size=8)  # lone surrogates included
CONFIGS = st.fixed_dictionaries(
    {},
    optional={
        "prompt_length": EXTREME_INTS,
        "init": st.sampled_from(["class_labels", "vocab", "random", "text"]),
        "init_text": TEXT | st.none(),
        "learning_rate": EXTREME_FLOATS,
        "steps": EXTREME_INTS,
        "batch_size": EXTREME_INTS,
        "eval_every": EXTREME_INTS,
        "max_input_tokens": EXTREME_INTS,
        "max_target_tokens": EXTREME_INTS,
        "seed": EXTREME_INTS,
        "weight_decay": EXTREME_FLOATS,
        "patience": EXTREME_INTS | st.none(),
    },
)
EVALS = st.dictionaries(TEXT, EXTREME_FLOATS, max_size=3) | st.none()
PROGRESS = st.fixed_dictionaries(
    {"step": EXTREME_INTS, "total_steps": EXTREME_INTS, "loss": EXTREME_FLOATS | st.none(), "eval": EVALS}
)
HISTORY = st.lists(st.fixed_dictionaries({"step": EXTREME_INTS, "loss": EXTREME_FLOATS, "eval": EVALS}), max_size=3)
RECORDS = st.fixed_dictionaries(
    {
        "job_id": TEXT,
        "tenant": TEXT,
        "task_id": TEXT,
        "state": st.sampled_from([s.value for s in JobState]),
        "config": CONFIGS,
        "progress": PROGRESS,
        "history": HISTORY,
        "error": TEXT | st.none(),
        "created_at": EXTREME_FLOATS,
        "updated_at": EXTREME_FLOATS,
        "finished_at": EXTREME_FLOATS | st.none(),
        "attempt": EXTREME_INTS,
        "checkpoint_step": EXTREME_INTS | st.none(),
    }
)


def round_trips(model: type[Any], raw: dict[str, Any]) -> None:
    try:
        value = model.model_validate(raw)
    except ValidationError:
        return
    assert model.model_validate_json(value.model_dump_json()) == value


@hypothesis_settings(max_examples=300, deadline=None)
@given(RECORDS)
def test_every_job_record_that_validates_reads_back_equal(raw: dict[str, Any]) -> None:
    round_trips(JobRecord, raw)


@hypothesis_settings(max_examples=300, deadline=None)
@given(CONFIGS, PROGRESS, HISTORY)
def test_every_config_progress_and_history_entry_that_validates_reads_back_equal(
    config_raw: dict[str, Any], progress_raw: dict[str, Any], history_raw: list[dict[str, Any]]
) -> None:
    round_trips(TrainingConfig, config_raw)
    round_trips(JobProgress, progress_raw)
    for entry in history_raw:
        round_trips(HistoryEntry, entry)


def test_a_record_change_that_would_store_a_non_finite_number_is_refused() -> None:
    record = JobRecord(
        job_id="0" * 32, tenant="t", task_id="t", config=TrainingConfig(), progress=JobProgress(total_steps=3)
    )
    for change in (
        {"history": [{"step": 1, "loss": float("inf")}]},
        {"progress": record.progress.model_copy(update={"loss": float("nan")})},
        {"error": "\ud800"},
    ):
        with pytest.raises(ValidationError):
            record.changed(**change)


# --- Findings 4, 14: text that cannot be tokenized; JSONL lines ------------------------------------------

SURROGATE = "\\ud800"  # as JSON writes it: parses to a lone surrogate
SURROGATE_BODIES = [
    ({"train": [*examples(1), {"input": f"a{SURROGATE}", "target": "yes"}]}, "train item 2: the input holds a lone surrogate"),
    ({"train": examples(2), "eval": [{"input": "a", "target": SURROGATE}]}, "eval item 1: the target holds a lone surrogate"),
    ({"train": examples(2), "config": {"init": "text", "init_text": SURROGATE}}, "config.init_text"),
]  # fmt: skip
HOSTILE_LINES = [
    ('{"input": "a", "target": "\\udfff"}', "train line 3: the target holds a lone surrogate (U+DFFF"),
    ("[" * 100_000, "train line 3: not valid JSON (nested too deeply)"),
    ('{"input": ' + "1" * 5000 + "}", "train line 3: not valid JSON"),
    ('{"input": NaN, "target": "yes"}', "train line 3: not valid JSON (NaN is not valid JSON"),
]


def test_untokenizable_text_and_hostile_json_lines_are_refused_naming_the_place(tmp_path: Path, tiny: FrozenT5) -> None:
    with (
        running_server(hostile_settings(tmp_path / "data"), tiny) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        for body, expected in SURROGATE_BODIES:
            text = json.dumps({"task_id": "t", "config": config(5), **body}).replace("\\\\ud800", "\\ud800")
            assert_refused(post_json_text(http, text), 422, expected)
        good = jsonl(examples(4)).decode().splitlines()
        for line, expected in HOSTILE_LINES:
            data = "\n".join([*good[:2], line, *good[2:]]).encode()
            form = {"task_id": "t", "config": json.dumps(config(5))}
            assert_refused(http.post("/v1/training-jobs", files={"train": ("t.jsonl", data)}, data=form), 422, expected)
        init_text = json.dumps(config(5, init="text", init_text="x")).replace('"x"', f'"{SURROGATE}"')
        form = {"task_id": "t", "config": init_text}
        response = http.post("/v1/training-jobs", files={"train": ("t.jsonl", jsonl(examples()))}, data=form)
        assert_refused(response, 422, "config.init_text", "lone surrogate")
        assert http.get("/v1/training-jobs").json()["jobs"] == []


def test_jsonl_lines_are_split_on_newlines_only(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = hostile_settings(tmp_path / "data")
    texts = ["line\u2028separator", "next\u0085line", "para\u2029graph", "form\x0cfeed", "vertical\x0btab"]
    rows = [{"input": text, "target": ["yes", "no"][i % 2]} for i, text in enumerate(texts)]
    data = "\r\n".join(json.dumps(row, ensure_ascii=False) for row in rows).encode() + b"\n\n"
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        form = {"task_id": "t", "config": json.dumps(config(2))}
        response = http.post("/v1/training-jobs", files={"train": ("t.jsonl", data)}, data=form)
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        stored = DiskJobStore(settings.data_dir / "jobs").dataset(job_id)
        assert [e.input for e in stored.train] == texts
        assert wait_until_ended(http, job_id)["state"] == "succeeded"


# --- Finding 12: round-robin across tenants, time slices ------------------------------------------------


def test_queued_jobs_run_round_robin_across_tenants(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = hostile_settings(tmp_path / "data", training_time_slice_s=0)
    headers = tenant_headers(settings.keys_file, "a", "b")
    with running_server(settings, tiny) as url, tenant_clients(url, *headers) as (a, b):
        first = submit(a, "first", steps=60)
        wait_until_step(a, first, 1)
        second = submit(a, "second", steps=5)
        other = submit(b, "other", steps=5)
        done = {job_id: wait_until_ended(client, job_id) for client, job_id in ((a, first), (a, second), (b, other))}
        assert all(d["state"] == "succeeded" for d in done.values()), done
    # In submission order, `second` would run before `other`; round-robin gives tenant b its turn first.
    order = [moment(done[first]["finished_at"]), moment(done[other]["started_at"]), moment(done[second]["started_at"])]
    assert order == sorted(order), done


def test_a_long_job_yields_to_another_tenant_and_resumes_where_it_stopped(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = hostile_settings(tmp_path / "data", training_time_slice_s=0.5)
    headers = tenant_headers(settings.keys_file, "a", "b")
    with running_server(settings, tiny) as url, tenant_clients(url, *headers) as (a, b):
        long = submit(a, "long", steps=200)
        wait_until_step(a, long, 1)
        short = submit(b, "short", steps=3)
        assert wait_until_ended(b, short)["state"] == "succeeded"
        assert job(a, long)["state"] in ("queued", "running")  # b did not wait for the end of a's job

        done = wait_until_ended(a, long)
        assert done["state"] == "succeeded" and [h["step"] for h in done["history"]] == list(range(20, 201, 20))
        # No step ran twice: the long job resumed at the step where it yielded.
        assert metric(a.get("/metrics").text, "softserve_training_steps_total") == 200 + 3
        served = a.get("/v1/prompts/long").json()["versions"][0]["sha256"]
        # The same job again, with no one waiting: it runs without yielding, on the same server (a float result
        # depends on the number of torch threads, which is the server's to set, not this test's).
        assert wait_until_ended(a, submit(a, "again", steps=200))["state"] == "succeeded"
        uninterrupted = a.get("/v1/prompts/again").json()["versions"][0]["sha256"]
    assert DiskJobStore(settings.data_dir / "jobs").get(long).attempt >= 2  # it went back to the queue
    assert served == uninterrupted  # the same prompt as a run without yielding


def test_workers_take_jobs_round_robin_and_yield_across_tenants(
    redis_server: RedisServer, tmp_path: Path, tiny: FrozenT5
) -> None:
    headers = tenant_headers(tmp_path / "data" / "api_keys.json", "a", "b")
    flags = ("--training-time-slice-s", "0.5")
    with (
        replicas(redis_server, tmp_path, tiny, 1) as [api],
        workers(redis_server, tmp_path, 1, *flags),
        tenant_clients(str(api.base_url), *headers) as (a, b),
    ):
        long = submit(a, "long", steps=300)
        wait_until_step(a, long, 1)
        queued_behind = submit(a, "behind", steps=3)
        short = submit(b, "short", steps=3)
        assert wait_until_ended(b, short)["state"] == "succeeded"
        assert job(a, queued_behind)["state"] == "queued"  # b's job went first, and a's long one yielded
        assert job(a, long)["state"] in ("queued", "running")
        for job_id in (long, queued_behind):
            assert wait_until_ended(a, job_id)["state"] == "succeeded"
        assert record(redis_server, long).attempt >= 2
        assert [h["step"] for h in job(a, long)["history"]] == list(range(20, 301, 20))


# --- Finding 13: big uploads are parsed off the event loop ---------------------------------------------


@contextmanager
def in_flight(request: Any) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(timeout=120)


@pytest.mark.timing
def test_a_big_jsonl_upload_is_parsed_off_the_event_loop(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = hostile_settings(tmp_path / "data", max_body_bytes=16 * 1024 * 1024)
    rows = 200_000  # ~2 s of parsing; the last line is bad, so the answer comes right after the parse
    data = jsonl([{"input": f"s {i}", "target": "yes"} for i in range(rows)]) + b"{bad\n"
    answers: list[httpx.Response] = []
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=60) as http:

        def upload() -> None:
            with httpx.Client(base_url=url, timeout=120) as own:
                form = {"task_id": "t", "config": json.dumps(config(5))}
                answers.append(own.post("/v1/training-jobs", files={"train": ("t.jsonl", data)}, data=form))

        started = time.monotonic()
        stalls, last = [], started
        with in_flight(upload) as thread:
            while thread.is_alive():
                assert http.get("/health").status_code == 200
                now = time.monotonic()
                stalls.append(now - last)
                last = now
        lasted = time.monotonic() - started
        assert_refused(answers[0], 422, f"train line {rows + 1}: not valid JSON")
        # A loop busy parsing answers nothing meanwhile: its longest stall would be most of the upload.
        assert max(stalls) < 0.5 * lasted, (max(stalls), lasted)

        too_big = http.post("/v1/training-jobs", files={"train": ("t.jsonl", data * 3)}, data={"task_id": "t"})
        assert too_big.status_code == 413  # the body limit still applies
