"""Hostile tenants on the inference hot path (issue 9): no request may break the server, another tenant, or
take more model work than the settings allow. Over real HTTP against the app, with the `tiny` model."""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import logging
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch

from prompt_store import DiskStore, SoftPrompt, TaskMetadata
from server.serving.model import Decoding, FrozenT5, Row
from server.serving.service import TOKENIZE_INLINE_MAX_CHARS
from server.settings import Settings
from server.testing.reference import random_prompt
from tests.prometheus import metric, wait_for_metric
from tests.serving import running_server
from tests.test_inference_api import direct_generate, upload

# With this prompt and input, a sampled row (seed 7) of the tiny model runs its whole 256 tokens.
LONG_INPUT = "alpha beta"
LONG_SAMPLE = {"do_sample": True, "seed": 7, "max_new_tokens": 256}
JSON = {"content-type": "application/json"}


def long_prompt(model: FrozenT5) -> torch.Tensor:
    return random_prompt(5, model.d_model, seed=1)


@contextmanager
def serving(tmp_path: Path, tiny: FrozenT5, **settings: object) -> Iterator[httpx.Client]:
    settings_ = Settings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
    with running_server(settings_, tiny) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def error(response: httpx.Response, status: int) -> str:
    """The error's message, once the status and the error body's shape are checked."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"code", "message", "type", "param"}
    return body["message"]


@contextmanager
def pending_request(client: httpx.Client, path: str, body: bytes, declared_length: int | None = None) -> Iterator:
    """A POST on a socket of its own, whose answer nobody reads: when the block ends the client is gone.

    `declared_length` above `len(body)` leaves the server waiting for a body that never comes."""
    parts = urlsplit(str(client.base_url))
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    length = len(body) if declared_length is None else declared_length
    head = f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {length}\r\n\r\n".encode() + body)
    try:
        yield sock
    finally:
        sock.close()


def read_response(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response


def generate_body(task_id: str, inputs: list[str], **parameters: object) -> bytes:
    return json.dumps({"task_id": task_id, "inputs": inputs, "parameters": parameters}).encode()


def store_legacy_task(data_dir: Path, task_id: str, prompt: torch.Tensor, **metadata: object) -> None:
    """A task written by an older server (or by hand), which today's upload checks would refuse."""
    DiskStore(data_dir / "prompts").add_version("default", task_id, SoftPrompt(prompt), TaskMetadata(**metadata))


# Finding 4: lone surrogates


def test_lone_surrogates_in_inputs_or_labels_are_a_422_naming_the_field(tmp_path: Path, tiny: FrozenT5) -> None:
    with serving(tmp_path, tiny) as client:
        upload(client, "t", random_prompt(3, tiny.d_model, seed=0), labels=["yes", "no"])
        bodies = {
            "/v1/generate": ['"inputs": "\\ud800"', '"inputs": ["fine", "bad \\udfff"]'],
            "/v1/classify": ['"inputs": ["\\ud83d"]', '"inputs": "fine", "labels": ["yes", "\\udc00no"]'],
        }
        for route, fields in bodies.items():
            for field in fields:
                response = client.post(route, content=f'{{"task_id": "t", {field}}}', headers=JSON)
                message = error(response, 422)
                assert "surrogate" in message, message
                assert message.startswith("labels" if "labels" in field else "inputs"), message
        assert client.post("/v1/generate", json={"task_id": "t", "inputs": "still \U0001f600 fine"}).status_code == 200


# Finding 5: temperature and non-finite scores


def test_a_vanishing_temperature_is_refused_and_non_finite_scores_fail_only_their_row(
    tmp_path: Path, tiny: FrozenT5
) -> None:
    data_dir = tmp_path / "data"
    store_legacy_task(data_dir, "cold", random_prompt(3, tiny.d_model, 0), parameters={"temperature": 1e-45})
    store_legacy_task(data_dir, "broken", torch.full((3, tiny.d_model), float("nan")), labels=["yes", "no"])
    with serving(data_dir, tiny, max_wait_ms=50) as client:
        fine = random_prompt(4, tiny.d_model, seed=1)
        upload(client, "fine", fine)
        sampled = {"do_sample": True, "temperature": 1e-45}
        message = error(
            client.post("/v1/generate", json={"task_id": "fine", "inputs": "x", "parameters": sampled}), 422
        )
        assert "temperature" in message
        sample = {"parameters": {"do_sample": True}}
        message = error(client.post("/v1/generate", json={"task_id": "cold", "inputs": "x", **sample}), 422)
        assert "default parameters" in message and "temperature" in message  # stored before the floor: no 500

        def generate(task_id: str, **parameters: object) -> tuple[str, dict[str, object]]:
            return "/v1/generate", {"task_id": task_id, "inputs": ["a", "b"], "parameters": parameters}

        calls = [generate("broken"), generate("broken", do_sample=True, seed=1), generate("broken", num_beams=2)]
        calls += [("/v1/classify", {"task_id": "broken", "inputs": "a"}), *[generate("fine", max_new_tokens=5)] * 2]
        with ThreadPoolExecutor(len(calls)) as pool:  # at once, so that rows of both tasks share model calls
            responses = list(pool.map(lambda call: client.post(call[0], json=call[1]), calls))
        for (_, body), response in zip(calls, responses, strict=True):
            if body["task_id"] == "broken":
                assert error(response, 422).startswith("the model's scores for this input are not finite")
                assert response.json()["error"]["code"] == "invalid_input"
            else:
                expected = [direct_generate(tiny, fine, text, 5) for text in ("a", "b")]
                assert [o["text"] for o in response.json()["outputs"]] == expected
        assert client.get("/ready").status_code == 200


# Finding 7: templating and tokenizing


class LoopWatchingT5(FrozenT5):
    """The tiny model, noting for each tokenize call whether it ran on the event loop's thread."""

    def __init__(self, model: FrozenT5) -> None:
        super().__init__(model.model, model.tokenizer, model.model_id, model.device, model.dtype)
        self.on_loop: list[bool] = []

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        return super().tokenize(texts)


def test_texts_are_bounded_before_templating_and_long_ones_tokenized_off_the_loop(
    tmp_path: Path, tiny: FrozenT5
) -> None:
    """Texts are checked before they are templated or tokenized. A request's texts (templated) and labels of at
    most `TOKENIZE_INLINE_MAX_CHARS` characters in all are tokenized on the event loop, where a worker thread would
    cost more than the tokenizing; longer ones in a worker thread."""
    data_dir = tmp_path / "data"
    store_legacy_task(data_dir, "echo", random_prompt(3, tiny.d_model, 0), input_template="{input}" * 1000)
    watched = LoopWatchingT5(tiny)
    settings = Settings(data_dir=data_dir, max_input_chars=2000, max_input_tokens=1024)
    with running_server(settings, watched) as url, httpx.Client(base_url=url, timeout=60) as client:
        upload(client, "t", random_prompt(3, tiny.d_model, seed=0), labels=["yes", "no"])
        watched.on_loop.clear()
        message = error(client.post("/v1/generate", json={"task_id": "t", "inputs": ["ok", "x" * 2001]}), 422)
        assert message == "input 1 has 2001 characters; the limit is 2000"
        message = error(client.post("/v1/classify", json={"task_id": "t", "inputs": "ok", "labels": ["y" * 2001]}), 422)
        assert message == "label 0 has 2001 characters; the limit is 2000"
        # 80 bytes of input would be 80,000 characters once templated: refused before the text is built
        message = error(client.post("/v1/generate", json={"task_id": "echo", "inputs": "z" * 80}), 422)
        assert message == "input 0 is 80000 characters once placed in the task's input template; the limit is 2000"
        assert watched.on_loop == []  # none of those reached the tokenizer

        assert client.post("/v1/generate", json={"task_id": "echo", "inputs": "z"}).status_code == 200  # 1,000 chars
        assert client.post("/v1/classify", json={"task_id": "t", "inputs": ["a", "b"]}).status_code == 200
        assert watched.on_loop == [False, True]
        short, long = "a" * (TOKENIZE_INLINE_MAX_CHARS - 5), "a" * (TOKENIZE_INLINE_MAX_CHARS - 4)
        for text in (short, long):  # with the labels' 5 characters: at the bound, and one past it
            assert client.post("/v1/classify", json={"task_id": "t", "inputs": text}).status_code == 200
        assert watched.on_loop == [False, True, True, False]


# Finding 8: every request's model work is bounded


def test_classify_and_beam_work_beyond_the_limits_is_refused(tmp_path: Path, tiny: FrozenT5) -> None:
    with serving(tmp_path, tiny, max_batch_tokens=1024, max_beam_tokens=64) as client:
        upload(client, "t", random_prompt(3, tiny.d_model, seed=0))
        labels = [f"{i}" + "l" * 199 for i in range(8)]  # 8 labels x 201 tokens: 1,608 decoder positions
        message = error(client.post("/v1/classify", json={"task_id": "t", "inputs": "x", "labels": labels}), 422)
        assert message.startswith("input 0 costs 1613 tokens of one model call") and "limit is 1024" in message
        fits = client.post("/v1/classify", json={"task_id": "t", "inputs": "x", "labels": labels[:4]})
        assert fits.status_code == 200, fits.text

        beams = {"num_beams": 16, "max_new_tokens": 8}
        message = error(client.post("/v1/generate", json={"task_id": "t", "inputs": "x", "parameters": beams}), 422)
        assert message == "num_beams * max_new_tokens is 16 * 8; this server's limit is 64"
        beams = {"num_beams": 4, "max_new_tokens": 16}
        assert client.post("/v1/generate", json={"task_id": "t", "inputs": "x", "parameters": beams}).status_code == 200


def test_label_scoring_is_chunked_so_one_call_holds_bounded_logits(tiny: FrozenT5) -> None:
    rows = [Row(random_prompt(3 + i, tiny.d_model, seed=i), ids) for i, ids in enumerate(tiny.tokenize(["a", "bc"]))]
    targets = [tiny.tokenize([f"label {j}" * (j + 1) for j in range(6)])] * 2
    whole = tiny.score(rows, targets)
    logits_sizes: list[int] = []

    teacher_forced = tiny.decoder.teacher_forced

    def recorded(*args: torch.Tensor) -> torch.Tensor:
        logits = teacher_forced(*args)
        logits_sizes.append(logits.numel())
        return logits

    budget = 4 * 32 * tiny.vocab_size
    tiny.decoder.teacher_forced = recorded  # type: ignore[method-assign]
    try:
        chunked = tiny.score(rows, targets, chunk_elements=budget)
    finally:
        del tiny.decoder.teacher_forced  # the instance attribute; the method is back
    assert len(logits_sizes) > 2 and max(logits_sizes) <= budget
    for a, b in zip(chunked, whole, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


def test_rows_of_a_client_that_left_stop_using_the_model_at_the_next_group(tmp_path: Path, tiny: FrozenT5) -> None:
    """Static scheduler: seeded sampled rows run one per group: 8 rows are 8 model calls in one batch. The client leaves once the
    batch has started; the groups after the one running are skipped (and that one stops at its next step)."""
    with serving(tmp_path, tiny, max_batch_size=8, scheduler="static") as client:
        upload(client, "long", long_prompt(tiny))
        with pending_request(client, "/v1/generate", generate_body("long", [LONG_INPUT] * 8, **LONG_SAMPLE)):
            wait_for_metric(client, "softserve_queue_wait_seconds_count", 8)  # all 8 rows are in the running batch
        wait_for_metric(client, "softserve_inference_duration_seconds_count", 1)  # the batch has ended
        text = client.get("/metrics").text
        assert metric(text, "softserve_batch_size_sum") == 8
        assert metric(text, "softserve_dropped_rows_total") >= 6


# Finding 11: the token rate limit charges the full cost


def test_a_request_over_a_whole_second_of_token_budget_is_422_and_costs_are_charged_in_full(
    tmp_path: Path, tiny: FrozenT5
) -> None:
    with serving(tmp_path, tiny, rate_limit_tokens_per_s=50) as client:
        upload(client, "t", random_prompt(3, tiny.d_model, seed=0))
        message = error(client.post("/v1/generate", json={"task_id": "t", "inputs": "y" * 27}), 422)
        # 3 + 28 prompt and input tokens, and the 20 it may generate (the default `max_new_tokens`)
        assert message.startswith("this request costs 51 tokens (its rows' prompt and input tokens, and every token")
        body = {"task_id": "t", "inputs": ["y" * 16] * 2, "parameters": {"max_new_tokens": 1}}  # (3 + 17 + 1) * 2
        assert client.post("/v1/generate", json=body).status_code == 200  # the refused request was not charged
        assert error(client.post("/v1/generate", json=body), 429)  # 42 + 42 > 50: charged in full
        labels = {"task_id": "t", "inputs": "y", "labels": ["n" * 24, "m"]}  # 3 + 2 prompt and input, 2 x 25 labels
        message = error(client.post("/v1/classify", json=labels), 422)  # labels are model work too
        assert message.startswith("this request costs 55 tokens")


# Findings 17 and 18: shedding is cheap and correct; permanent refusals come first


def test_a_full_queue_sheds_before_the_body_is_read_and_only_when_full(tmp_path: Path, tiny: FrozenT5) -> None:
    """Static scheduler (see tests/test_engine_http.py for the continuous engine's shedding)."""
    with serving(tmp_path, tiny, max_batch_size=4, max_queue_size=4, scheduler="static") as client:
        upload(client, "long", long_prompt(tiny))
        with pending_request(client, "/v1/generate", generate_body("long", [LONG_INPUT] * 4, **LONG_SAMPLE)):
            wait_for_metric(client, "softserve_queue_wait_seconds_count", 4)  # the model thread is busy with them
            with pending_request(client, "/v1/generate", generate_body("long", ["x"] * 4)):
                wait_for_metric(client, "softserve_queue_depth", 4)  # the queue is full
                with pending_request(client, "/v1/classify", b"", declared_length=10**6) as bodiless:
                    shed = read_response(bodiless)  # answered though its body never comes
                assert shed.status == 503 and int(shed.getheader("Retry-After", "0")) >= 1
                assert json.loads(shed.read())["error"]["code"] == "overloaded"
                assert error(client.post("/v1/generate", content=b"{not json", headers=JSON), 503).startswith(
                    "the request queue is full"
                )
        wait_for_metric(client, "softserve_queue_depth", 0)  # both clients left: their rows are dropped
        assert metric(client.get("/metrics").text, "softserve_rejections_total", reason="overloaded") == 2
        assert client.post("/v1/generate", content=b"{not json", headers=JSON).status_code == 400  # not full: read


def test_a_request_that_can_never_be_served_is_422_not_503(tmp_path: Path, tiny: FrozenT5) -> None:
    with serving(tmp_path, tiny, max_queue_size=8) as client:
        upload(client, "t", random_prompt(3, tiny.d_model, seed=0))
        message = error(client.post("/v1/generate", json={"task_id": "t", "inputs": ["x"] * 1000}), 422)
        assert message == "1000 inputs in one request; the limit is 64"
        message = error(client.post("/v1/classify", json={"task_id": "t", "inputs": ["x"] * 10, "labels": ["a"]}), 422)
        assert message == "10 rows in one request; this server queues at most 8"
        assert client.post("/v1/generate", json={"task_id": "t", "inputs": ["x"] * 8}).status_code == 200


def test_a_decoding_group_is_exact_with_its_own_sampling_warpers(tiny: FrozenT5) -> None:
    """The sampling warpers now run ahead of the finiteness guard: seeded draws still equal transformers' own."""
    row = Row(long_prompt(tiny), tiny.tokenize([LONG_INPUT])[0])
    embeds, mask = tiny.layout([row])
    for decoding in (Decoding(do_sample=True, seed=3, temperature=0.7, top_p=0.9), Decoding(do_sample=True, seed=5)):
        ours = tiny.generate([row], decoding, [12])[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(decoding.seed or 0)
            reference = tiny.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                do_sample=True,
                temperature=decoding.temperature,
                top_p=decoding.top_p,
                max_new_tokens=12,
                eos_token_id=tiny.eos_token_id,
                pad_token_id=tiny.pad_token_id,
                decoder_start_token_id=tiny.model.config.decoder_start_token_id,
            )[0, 1:].tolist()
        assert ours.token_ids == reference[: len(ours.token_ids)]


def test_a_client_that_leaves_mid_request_leaves_no_error_in_the_log(
    tmp_path: Path, tiny: FrozenT5, caplog: pytest.LogCaptureFixture
) -> None:
    """The rows of a request whose client left are cancelled; their gathering future must not end up in asyncio's
    "exception was never retrieved" errors (one per request, at every disconnect under load)."""
    body = generate_body("long", [LONG_INPUT] * 4, max_new_tokens=256, ignore_eos=True)
    with serving(tmp_path, tiny) as client:
        upload(client, "long", long_prompt(tiny))
        with pending_request(client, "/v1/generate", body):
            wait_for_metric(client, "softserve_engine_active_rows", 4)
        wait_for_metric(client, "softserve_engine_rows_left_total", 4, reason="cancelled")
        gc.collect()  # asyncio reports an unretrieved exception when its future is collected
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []
