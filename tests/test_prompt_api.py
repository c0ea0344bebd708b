"""The prompt registry over real HTTP: the upload/list/get/download/activate/delete life cycle, the real
released prompts, every kind of bad input (each refused with the error shape, leaving the registry and
the server as they were), and many tasks served concurrently."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import pickle
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch

from prompt_store import PromptFormat, dump_prompt, load_prompt_bytes
from server.serving.model import FrozenT5
from server.settings import Settings
from server.testing.reference import random_prompt
from tests.conftest import REAL_PROMPTS
from tests.serving import running_server

D_TINY = 64
REAL_PROMPT_FILES = sorted(REAL_PROMPTS.glob("*.npy"))
ERROR_CODE = re.compile(r"^[a-z][a-z0-9_]*$")


# --- helpers -----------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def sha256_of(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def upload(
    http: httpx.Client, task_id: str, data: bytes, filename: str = "prompt", metadata: dict | None = None
) -> httpx.Response:
    form = {"metadata": json.dumps(metadata)} if metadata is not None else None
    return http.put(f"/v1/prompts/{task_id}", files={"file": (filename, data)}, data=form)


def upload_ok(http: httpx.Client, task_id: str, prompt: torch.Tensor, **metadata: object) -> dict:
    response = upload(http, task_id, dump_prompt(prompt, PromptFormat.SAFETENSORS), metadata=metadata or None)
    assert response.status_code == 201, response.text
    return response.json()


def download(http: httpx.Client, task_id: str, version: int, fmt: str | None = None) -> httpx.Response:
    params = {"format": fmt} if fmt else None
    response = http.get(f"/v1/prompts/{task_id}/versions/{version}", params=params)
    assert response.status_code == 200, response.text
    return response


def generate(http: httpx.Client, task_id: str, inputs: str | list[str], **extra: object) -> dict:
    body = {"task_id": task_id, "inputs": inputs, "parameters": {"max_new_tokens": 6}, **extra}
    response = http.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, code: str | None = None, mention: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "type", "param"}, body
    assert ERROR_CODE.match(body["error"]["code"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"].strip(), body
    if code is not None:
        assert body["error"]["code"] == code, body
    if mention is not None:
        assert mention.lower() in body["error"]["message"].lower(), body


def registry_state(http: httpx.Client) -> tuple[dict, dict[str, dict]]:
    listing = http.get("/v1/prompts")
    assert listing.status_code == 200, listing.text
    body = listing.json()
    tasks = {p["task_id"]: http.get(f"/v1/prompts/{p['task_id']}").json() for p in body["prompts"]}
    for entry in body["prompts"]:
        del entry["loaded"]  # this replica's cache, not the registry: serving a request loads the prompt
    return body, tasks


def assert_refused_harmlessly(
    http: httpx.Client,
    send: Callable[[], httpx.Response],
    status: int,
    code: str | None = None,
    mention: str | None = None,
) -> None:
    """The request gets the error body; the registry is as it was; the server still serves."""
    before = registry_state(http)
    served_before = baseline_scores(http)
    assert_error(send(), status, code, mention)
    assert registry_state(http) == before
    assert http.get("/health").status_code == 200
    assert baseline_scores(http) == served_before


def baseline_scores(http: httpx.Client) -> dict:
    """What the task `baseline` serves: classify scores are continuous, so any change to its prompt shows."""
    response = http.post("/v1/classify", json={"task_id": "baseline", "inputs": ["still serving?", "x"]})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def guarded(tiny: FrozenT5, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A tiny-model server shared by the refusal tests (they must not change it), with one task in it."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("guarded"), max_wait_ms=2)
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        upload_ok(http, "baseline", random_prompt(5, D_TINY, seed=100), labels=["yes", "no"])
        upload_ok(http, "baseline", random_prompt(7, D_TINY, seed=101))
        yield http


@pytest.fixture(scope="module")
def shared(tiny: FrozenT5, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A tiny-model server for tests that each work on a task of their own."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("shared"), max_wait_ms=2)
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


# --- the life cycle ----------------------------------------------------------------------------


def test_upload_returns_the_new_version(shared: httpx.Client) -> None:
    prompt = random_prompt(10, D_TINY, seed=1)
    response = upload(shared, "first-upload", dump_prompt(prompt, PromptFormat.NPY), filename="sst2.npy")
    assert response.status_code == 201, response.text
    assert response.json() == {
        "task_id": "first-upload",
        "version": 1,
        "length": 10,
        "d_model": D_TINY,
        "sha256": sha256_of(prompt),
        "active": True,
    }


def test_list_and_get_show_tasks_versions_and_metadata(client: httpx.Client) -> None:
    metadata = {
        "labels": ["positive", "negative"],
        "description": "sentiment",
        "input_template": "sentence: {input}",
        "parameters": {"max_new_tokens": 3},
    }
    upload_ok(client, "sst2", random_prompt(4, D_TINY, seed=1), **metadata)
    upload_ok(client, "sst2", random_prompt(6, D_TINY, seed=2), description="sentiment v2")
    upload_ok(client, "rte", random_prompt(8, D_TINY, seed=3))
    listing = client.get("/v1/prompts").json()["prompts"]
    by_id = {p["task_id"]: p for p in listing}
    assert set(by_id) == {"sst2", "rte"}
    assert by_id["sst2"]["active_version"] == 2 and by_id["sst2"]["versions"] == [1, 2]
    assert by_id["sst2"]["length"] == 6 and by_id["sst2"]["labels"] == ["positive", "negative"]
    assert by_id["rte"]["versions"] == [1] and by_id["rte"]["length"] == 8 and by_id["rte"]["labels"] is None
    assert all(p["updated_at"] for p in listing)

    task = client.get("/v1/prompts/sst2").json()
    assert task["task_id"] == "sst2" and task["active_version"] == 2
    assert task["labels"] == ["positive", "negative"]
    assert task["description"] == "sentiment v2"  # merged: the newer description, the older labels
    assert task["input_template"] == "sentence: {input}"
    assert task["parameters"]["max_new_tokens"] == 3
    assert [(v["version"], v["length"], v["d_model"]) for v in task["versions"]] == [(1, 4, D_TINY), (2, 6, D_TINY)]
    assert task["versions"][0]["sha256"] == sha256_of(random_prompt(4, D_TINY, seed=1))
    assert all(v["model"] == "tiny" for v in task["versions"])


@pytest.mark.parametrize("fmt", ["safetensors", "npy", "peft", None])
def test_download_in_each_format_gives_back_the_values(shared: httpx.Client, fmt: str | None) -> None:
    prompt = random_prompt(7, D_TINY, seed=5, scale=900.0)
    task_id = f"download-{fmt}"
    upload_ok(shared, task_id, random_prompt(3, D_TINY, seed=4))
    upload_ok(shared, task_id, prompt)
    response = download(shared, task_id, 2, fmt)
    extension = {"peft": "zip", None: "safetensors"}.get(fmt, fmt)
    assert response.headers["content-disposition"] == f'attachment; filename="{task_id}-v2.{extension}"'
    if fmt == "peft":
        assert response.headers["content-type"] == "application/zip"
        assert zipfile.ZipFile(io.BytesIO(response.content)).testzip() is None
    assert torch.equal(load_prompt_bytes(response.content), prompt)


def test_each_upload_is_a_version_and_activate_rolls_back_and_forward(client: httpx.Client) -> None:
    prompts = [random_prompt(n, D_TINY, seed=10 + n) for n in (3, 8, 5)]
    assert upload_ok(client, "t", prompts[0])["version"] == 1
    assert upload_ok(client, "t", prompts[1])["version"] == 2
    third = upload(client, "t", dump_prompt(prompts[2], PromptFormat.NPY), metadata={"activate": False})
    assert third.status_code == 201 and third.json()["version"] == 3 and third.json()["active"] is False
    assert client.get("/v1/prompts/t").json()["active_version"] == 2

    def scores(**version: int) -> dict:
        body = {"task_id": "t", "inputs": "the same input", "labels": ["yes", "no", "maybe"], **version}
        response = client.post("/v1/classify", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    pinned = {v: scores(version=v)["outputs"] for v in (1, 2, 3)}
    assert len({json.dumps(p) for p in pinned.values()}) == 3  # each version scores differently
    served = scores()
    assert served["prompt_version"] == 2 and served["outputs"] == pinned[2]

    for version in (1, 3, 2):
        response = client.post("/v1/prompts/t/activate", json={"version": version})
        assert response.status_code == 200, response.text
        assert response.json()["active_version"] == version
        assert [v["version"] for v in response.json()["versions"]] == [1, 2, 3]
        served = scores()
        assert served["prompt_version"] == version and served["outputs"] == pinned[version]
    for version, prompt in enumerate(prompts, start=1):  # versions are immutable
        assert torch.equal(load_prompt_bytes(download(client, "t", version).content), prompt)


def test_delete_stops_serving_and_leaves_other_tasks(client: httpx.Client) -> None:
    upload_ok(client, "gone", random_prompt(4, D_TINY, seed=1))
    upload_ok(client, "gone", random_prompt(5, D_TINY, seed=2))
    upload_ok(client, "kept", random_prompt(6, D_TINY, seed=3))
    kept_before = generate(client, "kept", "hello")
    generate(client, "gone", "hello")  # cached on the device before the delete

    response = client.delete("/v1/prompts/gone")
    assert response.status_code == 204 and response.content == b""
    assert_error(client.get("/v1/prompts/gone"), 404, "not_found")
    assert_error(client.post("/v1/generate", json={"task_id": "gone", "inputs": "hello"}), 404, "not_found")
    assert_error(client.get("/v1/prompts/gone/versions/1"), 404, "not_found")
    assert_error(client.delete("/v1/prompts/gone"), 404, "not_found")
    assert [p["task_id"] for p in client.get("/v1/prompts").json()["prompts"]] == ["kept"]
    assert generate(client, "kept", "hello") == kept_before

    again = upload_ok(client, "gone", random_prompt(9, D_TINY, seed=4))
    assert again["version"] == 1 and again["length"] == 9


def archive_of(prompt: torch.Tensor, kind: str) -> bytes:
    """The server's own PEFT export, repacked as the archive `kind`."""
    with zipfile.ZipFile(io.BytesIO(dump_prompt(prompt, PromptFormat.PEFT))) as source:
        members = {name: source.read(name) for name in source.namelist()}
    if kind == "zip":
        return dump_prompt(prompt, PromptFormat.PEFT)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if kind == "tar.gz" else "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"adapter/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("kind", "filename"),
    [
        ("safetensors", "prompt.npy"),
        ("single-key-safetensors", "weights.bin"),
        ("bf16-safetensors", "p.safetensors"),
        ("npy", "adapter.zip"),
        ("extensionless-npy", "checkpoint"),
        ("zip", "prompt.safetensors"),
        ("tar", "adapter.pt"),
        ("tar.gz", "adapter.tar.gz"),
    ],
)
def test_every_format_uploads_whatever_the_file_name(shared: httpx.Client, kind: str, filename: str) -> None:
    prompt = random_prompt(5, D_TINY, seed=6)
    expected = prompt
    if kind == "safetensors":
        data = dump_prompt(prompt, PromptFormat.SAFETENSORS)
    elif kind == "single-key-safetensors":
        data = safetensors.torch.save({"soft_prompt": prompt})
    elif kind == "bf16-safetensors":
        data = safetensors.torch.save({"prompt_embeddings": prompt.to(torch.bfloat16)})
        expected = prompt.to(torch.bfloat16).float()
    elif kind in ("npy", "extensionless-npy"):
        data = npy_bytes(prompt.numpy())
    else:
        data = archive_of(prompt, kind)
    task_id = f"format-{kind}"
    response = upload(shared, task_id, data, filename=filename)
    assert response.status_code == 201, response.text
    assert response.json()["sha256"] == sha256_of(expected)
    stored = safetensors.torch.load(download(shared, task_id, 1, "safetensors").content)["prompt_embeddings"]
    assert stored.dtype == torch.float32 and torch.equal(stored, expected)


# --- the released prompts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def d768_client(d768: FrozenT5, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("d768"), max_wait_ms=2)
    with running_server(settings, d768) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


@pytest.mark.parametrize("path", REAL_PROMPT_FILES, ids=lambda p: p.stem)
def test_real_prompts_upload_unchanged_on_a_d768_model(d768_client: httpx.Client, path: Path) -> None:
    raw = path.read_bytes()
    array = np.load(path, allow_pickle=False)
    response = upload(d768_client, path.stem, raw, filename=path.name, metadata={"labels": ["yes", "no"]})
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["length"], body["d_model"]) == (100, 768)
    assert body["sha256"] == hashlib.sha256(array.tobytes()).hexdigest()

    assert download(d768_client, path.stem, 1, "npy").content == raw
    stored = safetensors.torch.load(download(d768_client, path.stem, 1, "safetensors").content)["prompt_embeddings"]
    assert np.array_equal(stored.numpy(), array)
    assert np.array_equal(load_prompt_bytes(download(d768_client, path.stem, 1, "peft").content).numpy(), array)

    response = d768_client.post("/v1/classify", json={"task_id": path.stem, "inputs": ["sentence: fine", "x"]})
    assert response.status_code == 200, response.text
    for output in response.json()["outputs"]:
        assert all(np.isfinite(list(output["scores"].values())))
        assert sum(output["probs"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("path", REAL_PROMPT_FILES, ids=lambda p: p.stem)
def test_real_prompts_are_refused_clearly_on_the_tiny_model(guarded: httpx.Client, path: Path) -> None:
    assert_refused_harmlessly(
        guarded,
        lambda: upload(guarded, path.stem, path.read_bytes(), filename=path.name),
        422,
        "invalid_prompt",
        "width is 768 but the served model's d_model is 64",
    )


# --- bad uploads -------------------------------------------------------------------------------


def _with_value(value: float) -> bytes:
    tensor = random_prompt(4, D_TINY, seed=1)
    tensor[1, 2] = value
    return npy_bytes(tensor.numpy())


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _torch_save(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _peft_config(**overrides: object) -> bytes:
    config = {"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 2, "token_dim": 64}
    return json.dumps({**config, **overrides}).encode()


BAD_UPLOADS: list[tuple[str, Callable[[], bytes], int, str, str]] = [
    ("empty", lambda: b"", 415, "unsupported_format", "empty"),
    ("garbage", lambda: bytes(range(256)) * 8, 415, "unsupported_format", "unrecognised"),
    ("text", lambda: b"0.1 0.2 0.3\n0.4 0.5 0.6\n", 415, "unsupported_format", "unrecognised"),
    ("pickle", lambda: pickle.dumps(np.zeros((4, 64), np.float32), protocol=4), 415, "unsupported_format", "pickle"),
    ("torch-save", lambda: _torch_save({"prompt": torch.zeros(4, 64)}), 415, "unsupported_format", "pickle"),
    (
        "npy-objects",
        lambda: npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True),
        415,
        "unsupported_format",
        "pickle",
    ),
    (
        "peft-bin-only",
        lambda: _zip({"adapter_config.json": _peft_config(), "adapter_model.bin": _torch_save(torch.zeros(4, 64))}),
        415,
        "unsupported_format",
        "pickle",
    ),
    ("zip-not-peft", lambda: _zip({"notes.txt": b"hi"}), 415, "unsupported_format", "adapter_config.json"),
    (
        "peft-lora",
        lambda: _zip(
            {
                "adapter_config.json": _peft_config(peft_type="LORA"),
                "adapter_model.safetensors": safetensors.torch.save({"prompt_embeddings": torch.zeros(4, 64)}),
            }
        ),
        422,
        "invalid_prompt",
        "PROMPT_TUNING",
    ),
    (
        "corrupt-safetensors",
        lambda: (20).to_bytes(8, "little") + b"{not a valid header}" + b"\x00" * 32,
        422,
        "invalid_prompt",
        "safetensors",
    ),
    (
        "multi-tensor-safetensors",
        lambda: safetensors.torch.save({"a": torch.zeros(2, 64), "b": torch.zeros(2, 64)}),
        422,
        "invalid_prompt",
        "prompt_embeddings",
    ),
    ("truncated-npy", lambda: npy_bytes(np.zeros((4, 64), np.float32))[:-10], 422, "invalid_prompt", "npy"),
    ("corrupt-zip", lambda: b"PK\x03\x04" + b"\x00" * 100, 422, "invalid_prompt", "zip"),
    ("nan", lambda: _with_value(float("nan")), 422, "invalid_prompt", "NaN"),
    ("inf", lambda: _with_value(float("inf")), 422, "invalid_prompt", "infinite"),
    ("rank-1", lambda: npy_bytes(np.zeros(64, np.float32)), 422, "invalid_prompt", "2-D"),
    ("rank-3", lambda: npy_bytes(np.zeros((2, 4, 64), np.float32)), 422, "invalid_prompt", "2-D"),
    ("int", lambda: npy_bytes(np.zeros((4, 64), np.int64)), 422, "invalid_prompt", "floating-point"),
    ("d-model", lambda: npy_bytes(np.zeros((4, 32), np.float32)), 422, "invalid_prompt", "d_model is 64"),
    ("zero-rows", lambda: npy_bytes(np.zeros((0, 64), np.float32)), 422, "invalid_prompt", "0 rows"),
    ("too-long", lambda: npy_bytes(np.zeros((513, 64), np.float32)), 422, "invalid_prompt", "the limit is 512"),
]


@pytest.mark.parametrize(
    ("factory", "status", "code", "mention"), [c[1:] for c in BAD_UPLOADS], ids=[c[0] for c in BAD_UPLOADS]
)
@pytest.mark.parametrize("task_id", ["baseline", "newtask"])
def test_bad_uploads_are_refused(
    guarded: httpx.Client, task_id: str, factory: Callable[[], bytes], status: int, code: str, mention: str
) -> None:
    data = factory()
    assert_refused_harmlessly(
        guarded, lambda: upload(guarded, task_id, data, "prompt.safetensors"), status, code, mention
    )


def test_a_pickle_named_like_safetensors_is_still_refused_as_a_pickle(guarded: httpx.Client) -> None:
    data = pickle.dumps({"prompt_embeddings": np.zeros((4, 64), np.float32)}, protocol=2)
    assert_refused_harmlessly(
        guarded, lambda: upload(guarded, "p", data, "prompt.safetensors"), 415, "unsupported_format", "arbitrary code"
    )


@pytest.mark.parametrize(
    "metadata",
    [
        "{not json",
        "[1, 2]",
        '"a string"',
        '{"labels": "positive"}',
        '{"labels": []}',
        '{"colour": "red"}',
        '{"activate": "yes please"}',
        '{"parameters": {"max_new_tokens": 0}}',
        '{"parameters": {"beams": 2}}',
    ],
)
def test_bad_metadata_is_refused_and_the_file_is_not_stored(guarded: httpx.Client, metadata: str) -> None:
    data = dump_prompt(random_prompt(3, D_TINY, seed=9), PromptFormat.SAFETENSORS)
    assert_refused_harmlessly(
        guarded,
        lambda: guarded.put("/v1/prompts/baseline", files={"file": ("p", data)}, data={"metadata": metadata}),
        422,
        mention="metadata",
    )


@pytest.mark.parametrize(
    "send",
    [
        lambda http: http.put("/v1/prompts/baseline", data={"metadata": "{}"}),
        lambda http: http.put("/v1/prompts/baseline", files={"prompt": ("p.npy", npy_bytes(np.zeros((2, 64))))}),
        lambda http: http.put("/v1/prompts/baseline"),
        lambda http: http.put("/v1/prompts/baseline", json={"file": "AAAA"}),
    ],
    ids=["metadata-only", "wrong-field-name", "no-body", "json-body"],
)
def test_missing_file_field_is_422(guarded: httpx.Client, send: Callable[[httpx.Client], httpx.Response]) -> None:
    assert_refused_harmlessly(guarded, lambda: send(guarded), 422, mention="file")


# --- bad paths, unknown objects ----------------------------------------------------------------


@pytest.mark.parametrize(
    "task_id", ["-leading-dash", "_underscore", "x" * 65, "has%20space", "semi%3Bcolon", "d%C3%A9j%C3%A0"]
)
def test_invalid_task_id_in_the_path_is_422(guarded: httpx.Client, task_id: str) -> None:
    data = dump_prompt(random_prompt(3, D_TINY, seed=9), PromptFormat.SAFETENSORS)
    requests: list[Callable[[], httpx.Response]] = [
        lambda: guarded.put(f"/v1/prompts/{task_id}", files={"file": ("p", data)}),
        lambda: guarded.get(f"/v1/prompts/{task_id}"),
        lambda: guarded.get(f"/v1/prompts/{task_id}/versions/1"),
        lambda: guarded.post(f"/v1/prompts/{task_id}/activate", json={"version": 1}),
        lambda: guarded.delete(f"/v1/prompts/{task_id}"),
    ]
    for send in requests:
        assert_refused_harmlessly(guarded, send, 422, "invalid_request", "task_id")


@pytest.mark.parametrize(
    "send",
    [
        lambda http: http.get("/v1/prompts/nope"),
        lambda http: http.get("/v1/prompts/nope/versions/1"),
        lambda http: http.get("/v1/prompts/nope/versions/1", params={"format": "peft"}),
        lambda http: http.post("/v1/prompts/nope/activate", json={"version": 1}),
        lambda http: http.delete("/v1/prompts/nope"),
        lambda http: http.post("/v1/generate", json={"task_id": "nope", "inputs": "x"}),
        lambda http: http.post("/v1/classify", json={"task_id": "nope", "inputs": "x", "labels": ["a"]}),
    ],
    ids=["get", "download", "download-peft", "activate", "delete", "generate", "classify"],
)
def test_unknown_task_is_404(guarded: httpx.Client, send: Callable[[httpx.Client], httpx.Response]) -> None:
    assert_refused_harmlessly(guarded, lambda: send(guarded), 404, "not_found", "'nope'")


@pytest.mark.parametrize(
    "send",
    [
        lambda http: http.get("/v1/prompts/baseline/versions/3"),
        lambda http: http.get("/v1/prompts/baseline/versions/999", params={"format": "npy"}),
        lambda http: http.post("/v1/prompts/baseline/activate", json={"version": 3}),
        lambda http: http.post("/v1/generate", json={"task_id": "baseline", "inputs": "x", "version": 3}),
        lambda http: http.post("/v1/classify", json={"task_id": "baseline", "inputs": "x", "version": 7}),
    ],
    ids=["download", "download-npy", "activate", "generate", "classify"],
)
def test_unknown_version_is_404(guarded: httpx.Client, send: Callable[[httpx.Client], httpx.Response]) -> None:
    assert_refused_harmlessly(guarded, lambda: send(guarded), 404, "not_found", "no version")


@pytest.mark.parametrize(
    ("path", "mention"),
    [
        ("/v1/prompts/baseline/versions/0", "version"),
        ("/v1/prompts/baseline/versions/one", "version"),
        ("/v1/prompts/baseline/versions/1?format=pickle", "format"),
        ("/v1/prompts/baseline/versions/1?format=pt", "format"),
    ],
)
def test_bad_version_or_format_in_the_url_is_422(guarded: httpx.Client, path: str, mention: str) -> None:
    assert_refused_harmlessly(guarded, lambda: guarded.get(path), 422, "invalid_request", mention)


# --- bad JSON bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/classify", "/v1/prompts/baseline/activate"])
@pytest.mark.parametrize("raw", [b'{"task_id": "baseline", ', b"not json", b'{"version": 1,}'])
def test_malformed_json_is_400(guarded: httpx.Client, path: str, raw: bytes) -> None:
    headers = {"content-type": "application/json"}
    assert_refused_harmlessly(guarded, lambda: guarded.post(path, content=raw, headers=headers), 400, "malformed_json")


@pytest.mark.parametrize(
    ("path", "body", "mention"),
    [
        ("/v1/generate", {"task_id": "baseline", "inputs": 5}, "inputs"),
        ("/v1/generate", {"task_id": 7, "inputs": "x"}, "task_id"),
        ("/v1/generate", {"task_id": "bad id!", "inputs": "x"}, "task_id"),
        ("/v1/generate", {"inputs": "x"}, "task_id"),
        ("/v1/generate", {"task_id": "baseline", "inputs": ["x", 3]}, "inputs"),
        ("/v1/generate", {"task_id": "baseline", "inputs": "x", "version": "1"}, "version"),
        (
            "/v1/generate",
            {"task_id": "baseline", "inputs": "x", "parameters": {"max_new_tokens": "8"}},
            "max_new_tokens",
        ),
        ("/v1/generate", {"task_id": "baseline", "inputs": "x", "parameters": {"do_sample": "yes"}}, "do_sample"),
        ("/v1/generate", {"task_id": "baseline", "inputs": "x", "parameters": {"top_p": 2}}, "top_p"),
        ("/v1/generate", {"task_id": "baseline", "inputs": "x", "unexpected": 1}, "unexpected"),
        ("/v1/generate", [{"task_id": "baseline", "inputs": "x"}], "body"),
        ("/v1/classify", {"task_id": "baseline", "inputs": "x", "labels": "yes"}, "labels"),
        ("/v1/classify", {"task_id": "baseline", "inputs": "x", "labels": []}, "labels"),
        ("/v1/classify", {"task_id": "baseline", "inputs": "x", "length_normalize": "no"}, "length_normalize"),
        ("/v1/prompts/baseline/activate", {"version": "1"}, "version"),
        ("/v1/prompts/baseline/activate", {"version": 0}, "version"),
        ("/v1/prompts/baseline/activate", {}, "version"),
    ],
)
def test_wrong_types_and_fields_are_422(guarded: httpx.Client, path: str, body: object, mention: str) -> None:
    assert_refused_harmlessly(guarded, lambda: guarded.post(path, json=body), 422, "invalid_request", mention)


@pytest.mark.parametrize(
    ("path", "body", "mention"),
    [
        ("/v1/generate", {"task_id": "baseline", "inputs": "x" * 600}, "the limit is 512"),
        ("/v1/generate", {"task_id": "baseline", "inputs": ["short", "y" * 1000]}, "input 1 has"),
        ("/v1/classify", {"task_id": "baseline", "inputs": ["z" * 700]}, "the limit is 512"),
        ("/v1/generate", {"task_id": "baseline", "inputs": []}, "empty"),
        ("/v1/generate", {"task_id": "baseline", "inputs": ["x"] * 65}, "the limit is 64"),
        ("/v1/generate", {"task_id": "baseline", "inputs": "x", "parameters": {"max_new_tokens": 257}}, "limit"),
        ("/v1/classify", {"task_id": "baseline", "inputs": "x", "labels": ["a", "a"]}, "distinct"),
    ],
)
def test_over_long_or_unacceptable_inputs_are_422(guarded: httpx.Client, path: str, body: object, mention: str) -> None:
    assert_refused_harmlessly(guarded, lambda: guarded.post(path, json=body), 422, "invalid_input", mention)


# --- the body size limit -----------------------------------------------------------------------


@pytest.fixture
def small_body_client(tiny: FrozenT5, settings: Settings) -> Iterator[httpx.Client]:
    limited = settings.model_copy(update={"max_body_bytes": 4096})
    with running_server(limited, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        upload_ok(http, "baseline", random_prompt(3, D_TINY, seed=100), labels=["yes", "no"])  # fits in 4 KiB
        yield http


def _chunks(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _multipart_upload(boundary: str = "softserve-boundary") -> tuple[bytes, dict[str, str]]:
    """A well-formed multipart body holding a prompt too large for the limit."""
    part = b'Content-Disposition: form-data; name="file"; filename="p.npy"\r\n'
    part += b"Content-Type: application/octet-stream\r\n\r\n"
    part += dump_prompt(random_prompt(40, D_TINY, seed=1), PromptFormat.NPY)
    body = f"--{boundary}\r\n".encode() + part + f"\r\n--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.parametrize(
    "send",
    [
        lambda http: upload(http, "big", dump_prompt(random_prompt(40, D_TINY, seed=1), PromptFormat.NPY)),
        lambda http: upload(http, "baseline", dump_prompt(random_prompt(40, D_TINY, seed=1), PromptFormat.NPY)),
        lambda http: http.post("/v1/generate", json={"task_id": "baseline", "inputs": "x" * 5000}),
        # No Content-Length: the limit is enforced while the body streams in.
        lambda http: http.post(
            "/v1/generate",
            content=_chunks(json.dumps({"task_id": "baseline", "inputs": "x" * 9000}).encode()),
            headers={"content-type": "application/json"},
        ),
        lambda http: http.put(
            "/v1/prompts/big", content=_chunks(_multipart_upload()[0]), headers=_multipart_upload()[1]
        ),
    ],
    ids=["upload-new", "upload-existing", "generate", "generate-chunked", "upload-chunked"],
)
def test_body_over_the_limit_is_413(
    small_body_client: httpx.Client, send: Callable[[httpx.Client], httpx.Response]
) -> None:
    assert_refused_harmlessly(
        small_body_client, lambda: send(small_body_client), 413, "body_too_large", "limit of 4096 bytes"
    )


# --- many tasks at once ------------------------------------------------------------------------


def test_concurrent_requests_of_many_tasks_equal_each_request_alone(
    tiny: FrozenT5, settings: Settings, tmp_path: Path
) -> None:
    lengths = [1, 3, 5, 8, 13, 2, 21, 4]
    tasks = {f"task-{i}": random_prompt(n, D_TINY, seed=200 + i) for i, n in enumerate(lengths)}
    texts = ["a gorgeous, witty film", "x", "premise: a cat sat. hypothesis: a cat is sitting", "dull", "42"]
    bodies = []
    for k in range(40):
        task_id = f"task-{k % len(tasks)}"
        inputs: str | list[str] = texts[k % len(texts)] if k % 3 else [texts[k % 5], texts[(k + 2) % 5]]
        bodies.append({"task_id": task_id, "inputs": inputs, "parameters": {"max_new_tokens": 3 + k % 6}})

    batching = settings.model_copy(update={"max_wait_ms": 20.0, "max_batch_size": 16})
    with running_server(batching, tiny) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            for task_id, prompt in tasks.items():
                upload_ok(http, task_id, prompt)
            alone = []
            for body in bodies:
                response = http.post("/v1/generate", json=body)
                assert response.status_code == 200, response.text
                alone.append(response.json())

        async def send_all() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=len(bodies))
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
                return await asyncio.gather(*(http.post("/v1/generate", json=body) for body in bodies))

        together = asyncio.run(send_all())
        metrics = httpx.get(f"{url}/metrics").text

    assert [r.status_code for r in together] == [200] * len(bodies), [r.text for r in together if r.is_error]
    for body, response, expected in zip(bodies, together, alone, strict=True):
        assert response.json() == expected, body
    assert len({json.dumps(a["outputs"]) for a in alone}) > len(tasks)  # outputs vary by task and input
    assert max_observed(metrics, "softserve_batch_tasks") > 1  # some batch really mixed tasks


def max_observed(metrics: str, histogram: str) -> float:
    """The smallest bucket bound that holds every observation of a Prometheus histogram."""
    buckets = [
        (float(m.group(1)), float(m.group(2)))
        for m in re.finditer(rf'^{histogram}_bucket{{le="([^"]+)"}} (\S+)$', metrics, re.MULTILINE)
    ]
    total = max(count for _, count in buckets)
    return min(bound for bound, count in buckets if count == total)
