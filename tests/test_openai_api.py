"""The OpenAI-compatible routes, driven by the real `openai` client over real HTTP (a task is a model).

Outputs are checked against `/v1/generate` on the same server (greedy, and sampled with a seed), usage against the
tokenizer, streams against the same request unstreamed, and each error against the client's exception class.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from server.serving.model import FrozenT5
from server.serving.stop_strings import StopCutter
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.testing.reference import random_prompt
from tests.prometheus import metric
from tests.serving import running_server, server_process
from tests.test_hot_loading import eventually
from tests.test_inference_api import upload
from tests.test_streaming import LONG, long_settings, rows_left

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "sentence: {input}"
SST2_LENGTH, TERSE_LENGTH = 5, 3
TEXTS = ["a gorgeous, witty film", "a dull mess"]


@dataclass
class Served:
    url: str
    acme: str  # keys
    globex: str

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.acme, max_retries=0)

    def http(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key or self.acme}"}, timeout=60)

    def generate(self, task_id: str, inputs: str | list[str], **parameters: Any) -> list[dict[str, Any]]:
        """`/v1/generate`'s outputs: what the OpenAI routes are checked against."""
        with self.http() as http:
            response = http.post("/v1/generate", json={"task_id": task_id, "inputs": inputs, "parameters": parameters})
        assert response.status_code == 200, response.text
        return response.json()["outputs"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny: FrozenT5) -> Iterator[Served]:
    """Two tenants: acme has `sst2` (templated) and `terse` (default parameters of its own); globex has its own
    `sst2` and `private`."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("openai") / "data", max_wait_ms=2)
    keys = ApiKeys(settings.keys_file)
    served_keys = {tenant: keys.add(tenant) for tenant in ("acme", "globex")}
    with running_server(settings, tiny) as url:
        served = Served(url, served_keys["acme"], served_keys["globex"])
        with served.http(served.acme) as acme, served.http(served.globex) as globex:
            upload(acme, "sst2", random_prompt(SST2_LENGTH, tiny.d_model, seed=1), input_template=TEMPLATE)
            upload(acme, "terse", random_prompt(TERSE_LENGTH, tiny.d_model, seed=2), parameters={"max_new_tokens": 3})
            upload(globex, "sst2", random_prompt(4, tiny.d_model, seed=3))
            upload(globex, "private", random_prompt(4, tiny.d_model, seed=4))
        yield served


def finish_reason(generate_reason: str) -> str:
    return {"eos": "stop", "length": "length"}[generate_reason]


# --- models ------------------------------------------------------------------------------------------------------


def test_each_tenant_lists_its_own_tasks_as_models(served: Served) -> None:
    acme, globex = served.client(served.acme), served.client(served.globex)
    listed = acme.models.list().data
    assert sorted(model.id for model in listed) == ["sst2", "terse"]
    assert {(model.object, model.owned_by) for model in listed} == {("model", "acme")}
    assert sorted(model.id for model in globex.models.list().data) == ["private", "sst2"]

    assert acme.models.retrieve("sst2").owned_by == "acme"
    assert acme.models.retrieve("sst2@1").id == "sst2@1"
    for missing in ("private", "sst2@2", "no-such-task", "sst2@x"):  # another tenant's is a 404 like no task at all
        with pytest.raises(openai.NotFoundError) as raised:
            acme.models.retrieve(missing)
        assert (raised.value.code, raised.value.param) == ("model_not_found", "model")


def test_another_tenants_task_is_not_a_model(served: Served) -> None:
    with pytest.raises(openai.NotFoundError, match="private"):
        served.client(served.acme).completions.create(model="private", prompt="x", max_tokens=2)
    # The same task id names each tenant's own task.
    acme = served.client(served.acme).completions.create(model="sst2", prompt="x", max_tokens=6, temperature=0)
    globex = served.client(served.globex).completions.create(model="sst2", prompt="x", max_tokens=6, temperature=0)
    assert acme.choices[0].text == served.generate("sst2", "x", max_new_tokens=6)[0]["text"]
    assert acme.usage is not None and globex.usage is not None
    assert (acme.usage.soft_prompt_tokens, globex.usage.soft_prompt_tokens) == (SST2_LENGTH, 4)  # type: ignore[attr-defined]


# --- completions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [TEXTS[0], TEXTS], ids=["one-prompt", "a-list"])
def test_temperature_0_is_generate_greedy(served: Served, tiny: FrozenT5, prompt: str | list[str]) -> None:
    completion = served.client().completions.create(model="sst2", prompt=prompt, max_tokens=12, temperature=0)
    expected = served.generate("sst2", prompt, max_new_tokens=12)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.model == "sst2@1"  # the version that served it
    assert [c.index for c in completion.choices] == list(range(len(expected)))
    assert [c.text for c in completion.choices] == [output["text"] for output in expected]
    assert [c.finish_reason for c in completion.choices] == [finish_reason(o["finish_reason"]) for o in expected]
    assert all(choice.logprobs is None for choice in completion.choices)

    prompts = [prompt] if isinstance(prompt, str) else prompt
    input_tokens = sum(len(ids) for ids in tiny.tokenize([TEMPLATE.format(input=p) for p in prompts]))  # with </s>
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == input_tokens
    assert usage.completion_tokens == sum(output["num_tokens"] for output in expected)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.soft_prompt_tokens == SST2_LENGTH * len(prompts)  # type: ignore[attr-defined]


def test_openai_defaults_apply_and_the_tasks_default_parameters_do_not(served: Served) -> None:
    """`terse` defaults to 3 new tokens for `/v1/generate`; a completion without `max_tokens` gets OpenAI's 16, and
    without `temperature` it samples (OpenAI's default temperature is 1)."""
    client = served.client()
    greedy = client.completions.create(model="terse", prompt="x", temperature=0)
    expected = served.generate("terse", "x", max_new_tokens=16)[0]
    assert served.generate("terse", "x")[0]["num_tokens"] <= 3
    assert greedy.choices[0].text == expected["text"]
    assert greedy.usage is not None and greedy.usage.completion_tokens == expected["num_tokens"]

    defaulted = client.completions.create(model="terse", prompt="x", seed=11)
    sampled = served.generate("terse", "x", max_new_tokens=16, do_sample=True, temperature=1.0, seed=11)[0]
    assert defaulted.choices[0].text == sampled["text"]


def test_a_seed_makes_sampling_reproducible(served: Served) -> None:
    client = served.client()

    def sampled(seed: int) -> str:
        completion = client.completions.create(
            model="sst2", prompt=TEXTS[1], max_tokens=16, temperature=1.5, top_p=0.9, seed=seed
        )
        return completion.choices[0].text

    def native(seed: int) -> str:
        sampling = {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "seed": seed}
        return served.generate("sst2", TEXTS[1], max_new_tokens=16, **sampling)[0]["text"]

    assert sampled(7) == sampled(7)
    assert {seed: sampled(seed) for seed in (7, 8)} == {seed: native(seed) for seed in (7, 8)}  # the same draws
    assert sampled(8) != sampled(7)  # the seed is used, not ignored


def test_a_version_is_pinned_with_task_at_n(served: Served, tiny: FrozenT5) -> None:
    with served.http(served.globex) as globex:
        upload(globex, "versioned", random_prompt(4, tiny.d_model, seed=5))
        upload(globex, "versioned", random_prompt(6, tiny.d_model, seed=6))
    client = served.client(served.globex)
    latest = client.completions.create(model="versioned", prompt="x", max_tokens=8, temperature=0)
    pinned = client.completions.create(model="versioned@1", prompt="x", max_tokens=8, temperature=0)
    assert (latest.model, pinned.model) == ("versioned@2", "versioned@1")
    assert latest.usage is not None and pinned.usage is not None
    assert (latest.usage.soft_prompt_tokens, pinned.usage.soft_prompt_tokens) == (6, 4)  # type: ignore[attr-defined]


def greedy_text(served: Served, text: str, max_tokens: int = 24) -> str:
    output = served.generate("sst2", text, max_new_tokens=max_tokens)[0]
    assert len(output["text"]) >= 6, output  # room for a stop string inside it
    return output["text"]


def test_stop_cuts_the_text_before_the_first_stop_string(served: Served) -> None:
    client = served.client()
    full = greedy_text(served, TEXTS[0])
    stop = full[3:5]
    cut = full[: full.index(stop)]
    completion = client.completions.create(
        model="sst2", prompt=TEXTS[0], max_tokens=24, temperature=0, stop=["\x7f never \x7f", stop]
    )
    (choice,) = completion.choices
    assert (choice.text, choice.finish_reason) == (cut, "stop")
    assert completion.usage is not None and completion.usage.completion_tokens < 24

    never = client.completions.create(model="sst2", prompt=TEXTS[0], max_tokens=24, temperature=0, stop="\x7f never")
    whole = served.generate("sst2", TEXTS[0], max_new_tokens=24)[0]
    assert never.choices[0].text == full
    assert never.choices[0].finish_reason == finish_reason(whole["finish_reason"])
    assert never.usage is not None and never.usage.completion_tokens == whole["num_tokens"]


def test_streamed_chunks_join_into_the_unstreamed_text(served: Served) -> None:
    client = served.client()
    full = greedy_text(served, TEXTS[1])
    for stop in (None, full[4:6]):
        request: dict[str, Any] = {"model": "sst2", "prompt": TEXTS, "max_tokens": 24, "temperature": 0, "stop": stop}
        whole = client.completions.create(**request)
        chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
        *pieces, last = chunks
        assert last.choices == [] and last.usage == whole.usage
        assert all(chunk.usage is None for chunk in pieces)
        assert {chunk.id for chunk in chunks} == {chunks[0].id} and chunks[0].model == "sst2@1"
        for choice in whole.choices:
            own = [chunk.choices[0] for chunk in pieces if chunk.choices[0].index == choice.index]
            assert "".join(c.text for c in own) == choice.text
            assert [c.finish_reason for c in own] == [None] * (len(own) - 1) + [choice.finish_reason]


def test_the_stream_ends_with_done_and_carries_usage_only_when_asked(served: Served) -> None:
    body = {"model": "sst2", "prompt": "x", "max_tokens": 4, "temperature": 0, "stream": True}
    with served.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in chunk and chunk["object"] == "text_completion" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


# --- chat --------------------------------------------------------------------------------------------------------


def test_chat_answers_the_user_message_as_a_completion_would(served: Served) -> None:
    client = served.client()
    messages: list[Any] = [{"role": "user", "content": TEXTS[0]}]
    completion = client.completions.create(model="sst2", prompt=TEXTS[0], max_tokens=10, temperature=0)
    chat = client.chat.completions.create(model="sst2", messages=messages, max_tokens=10, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == "sst2@1"
    (choice,) = chat.choices
    assert choice.message.role == "assistant" and choice.message.content == completion.choices[0].text
    assert choice.finish_reason == completion.choices[0].finish_reason
    assert chat.usage == completion.usage

    parts = [{"role": "user", "content": [{"type": "text", "text": TEXTS[0]}]}]
    newer = client.chat.completions.create(model="sst2", messages=parts, max_completion_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert newer.choices[0].message.content == completion.choices[0].text

    chunks = list(
        client.chat.completions.create(
            model="sst2",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first, *pieces, end, usage = chunks
    assert first.object == "chat.completion.chunk" and first.choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in pieces) == choice.message.content
    assert all(chunk.choices[0].finish_reason is None for chunk in [first, *pieces])
    assert end.choices[0].finish_reason == choice.finish_reason
    assert usage.choices == [] and usage.usage == chat.usage


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
        [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
        [{"role": "assistant", "content": "y"}],
    ],
    ids=["system", "earlier-turns", "two-user-messages", "no-user-message"],
)
def test_chat_refuses_what_a_single_turn_task_cannot_honour(served: Served, messages: list[Any]) -> None:
    with pytest.raises(openai.BadRequestError, match="single-turn") as raised:
        served.client().chat.completions.create(model="sst2", messages=messages, max_tokens=4)
    assert (raised.value.code, raised.value.param) == ("unsupported_parameter", "messages")


def test_the_async_client(served: Served) -> None:
    async def run() -> tuple[list[str], str]:
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=served.acme, max_retries=0) as client:
            completions = await asyncio.gather(
                *(
                    client.completions.create(model=task, prompt=TEXTS[0], max_tokens=8, temperature=0)
                    for task in ("sst2", "terse")
                )
            )
            stream = await client.chat.completions.create(
                model="sst2", messages=[{"role": "user", "content": TEXTS[1]}], max_tokens=8, temperature=0, stream=True
            )
            streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
            return [c.choices[0].text for c in completions], streamed

    texts, streamed = asyncio.run(run())
    assert texts == [served.generate(task, TEXTS[0], max_new_tokens=8)[0]["text"] for task in ("sst2", "terse")]
    assert streamed == served.generate("sst2", TEXTS[1], max_new_tokens=8)[0]["text"]


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "param"),
    [
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"logit_bias": {"50": 10}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_unsupported_parameters_are_refused_by_name(served: Served, parameters: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        served.client().completions.create(model="sst2", prompt="x", max_tokens=2, **parameters)
    assert (raised.value.code, raised.value.param, raised.value.type) == (
        "unsupported_parameter",
        param,
        "invalid_request_error",
    )
    assert param in raised.value.message


def test_no_op_values_of_unsupported_parameters_pass(served: Served) -> None:
    """What clients send by default (`n: 1`, zero penalties, an empty bias) changes nothing: it is not refused."""
    neutral = {"n": 1, "echo": False, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}
    completion = served.client().completions.create(
        model="sst2", prompt="x", max_tokens=4, temperature=0, user="someone", **neutral
    )
    assert completion.choices[0].text == served.generate("sst2", "x", max_new_tokens=4)[0]["text"]
    chat = served.client().chat.completions.create(
        model="sst2",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        temperature=0,
        tool_choice="none",
        response_format={"type": "text"},
        logprobs=False,
    )
    assert chat.choices[0].message.content == completion.choices[0].text


def test_each_error_is_its_openai_client_exception(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.AuthenticationError) as auth:
        served.client("ss-not-a-key").models.list()
    assert auth.value.type == "authentication_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nothing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(
            model="sst2",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert tools.value.param == "tools"
    with pytest.raises(openai.UnprocessableEntityError) as out_of_range:
        client.completions.create(model="sst2", prompt="x", temperature=3)
    assert (out_of_range.value.code, out_of_range.value.param) == ("invalid_request", "temperature")
    with pytest.raises(openai.UnprocessableEntityError) as unknown:
        client.completions.create(model="sst2", prompt="x", extra_body={"temprature": 0})
    assert unknown.value.param == "temprature"
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        client.completions.create(model="sst2", prompt="x", max_tokens=100_000)
    assert (too_long.value.code, too_long.value.param) == ("invalid_input", "max_tokens")
    with served.http() as http:
        assert metric(http, "softserve_rejections_total", reason="unsupported_parameter") >= 1


def test_rate_limits_apply_as_for_generate(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2, rate_limit_requests_per_s=1)
    key = ApiKeys(settings.keys_file).add("acme")
    with running_server(settings, tiny) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
            upload(http, "t", random_prompt(2, tiny.d_model, seed=0))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.RateLimitError) as raised:
            for _ in range(10):  # well over 1/s
                client.completions.create(model="t", prompt="x", max_tokens=1)
        assert raised.value.type == "rate_limit_error" and int(raised.value.response.headers["Retry-After"]) >= 1


def test_the_static_scheduler_serves_completions_but_neither_stop_strings_nor_streams(
    tmp_path: Path, tiny: FrozenT5
) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2, scheduler="static")
    key = ApiKeys(settings.keys_file).add("acme")
    with running_server(settings, tiny) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
            upload(http, "t", random_prompt(2, tiny.d_model, seed=0))
            expected = http.post("/v1/generate", json={"task_id": "t", "inputs": "x"}).json()["outputs"][0]["text"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        completion = client.completions.create(model="t", prompt="x", max_tokens=20, temperature=0)
        assert completion.choices[0].text == expected
        for refused in ({"stop": "a"}, {"stream": True}):
            with pytest.raises(openai.UnprocessableEntityError, match="continuous scheduler"):
                client.completions.create(model="t", prompt="x", max_tokens=4, **refused)


# --- rows that end early, deadlines -------------------------------------------------------------------------------


def test_a_stop_string_ends_the_row_and_a_deadline_ends_the_stream(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = long_settings(tmp_path, request_timeout_s=1.0)
    key = ApiKeys(settings.keys_file).add("acme")
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        http.headers["Authorization"] = f"Bearer {key}"
        upload(http, "t", random_prompt(4, tiny.d_model, seed=1))
        # Greedy decoding of this row runs past the deadline without ending: only a stop string ends it early.
        never_ends = {"task_id": "t", "inputs": "x", "parameters": {"max_new_tokens": LONG}}
        assert http.post("/v1/generate", json=never_ends).json()["error"]["code"] == "deadline_exceeded"
        begun = http.post("/v1/generate", json={**never_ends, "parameters": {"max_new_tokens": 16}}).json()
        stop = begun["outputs"][0]["text"][2:4]

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        cancelled, length = rows_left(http, "cancelled"), rows_left(http, "length")
        stopped = client.completions.create(model="t", prompt="x", max_tokens=LONG, temperature=0, stop=stop)
        assert stopped.choices[0].finish_reason == "stop"
        eventually(lambda: rows_left(http, "cancelled") == cancelled + 1, 10, "the stopped row to leave")
        assert rows_left(http, "length") == length  # it did not run to its end

        stream = client.completions.create(model="t", prompt="x", max_tokens=LONG, temperature=0, stream=True)
        assert [chunk.choices[0].index for chunk, _ in zip(stream, range(3), strict=False)] == [0, 0, 0]
        stream.close()  # a client that leaves stops its row
        eventually(lambda: rows_left(http, "cancelled") == cancelled + 2, 10, "the left row to leave")
        assert rows_left(http, "length") == length

        chunks = []
        with pytest.raises(openai.APIError) as raised:
            for chunk in client.completions.create(model="t", prompt="x", max_tokens=LONG, temperature=0, stream=True):
                chunks.append(chunk)
        assert chunks and (raised.value.code, raised.value.type) == ("deadline_exceeded", "server_error")
        assert rows_left(http, "deadline") >= 1


# --- stop strings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "stops", "shown", "stopped"),
    [
        (["hel", "lo wo", "rld"], ["o w"], ["hel", "l"], True),
        (["ab", "c"], ["bd"], ["a", "bc"], False),
        (["a", "b", "c", "d"], ["cd", "bc"], ["a", "", ""], True),
        (["xy"], [], ["xy"], False),
        (["say STOP", " now"], ["STOP", "P n"], ["say "], True),
    ],
)
def test_stop_cutter_shows_only_text_that_stays(
    pieces: list[str], stops: list[str], shown: list[str], stopped: bool
) -> None:
    cutter = StopCutter(stops)
    seen = []
    for piece in pieces:
        seen.append(cutter.feed(piece))
        if cutter.stopped:
            break
    assert (seen, cutter.stopped) == (shown, stopped)
    text = "".join(pieces)
    cut = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))
    assert "".join(seen) + ("" if stopped else cutter.rest()) == text[:cut]


# --- the README ---------------------------------------------------------------------------------------------------


def readme_section_blocks(language: str) -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Use it with the OpenAI client", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_the_readme_openai_examples_run_as_written(tmp_path: Path) -> None:
    (bash,), (python,) = readme_section_blocks("bash"), readme_section_blocks("python")
    np.save(tmp_path / "prompt.npy", np.random.default_rng(0).normal(size=(20, 64)).astype("float32"))
    data_dir = tmp_path / "data"
    with server_process(data_dir, "--engine", "thread") as (_, url):
        port = url.rsplit(":", 1)[1]
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "SOFTSERVE_DATA_DIR": str(data_dir),
        }
        script = "set -euo pipefail\n" + bash.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        script += '\nprintf %s "$SOFTSERVE_API_KEY" > key.txt\n'
        run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert '"error"' not in run.stdout, run.stdout
        assert '"object":"text_completion"' in run.stdout.replace(" ", "") and "data: [DONE]" in run.stdout

        env["SOFTSERVE_API_KEY"] = (tmp_path / "key.txt").read_text()
        code = python.replace("http://127.0.0.1:8000", url)
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[0] == "['sst2']"
