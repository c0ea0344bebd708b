"""What the services own (the routes only translate HTTP): submission parsing, the one task quota, the
retry-after errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from prompt_store.errors import RetryLater
from server.api.errors import ERROR_TABLE
from server.errors import InvalidInput, InvalidRequest
from server.jobs import submission
from server.serving.model import FrozenT5
from server.settings import Settings
from server.training import TrainingConfig
from tests.serving import running_server
from tests.training import config, examples, jsonl, upload, wait_until_ended


def no_limits(config: TrainingConfig) -> None:
    pass


def test_a_json_submission_is_parsed_without_http() -> None:
    body = jsonl([{"task_id": "sst2", "train": examples(3), "config": config(2)}]).strip()
    parsed = submission.from_json(body, no_limits)
    assert parsed.options.task_id == "sst2" and parsed.options.config.steps == 2
    assert len(parsed.dataset.train) == 3 and parsed.eval is None

    with pytest.raises(InvalidRequest) as malformed:
        submission.from_json(b"{not json", no_limits)
    assert malformed.value.problems[0]["type"] == "json_invalid"
    with pytest.raises(InvalidRequest) as invalid:
        submission.from_json(b'{"task_id": "no spaces allowed", "train": []}', no_limits)
    assert invalid.value.problems[0]["loc"] == ("task_id",)


def test_a_form_submission_is_parsed_without_http() -> None:
    parts = {"task_id": "sst2", "train": jsonl(examples(2)), "eval": jsonl(examples(1)), "config": '{"steps": 3}'}
    parsed = submission.from_form(parts, no_limits)
    assert (len(parsed.train.examples), len(parsed.dataset.eval), parsed.options.config.steps) == (2, 1, 3)
    with pytest.raises(InvalidInput, match="unexpected form field"):
        submission.from_form({**parts, "extra": "x"}, no_limits)


def test_the_limits_are_checked_before_the_examples_are_parsed() -> None:
    def refuse(config: TrainingConfig) -> None:
        raise InvalidInput("over the limit")

    with pytest.raises(InvalidInput, match="over the limit"):  # the train file is not even JSONL
        submission.from_form({"task_id": "sst2", "train": b"\xff not json"}, refuse)


def test_one_task_quota_holds_for_uploads_and_training_jobs(tmp_path: Path, tiny: FrozenT5) -> None:
    """A trained prompt becomes a task: a job for a new task past the quota is refused like an upload."""
    settings = Settings(data_dir=tmp_path, max_tasks_per_tenant=1, max_wait_ms=2)
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=60) as http:
        upload(http, "first", seed=0)
        body = {"train": examples(4), "config": config(1)}
        refused = http.post("/v1/training-jobs", json={"task_id": "second", **body})
        assert refused.status_code == 429, refused.text
        assert "quota of 1 tasks" in refused.json()["error"]["message"] and "Retry-After" in refused.headers
        assert (
            http.put("/v1/prompts/second", files={"file": ("p", b"x")}).json()["error"]["message"]
            == (refused.json()["error"]["message"])
        )
        accepted = http.post("/v1/training-jobs", json={"task_id": "first", **body})  # a new version: no new task
        assert accepted.status_code == 202, accepted.text
        assert wait_until_ended(http, accepted.json()["job_id"])["state"] == "succeeded"


def test_every_transient_refusal_sends_retry_after_and_no_other_does() -> None:
    for exc_type, status, code, retry_after in ERROR_TABLE:
        transient = issubclass(exc_type, RetryLater)
        assert (retry_after is not None) == transient, code
        assert not transient or status in (429, 503), code
