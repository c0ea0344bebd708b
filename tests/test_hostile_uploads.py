"""Hostile uploads over real HTTP (issue 9): files that declare more than they hold, archive bombs,
metadata that would be accepted but unusable, and text that is not Unicode. Each is refused with a 4xx
and the error body, the registry is unchanged, and the server keeps serving."""

from __future__ import annotations

import asyncio
import functools
import gzip
import io
import json
import os
import struct
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.torch

from prompt_store import DiskStore, PromptFormat, dump_prompt
from server.components import serving_limits
from server.registry.registry import PromptRegistry
from server.registry.schemas import UploadMetadata
from server.registry.service import PromptService
from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.quotas import TaskQuota
from server.testing.reference import random_prompt
from tests.serving import running_server
from tests.test_prompt_api import (
    D_TINY,
    assert_error,
    assert_refused_harmlessly,
    registry_state,
    upload,
    upload_ok,
)

MAX_MEMBERS = 64  # `ReadLimits.max_members`


@pytest.fixture(scope="module")
def server(tiny: FrozenT5, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A tiny-model server (default limits) with one task, `baseline`, that every refusal must leave alone."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("hostile-uploads"), max_wait_ms=2)
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=60) as http:
        upload_ok(http, "baseline", random_prompt(5, D_TINY, seed=100), labels=["yes", "no"])
        yield http


def good_file(seed: int = 1) -> bytes:
    return dump_prompt(random_prompt(3, D_TINY, seed=seed), PromptFormat.SAFETENSORS)


# --- finding 6: a header's shape is checked before anything is allocated -------------------------


def npy_with_header(shape: tuple[int, ...], payload: bytes, dtype: str = "<f4") -> bytes:
    """A `.npy` whose header declares `shape`, followed by whatever bytes we choose."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + payload


def safetensors_with_header(shape: list[int], payload: bytes) -> bytes:
    nbytes = int(np.prod(shape, dtype=object)) * 4
    header = json.dumps({"prompt_embeddings": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}})
    return len(header).to_bytes(8, "little") + header.encode() + payload


LYING_HEADERS: list[tuple[str, Callable[[], bytes], str]] = [
    ("npy-2**40-rows", lambda: npy_with_header((2**40, D_TINY), bytes(1024)), "the limit is 512"),
    ("npy-batch-of-2**40", lambda: npy_with_header((1, 2**40, D_TINY), bytes(1024)), "the limit is 512"),
    ("npy-2**40-wide", lambda: npy_with_header((4, 2**40), bytes(1024)), "d_model is 64"),
    ("npy-huge-2d", lambda: npy_with_header((2**31, 2**31), bytes(1024), "<f8"), "the limit is 512"),
    ("npy-short-data", lambda: npy_with_header((4, D_TINY), bytes(100)), "truncated"),
    ("npy-extra-data", lambda: npy_with_header((4, D_TINY), bytes(4 * D_TINY * 4 + 1000)), "truncated or corrupt"),
    ("safetensors-2**40-rows", lambda: safetensors_with_header([2**40, D_TINY], bytes(1024)), "the limit is 512"),
]


@pytest.mark.parametrize(("factory", "mention"), [c[1:] for c in LYING_HEADERS], ids=[c[0] for c in LYING_HEADERS])
def test_a_file_declaring_more_than_the_limits_or_than_it_holds_is_refused(
    server: httpx.Client, factory: Callable[[], bytes], mention: str
) -> None:
    data = factory()
    assert len(data) < 10_000
    assert_refused_harmlessly(server, lambda: upload(server, "lying", data), 422, "invalid_prompt", mention)


# --- finding 9: archives are read as streams, with caps on members, bytes and time ---------------


def tar_header(name: str, size: int = 0, **pax: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.pax_headers = pax
    return info.tobuf(format=tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT)


def tar_gz_of_empty_members(count: int) -> bytes:
    """`count` empty members, then bytes that are not gzip: reading every member would end in an error."""
    return gzip.compress(tar_header("empty") * count, compresslevel=1) + b"this is not gzip data " * 100


def peft_config(**overrides: object) -> bytes:
    config = {"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 2, "token_dim": 64}
    return json.dumps({**config, **overrides}).encode()


def peft_weights(rows: int = 4) -> bytes:
    return safetensors.torch.save({"prompt_embeddings": random_prompt(rows, D_TINY, seed=7)})


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_gz_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def chained_headers(count: int, tar_format: int) -> bytes:
    """`count` extended headers (pax, or GNU long names) in a row, each announcing the next: tarfile
    reads such a chain recursively."""
    info = tarfile.TarInfo("n" * 200)
    info.pax_headers = {"comment": "x"} if tar_format == tarfile.PAX_FORMAT else {}
    block = info.tobuf(format=tar_format)[:-512]  # the extended header and its data, without the member
    return gzip.compress(block * count + info.tobuf(format=tar_format)[-512:] + bytes(1024))


def zip_with_lying_directory(real_size: int, declared_size: int) -> bytes:
    """A zip whose directory (and local header) declares `declared_size` for a member that unpacks to more."""
    data = zip_of({"adapter_config.json": peft_config(), "adapter_model.safetensors": bytes(real_size)})
    real = struct.pack("<L", real_size)
    assert data.count(real) == 2  # the local header's size field and the central directory's
    return data.replace(real, struct.pack("<L", declared_size))


def test_a_tar_bomb_of_empty_members_stops_at_the_member_cap(server: httpx.Client) -> None:
    """100,000 empty members and then garbage: only a reader that stopped at the cap never reaches the
    garbage (it would answer 415), so the refusal proves the members read were bounded, not all read."""
    bomb = tar_gz_of_empty_members(100_000)
    assert len(bomb) < 1_000_000
    assert_refused_harmlessly(
        server, lambda: upload(server, "bomb", bomb), 422, "invalid_prompt", f"more than {MAX_MEMBERS} members"
    )


ARCHIVE_BOMBS: list[tuple[str, Callable[[], bytes], str]] = [
    (
        "tar-pax-header-of-30MB",
        lambda: gzip.compress(tar_header("x", comment="x" * 30_000_000) + bytes(1024)),
        "unpacks to more than",
    ),
    (
        "tar-member-declaring-4GB",
        lambda: gzip.compress(tar_header("README.md", size=2**32) + bytes(4096)),
        "unpacks to more than",
    ),
    (
        "tar-weights-declaring-4GB",
        lambda: gzip.compress(
            tar_header("adapter_config.json", size=len(peft_config()))
            + peft_config().ljust(512, b"\0")
            + tar_header("adapter_model.safetensors", size=2**32)
        ),
        "unpacks to more than",
    ),
    (
        "zip-member-of-64MB",
        lambda: zip_of({"adapter_config.json": peft_config(), "adapter_model.safetensors": bytes(64 * 2**20)}),
        "too large",
    ),
    ("tar-pax-header-chain", lambda: chained_headers(2000, tarfile.PAX_FORMAT), "chains too many"),
    ("tar-long-name-chain", lambda: chained_headers(2000, tarfile.GNU_FORMAT), "chains too many"),
    (
        "zip-bzip2-member",
        lambda: zip_of(
            {"adapter_config.json": peft_config(), "adapter_model.safetensors": peft_weights()}, zipfile.ZIP_BZIP2
        ),
        "compressed with method 12",
    ),
    ("zip-of-5000-members", lambda: zip_of({f"m{i}": b"" for i in range(5000)}), f"more than {MAX_MEMBERS} members"),
    ("zip-directory-understating", lambda: zip_with_lying_directory(8 * 2**20, 1000), "corrupt"),
    ("zip-directory-overstating", lambda: zip_with_lying_directory(8 * 2**20, 2**31), "too large"),
    (
        "zip-two-configs",
        lambda: zip_of({"a/adapter_config.json": peft_config(), "b/adapter_config.json": peft_config()}),
        "more than one adapter_config.json",
    ),
    (
        "tar-config-of-1MB",
        lambda: tar_gz_of({"adapter_config.json": b" " * 2**20, "adapter_model.safetensors": peft_weights()}),
        "too large",
    ),
]


@pytest.mark.parametrize(("factory", "mention"), [c[1:] for c in ARCHIVE_BOMBS], ids=[c[0] for c in ARCHIVE_BOMBS])
def test_archive_bombs_are_refused_by_their_caps(
    server: httpx.Client, factory: Callable[[], bytes], mention: str
) -> None:
    bomb = factory()
    assert len(bomb) < 1_000_000
    assert_refused_harmlessly(server, lambda: upload(server, "bomb", bomb), 422, "invalid_prompt", mention)


def test_three_bombs_at_once_are_all_refused_and_the_server_keeps_serving(server: httpx.Client) -> None:
    bombs = [tar_gz_of_empty_members(100_000), ARCHIVE_BOMBS[0][1](), ARCHIVE_BOMBS[3][1]()]
    before = registry_state(server)
    with ThreadPoolExecutor(len(bombs)) as pool:
        responses = list(pool.map(lambda bomb: upload(server, "bomb", bomb), bombs))
    for response in responses:
        assert_error(response, 422, "invalid_prompt")
    assert server.get("/health").status_code == 200
    assert registry_state(server) == before


def test_a_valid_peft_adapter_still_uploads_as_tar_gz_and_zip(server: httpx.Client) -> None:
    members = {"adapter/adapter_config.json": peft_config(), "adapter/adapter_model.safetensors": peft_weights()}
    for task_id, data in [("peft-tar", tar_gz_of(members)), ("peft-zip", zip_of(members))]:
        response = upload(server, task_id, data)
        assert response.status_code == 201, response.text
        assert response.json()["length"] == 2


class ReadsStarted:
    """Counts the uploads that have started reading their file."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


class PipeFile(io.RawIOBase):
    """The read end of a real pipe, as an upload's file: a read blocks until the writer closes it."""

    def __init__(self, fd: int, started: ReadsStarted) -> None:
        self._file = os.fdopen(fd, "rb", buffering=0)
        self._started = started

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self._started.add()
        chunks = []
        while chunk := self._file.read(size if size > 0 else 65536):
            chunks.append(chunk)
        self._file.close()
        return b"".join(chunks)


def test_at_most_two_uploads_read_their_files_at_once(tiny: FrozenT5, tmp_path: Path) -> None:
    """The third upload waits for a reader: three bombs at once occupy two threads, not three."""
    started = ReadsStarted()

    async def scenario() -> list[int]:
        registry = PromptRegistry(DiskStore(tmp_path / "prompts"), tiny.prompt_on_device, 2**20)
        service = PromptService(tiny, registry, serving_limits(Settings()), TaskQuota(registry, 0))
        pipes = [os.pipe() for _ in range(3)]
        uploads = [
            asyncio.create_task(service.upload("t", f"task{i}", PipeFile(read, started), UploadMetadata()))
            for i, (read, _) in enumerate(pipes)
        ]
        for _ in range(3000):  # up to 30 s for the first two reads to start
            if started.count >= 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # room for a third read to start, were one allowed
        seen = [started.count]
        for i, (_, write) in enumerate(pipes):
            os.write(write, good_file(seed=i))
            os.close(write)
        await asyncio.gather(*uploads)
        return [*seen, started.count, len(await registry.list_tasks("t"))]

    assert asyncio.run(scenario()) == [2, 3, 3]


# --- finding 15: what serving would refuse is refused at upload ----------------------------------

UNUSABLE_METADATA: list[tuple[str, str, str]] = [
    ("duplicate-labels", '{"labels": ["yes", "yes"]}', "distinct"),
    ("empty-label", '{"labels": ["yes", ""]}', "empty"),
    ("label-over-max-input-tokens", json.dumps({"labels": ["yes", "x" * 600]}), "labels.1 has 601 tokens"),
    ("label-over-the-character-cap", json.dumps({"labels": ["x" * 40_000]}), "characters"),
    ("max-new-tokens-over-the-limit", '{"parameters": {"max_new_tokens": 1000}}', "max_new_tokens"),
    ("beams-x-tokens-over-the-limit", '{"parameters": {"num_beams": 16, "max_new_tokens": 100}}', "num_beams"),
    ("template-without-input", '{"input_template": "classify this"}', "{input}"),
    ("template-with-two-inputs", '{"input_template": "{input} and {input}"}', "{input}"),
    ("template-over-the-cap", json.dumps({"input_template": "{input}" + "x" * 2000}), "2000"),
    ("template-over-max-input-tokens", json.dumps({"input_template": "{input}" + "x" * 1500}), "1501 tokens"),
    (
        "labels-over-one-model-call",
        json.dumps({"labels": [f"{i:03d}" + "x" * 297 for i in range(64)]}),
        "even an empty input costs",
    ),
    ("activate-string", '{"activate": "yes"}', "activate"),
    ("activate-number", '{"activate": 1}', "activate"),
    ("nan-literal", '{"parameters": {"temperature": NaN}}', "NaN"),
    ("infinity-literal", '{"parameters": {"top_p": Infinity}}', "Infinity"),
    ("float-for-int", '{"parameters": {"max_new_tokens": 5.0}}', "max_new_tokens"),
    ("deep-nesting", '{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}", "metadata"),
]


@pytest.mark.parametrize(
    ("metadata", "mention"), [c[1:] for c in UNUSABLE_METADATA], ids=[c[0] for c in UNUSABLE_METADATA]
)
def test_metadata_serving_could_not_use_is_refused_at_upload(server: httpx.Client, metadata: str, mention: str) -> None:
    data = good_file()
    assert_refused_harmlessly(
        server,
        lambda: server.put("/v1/prompts/baseline", files={"file": ("p", data)}, data={"metadata": metadata}),
        422,
        "invalid_input",
        mention,
    )


PEFT_CONFIGS: list[tuple[str, bytes, str]] = [
    ("num-virtual-tokens-true", peft_config(num_virtual_tokens=True), "num_virtual_tokens"),
    ("num-virtual-tokens-over-the-limit", peft_config(num_virtual_tokens=10**6), "the limit is 512"),
    ("nan-literal", peft_config().replace(b'"token_dim": 64', b'"token_dim": NaN'), "NaN"),
]


@pytest.mark.parametrize(("config", "mention"), [c[1:] for c in PEFT_CONFIGS], ids=[c[0] for c in PEFT_CONFIGS])
def test_adapter_config_is_read_strictly(server: httpx.Client, config: bytes, mention: str) -> None:
    data = zip_of({"adapter_config.json": config, "adapter_model.safetensors": peft_weights()})
    assert_refused_harmlessly(server, lambda: upload(server, "peft", data), 422, "invalid_prompt", mention)


FORMS: list[tuple[str, Callable[[], dict], str]] = [
    ("two-file-parts", lambda: {"files": [("file", ("a", good_file(1))), ("file", ("b", good_file(2)))]}, "file"),
    (
        "two-metadata-parts",
        lambda: {"files": {"file": ("a", good_file())}, "data": {"metadata": ["{}", '{"activate": false}']}},
        "metadata",
    ),
    ("unknown-field", lambda: {"files": {"file": ("a", good_file())}, "data": {"colour": "red"}}, "colour"),
]


@pytest.mark.parametrize(("form", "mention"), [c[1:] for c in FORMS], ids=[c[0] for c in FORMS])
def test_an_ambiguous_form_is_refused(server: httpx.Client, form: Callable[[], dict], mention: str) -> None:
    parts = form()
    send = lambda: server.put("/v1/prompts/baseline", **parts)  # noqa: E731
    assert_refused_harmlessly(server, send, 422, "invalid_input", mention)


def test_the_smallest_request_must_fit_one_model_call(tiny: FrozenT5, tmp_path: Path) -> None:
    """Costed as serving costs it (`max_batch_tokens`), with the metadata the new version will be served with:
    what the upload sets, and what the task already has."""
    settings = Settings(data_dir=tmp_path, max_wait_ms=2, max_batch_tokens=256)
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=60) as http:
        upload_ok(http, "baseline", random_prompt(3, D_TINY, seed=1), labels=["a" * 99, "b" * 99])  # 3 + 1 + 2 x 100
        refusals: list[tuple[dict | None, int, str]] = [
            ({"parameters": {"num_beams": 4}, "input_template": "x" * 100 + "{input}"}, 3, "num_beams 4"),
            ({"labels": ["a" * 99, "b" * 99, "c"]}, 3, "costs 304 tokens"),
            (None, 60, "costs 261 tokens"),  # the task's labels, with a longer prompt
        ]
        for metadata, rows, mention in refusals:
            data = dump_prompt(random_prompt(rows, D_TINY, seed=2), PromptFormat.SAFETENSORS)
            send = functools.partial(upload, http, "baseline", data, metadata=metadata)
            assert_refused_harmlessly(http, send, 422, "invalid_input", mention)
        upload_ok(http, "baseline", random_prompt(50, D_TINY, seed=3))  # 50 + 1 + 200 still fits


def test_usable_metadata_is_accepted_and_served(server: httpx.Client) -> None:
    metadata = {
        "labels": ["yes", "no"],
        "input_template": "question: {input}",
        "description": "déjà vu 🙂",
        "parameters": {"max_new_tokens": 8, "num_beams": 2},
    }
    assert upload(server, "usable", good_file(), metadata=metadata).status_code == 201
    classify = server.post("/v1/classify", json={"task_id": "usable", "inputs": "is it?"})
    assert classify.status_code == 200, classify.text
    generate = server.post("/v1/generate", json={"task_id": "usable", "inputs": "is it?"})
    assert generate.status_code == 200, generate.text
    assert generate.json()["outputs"][0]["num_tokens"] <= 8


# --- finding 4: text that is not Unicode ---------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ('{"labels": ["yes", "\\ud800"]}', "labels.1"),
        ('{"input_template": "{input} \\udfff"}', "input_template"),
        ('{"description": "a \\ud800\\ud800 b"}', "description"),
    ],
)
def test_lone_surrogates_in_metadata_are_refused_naming_the_field(
    server: httpx.Client, metadata: str, field: str
) -> None:
    assert_refused_harmlessly(
        server,
        lambda: server.put("/v1/prompts/baseline", files={"file": ("p", good_file())}, data={"metadata": metadata}),
        422,
        "invalid_input",
        f"{field}: Value error, holds a lone surrogate",
    )
