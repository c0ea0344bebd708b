"""The continuous engine over real HTTP (the app with the `tiny` model, the engine in a thread): shedding,
deadlines, bounded memory, and classify requests that do not wait behind long generations."""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.serving.model import FrozenT5
from server.testing.reference import random_prompt
from tests.prometheus import metric, wait_for_metric
from tests.serving import server_process
from tests.test_hostile_inference import (
    JSON,
    error,
    generate_body,
    pending_request,
    read_response,
    serving,
)
from tests.test_inference_api import upload

LONG = {"max_new_tokens": 256, "ignore_eos": True}
UNENDING_LIMITS = {"max_new_tokens": 8192, "max_beam_tokens": 8192}
UNENDING = {"max_new_tokens": 8192, "ignore_eos": True}  # far longer than any test waits: rows leave when cancelled


def test_a_full_engine_sheds_before_the_body_is_read(tmp_path: Path, tiny: FrozenT5) -> None:
    """The 4 rows that fill the engine outlast the test by far (8192 steps, tens of seconds), so they are still
    decoding when the bodiless request comes however busy the machine is, and they leave only when their client
    does. (With 256 steps they finished in about 0.5 s: on a busy machine before the shed was asked for.)"""
    with serving(tmp_path, tiny, max_queue_size=4, shed_delay_ms=300, **UNENDING_LIMITS) as client:
        upload(client, "t", random_prompt(5, tiny.d_model, seed=1))
        with pending_request(client, "/v1/generate", generate_body("t", ["x"] * 4, **UNENDING)):
            wait_for_metric(client, "softserve_engine_active_rows", 4)
            with pending_request(client, "/v1/classify", b"", declared_length=10**6) as bodiless:
                sent = time.monotonic()
                shed = read_response(bodiless)  # answered though its body never comes
                held = time.monotonic() - sent
            assert shed.status == 503 and int(shed.getheader("Retry-After", "0")) >= 1
            assert held >= 0.3  # a client retrying at once waits for its 503 (a lower bound, not a timing)
            assert json.loads(shed.read())["error"]["code"] == "overloaded"
        wait_for_metric(client, "softserve_engine_active_rows", 0)  # the client left: its rows left too
        assert metric(client.get("/metrics").text, "softserve_engine_rows_left_total", reason="cancelled") == 4
        body = {"task_id": "t", "inputs": ["x"] * 5}
        assert "this server queues at most 4" in error(
            client.post("/v1/generate", json=body), 422
        )  # never servable: 422
        assert client.post("/v1/generate", json={"task_id": "t", "inputs": ["x"] * 4}).status_code == 200


def test_refusals_in_a_row_on_one_connection_wait_twice_as_long_each_until_one_is_taken(
    tmp_path: Path, tiny: FrozenT5
) -> None:
    """A client retrying its 503s at once on one connection waits 50, 100, 150 (the cap), 150 ms for them; a request
    taken on the connection starts it again, and another connection's first refusal waits the first delay. The
    waits are read from `softserve_shed_delay_seconds`: what the server chose, not a wall-clock timing."""
    delays = {"shed_delay_ms": 50, "shed_delay_max_ms": 150}
    body = {"task_id": "t", "inputs": ["x"]}
    with serving(tmp_path, tiny, max_queue_size=4, **delays, **UNENDING_LIMITS) as client:
        upload(client, "t", random_prompt(5, tiny.d_model, seed=1))
        fill = generate_body("t", ["x"] * 4, **UNENDING)

        def waited() -> tuple[float, float]:
            text = client.get("/metrics").text
            return metric(text, "softserve_shed_delay_seconds_count"), metric(text, "softserve_shed_delay_seconds_sum")

        with httpx.Client(base_url=client.base_url, timeout=30) as one_connection:
            with pending_request(client, "/v1/generate", fill):
                wait_for_metric(client, "softserve_engine_active_rows", 4)
                for _ in range(4):
                    assert one_connection.post("/v1/generate", json=body).status_code == 503
                assert waited() == (4, pytest.approx(0.05 + 0.1 + 0.15 + 0.15))
                assert client.post("/v1/generate", json=body).status_code == 503  # another connection
                assert waited() == (5, pytest.approx(0.5))
            wait_for_metric(client, "softserve_engine_active_rows", 0)
            assert one_connection.post("/v1/generate", json=body).status_code == 200
            with pending_request(client, "/v1/generate", fill):
                wait_for_metric(client, "softserve_engine_active_rows", 4)
                assert one_connection.post("/v1/generate", json=body).status_code == 503
                assert waited() == (6, pytest.approx(0.55))  # started again


@pytest.mark.timing
def test_a_deadline_mid_generation_is_504_and_the_row_leaves(tmp_path: Path, tiny: FrozenT5) -> None:
    with serving(tmp_path, tiny, request_timeout_s=0.5, **UNENDING_LIMITS) as client:
        upload(client, "t", random_prompt(5, tiny.d_model, seed=1))
        started = time.monotonic()
        response = client.post("/v1/generate", json={"task_id": "t", "inputs": ["x"] * 8, "parameters": UNENDING})
        assert response.status_code == 504, response.text
        assert time.monotonic() - started < 5
        wait_for_metric(client, "softserve_engine_active_rows", 0)
        text = client.get("/metrics").text
        left = sum(
            metric(text, "softserve_engine_rows_left_total", reason=reason) for reason in ("deadline", "cancelled")
        )
        assert left == 8
        assert metric(text, "softserve_engine_rows_left_total", reason="length") == 0


def test_many_long_requests_wait_for_memory_and_all_finish(tmp_path: Path, tiny: FrozenT5) -> None:
    """Cached tokens for about two rows at a time: 12 long requests queue for room, none fails."""
    prompt = random_prompt(5, tiny.d_model, seed=1)
    row_tokens = 5 + len(tiny.tokenize(["some input"])[0]) + 64
    with serving(tmp_path, tiny, max_cached_tokens=2 * row_tokens + 1) as client:
        upload(client, "t", prompt)
        body = {"task_id": "t", "inputs": "some input", "parameters": {"max_new_tokens": 64, "ignore_eos": True}}
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: client.post("/v1/generate", json=body), range(12)))
        assert [r.status_code for r in responses] == [200] * 12
        assert all(r.json()["outputs"][0]["num_tokens"] == 64 for r in responses)
        text = client.get("/metrics").text
        assert metric(text, "softserve_batch_size_bucket", le="2.0") == metric(text, "softserve_batch_size_count")


@pytest.mark.timing
def test_classify_does_not_wait_behind_long_generations(tmp_path: Path, tiny: FrozenT5) -> None:
    """A classify request while long generations run takes at most about one decoder step more than idle:
    within 2x its idle latency (a ratio on one machine, medians of 25). `softserve serve` as deployed: the
    engine in its own process."""
    with server_process(tmp_path, "--cpu-threads", "1") as (_, url), httpx.Client(base_url=url, timeout=60) as client:
        upload(client, "t", random_prompt(5, tiny.d_model, seed=1))
        classify = {"task_id": "t", "inputs": "a fine film", "labels": ["positive", "negative"]}

        def latencies(count: int) -> list[float]:
            seen = []
            for _ in range(count):
                started = time.perf_counter()
                assert client.post("/v1/classify", json=classify).status_code == 200
                seen.append(time.perf_counter() - started)
            return seen

        latencies(5)
        idle = statistics.median(latencies(25))
        long_body = {"task_id": "t", "inputs": ["some long input text"] * 8, "parameters": LONG}
        with httpx.Client(base_url=url, timeout=120) as other, ThreadPoolExecutor(1) as pool:
            generation = pool.submit(other.post, "/v1/generate", json=long_body, headers=JSON)
            wait_for_metric(client, "softserve_engine_active_rows", 8)
            busy = statistics.median(latencies(25))
            assert metric(client.get("/metrics").text, "softserve_engine_active_rows") == 8  # still generating
            assert generation.result().status_code == 200
        assert busy <= 2 * idle, f"idle median {idle * 1000:.1f} ms, busy {busy * 1000:.1f} ms"


def test_while_a_row_streams_every_pass_keeps_to_the_stream_budget(tmp_path: Path, tiny: FrozenT5) -> None:
    """A classify of about 1,100 tokens runs in passes of up to `pass_budget_tokens` when no row in the step
    streams, and of at most `stream_pass_budget_tokens` while one does (each pass is a gap in its tokens)."""
    stream_budget = 128
    settings = {"pass_budget_tokens": 1024, "stream_pass_budget_tokens": stream_budget, **UNENDING_LIMITS}
    with serving(tmp_path, tiny, **settings) as client:
        upload(client, "t", random_prompt(5, tiny.d_model, seed=1))
        classify = {"task_id": "t", "inputs": "a fine film", "labels": [f"label number {i:02d}" for i in range(64)]}

        def passes_over_stream_budget() -> float:
            text = client.get("/metrics").text
            name = "softserve_engine_pass_budget_spent_tokens"
            return metric(text, f"{name}_count") - metric(text, f"{name}_bucket", le=f"{stream_budget}.0")

        assert client.post("/v1/classify", json=classify).status_code == 200
        alone = passes_over_stream_budget()
        assert alone >= 1  # its first pass: the row's encoder tokens and about 60 labels of 17 tokens
        streamed = json.dumps({"task_id": "t", "inputs": "x", "stream": True, "parameters": UNENDING}).encode()
        with pending_request(client, "/v1/generate", streamed):
            wait_for_metric(client, "softserve_engine_active_rows", 1)
            assert client.post("/v1/classify", json=classify).status_code == 200
            assert metric(client.get("/metrics").text, "softserve_engine_active_rows") == 1  # still streaming
        assert passes_over_stream_budget() == alone
