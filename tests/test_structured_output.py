"""Structured output over real HTTP on the `tiny` model: a random model writes nonsense, but valid nonsense.

Random JSON schemas and regexes (hypothesis) each constrain a generation; every output must parse and validate
(`jsonschema`) or match (`re.fullmatch`). The schemas bound every value (string lengths, integer ranges, array
sizes) so that every valid output is short and the row must end. Rows with and without grammars share decoder
steps, and the unconstrained rows' tokens are the ones they make alone."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine.engine import Engine
from server.engine.limits import EngineLimits
from server.engine.protocol import Event, Finished, GenerateRow, RowInput, Sampling, Token
from server.serving.grammar import grammar_text
from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.testing.reference import Alone, mixed_rows, random_prompt
from tests.serving import running_server
from tests.test_inference_api import upload

NAMES = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=5)
LEAVES = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 4)),
    st.builds(
        lambda a, b: {"type": "integer", "minimum": a, "maximum": a + b}, st.integers(-50, 50), st.integers(0, 60)
    ),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda values: {"enum": values}, st.lists(NAMES, min_size=1, max_size=3, unique=True)),
)


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": sorted(properties), "additionalProperties": False}


def _array(items: dict[str, Any], most: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "maxItems": most}


INNER = st.one_of(
    LEAVES,
    st.builds(_array, LEAVES, st.integers(0, 2)),
    st.builds(_object, st.dictionaries(NAMES, LEAVES, min_size=1, max_size=3)),
)
SCHEMAS = st.one_of(
    st.builds(_object, st.dictionaries(NAMES, INNER, min_size=1, max_size=3)),
    st.builds(_array, INNER, st.integers(0, 2)),
    LEAVES,
)
ATOMS = st.sampled_from(["a", "b", "7", "-", "[a-c]", "[0-9]", "[xyz]", "(ab|cd)", r"\."])
REGEXES = st.lists(
    st.builds(lambda atom, low, extra: f"{atom}{{{low},{low + extra}}}", ATOMS, st.integers(0, 2), st.integers(0, 2)),
    min_size=1,
    max_size=4,
).map("".join)


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory, tiny: FrozenT5) -> Iterator[httpx.Client]:
    data = tmp_path_factory.mktemp("structured") / "data"
    with (
        running_server(Settings(data_dir=data, max_new_tokens=1024), tiny) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        upload(client, "t", random_prompt(6, tiny.d_model, seed=3))
        yield client


def outputs(http: httpx.Client, grammar: dict[str, Any], **params: Any) -> list[dict[str, Any]]:
    parameters = {"grammar": grammar, "max_new_tokens": 1024, **params}
    response = http.post(
        "/v1/generate", json={"task_id": "t", "inputs": ["a film", "nothing"], "parameters": parameters}
    )
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, sampled=st.booleans())
def test_every_output_of_a_random_schema_validates(http: httpx.Client, schema: dict[str, Any], sampled: bool) -> None:
    params = {"do_sample": True, "temperature": 1.5, "seed": 1} if sampled else {}
    for output in outputs(http, {"type": "json_schema", "schema": schema}, **params):
        assert output["finish_reason"] == "eos", (schema, output)
        jsonschema.validate(json.loads(output["text"]), schema)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=REGEXES, sampled=st.booleans())
def test_every_output_of_a_random_regex_matches(http: httpx.Client, pattern: str, sampled: bool) -> None:
    params = {"do_sample": True, "temperature": 1.5, "seed": 2} if sampled else {}
    for output in outputs(http, {"type": "regex", "pattern": pattern}, **params):
        assert re.fullmatch(pattern, output["text"]), (pattern, output)


def test_a_choice_is_one_of_its_strings(http: httpx.Client) -> None:
    choices = ["positive", "negative", "mixed feelings"]
    for seed in range(4):
        for output in outputs(http, {"type": "choice", "choices": choices}, do_sample=True, seed=seed):
            assert output["text"] in choices


@pytest.mark.parametrize(
    ("grammar", "params", "says"),
    [
        ({"type": "regex", "pattern": "(("}, {}, "does not compile"),
        ({"type": "json_schema", "schema": {"type": "object", "properties": 3}}, {}, "does not compile"),
        ({"type": "regex", "pattern": "a{2}"}, {"num_beams": 2}, "not beam search"),
        ({"type": "regex", "pattern": "a{2}"}, {"ignore_eos": True}, "ignore_eos"),
        ({"type": "choice", "choices": []}, {}, "at least 1 item"),
        ({"type": "sql", "query": "x"}, {}, "does not match any of the expected tags"),
    ],
)
def test_a_grammar_that_cannot_be_served_is_422(
    http: httpx.Client, grammar: dict[str, Any], params: dict[str, Any], says: str
) -> None:
    body = {"task_id": "t", "inputs": "x", "parameters": {"grammar": grammar, **params}}
    response = http.post("/v1/generate", json=body)
    assert response.status_code == 422, response.text
    assert says in response.text


def test_a_grammar_larger_than_the_server_takes_is_422(settings: Settings, tiny: FrozenT5) -> None:
    small = settings.model_copy(update={"max_grammar_bytes": 1024})
    with running_server(small, tiny) as url, httpx.Client(base_url=url, timeout=60) as client:
        upload(client, "t", random_prompt(6, tiny.d_model, seed=3))
        choices = [f"choice number {i}" for i in range(100)]
        body = {"task_id": "t", "inputs": "x", "parameters": {"grammar": {"type": "choice", "choices": choices}}}
        response = client.post("/v1/generate", json=body)
        assert response.status_code == 422 and "at most 1024" in response.json()["error"]["message"]


def test_rows_with_and_without_grammars_share_steps_and_keep_their_tokens(tiny: FrozenT5) -> None:
    """The engine driven pass by pass: constrained rows beside unconstrained ones, in every step; the unconstrained
    rows make `transformers`' tokens for the row alone, and the constrained ones follow their grammar."""
    rows = mixed_rows(tiny)[:4]
    schema = _object({"k": {"type": "integer", "minimum": 0, "maximum": 9}, "s": {"type": "string", "maxLength": 3}})
    grammar = grammar_text("json_schema", schema)
    events: dict[int, list[Event]] = {i: [] for i in range(4)}

    def collect(batch: list[Event], _stats: object) -> None:
        for event in batch:
            events[event.request_id].append(event)

    engine = Engine(tiny, EngineLimits(64, 1 << 20, 32, 16384), collect)
    engine.submit(
        [
            GenerateRow(i, "t", RowInput(row.prompt, row.input_ids), Sampling(), 64, grammar=grammar if i % 2 else None)
            for i, row in enumerate(rows)
        ]
    )
    for _ in range(500):
        if engine.idle:
            break
        engine.run_once()
    for i, row in enumerate(rows):
        tokens = [e.token_id for e in events[i] if isinstance(e, Token)]
        assert isinstance(events[i][-1], Finished)
        if i % 2:
            text = tiny.tokenizer.decode(tokens, skip_special_tokens=True)
            jsonschema.validate(json.loads(text), schema)
        else:
            assert tokens == Alone(tiny, row).generate(64)


def test_the_openai_client_gets_json_from_response_format(settings: Settings, tiny: FrozenT5) -> None:
    key = ApiKeys(settings.keys_file).add("acme")
    with running_server(settings, tiny) as url:
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
            upload(client, "t", random_prompt(6, tiny.d_model, seed=3))
        openai_client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        schema = _object({"label": {"enum": ["good", "bad"]}, "score": {"type": "integer", "minimum": 1, "maximum": 5}})
        messages = [{"role": "user", "content": "a gem"}]
        answer = openai_client.chat.completions.create(
            model="t",
            messages=messages,
            max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "review", "schema": schema}},
        )
        jsonschema.validate(json.loads(answer.choices[0].message.content or ""), schema)
        anything = openai_client.chat.completions.create(
            model="t", messages=messages, max_tokens=200, temperature=0, response_format={"type": "json_object"}
        )
        assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            openai_client.chat.completions.create(
                model="t", messages=messages, response_format={"type": "json_schema", "json_schema": {"name": "x"}}
            )
        assert refused.value.param == "response_format"
