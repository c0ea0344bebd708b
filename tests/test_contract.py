"""docs/api.md stays the truth about the HTTP API: checked against the app's own OpenAPI schema and error table.

- every route of the schema has a section (a heading "`METHOD /path`") and every section is a route;
- every request field of a route (path, query, body, form, nested objects) is named in its section, and
  every response field somewhere on the page;
- every error code the server can send is a row of the error table, with its status and Retry-After.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.api.errors import ERROR_TABLE, HTTP_CODES
from server.app import create_app
from server.registry.schemas import UploadMetadata
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
ROUTE_HEADING = re.compile(r"^#{2,4} `(GET|POST|PUT|PATCH|DELETE) (/\S*)`$", re.MULTILINE)
ERROR_ROW = re.compile(r"^\| `([a-z_]+)` \| (\d{3}) \|.*\| *(yes)? *\|$", re.MULTILINE)
# `error_response(503, "too_many_connections", ...)`, `BodyRefused(413, "body_too_large", ...)`, `return 400,
# "malformed_json", ...`: codes the API sends without the error table.
CODE_IN_SOURCE = re.compile(r"\b([1-5]\d\d), \"([a-z]+(?:_[a-z]+)*)\"")

Route = tuple[str, str]


@cache
def doc() -> str:
    return API_DOC.read_text()


@cache
def schema() -> dict[str, Any]:
    return create_app(Settings(data_dir=ROOT / "tests" / "no-such-data-dir")).openapi()  # read nothing, write nothing


def operations() -> dict[Route, dict[str, Any]]:
    return {(method.upper(), path): op for path, item in schema()["paths"].items() for method, op in item.items()}


def sections() -> dict[Route, str]:
    """Each route heading's text, up to the next heading of any level."""
    text = doc()
    headings = list(ROUTE_HEADING.finditer(text))
    found: dict[Route, str] = {}
    for heading in headings:
        rest = text[heading.end() :]
        next_heading = re.search(r"^#", rest, re.MULTILINE)
        body = rest[: next_heading.start() if next_heading else len(rest)]
        found[(heading.group(1), heading.group(2))] = heading.group(0) + body  # the path names its parameters
    assert len(found) == len(headings), "a route has two sections"
    return found


def named(text: str) -> set[str]:
    """Names the text gives as names: inside `code spans` (`config.steps` names both) and as JSON keys."""
    spans = re.findall(r"`([^`\n]+)`", text) + re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"\s*:', text)
    return {word for span in spans for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}


def field_names(node: Any, seen: frozenset[str] = frozenset()) -> set[str]:
    """Every property name in a JSON schema, through `$ref`s, unions, arrays and nested objects."""
    if isinstance(node, list):
        return set().union(*(field_names(item, seen) for item in node))
    if not isinstance(node, dict):
        return set()
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return set() if name in seen else field_names(schema()["components"]["schemas"][name], seen | {name})
    names = set(node.get("properties", {}))
    nested = [*node.get("properties", {}).values(), *(node.get(key) for key in ("items", "anyOf", "oneOf", "allOf"))]
    return names | field_names([part for part in nested if part is not None], seen)


def request_fields(operation: dict[str, Any]) -> set[str]:
    bodies = [content["schema"] for content in operation.get("requestBody", {}).get("content", {}).values()]
    return {parameter["name"] for parameter in operation.get("parameters", [])} | field_names(bodies)


def response_fields(operation: dict[str, Any]) -> set[str]:
    ok = [response for status, response in operation["responses"].items() if status.startswith("2")]
    return field_names(
        [content.get("schema", {}) for response in ok for content in response.get("content", {}).values()]
    )


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    served, documented = set(operations()), set(sections())
    assert served - documented == set(), "routes missing from docs/api.md"
    assert documented - served == set(), "docs/api.md documents routes the server does not have"


def test_the_route_table_is_read_from_the_doc() -> None:
    """The checks above and below see what a reader sees (a parser that found nothing would pass them)."""
    assert len(sections()) >= 16
    assert "task_id" in named(sections()[("POST", "/v1/generate")])
    assert "nothing_like_this" not in named(doc())


@pytest.mark.parametrize("route", sorted(operations()), ids=" ".join)
def test_every_request_field_is_named_in_its_routes_section(route: Route) -> None:
    missing = request_fields(operations()[route]) - named(sections()[route])
    assert missing == set(), f"{' '.join(route)}: fields not described in docs/api.md"


def test_the_core_request_fields_are_checked() -> None:
    """generate, classify and the decoding parameters: the fields every client uses."""
    generate = request_fields(operations()[("POST", "/v1/generate")])
    assert {"task_id", "inputs", "version", "parameters", "max_new_tokens", "num_beams", "seed"} <= generate
    assert {"labels", "length_normalize"} <= request_fields(operations()[("POST", "/v1/classify")])
    assert {"train", "config", "steps", "prompt_length"} <= request_fields(operations()[("POST", "/v1/training-jobs")])


def test_every_response_field_is_named() -> None:
    fields = set().union(*(response_fields(op) for op in operations().values()))
    assert {"prompt_version", "finish_reason", "probs", "sha256", "total_steps"} <= fields
    assert fields - named(doc()) == set()


def test_upload_metadata_fields_are_documented() -> None:
    """`metadata` is a JSON string in the form, so its fields are not in the schema: checked from the model."""
    missing = set(UploadMetadata.model_fields) - named(sections()[("PUT", "/v1/prompts/{task_id}")])
    assert missing == set()


def error_codes() -> set[tuple[str, int]]:
    """(code, status) of every error the server can send: the table, the HTTP fallbacks and the API's own."""
    codes = {(code, status) for _, status, code, _ in ERROR_TABLE}
    codes |= {(code, status) for status, code in HTTP_CODES.items()}
    for source in (ROOT / "server" / "api").glob("*.py"):
        codes |= {(code, int(status)) for status, code in CODE_IN_SOURCE.findall(source.read_text())}
    return codes


def documented_errors() -> dict[str, tuple[int, bool]]:
    rows = ERROR_ROW.findall(doc())
    assert len({code for code, _, _ in rows}) == len(rows), "an error code has two rows"
    return {code: (int(status), bool(retry)) for code, status, retry in rows}


def test_every_error_code_is_documented_with_its_status() -> None:
    sent, documented = error_codes(), documented_errors()
    assert {("malformed_json", 400), ("too_many_connections", 503), ("body_too_large", 413)} <= sent
    assert {(code, status) for code, (status, _) in documented.items()} == sent


def test_retry_after_is_documented_for_exactly_the_errors_that_send_it() -> None:
    documented = documented_errors()
    for _, _, code, retry_after in ERROR_TABLE:
        assert documented[code][1] == (retry_after is not None), code


def test_info_fields_are_documented(client: httpx.Client) -> None:
    """`/v1/info` answers a free-form object: its fields are read from a running server."""
    info = client.get("/v1/info").json()
    section = named(sections()[("GET", "/v1/info")])
    assert set(info) | set(info["limits"]) <= section
