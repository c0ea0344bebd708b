"""`n` outputs per input over real HTTP: on `/v1/generate` (`parameters.n`) and the OpenAI routes (`n`), with the
real `openai` client. Sampled choices draw with `seed`, `seed + 1`, ...: a seeded request is reproducible, and each
choice equals the one-choice request with its seed, in any company."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.testing.reference import random_prompt
from tests.serving import running_server
from tests.test_inference_api import upload

SAMPLED = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 40, "ignore_eos": True}
TEXTS = ["a gorgeous, witty film", "a dull mess"]


def texts(http: httpx.Client, inputs: list[str], **params: object) -> list[str]:
    response = http.post("/v1/generate", json={"task_id": "t", "inputs": inputs, "parameters": params})
    assert response.status_code == 200, response.text
    return [output["text"] for output in response.json()["outputs"]]


def test_n_choices_per_input_are_seeded_in_turn_and_reproducible(client: httpx.Client, tiny: FrozenT5) -> None:
    upload(client, "t", random_prompt(5, tiny.d_model, seed=0))
    three = texts(client, TEXTS, **SAMPLED, n=3)
    assert len(three) == 6  # input by input: choices 0-2 of the first input, then of the second
    assert three == texts(client, TEXTS, **SAMPLED, n=3)  # reproducible
    for i, text in enumerate(TEXTS):
        alone = [texts(client, [text], **(SAMPLED | {"seed": 40 + j}))[0] for j in range(3)]
        assert three[3 * i : 3 * i + 3] == alone  # choice j is the request with seed + j
    assert len(set(three[:3])) > 1  # different seeds, different samples (fixed seeds: this cannot flake)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"inputs": ["x"] * 33, "parameters": {"n": 2}}, "is 66 rows"),
        ({"inputs": "x", "parameters": {"n": 2, "num_beams": 2}}, "beam search"),
        ({"inputs": "x", "stream": True, "parameters": {"n": 2}}, "one output"),
        ({"inputs": "x", "parameters": {"n": 0}}, "greater than or equal to 1"),
    ],
)
def test_n_that_cannot_be_served_is_422(client: httpx.Client, tiny: FrozenT5, body: dict, says: str) -> None:
    upload(client, "t", random_prompt(5, tiny.d_model, seed=0))
    response = client.post("/v1/generate", json={"task_id": "t"} | body)
    assert response.status_code == 422, response.text
    assert says in response.text


def test_the_openai_client_reads_n_choices(settings: Settings, tiny: FrozenT5) -> None:
    key = ApiKeys(settings.keys_file).add("acme")
    headers = {"Authorization": f"Bearer {key}"}
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30, headers=headers) as http:
        upload(http, "t", random_prompt(5, tiny.d_model, seed=0))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        sampled = {"max_tokens": 6, "temperature": 1.5, "seed": 7}
        completion = client.completions.create(model="t", prompt=TEXTS, n=2, **sampled)
        assert [c.index for c in completion.choices] == [0, 1, 2, 3]
        expected = texts(http, TEXTS, max_new_tokens=6, do_sample=True, temperature=1.5, seed=7, n=2)
        assert [c.text for c in completion.choices] == expected
        one_prompt_tokens = len(tiny.tokenize([TEXTS[0]])[0]) + len(tiny.tokenize([TEXTS[1]])[0])
        assert completion.usage is not None and completion.usage.prompt_tokens == one_prompt_tokens  # once each
        messages = [{"role": "user", "content": TEXTS[0]}]
        chat = client.chat.completions.create(model="t", messages=messages, n=3, **sampled)
        assert [c.index for c in chat.choices] == [0, 1, 2]
        streamed = client.chat.completions.create(model="t", messages=messages, n=3, stream=True, **sampled)
        joined = ["", "", ""]
        for chunk in streamed:
            for choice in chunk.choices:
                joined[choice.index] += choice.delta.content or ""
        assert joined == [c.message.content for c in chat.choices]
