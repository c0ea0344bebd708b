"""Graceful shutdown and dropped work, with `softserve serve` as a real process."""

from __future__ import annotations

import io
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

from tests.prometheus import metric, wait_for_metric
from tests.serving import server_process
from tests.test_hostile_inference import generate_body, pending_request
from tests.test_hot_loading import eventually

INPUTS = ["some input text"] * 4
ROWS_LEFT = "softserve_engine_rows_left_total"
UNENDING = 8192  # tokens: minutes of decoding, so a row that ends sooner was made to leave


def upload_prompt(url: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32))
    assert httpx.put(f"{url}/v1/prompts/t", files={"file": ("p", buffer.getvalue())}).status_code == 201


def generate(url: str, max_new_tokens: int, timeout: float = 300, ignore_eos: bool = False) -> int:
    parameters = {"max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos}
    body = {"task_id": "t", "inputs": INPUTS, "parameters": parameters}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=timeout).status_code


def rows_in_the_engine(client: httpx.Client) -> float:
    """Generate rows the engine has taken: joined the decoder step (some perhaps done since), or waiting."""
    text = client.get("/metrics").text
    return metric(text, "softserve_engine_rows_joined_total") + metric(text, "softserve_engine_waiting_rows")


def rows_in_the_batcher(client: httpx.Client) -> float:
    """Rows the static batcher has taken: given to the model (each observed its queue wait), or queued."""
    text = client.get("/metrics").text
    return metric(text, "softserve_queue_wait_seconds_count") + metric(text, "softserve_queue_depth")


def test_sigterm_turns_ready_503_and_loses_no_accepted_request(tmp_path: Path) -> None:
    flags = ("--drain-delay-s", "1.5", "--max-batch-size", "4", "--request-timeout-s", "300")
    with server_process(tmp_path, *flags) as (process, url), httpx.Client(base_url=url, timeout=30) as client:
        upload_prompt(url)
        with ThreadPoolExecutor(8) as pool:
            accepted = [pool.submit(generate, url, 64) for _ in range(8)]
            eventually(lambda: rows_in_the_engine(client) == 8 * len(INPUTS), 30, "all 8 requests accepted")
            process.send_signal(signal.SIGTERM)
            eventually(lambda: client.get("/ready").status_code == 503, 1.5, "/ready to turn 503 while draining")
            assert client.get("/ready").json()["status"] == "draining"
            assert [f.result() for f in accepted] == [200] * 8
        process.wait(timeout=120)
        assert process.returncode in (0, -signal.SIGTERM)


def test_rows_of_a_client_that_left_leave_the_engine_at_once(tmp_path: Path) -> None:
    """Continuous engine: the rows of a client that left leave at the engine's next steps, the rows that were
    decoding (with minutes of tokens to go) as well as the rows waiting for a place, which never join."""
    limits = ("--max-new-tokens", str(UNENDING), "--max-beam-tokens", str(UNENDING))
    flags = ("--max-active-rows", "4", "--request-timeout-s", "300", *limits)
    unending = generate_body("t", INPUTS, max_new_tokens=UNENDING, ignore_eos=True)
    with server_process(tmp_path, *flags) as (_, url), httpx.Client(base_url=url, timeout=30) as client:
        upload_prompt(url)
        with pending_request(client, "/v1/generate", unending):
            wait_for_metric(client, "softserve_engine_active_rows", 4)  # decoding: the step is full
            with pending_request(client, "/v1/generate", unending):
                wait_for_metric(client, "softserve_engine_waiting_rows", 4)
            wait_for_metric(client, ROWS_LEFT, 4, reason="cancelled")
            assert metric(client, "softserve_engine_rows_joined_total") == 4  # the waiting rows never joined
            assert metric(client, "softserve_engine_active_rows") == 4  # the decoding rows decode on
            generated_before_leaving = metric(client, "softserve_generated_tokens_total")
        wait_for_metric(client, ROWS_LEFT, 8, reason="cancelled")
        wait_for_metric(client, "softserve_engine_active_rows", 0)
        text = client.get("/metrics").text
        assert metric(text, ROWS_LEFT, reason="length") == 0
        generated_after_leaving = metric(text, "softserve_generated_tokens_total") - generated_before_leaving
        assert generated_after_leaving < (4 * UNENDING - generated_before_leaving) / 10  # not run on to the end


def test_rows_of_a_client_that_left_are_not_computed(tmp_path: Path) -> None:
    """Static scheduler: queued rows of a client that left never reach the model."""
    flags = ("--scheduler", "static", "--max-batch-size", "4", "--max-wait-ms", "0", "--request-timeout-s", "300")
    with server_process(tmp_path, *flags) as (_, url), httpx.Client(base_url=url, timeout=30) as client:
        upload_prompt(url)
        impatient_body = generate_body("t", INPUTS, max_new_tokens=256)
        with ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(generate, url, 256) for _ in range(4)]  # the model thread, busy for 4 batches
            eventually(lambda: rows_in_the_batcher(client) == 16, 30, "the busy requests to be queued")
            with ExitStack() as impatient:
                for _ in range(3):
                    impatient.enter_context(pending_request(client, "/v1/generate", impatient_body))
                eventually(lambda: rows_in_the_batcher(client) == 28, 30, "the impatient requests to be queued")
            assert [f.result() for f in busy] == [200] * 4
        wait_for_metric(client, "softserve_dropped_rows_total", 12)  # 3 requests x 4 rows, before the model
        assert metric(client, "softserve_batch_size_sum") == 16  # the four busy requests, nothing else
