"""Prompt file formats: detection by content, loading without pickle, and export.

Accepted: safetensors (key `prompt_embeddings`, or the only tensor), NumPy `.npy` (also the
extension-less files of T5X checkpoints), and PEFT prompt-tuning adapters packed as zip or tar.

Every file comes from a client, so nothing is allocated or unpacked on its word: the shape in a
`.npy` or safetensors header is checked against the limits (and against the bytes the file really
holds) before any value is read, and archives are read as streams with caps on members, unpacked
bytes and time (`ReadLimits`), so a small bomb costs a few reads, not the machine.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Any

import numpy as np
import safetensors.torch
import torch

from prompt_store.errors import InvalidPrompt, UnsupportedFormat
from prompt_store.prompt import check_prompt_shape

PROMPT_KEY = "prompt_embeddings"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
PEFT_MEMBERS_READ = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)  # the only members of an archive ever unpacked

PICKLE_REFUSAL = (
    "pickle files (.bin, .pt, .pkl) are refused because loading them can run arbitrary code; "
    "save the prompt as safetensors or .npy instead"
)

# PEFT stores one block of rows per transformer submodule (2 for seq2seq models: encoder, decoder).
PEFT_MAX_SUBMODULES = 2
# Bytes per value allowed for in the size caps: a PEFT adapter's two fp32 blocks, or one fp64 block.
BYTES_PER_ROW_VALUE = PEFT_MAX_SUBMODULES * 4
# Room beyond the values: npy/safetensors headers, tar headers, adapter_config.json, a README.
FILE_OVERHEAD_BYTES = 1024 * 1024
MAX_CONFIG_BYTES = 64 * 1024
# The width assumed for the caps when no model is known (t5-xxl's d_model is 4096).
WIDTH_WITHOUT_MODEL = 4096
READ_CHUNK_BYTES = 64 * 1024

SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class ReadLimits:
    """What an acceptable prompt file can hold; every cap follows from `max_rows x d_model`.

    `max_bytes` bounds the file itself, everything unpacked from an archive, and each member read.
    """

    max_rows: int = 512
    d_model: int | None = None
    max_members: int = 64
    max_seconds: float = 10.0

    @property
    def max_bytes(self) -> int:
        return self.max_rows * (self.d_model or WIDTH_WITHOUT_MODEL) * BYTES_PER_ROW_VALUE + FILE_OVERHEAD_BYTES


class PromptFormat(str, Enum):
    SAFETENSORS = "safetensors"
    NPY = "npy"
    PEFT = "peft"


Loader = Callable[[bytes, ReadLimits], torch.Tensor]


def load_prompt_bytes(data: bytes, limits: ReadLimits | None = None) -> torch.Tensor:
    """Returns the encoder prompt held by `data`, whatever accepted format it is in."""
    limits = limits or ReadLimits()
    if not data:
        raise UnsupportedFormat("the uploaded file is empty")
    loader = _detect(data)
    if len(data) > limits.max_bytes:
        raise InvalidPrompt(
            f"the file is larger than any acceptable prompt: at most {limits.max_bytes} bytes "
            f"(up to {limits.max_rows} rows of the model's width) are read"
        )
    return loader(data, limits)


def _detect(data: bytes) -> Loader:
    if data.startswith(b"\x93NUMPY"):
        return _load_npy
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        return _load_zip
    if _looks_like_pickle(data):
        raise UnsupportedFormat(PICKLE_REFUSAL)
    if _looks_like_safetensors(data):
        return _load_safetensors
    if _looks_like_tar(data):
        return _load_tar
    raise UnsupportedFormat(
        "unrecognised file format; upload safetensors, NumPy .npy, or a PEFT prompt-tuning adapter (zip or tar)"
    )


def _looks_like_pickle(data: bytes) -> bool:
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header_size = int.from_bytes(data[:8], "little")
    return 0 < header_size <= len(data) - 8 and data[8:9] == b"{"


def _looks_like_tar(data: bytes) -> bool:
    if data.startswith(b"\x1f\x8b"):
        return True
    return data[257:262] == b"ustar"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _strict_json(data: bytes) -> Any:
    """`json.loads` without the `NaN`/`Infinity` extensions; deep nesting is a `ValueError` too."""
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


# --- npy -------------------------------------------------------------------------------------------

NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _load_npy(data: bytes, limits: ReadLimits) -> torch.Tensor:
    """Reads the header, checks dtype, shape and data size, and only then views the values."""
    stream = io.BytesIO(data)
    shape, fortran_order, dtype = _npy_header(stream)
    if dtype.hasobject:
        raise UnsupportedFormat(f"this .npy holds Python objects; {PICKLE_REFUSAL}")
    if not np.issubdtype(dtype, np.floating):
        raise InvalidPrompt(f"a prompt must hold floating-point values, got {dtype}")
    check_prompt_shape(shape, limits.d_model, limits.max_rows)
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise InvalidPrompt(
            f"the .npy file could not be read: its header declares {count * dtype.itemsize} bytes of values "
            f"(shape {list(shape)}, {dtype}) but it holds {len(data) - offset}: it is truncated or corrupt"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    array = array.reshape(shape, order="F" if fortran_order else "C")
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))


def _npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) as the header declares them; nothing past the header is read."""
    try:
        version = np.lib.format.read_magic(stream)
        if version not in NPY_HEADER_READERS:
            raise ValueError(f"format version {version} is not supported (1.0 or 2.0)")
        shape, fortran_order, dtype = NPY_HEADER_READERS[version](stream)
        if not _is_counts(list(shape), any_length=True):  # numpy lets `True` pass for 1
            raise ValueError(f"the header's shape {shape} is not a tuple of counts")
    except (ValueError, TypeError, SyntaxError, EOFError) as error:
        raise InvalidPrompt(f"the .npy file could not be read: {error}") from error
    return shape, fortran_order, dtype


# --- safetensors -----------------------------------------------------------------------------------


def _load_safetensors(data: bytes, limits: ReadLimits, max_rows: int | None = None) -> torch.Tensor:
    """Checks the chosen tensor's declared shape against the limits before the file is loaded."""
    header = _safetensors_header(data)
    name = _prompt_tensor_name(header)
    check_prompt_shape(header[name]["shape"], limits.d_model, max_rows or limits.max_rows)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise InvalidPrompt(f"the safetensors file could not be read: {error}") from error
    return tensors[name]


def _safetensors_header(data: bytes) -> dict[str, Any]:
    """The header's tensor entries, each with a known dtype, a shape of counts and a matching byte span."""
    size = int.from_bytes(data[:8], "little")
    try:
        if size > min(len(data) - 8, FILE_OVERHEAD_BYTES):
            raise ValueError(f"the header declares {size} bytes")
        header = _strict_json(data[8 : 8 + size])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        for name, entry in header.items():
            _check_safetensors_entry(name, entry)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidPrompt(f"the safetensors file could not be read: {error}") from error
    return header


def _check_safetensors_entry(name: str, entry: Any) -> None:
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPE_SIZES:
        raise ValueError(f"tensor {name!r} has no known dtype")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not _is_counts(shape, any_length=True) or not _is_counts(offsets, any_length=False):
        raise ValueError(f"tensor {name!r} has an invalid shape or data_offsets")
    if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPE_SIZES[entry["dtype"]]:
        raise ValueError(f"tensor {name!r}: its shape does not match its {offsets[1] - offsets[0]} bytes")


def _is_counts(value: Any, any_length: bool) -> bool:
    """A list of non-negative ints (`bool` is not a count); `data_offsets` is an ordered pair."""
    if not isinstance(value, list) or not all(type(x) is int and x >= 0 for x in value):
        return False
    return any_length or (len(value) == 2 and value[0] <= value[1])


def _prompt_tensor_name(header: dict[str, Any]) -> str:
    if PROMPT_KEY in header:
        return PROMPT_KEY
    if len(header) == 1:
        return next(iter(header))
    raise InvalidPrompt(f"the safetensors file holds {len(header)} tensors and none is named '{PROMPT_KEY}'")


# --- archives ----------------------------------------------------------------------------------------

MemberReader = Callable[[str], bytes | None]


@dataclass
class _ArchiveBudget:
    """Caps one archive read: unpacked bytes and wall time, checked at every read of a stream."""

    limits: ReadLimits
    unpacked: int = 0
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.limits.max_seconds

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise InvalidPrompt(f"reading the archive took longer than {self.limits.max_seconds:g} s; it was refused")

    def take(self, nbytes: int) -> None:
        self.unpacked += nbytes
        self.check_unpacked_size(self.unpacked)
        self.check_time()

    def check_unpacked_size(self, nbytes: int) -> None:
        if nbytes > self.limits.max_bytes:
            raise InvalidPrompt(
                f"the archive unpacks to more than {self.limits.max_bytes} bytes, more than any prompt adapter needs"
            )

    def check_member_size(self, name: str, size: int) -> None:
        cap = MAX_CONFIG_BYTES if name == PEFT_CONFIG_NAME else self.limits.max_bytes
        if size > cap:
            raise InvalidPrompt(f"{name} in the archive is too large ({size} bytes; at most {cap})")

    def read_member(self, name: str, stream: IO[bytes]) -> bytes:
        """Reads in chunks and stops at the cap, whatever size the archive declared for the member."""
        chunks: list[bytes] = []
        size = 0
        while chunk := stream.read(READ_CHUNK_BYTES):
            size += len(chunk)
            self.check_member_size(name, size)
            self.check_time()
            chunks.append(chunk)
        return b"".join(chunks)


class _MeteredStream(io.RawIOBase):
    """A read-only stream that charges what passes through it to the budget (or only checks the time)."""

    def __init__(self, source: IO[bytes], budget: _ArchiveBudget, count_bytes: bool) -> None:
        self._source = source
        self._budget = budget
        self._count_bytes = count_bytes

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()  # in chunks, through `read`, so every byte is charged
        data = self._source.read(size)
        if self._count_bytes:
            self._budget.take(len(data))
        else:
            self._budget.check_time()
        return data


def _check_member_count(count: int, limits: ReadLimits) -> None:
    if count > limits.max_members:
        raise InvalidPrompt(
            f"the archive holds more than {limits.max_members} members; a prompt adapter needs only a few"
        )


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


# --- zip -----------------------------------------------------------------------------------------

ZIP_END = struct.Struct("<4s4H2LH")  # signature, disks, entries here, entries in all, directory size, offset
ZIP_END_SIGNATURE = b"PK\x05\x06"
ZIP64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, offset of the zip64 end record, disks
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
ZIP64_END = struct.Struct("<4sQ2H2L4Q")  # ..., entries here, entries in all, directory size, offset
ZIP64_END_SIGNATURE = b"PK\x06\x06"
ZIP_DIRECTORY_BYTES_PER_MEMBER = 1024
ZIP_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def _load_zip(data: bytes, limits: ReadLimits) -> torch.Tensor:
    _check_zip_directory(data, limits)
    budget = _ArchiveBudget(limits)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
            _check_member_count(len(infos), limits)
            members: dict[str, zipfile.ZipInfo] = {}
            for info in infos:
                members[_unique_name(info.filename, members)] = info
            if PEFT_CONFIG_NAME not in members:
                if any(name.endswith(".pkl") for name in members):
                    raise UnsupportedFormat(f"this zip is a PyTorch pickle checkpoint; {PICKLE_REFUSAL}")
                raise UnsupportedFormat(f"the zip holds no {PEFT_CONFIG_NAME}: it is not a PEFT adapter")

            def read(name: str) -> bytes | None:
                info = members.get(name)
                if info is None:
                    return None
                _check_zip_compression(name, info)
                budget.check_member_size(name, info.file_size)  # the directory's word: a cheap first refusal
                with archive.open(info) as stream:
                    return budget.read_member(name, stream)  # the bytes really unpacked: the directory can lie

            return _load_peft(read, set(members), limits)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as error:
        raise InvalidPrompt(f"the zip file is corrupt or unsupported: {error}") from error


def _check_zip_compression(name: str, info: zipfile.ZipInfo) -> None:
    """Only stored and deflated members: `zipfile` unpacks bzip2 and lzma input without an output bound,
    so one small chunk of a bzip2 bomb would become gigabytes before any cap could see it."""
    if info.compress_type not in ZIP_READABLE_METHODS:
        raise InvalidPrompt(f"{name} in the zip is compressed with method {info.compress_type}; use deflate or none")


def _check_zip_directory(data: bytes, limits: ReadLimits) -> None:
    """Bounds the central directory before `zipfile` parses it (it reads every entry it declares).

    The end record is found as `zipfile` finds it, so both read the same directory size.
    """
    end = _zip_end_offset(data)
    if end is None:
        raise InvalidPrompt("the zip file is corrupt: it has no end of central directory record")
    declared = ZIP_END.unpack_from(data, end)[4:6]  # entries in all, directory size
    for entries, directory_bytes in [declared, *_zip64_directories(data, end)]:
        _check_member_count(entries, limits)
        if directory_bytes > limits.max_members * ZIP_DIRECTORY_BYTES_PER_MEMBER:
            raise InvalidPrompt(f"the zip's central directory is too large ({directory_bytes} bytes)")


def _zip64_directories(data: bytes, end: int) -> list[tuple[int, int]]:
    """(entries, directory size) of each zip64 end record `zipfile` may use instead (PyTorch writes zip64).

    Both places a reader may look are checked: just before the locator, and at the offset it names.
    """
    locator = end - ZIP64_LOCATOR.size
    if locator < 0 or data[locator : locator + 4] != ZIP64_LOCATOR_SIGNATURE:
        return []
    _, _, record_offset, _ = ZIP64_LOCATOR.unpack_from(data, locator)
    found = []
    for start in {locator - ZIP64_END.size, record_offset}:
        if 0 <= start <= len(data) - ZIP64_END.size and data[start : start + 4] == ZIP64_END_SIGNATURE:
            *_, entries, directory_bytes, _ = ZIP64_END.unpack_from(data, start)
            found.append((entries, directory_bytes))
    return found


def _zip_end_offset(data: bytes) -> int | None:
    """Where `zipfile` takes the end of central directory record to be (see `zipfile._EndRecData`)."""
    last = len(data) - ZIP_END.size
    if last >= 0 and data[last : last + 4] == ZIP_END_SIGNATURE and data[-2:] == b"\x00\x00":
        return last
    start = data.rfind(ZIP_END_SIGNATURE, max(0, last - 0xFFFF))
    return start if 0 <= start <= last else None


# --- tar -----------------------------------------------------------------------------------------


def _load_tar(data: bytes, limits: ReadLimits) -> torch.Tensor:
    budget = _ArchiveBudget(limits)
    try:
        members = _read_tar_stream(data, budget)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise UnsupportedFormat(f"the file is not a readable tar archive: {error}") from error
    except RecursionError:  # tarfile reads a chain of pax / long-name headers recursively
        raise InvalidPrompt("the tar archive chains too many extended headers") from None
    if PEFT_CONFIG_NAME not in members:
        raise UnsupportedFormat(f"the tar holds no {PEFT_CONFIG_NAME}: it is not a PEFT adapter")
    return _load_peft(members.get, set(members), limits)


def _read_tar_stream(data: bytes, budget: _ArchiveBudget) -> dict[str, bytes | None]:
    """Reads the members one header at a time and keeps the two a prompt adapter needs.

    `getmembers()` would read every header of the archive first; a stream stops at the member cap.
    Every byte gzip unpacks is charged to the budget, headers included (tar's long names and pax
    records are read whole before a member is seen). Other members map to None: only their names matter.
    """
    raw = _MeteredStream(io.BytesIO(data), budget, count_bytes=False)
    unpacked = gzip.GzipFile(fileobj=raw, mode="rb") if data.startswith(b"\x1f\x8b") else raw
    source = _MeteredStream(unpacked, budget, count_bytes=True)
    found: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=source, mode="r|") as archive:
        for member in _capped_members(archive, budget):
            if not member.isfile():
                continue
            name = _unique_name(member.name, found)
            found[name] = _read_tar_member(archive, member, name, budget) if name in PEFT_MEMBERS_READ else None
    return found


def _capped_members(archive: tarfile.TarFile, budget: _ArchiveBudget) -> Iterator[tarfile.TarInfo]:
    """Stops at the member cap, and at a member whose declared end is past the byte cap (before skipping it)."""
    for count, member in enumerate(archive, start=1):
        _check_member_count(count, budget.limits)
        budget.check_unpacked_size(member.offset_data + member.size)
        yield member


def _read_tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo, name: str, budget: _ArchiveBudget) -> bytes:
    budget.check_member_size(name, member.size)
    stream = archive.extractfile(member)
    if stream is None:
        raise InvalidPrompt(f"{name} in the archive could not be read")
    return budget.read_member(name, stream)


def _unique_name(path: str, seen: Container[str]) -> str:
    """A member's file name (adapters are often packed in a folder); the ones read must be unambiguous."""
    name = _basename(path)
    if name in seen and name in PEFT_MEMBERS_READ:
        raise InvalidPrompt(f"the archive holds more than one {name}")
    return name


# --- PEFT ----------------------------------------------------------------------------------------


def _load_peft(read: MemberReader, names: set[str], limits: ReadLimits) -> torch.Tensor:
    """`read` gives a member's bytes by file name; `names` are all the archive's file names."""
    config = _peft_config(read(PEFT_CONFIG_NAME) or b"")
    num_virtual_tokens = _num_virtual_tokens(config, limits)
    weights = read(PEFT_WEIGHTS_NAME)
    if weights is None:
        if PEFT_PICKLE_NAME in names:
            raise UnsupportedFormat(f"{PEFT_PICKLE_NAME} is a pickle; {PICKLE_REFUSAL}")
        raise InvalidPrompt(f"the adapter holds no {PEFT_WEIGHTS_NAME}")
    if not _looks_like_safetensors(weights):
        raise InvalidPrompt(f"the safetensors file could not be read: {PEFT_WEIGHTS_NAME} has no safetensors header")
    tensor = _load_safetensors(weights, limits, max_rows=limits.max_rows * PEFT_MAX_SUBMODULES)
    return _encoder_rows(tensor, num_virtual_tokens)


def _peft_config(raw: bytes) -> dict[str, Any]:
    try:
        config = _strict_json(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidPrompt(f"{PEFT_CONFIG_NAME} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise InvalidPrompt(f"only PEFT prompt-tuning adapters are served (peft_type PROMPT_TUNING), got {kind!r}")
    return config


def _num_virtual_tokens(config: dict[str, Any], limits: ReadLimits) -> int:
    n = config.get("num_virtual_tokens")
    if type(n) is not int or n <= 0:  # `true` is not 1
        raise InvalidPrompt("adapter_config.json needs a positive integer num_virtual_tokens")
    if n > limits.max_rows:
        raise InvalidPrompt(f"adapter_config.json declares num_virtual_tokens={n}; the limit is {limits.max_rows}")
    return n


def _encoder_rows(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """Seq2seq adapters store `[submodules * n, d]`; rows `[:n]` are the encoder prompt."""
    if tensor.ndim != 2 or tensor.shape[0] < n:
        raise InvalidPrompt(
            f"the adapter's prompt has shape {list(tensor.shape)}, fewer than num_virtual_tokens={n} rows"
        )
    return tensor[:n]


# --- export --------------------------------------------------------------------------------------


def dump_prompt(embeddings: torch.Tensor, fmt: PromptFormat, base_model: str = "") -> bytes:
    """Serialises a `[P, d]` prompt; `peft` gives a zip that `PeftModel.from_pretrained` loads."""
    embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()
    if fmt is PromptFormat.SAFETENSORS:
        return safetensors.torch.save({PROMPT_KEY: embeddings}, metadata={"format": "pt"})
    if fmt is PromptFormat.NPY:
        buffer = io.BytesIO()
        np.save(buffer, embeddings.numpy(), allow_pickle=False)
        return buffer.getvalue()
    return _dump_peft(embeddings, base_model)


def _dump_peft(embeddings: torch.Tensor, base_model: str) -> bytes:
    length, d_model = embeddings.shape
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_2_SEQ_LM",
        "num_virtual_tokens": length,
        "token_dim": d_model,
        "num_transformer_submodules": 2,
        "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }
    # PEFT keeps a second block for the decoder; prompt tuning on T5 only reads rows [:n].
    weights = torch.cat([embeddings, embeddings]).contiguous()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(PEFT_CONFIG_NAME, json.dumps(config, indent=2))
        archive.writestr(PEFT_WEIGHTS_NAME, safetensors.torch.save({PROMPT_KEY: weights}))
    return buffer.getvalue()
