"""The inference gateway's model server protocol over real HTTP: the gauges an endpoint picker reads (rows queued
and running, the row cache's fill, the tasks running and waiting) follow the engine's rows and read 0 when idle.

The rows of `UNENDING` requests outlast the test by far, so what the gauges say while they are held cannot
change under the test's feet; they leave when their client does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from server.engine.client import EngineClient
from server.engine.limits import EngineLimits
from server.engine.link import Deliver, Down, Up
from server.engine.protocol import ClassifyRow, EngineRequest, GenerateRow, Joined, RowInput, Sampling, StepStats
from server.metrics import TASK_INFO_LABELS, ServerMetrics
from server.serving.model import FrozenT5
from server.testing.reference import random_prompt
from tests.prometheus import metric, wait_for_metric
from tests.serving import server_process
from tests.test_engine_http import UNENDING, UNENDING_LIMITS
from tests.test_hostile_inference import generate_body, pending_request, serving
from tests.test_inference_api import upload

QUEUED, RUNNING = "softserve_engine_waiting_rows", "softserve_engine_running_rows"
CACHE_USAGE, CACHE_TOKENS = "softserve_engine_cache_usage_ratio", "softserve_engine_cache_tokens"
TASKS_INFO = "softserve_engine_tasks_info"


def tasks_info(client: httpx.Client) -> dict[str, str]:
    """The labels of the one `tasks_info` series (a picker reads the latest; there must be exactly one)."""
    series = [
        sample
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
        if sample.name == TASKS_INFO
    ]
    assert len(series) == 1, series
    assert set(series[0].labels) == set(TASK_INFO_LABELS)
    return series[0].labels


def assert_idle(client: httpx.Client, max_active_rows: int) -> None:
    for name in (QUEUED, RUNNING, CACHE_USAGE, CACHE_TOKENS):
        wait_for_metric(client, name, 0)
    info = {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": str(max_active_rows)}
    assert tasks_info(client) == info


LIMITS = {"max_active_rows": 2, "max_cached_tokens": 65536, **UNENDING_LIMITS}


def follow_the_rows(client: httpx.Client, d_model: int) -> None:
    """Two rows of `alpha` fill the step (2 places); `beta`'s row waits, then leaves; then runs once `alpha`'s
    client has gone. Each gauge is read at each stage."""
    for task, seed in (("alpha", 1), ("beta", 2)):
        upload(client, task, random_prompt(5, d_model, seed=seed))
    assert_idle(client, max_active_rows=2)
    with pending_request(client, "/v1/generate", generate_body("alpha", ["x", "y"], **UNENDING)):
        wait_for_metric(client, RUNNING, 2)
        assert metric(client, QUEUED) == 0
        assert tasks_info(client)["running_lora_adapters"] == "alpha"
        with pending_request(client, "/v1/generate", generate_body("beta", ["z"], **UNENDING)):
            wait_for_metric(client, QUEUED, 1)  # no place left in the step: beta's row waits
            text = client.get("/metrics").text
            assert metric(text, RUNNING) == 2
            assert metric(text, CACHE_USAGE) == metric(text, CACHE_TOKENS) / 65536 > 0
            info = tasks_info(client)
            assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("alpha", "beta")
        wait_for_metric(client, QUEUED, 0)  # beta's client left: its row left the queue
        info = tasks_info(client)
        assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("alpha", "")
        assert metric(client, RUNNING) == 2
    assert_idle(client, max_active_rows=2)
    with pending_request(client, "/v1/generate", generate_body("beta", ["z"], **UNENDING)):
        wait_for_metric(client, RUNNING, 1)  # a place is free again: beta runs
        assert tasks_info(client)["running_lora_adapters"] == "beta"
    assert_idle(client, max_active_rows=2)


def test_the_protocol_gauges_follow_the_rows_and_read_zero_when_idle(tmp_path: Path, tiny: FrozenT5) -> None:
    with serving(tmp_path, tiny, **LIMITS) as client:
        follow_the_rows(client, tiny.d_model)


def test_the_gauges_cross_the_wire_from_an_engine_process(tmp_path: Path, tiny: FrozenT5) -> None:
    """`softserve serve` as it runs in a pod: the engine is a child process, its numbers come over the wire."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in LIMITS.items()]
    with (
        server_process(tmp_path, "--cpu-threads", "1", *flags) as (_, url),
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        follow_the_rows(client, tiny.d_model)


def test_a_task_with_rows_running_and_waiting_is_named_in_both(tmp_path: Path, tiny: FrozenT5) -> None:
    with serving(tmp_path, tiny, max_active_rows=1, **UNENDING_LIMITS) as client:
        upload(client, "alpha", random_prompt(5, tiny.d_model, seed=1))
        with pending_request(client, "/v1/generate", generate_body("alpha", ["x", "y", "z"], **UNENDING)):
            wait_for_metric(client, QUEUED, 2)
            assert metric(client, RUNNING) == 1
            info = tasks_info(client)
            assert (info["running_lora_adapters"], info["waiting_lora_adapters"], info["max_lora"]) == (
                "alpha",
                "alpha",
                "1",
            )
        assert_idle(client, max_active_rows=1)


class ScriptedLink:
    """An engine the test speaks for: it keeps the client's callbacks and records what was submitted."""

    def __init__(self) -> None:
        self.submitted: list[EngineRequest] = []

    async def start(self, deliver: Deliver, down: Down, up: Up) -> None:
        self.deliver, self.down = deliver, down
        up()

    def submit(self, requests: list[EngineRequest]) -> None:
        self.submitted += requests

    def cancel(self, request_ids: list[int]) -> None:
        pass

    async def stop(self) -> None:
        pass


def engine_sample(metrics: ServerMetrics, name: str) -> float:
    return metric(metrics.render().decode(), name)


def info_labels(metrics: ServerMetrics) -> tuple[str, str]:
    (sample,) = [s for family in metrics.registry.collect() for s in family.samples if s.name == TASKS_INFO]
    return sample.labels["running_lora_adapters"], sample.labels["waiting_lora_adapters"]


def test_classify_rows_run_at_once_and_an_engine_that_goes_down_reads_idle() -> None:
    asyncio.run(classify_rows_run_at_once_and_an_engine_that_goes_down_reads_idle())


async def classify_rows_run_at_once_and_an_engine_that_goes_down_reads_idle() -> None:
    metrics, link = ServerMetrics(), ScriptedLink()
    limits = EngineLimits(max_active_rows=4, max_cached_tokens=1000, max_batch_size=4, max_batch_tokens=100)
    client = EngineClient(link, max_queue_size=16, metrics=metrics, limits=limits)
    await client.start()
    row = RowInput(torch.zeros(2, 4), [1, 2])
    client.submit([ClassifyRow(client.new_id(), "t", row, [[1]])], ["sentiment"])
    generate = GenerateRow(client.new_id(), "t", row, Sampling(), 8, task="summary")
    client.submit([generate])  # a generate row names its own task
    assert info_labels(metrics) == ("sentiment", "summary")
    link.deliver([Joined(generate.request_id)], StepStats(placed_rows=1, pending_rows=1, cache_tokens=250))
    assert info_labels(metrics) == ("sentiment,summary", "")
    assert engine_sample(metrics, RUNNING) == 2 and engine_sample(metrics, CACHE_USAGE) == 0.25
    link.down("the engine process exited")
    for name in (QUEUED, RUNNING, CACHE_USAGE, CACHE_TOKENS):
        assert engine_sample(metrics, name) == 0, name
    assert info_labels(metrics) == ("", "")
