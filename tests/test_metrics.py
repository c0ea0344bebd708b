"""Every labelled metric's series exist, at 0, on a fresh server: dashboards and alerts see 0, never "no data".

The expected label values come from the code's own constants (the error table, `JobState`, the registry's
load sources), and each test also names values it must include, so an empty constant cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.api.errors import REJECTION_REASONS
from server.jobs.records import JOB_STATES
from server.metrics import ServerMetrics
from server.registry.registry import PROMPT_SOURCES
from server.serving.model import FrozenT5
from server.settings import Settings
from tests.prometheus import metric
from tests.redis_server import RedisServer
from tests.serving import running_server
from tests.test_training_workers import workers

Series = dict[tuple[str, str], float]  # (sample name, the one label's value) -> value


def labelled_series(text: str, name: str, label: str) -> Series:
    return {
        (sample.name, sample.labels[label]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and label in sample.labels
    }


def assert_at_zero(text: str, name: str, label: str, values: tuple[str, ...]) -> None:
    series = labelled_series(text, name, label)
    assert {(name, value): 0.0 for value in values} == series


def test_a_fresh_server_exports_every_labelled_series_at_zero(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    assert {"overloaded", "rate_limited", "invalid_input", "store_unavailable", "too_many_jobs"} <= set(
        REJECTION_REASONS
    )
    assert "not_found" not in REJECTION_REASONS  # a 404 answers about the data; it is not a refusal
    assert_at_zero(text, "softserve_rejections_total", "reason", REJECTION_REASONS)
    assert set(PROMPT_SOURCES) == {"cache", "redis", "disk"}
    assert_at_zero(text, "softserve_prompt_loads_total", "source", PROMPT_SOURCES)
    assert set(JOB_STATES) == {"queued", "running", "succeeded", "failed", "cancelled"}
    assert_at_zero(text, "softserve_training_jobs_total", "state", JOB_STATES)


def test_a_rejection_counts_on_its_existing_series(client: httpx.Client) -> None:
    response = client.post("/v1/generate", json={"task_id": "t", "inputs": []})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_input"
    series = labelled_series(client.get("/metrics").text, "softserve_rejections_total", "reason")
    assert series.pop(("softserve_rejections_total", "invalid_input")) == 1.0
    assert set(series.values()) == {0.0} and len(series) == len(REJECTION_REASONS) - 1


def test_a_replica_on_redis_exports_its_sync_series_from_the_start(
    tiny: FrozenT5, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(store="redis", redis_url=redis_server.url, data_dir=tmp_path / "data", registry_reconcile_s=60)
    with running_server(settings, tiny) as url:
        text = httpx.get(f"{url}/metrics").text
    assert_at_zero(text, "softserve_registry_refreshes_total", "cause", ("notice", "reconcile"))
    reconciles = labelled_series(text, "softserve_registry_reconciles_total", "trigger")
    assert reconciles == {
        ("softserve_registry_reconciles_total", "connect"): 1.0,  # ready means connected, and it reconciled then
        ("softserve_registry_reconciles_total", "periodic"): 0.0,
    }


def test_a_worker_exports_every_job_state_at_zero(redis_server: RedisServer, tmp_path: Path) -> None:
    """`softserve worker` (a real process) counts its own training metrics and serves them on its port."""
    with workers(redis_server, tmp_path, 1) as (worker,):
        assert_at_zero(worker.metrics(), "softserve_training_jobs_total", "state", JOB_STATES)


def test_the_tests_metric_reader_refuses_unknown_names_and_unseen_series() -> None:
    """A renamed metric, or a series read without a default before it exists, fails a test instead of reading 0."""
    metrics = ServerMetrics()
    metrics.requests.labels(route="/v1/generate", status="200").inc()
    text = generate_latest(metrics.registry).decode()
    assert metric(text, "softserve_requests_total", route="/v1/generate", status="200") == 1
    assert metric(text, "softserve_batch_size_count") == 0
    with pytest.raises(LookupError, match="no metric"):
        metric(text, "softserve_request_total", default=0, route="/v1/generate", status="200")
    with pytest.raises(LookupError, match="no series"):
        metric(text, "softserve_requests_total", route="/v1/generate", status="503")
    assert metric(text, "softserve_requests_total", default=0, route="/v1/generate", status="503") == 0
