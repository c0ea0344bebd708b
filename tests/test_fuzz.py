"""Schemathesis against the app's own OpenAPI schema, with auth: no 5xx, and responses match the schema."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from tests.serving import running_server


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory, tiny: FrozenT5) -> Iterator[tuple[str, str]]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    config = Settings(data_dir=data_dir, max_new_tokens=16, max_inputs_per_request=8, max_input_tokens=128)
    key = ApiKeys(config.keys_file).add("fuzzer")
    with running_server(config, tiny) as url:
        buffer = io.BytesIO()
        np.save(buffer, np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32))
        headers = {"Authorization": f"Bearer {key}"}
        httpx.put(f"{url}/v1/prompts/sst2", files={"file": ("p", buffer.getvalue())}, headers=headers)
        yield url, key


def test_no_server_errors_and_responses_match_the_schema(fuzz_target: tuple[str, str]) -> None:
    """Every operation of /openapi.json, fuzzed with schema-derived (and schema-violating) inputs."""
    url, key = fuzz_target
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            case.validate_response(response, checks=checks)

        fuzz()
