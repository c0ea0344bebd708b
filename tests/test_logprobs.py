"""Log-probabilities over real HTTP: `parameters.logprobs` on `/v1/generate`, streamed and not, and what is refused.

Their values against `transformers` (the row alone, the processors applied) are checked at the engine, in
tests/test_engine.py; here: the shapes, one definition for streamed and unstreamed answers, and the refusals."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.testing.reference import random_prompt
from tests.serving import running_server
from tests.test_inference_api import upload
from tests.test_streaming import stream

BODY = {"task_id": "t", "inputs": "a gorgeous, witty film"}


def test_each_token_carries_its_logprob_and_the_top_alternatives(client: httpx.Client, tiny: FrozenT5) -> None:
    upload(client, "t", random_prompt(5, tiny.d_model, seed=0))
    params = {"max_new_tokens": 8, "ignore_eos": True, "logprobs": 3}
    (output,) = client.post("/v1/generate", json=BODY | {"parameters": params}).json()["outputs"]
    entries = output["logprobs"]
    assert len(entries) == output["num_tokens"] == 8
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert entry["logprob"] <= 0 and entry["logprob"] <= top[0]["logprob"] + 1e-6
        assert entry["id"] == top[0]["id"]  # greedy: the chosen token is the most likely one
        assert entry["text"] == tiny.tokenizer.convert_ids_to_tokens([entry["id"]])[0]
    plain = client.post("/v1/generate", json=BODY | {"parameters": {"max_new_tokens": 8, "ignore_eos": True}})
    assert "logprobs" not in plain.json()["outputs"][0]  # only when asked
    assert plain.json()["outputs"][0]["text"] == output["text"]  # asking changes no token
    _, events = stream(client, BODY | {"parameters": params})
    streamed = [data["logprobs"] for name, data in events if name == "message"]
    assert [e["id"] for e in streamed] == [e["id"] for e in entries]
    for a, b in zip(streamed, entries, strict=True):
        assert math.isclose(a["logprob"], b["logprob"], abs_tol=1e-5)


def test_sampled_tokens_report_the_warped_distribution(client: httpx.Client, tiny: FrozenT5) -> None:
    """Top-p 0.5 keeps few tokens: the alternatives are those it kept (the chosen one among them), and their
    probabilities add up to one."""
    upload(client, "t", random_prompt(5, tiny.d_model, seed=0))
    params = {"max_new_tokens": 6, "do_sample": True, "top_p": 0.5, "seed": 3, "logprobs": 20}
    (output,) = client.post("/v1/generate", json=BODY | {"parameters": params}).json()["outputs"]
    for entry in output["logprobs"]:
        kept = entry["top_logprobs"]
        assert entry["id"] in {t["id"] for t in kept}
        assert len(kept) < 20 and math.isclose(sum(math.exp(t["logprob"]) for t in kept), 1.0, abs_tol=1e-4)


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"logprobs": 21}, "less than or equal to 20"),
        ({"logprobs": -1}, "greater than or equal to 0"),
        ({"logprobs": 2, "num_beams": 2}, "beam search"),
    ],
)
def test_logprobs_out_of_range_or_with_beams_are_422(
    client: httpx.Client, tiny: FrozenT5, params: dict, says: str
) -> None:
    upload(client, "t", random_prompt(5, tiny.d_model, seed=0))
    response = client.post("/v1/generate", json=BODY | {"parameters": params})
    assert response.status_code == 422, response.text
    assert says in response.text


def test_the_servers_cap_and_the_static_scheduler_refuse_logprobs(settings: Settings, tiny: FrozenT5) -> None:
    capped = settings.model_copy(update={"max_top_logprobs": 2})
    with running_server(capped, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        upload(http, "t", random_prompt(5, tiny.d_model, seed=0))
        refused = http.post("/v1/generate", json=BODY | {"parameters": {"logprobs": 3}})
        assert refused.status_code == 422 and "at most 2 alternatives" in refused.json()["error"]["message"]
        assert http.post("/v1/generate", json=BODY | {"parameters": {"logprobs": 2}}).status_code == 200
    static = settings.model_copy(update={"scheduler": "static"})
    with running_server(static, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        upload(http, "t", random_prompt(5, tiny.d_model, seed=0))
        refused = http.post("/v1/generate", json=BODY | {"parameters": {"logprobs": 1}})
        assert refused.status_code == 422 and "continuous scheduler" in refused.json()["error"]["message"]


def test_the_openai_client_reads_logprobs_in_its_shapes(settings: Settings, tiny: FrozenT5) -> None:
    """Completions (`logprobs: N`) and chat (`logprobs`, `top_logprobs`), streamed and not, greedy: the values are
    `/v1/generate`'s, the token texts what each token decodes to."""
    key = ApiKeys(settings.keys_file).add("acme")
    headers = {"Authorization": f"Bearer {key}"}
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30, headers=headers) as http:
        upload(http, "t", random_prompt(5, tiny.d_model, seed=0))
        reference = http.post("/v1/generate", json=BODY | {"parameters": {"max_new_tokens": 6, "logprobs": 2}}).json()[
            "outputs"
        ][0]["logprobs"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        completion = client.completions.create(
            model="t", prompt=BODY["inputs"], max_tokens=6, temperature=0, logprobs=2
        )
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None
        assert logprobs.token_logprobs == pytest.approx([e["logprob"] for e in reference], abs=1e-5)
        assert logprobs.tokens == [tiny.tokenizer.decode([e["id"]]) for e in reference]
        assert logprobs.top_logprobs is not None and all(len(top) <= 2 for top in logprobs.top_logprobs)
        assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(reference))]
        messages = [{"role": "user", "content": BODY["inputs"]}]
        chat = client.chat.completions.create(
            model="t", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
        )
        content = chat.choices[0].logprobs.content
        assert [c.logprob for c in content] == pytest.approx([e["logprob"] for e in reference], abs=1e-5)
        assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
        streamed = client.chat.completions.create(
            model="t", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True
        )
        pieces = [c.logprobs.content for chunk in streamed for c in chunk.choices if c.logprobs is not None]
        assert [c.logprob for piece in pieces for c in piece] == pytest.approx([c.logprob for c in content], abs=1e-5)
        plain = client.chat.completions.create(model="t", messages=messages, max_tokens=6, temperature=0)
        assert plain.choices[0].logprobs is None
        with pytest.raises(openai.UnprocessableEntityError, match="needs `logprobs: true`"):
            client.chat.completions.create(model="t", messages=messages, max_tokens=6, top_logprobs=2)
