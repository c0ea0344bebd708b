"""Graceful shutdown and dropped work, with `softserve serve` as a real process."""

from __future__ import annotations

import io
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from tests.serving import server_process
from tests.training import metric


def upload_prompt(url: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32))
    assert httpx.put(f"{url}/v1/prompts/t", files={"file": ("p", buffer.getvalue())}).status_code == 201


def generate(url: str, max_new_tokens: int, timeout: float = 300, ignore_eos: bool = False) -> int:
    parameters = {"max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos}
    body = {"task_id": "t", "inputs": ["some input text"] * 4, "parameters": parameters}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=timeout).status_code


def test_sigterm_turns_ready_503_and_loses_no_accepted_request(tmp_path: Path) -> None:
    flags = ("--drain-delay-s", "1.5", "--max-batch-size", "4", "--request-timeout-s", "300")
    with server_process(tmp_path, *flags) as (process, url):
        upload_prompt(url)
        with ThreadPoolExecutor(8) as pool:
            accepted = [pool.submit(generate, url, 64) for _ in range(8)]
            time.sleep(0.3)  # let them reach the server
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            ready = httpx.get(f"{url}/ready", timeout=30)
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            assert [f.result() for f in accepted] == [200] * 8
        process.wait(timeout=120)
        assert process.returncode in (0, -signal.SIGTERM)


def test_rows_of_a_client_that_left_leave_the_decoder_step(tmp_path: Path) -> None:
    """Continuous engine: the rows of a client that left (queued or decoding) leave at the engine's next step."""
    flags = ("--max-active-rows", "4", "--request-timeout-s", "300")
    with server_process(tmp_path, *flags) as (_, url):
        upload_prompt(url)
        with ThreadPoolExecutor(8) as pool:
            busy = [pool.submit(generate, url, 64, 300, True) for _ in range(2)]
            time.sleep(0.3)
            impatient = [pool.submit(generate, url, 256, 0.3, True) for _ in range(3)]
            for future in impatient:
                assert isinstance(future.exception(), httpx.TimeoutException)
            assert [f.result() for f in busy] == [200] * 2
        deadline = time.monotonic() + 10
        cancelled = 0.0
        while time.monotonic() < deadline and cancelled < 12:
            cancelled = metric(httpx.get(f"{url}/metrics").text, "softserve_engine_rows_left_total", reason="cancelled")
            time.sleep(0.1)
        text = httpx.get(f"{url}/metrics").text
        assert cancelled == 12  # 3 requests x 4 rows, none of them run to its end
        assert metric(text, "softserve_engine_rows_left_total", reason="length") == 8  # the two busy requests
        assert metric(text, "softserve_generated_tokens_total") < 8 * 64 + 12 * 256


def test_rows_of_a_client_that_left_are_not_computed(tmp_path: Path) -> None:
    """Static scheduler: queued rows of a client that left never reach the model."""
    flags = ("--scheduler", "static", "--max-batch-size", "4", "--max-wait-ms", "0", "--request-timeout-s", "300")
    with server_process(tmp_path, *flags) as (_, url):
        upload_prompt(url)
        with ThreadPoolExecutor(8) as pool:
            busy = [pool.submit(generate, url, 256) for _ in range(4)]  # keep the model thread busy
            time.sleep(0.3)
            impatient = [pool.submit(generate, url, 256, 0.2) for _ in range(3)]
            for future in impatient:
                assert isinstance(future.exception(), httpx.TimeoutException)
            assert [f.result() for f in busy] == [200] * 4
        deadline = time.monotonic() + 10
        dropped = 0.0
        while time.monotonic() < deadline and dropped < 12:
            dropped = metric(httpx.get(f"{url}/metrics").text, "softserve_dropped_rows_total")
            time.sleep(0.1)
        assert dropped == 12  # 3 requests x 4 rows, dropped before reaching the model
        batch_rows = metric(httpx.get(f"{url}/metrics").text, "softserve_batch_size_sum")
        assert batch_rows == 16  # the four busy requests, nothing else
