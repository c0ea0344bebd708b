"""`POST /v1/generate` with `stream: true` over real HTTP: server-sent events, one per token, then the end.

The stream is checked against the same request unstreamed and the model called directly; a client that
leaves and a deadline that passes mid-stream are checked through the engine's own metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.client import AsyncSoftserveClient, SoftserveClient, SoftserveError
from server.serving.model import Decoding, FrozenT5, Row
from server.settings import Settings
from server.testing.reference import random_prompt
from tests.prometheus import metric
from tests.serving import running_server
from tests.test_hot_loading import eventually
from tests.test_inference_api import upload

README = Path(__file__).resolve().parents[1] / "README.md"
# ByT5 token ids are bytes + 3: a UTF-8 continuation byte (0b10xxxxxx) ends a character begun in an earlier token.
BYTE_OFFSET = 3
CONTINUATION_IDS = range(0x80 + BYTE_OFFSET, 0xC0 + BYTE_OFFSET)
# Long enough that a row is still decoding when the test acts on it (the tiny model makes ~1,000 tokens/s).
LONG = 4000
ROWS_LEFT = "softserve_engine_rows_left_total"
ACTIVE_ROWS = "softserve_engine_active_rows"
REQUESTS = "softserve_requests_total"

Event = tuple[str, dict[str, Any]]


def server_events(lines: Iterable[str]) -> Iterator[Event]:
    """(event name, parsed data) of each server-sent event, read independently of the client under test."""
    name, data = "message", []
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))
        elif line == "" and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []
        else:
            assert line == "", f"not a server-sent event line: {line!r}"


def stream(client: httpx.Client, body: dict[str, Any]) -> tuple[httpx.Headers, list[Event]]:
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return response.headers, list(server_events(response.iter_lines()))


def tokens_and_end(events: list[Event]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The token events' data and the final event's, checking their order and shape."""
    *token_events, (last_name, end) = events
    assert last_name == "end", events[-1]
    assert all(name == "message" and set(data) == {"index", "token"} for name, data in token_events), token_events
    tokens = [data for _, data in token_events]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert set(end) == {"task_id", "prompt_version", "finish_reason", "text", "num_tokens"}
    return tokens, end


def long_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_wait_ms=2, max_new_tokens=LONG, max_beam_tokens=LONG, **overrides)


def long_body(task_id: str) -> dict[str, Any]:
    return {"task_id": task_id, "inputs": "x", "parameters": {"max_new_tokens": LONG, "ignore_eos": True}}


def rows_left(client: httpx.Client, reason: str) -> float:
    return metric(client, ROWS_LEFT, reason=reason)


def wait_until_no_row_is_active(client: httpx.Client) -> None:
    eventually(lambda: metric(client, ACTIVE_ROWS) == 0, 10, "the engine's active rows to return to 0")


@pytest.mark.parametrize(
    "parameters",
    [{"max_new_tokens": 24}, {"max_new_tokens": 40, "do_sample": True, "temperature": 3.0, "seed": 5}],
    ids=["greedy", "seeded-sampling"],
)
def test_the_stream_is_the_unstreamed_answer_token_by_token(client: httpx.Client, parameters: dict[str, Any]) -> None:
    upload(client, "t", random_prompt(4, 64, seed=2))
    body = {"task_id": "t", "inputs": "a gorgeous, witty film", "parameters": parameters}
    headers, events = stream(client, body)
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    tokens, end = tokens_and_end(events)

    unstreamed = client.post("/v1/generate", json=body).json()
    (output,) = unstreamed["outputs"]
    assert end == {"task_id": "t", "prompt_version": unstreamed["prompt_version"], **output}
    assert len(tokens) == end["num_tokens"] > 1
    assert "".join(t["token"]["text"] for t in tokens) == end["text"] != ""


def test_greedy_tokens_are_the_models_own(client: httpx.Client, tiny: FrozenT5) -> None:
    prompt = random_prompt(4, 64, seed=0)
    upload(client, "t", prompt)
    _, events = stream(client, {"task_id": "t", "inputs": "hello there", "parameters": {"max_new_tokens": 30}})
    tokens, end = tokens_and_end(events)
    row = Row(tiny.prompt_on_device(prompt), tiny.tokenize(["hello there"])[0])
    (direct,) = tiny.generate([row], Decoding(), [30])
    assert [t["token"]["id"] for t in tokens] == direct.token_ids
    assert (end["text"], end["finish_reason"]) == (direct.text, direct.finish_reason)


def test_a_character_spread_over_several_tokens_arrives_whole(client: httpx.Client) -> None:
    """ByT5 decodes byte by byte: a character's first bytes add no text; the token that completes it adds it."""
    upload(client, "t", random_prompt(4, 64, seed=0))
    body = {"task_id": "t", "inputs": "日本語のテキスト, ünïcödé ✓", "parameters": {"max_new_tokens": 64}}
    tokens, end = tokens_and_end(stream(client, body)[1])
    texts = [t["token"]["text"] for t in tokens]
    assert "".join(texts) == end["text"] == client.post("/v1/generate", json=body).json()["outputs"][0]["text"]
    assert all("\ufffd" not in text for text in texts)
    completing = [i for i, t in enumerate(tokens) if any(len(c.encode()) > 1 for c in t["token"]["text"])]
    assert completing, f"the output has no multi-byte character to check: {end['text']!r}"
    for i in completing:
        last_char_bytes = len(texts[i][-1].encode())
        assert tokens[i]["token"]["id"] in CONTINUATION_IDS  # the character ends in this token...
        assert texts[i - last_char_bytes + 1 : i] == [""] * (last_char_bytes - 1)  # ...its first bytes added nothing


def test_a_client_leaving_mid_stream_cancels_its_row(tmp_path: Path, tiny: FrozenT5) -> None:
    with running_server(long_settings(tmp_path), tiny) as url, httpx.Client(base_url=url, timeout=30) as client:
        upload(client, "t", random_prompt(4, 64, seed=1))
        cancelled = rows_left(client, "cancelled")
        with client.stream("POST", "/v1/generate", json={**long_body("t"), "stream": True}) as response:
            events = server_events(response.iter_lines())
            assert [next(events)[1]["index"] for _ in range(3)] == [0, 1, 2]
        eventually(lambda: rows_left(client, "cancelled") == cancelled + 1, 10, "the row to leave as cancelled")
        wait_until_no_row_is_active(client)
        assert rows_left(client, "length") == 0  # it never ran to its end
        ok = {"route": "/v1/generate", "status": "200"}
        eventually(
            lambda: metric(client, REQUESTS, default=0, **ok) == 1, 10, "the request to be counted, its client gone"
        )

        with SoftserveClient(url) as softserve:  # the client's iterator, left early, closes the connection too
            for event in softserve.generate_stream("t", "x", max_new_tokens=LONG, ignore_eos=True):
                if event["index"] == 2:
                    break
        eventually(lambda: rows_left(client, "cancelled") == cancelled + 2, 10, "the second row to leave")
        wait_until_no_row_is_active(client)


def test_a_deadline_mid_stream_ends_it_with_an_error_event(tmp_path: Path, tiny: FrozenT5) -> None:
    with running_server(long_settings(tmp_path, request_timeout_s=1.0), tiny) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            upload(client, "t", random_prompt(4, 64, seed=1))
            *tokens, (name, error) = stream(client, long_body("t"))[1]
            assert name == "error" and error["error"]["code"] == "deadline_exceeded", (name, error)
            assert set(error) == {"error"} and error["error"]["message"]
            assert 0 < len(tokens) < LONG and all(name == "message" for name, _ in tokens)
            assert rows_left(client, "deadline") == 1
            assert metric(client, "softserve_rejections_total", reason="deadline_exceeded") == 1
            wait_until_no_row_is_active(client)

        with SoftserveClient(url) as softserve, pytest.raises(SoftserveError) as raised:
            list(softserve.generate_stream("t", "x", max_new_tokens=LONG, ignore_eos=True))
        assert (raised.value.status, raised.value.code) == (200, "deadline_exceeded")  # the stream had begun


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": ["one", "two"]}, "exactly one input"),
        ({"parameters": {"num_beams": 2}}, "beam search cannot stream"),
    ],
    ids=["two-inputs", "beams"],
)
def test_what_cannot_stream_is_refused_before_the_stream(
    client: httpx.Client, change: dict[str, Any], message: str
) -> None:
    upload(client, "t", random_prompt(4, 64, seed=1))
    response = client.post("/v1/generate", json={"task_id": "t", "inputs": "x", "stream": True, **change})
    assert response.status_code == 422 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "invalid_input" and message in response.json()["error"]["message"]


def test_the_static_scheduler_refuses_streams(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2, scheduler="static")
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as client:
        upload(client, "t", random_prompt(4, 64, seed=1))
        body = {"task_id": "t", "inputs": "x"}
        assert client.post("/v1/generate", json=body).status_code == 200
        response = client.post("/v1/generate", json={**body, "stream": True})
        assert response.status_code == 422, response.text
        assert "continuous scheduler" in response.json()["error"]["message"]


def test_the_python_clients_iterate_the_stream(base_url: str, client: httpx.Client) -> None:
    upload(client, "t", random_prompt(4, 64, seed=3))
    unstreamed = client.post("/v1/generate", json={"task_id": "t", "inputs": "hi", "parameters": {"max_new_tokens": 9}})
    expected = {"task_id": "t", "prompt_version": 1, **unstreamed.json()["outputs"][0]}

    with SoftserveClient(base_url) as softserve:
        events = list(softserve.generate_stream("t", "hi", max_new_tokens=9))
        with pytest.raises(SoftserveError) as missing:
            list(softserve.generate_stream("no-such-task", "hi"))
    assert (missing.value.status, missing.value.code) == (404, "not_found")

    async def read_async() -> list[dict[str, Any]]:
        async with AsyncSoftserveClient(base_url) as softserve:
            return [event async for event in softserve.generate_stream("t", "hi", max_new_tokens=9)]

    for received in (events, asyncio.run(read_async())):
        tokens, end = tokens_and_end([("message", e) for e in received[:-1]] + [("end", received[-1])])
        assert end == expected
        assert "".join(t["token"]["text"] for t in tokens) == end["text"]


def readme_streaming_blocks() -> tuple[str, str]:
    section = README.read_text().split("\n## Streaming\n", 1)[1].split("\n## ", 1)[0]
    (curl,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    (python,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return curl, python


def test_the_readme_streaming_examples_run_as_written(base_url: str, client: httpx.Client) -> None:
    """Against a server holding the tour's `sst2` task."""
    upload(client, "sst2", random_prompt(20, 64, seed=0), input_template="sentence: {input}")
    curl, python = (block.replace("http://127.0.0.1:8000", base_url) for block in readme_streaming_blocks())

    run = subprocess.run(["bash", "-c", f"set -euo pipefail\n{curl}"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    tokens, end = tokens_and_end(list(server_events(run.stdout.splitlines())))
    assert end["task_id"] == "sst2" and end["num_tokens"] == len(tokens) > 0

    run = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == f"{end['num_tokens']} tokens, {end['finish_reason']}"
