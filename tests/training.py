"""Helpers of the training-job tests: a small labelled data set, fast configs, polling a job over HTTP."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from server.testing.reference import random_prompt

LABELS = ["yes", "no"]
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Autouse where imported: the tiny model's ops are too small to gain from threads, and on a shared
    2-core box they lose ~10x (the server under test runs in the test's process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def examples(count: int = 16, offset: int = 0) -> list[dict[str, str]]:
    return [{"input": f"sentence {i} {'x' * (i % 5)}", "target": LABELS[i % 2]} for i in range(offset, offset + count)]


def jsonl(items: list[Any]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def config(steps: int, **overrides: Any) -> dict[str, Any]:
    """A job that runs in about `steps` x 25 ms on the tiny model."""
    return {"prompt_length": 4, "init": "vocab", "batch_size": 4, "eval_every": 20, "steps": steps, **overrides}


def submit(client: httpx.Client, task_id: str, steps: int, **body: Any) -> str:
    payload = {"task_id": task_id, "train": examples(), "eval": examples(4, 100), "config": config(steps), **body}
    response = client.post("/v1/training-jobs", json=payload)
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "queued"
    return response.json()["job_id"]


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/training-jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_until_ended(client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    return wait_for(lambda: (j := job(client, job_id))["state"] in FINAL and j, timeout_s, f"job {job_id} to end")


def wait_until_step(client: httpx.Client, job_id: str, step: int, timeout_s: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        current = job(client, job_id)
        assert current["state"] in ("queued", "running"), current
        return current if current["progress"]["step"] >= step else None

    return wait_for(reached, timeout_s, f"job {job_id} to reach step {step}")


def upload(client: httpx.Client, task_id: str, seed: int) -> None:
    buffer = io.BytesIO()
    np.save(buffer, random_prompt(4, 64, seed).numpy())
    response = client.put(f"/v1/prompts/{task_id}", files={"file": ("p.npy", buffer.getvalue())})
    assert response.status_code == 201, response.text
