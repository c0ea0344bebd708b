"""Prompt file formats: detection by content, loading without pickle, and export.

Accepted: safetensors (key `prompt_embeddings`, or the only tensor), NumPy `.npy` (also the
extension-less files of T5X checkpoints), and PEFT prompt-tuning adapters packed as zip or tar.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Callable
from enum import Enum

import numpy as np
import safetensors.torch
import torch

from prompt_store.errors import InvalidPrompt, UnsupportedFormat

PROMPT_KEY = "prompt_embeddings"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
MAX_ARCHIVE_MEMBER_BYTES = 256 * 1024 * 1024

PICKLE_REFUSAL = (
    "pickle files (.bin, .pt, .pkl) are refused because loading them can run arbitrary code; "
    "save the prompt as safetensors or .npy instead"
)


class PromptFormat(str, Enum):
    SAFETENSORS = "safetensors"
    NPY = "npy"
    PEFT = "peft"


def load_prompt_bytes(data: bytes) -> torch.Tensor:
    """Returns the encoder prompt held by `data`, whatever accepted format it is in."""
    if not data:
        raise UnsupportedFormat("the uploaded file is empty")
    loader = _detect(data)
    return loader(data)


def _detect(data: bytes) -> Callable[[bytes], torch.Tensor]:
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


def _load_npy(data: bytes) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise UnsupportedFormat(f"this .npy holds Python objects; {PICKLE_REFUSAL}") from error
        raise InvalidPrompt(f"the .npy file could not be read: {error}") from error
    except (OSError, EOFError) as error:
        raise InvalidPrompt(f"the .npy file is truncated or corrupt: {error}") from error
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidPrompt(f"a prompt must hold floating-point values, got {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _load_safetensors(data: bytes) -> torch.Tensor:
    try:
        tensors = safetensors.torch.load(data)
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise InvalidPrompt(f"the safetensors file could not be read: {error}") from error
    if PROMPT_KEY in tensors:
        return tensors[PROMPT_KEY]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise InvalidPrompt(f"the safetensors file holds {len(tensors)} tensors and none is named '{PROMPT_KEY}'")


def _load_zip(data: bytes) -> torch.Tensor:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename.rsplit("/", 1)[-1]: info for info in archive.infolist() if not info.is_dir()}
            if PEFT_CONFIG_NAME not in members:
                if any(name.endswith(".pkl") for name in members):
                    raise UnsupportedFormat(f"this zip is a PyTorch pickle checkpoint; {PICKLE_REFUSAL}")
                raise UnsupportedFormat(f"the zip holds no {PEFT_CONFIG_NAME}: it is not a PEFT adapter")

            def read(name: str) -> bytes | None:
                info = members.get(name)
                if info is None:
                    return None
                _check_member_size(name, info.file_size)
                return archive.read(info)

            return _load_peft(read)
    except zipfile.BadZipFile as error:
        raise InvalidPrompt(f"the zip file is corrupt: {error}") from error


def _load_tar(data: bytes) -> torch.Tensor:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            members = {m.name.rsplit("/", 1)[-1]: m for m in archive.getmembers() if m.isfile()}
            if PEFT_CONFIG_NAME not in members:
                raise UnsupportedFormat(f"the tar holds no {PEFT_CONFIG_NAME}: it is not a PEFT adapter")

            def read(name: str) -> bytes | None:
                member = members.get(name)
                if member is None:
                    return None
                _check_member_size(name, member.size)
                extracted = archive.extractfile(member)
                return extracted.read() if extracted is not None else None

            return _load_peft(read)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UnsupportedFormat(f"the file is not a readable tar archive: {error}") from error


def _check_member_size(name: str, size: int) -> None:
    if size > MAX_ARCHIVE_MEMBER_BYTES:
        raise InvalidPrompt(f"{name} in the archive is too large ({size} bytes)")


def _load_peft(read: Callable[[str], bytes | None]) -> torch.Tensor:
    try:
        config = json.loads(read(PEFT_CONFIG_NAME) or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidPrompt(f"{PEFT_CONFIG_NAME} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise InvalidPrompt(f"only PEFT prompt-tuning adapters are served (peft_type PROMPT_TUNING), got {kind!r}")
    weights = read(PEFT_WEIGHTS_NAME)
    if weights is None:
        if read("adapter_model.bin") is not None:
            raise UnsupportedFormat(f"adapter_model.bin is a pickle; {PICKLE_REFUSAL}")
        raise InvalidPrompt(f"the adapter holds no {PEFT_WEIGHTS_NAME}")
    tensor = _load_safetensors(weights)
    return _encoder_rows(tensor, config)


def _encoder_rows(tensor: torch.Tensor, config: dict) -> torch.Tensor:
    """Seq2seq adapters store `[submodules * n, d]`; rows `[:n]` are the encoder prompt."""
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or n <= 0:
        raise InvalidPrompt("adapter_config.json needs a positive integer num_virtual_tokens")
    if tensor.ndim != 2 or tensor.shape[0] < n:
        raise InvalidPrompt(
            f"the adapter's prompt has shape {list(tensor.shape)}, fewer than num_virtual_tokens={n} rows"
        )
    return tensor[:n]


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
