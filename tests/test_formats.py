"""Prompt file formats: every accepted format round-trips, detection is by content, and unsafe or
malformed files are refused with the right error. Also `validate_prompt`'s shape/dtype/value rules."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from prompt_store import (
    InvalidPrompt,
    PromptFormat,
    UnsupportedFormat,
    dump_prompt,
    load_prompt_bytes,
    validate_prompt,
)
from server.testing.reference import random_prompt
from tests.conftest import REAL_PROMPTS

REAL_PROMPT_FILES = sorted(REAL_PROMPTS.glob("*.npy"))


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def peft_config(num_virtual_tokens: int, token_dim: int, **overrides: object) -> dict:
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_2_SEQ_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 2,
        "prompt_tuning_init": "RANDOM",
    }
    config.update(overrides)
    return config


def peft_members(weights: torch.Tensor, config: dict) -> dict[str, bytes]:
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": safetensors.torch.save({"prompt_embeddings": weights.contiguous()}),
        "README.md": b"# a PEFT adapter\n",
    }


def zip_bytes(members: dict[str, bytes], folder: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(folder + name, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w", folder: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(folder + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def torch_save_bytes(obj: object, zip_format: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


def seq2seq_weights(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A PEFT seq2seq block `[2n, d]` whose halves differ, and its encoder half."""
    encoder = random_prompt(n, d, seed=11)
    decoder = random_prompt(n, d, seed=12) + 100.0
    return torch.cat([encoder, decoder]), encoder


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(PromptFormat))
def test_dump_then_load_is_bit_exact(fmt: PromptFormat) -> None:
    prompt = random_prompt(7, 48, seed=1)
    loaded = load_prompt_bytes(dump_prompt(prompt, fmt))
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, prompt)


@pytest.mark.parametrize("path", REAL_PROMPT_FILES, ids=lambda p: p.stem)
def test_real_prompt_file_loads_unchanged(path: Path) -> None:
    expected = np.load(path, allow_pickle=False)
    assert expected.shape == (100, 768) and expected.dtype == np.float32
    loaded = load_prompt_bytes(path.read_bytes())
    assert np.array_equal(loaded.numpy(), expected)
    prompt = validate_prompt(loaded, d_model=768, max_length=512)
    assert prompt.sha256 == hashlib.sha256(expected.astype("<f4").tobytes()).hexdigest()


@pytest.mark.parametrize("fmt", list(PromptFormat))
@pytest.mark.parametrize("path", REAL_PROMPT_FILES, ids=lambda p: p.stem)
def test_real_prompt_round_trips_through_every_format(path: Path, fmt: PromptFormat) -> None:
    original = validate_prompt(load_prompt_bytes(path.read_bytes()), d_model=768, max_length=512)
    again = validate_prompt(load_prompt_bytes(dump_prompt(original.embeddings, fmt)), d_model=768, max_length=512)
    assert again.sha256 == original.sha256
    assert torch.equal(again.embeddings, original.embeddings)


def test_real_prompts_have_large_values_and_are_accepted() -> None:
    for path in REAL_PROMPT_FILES:
        tensor = load_prompt_bytes(path.read_bytes())
        assert tensor.abs().max() > 100  # real prompts are far from unit scale
        assert validate_prompt(tensor, d_model=768, max_length=100).length == 100


def test_safetensors_with_prompt_embeddings_key_among_others() -> None:
    prompt = random_prompt(5, 16, seed=2)
    data = safetensors.torch.save({"other": torch.zeros(2, 16), "prompt_embeddings": prompt, "z": torch.ones(3)})
    assert torch.equal(load_prompt_bytes(data), prompt)


def test_safetensors_with_a_single_tensor_of_any_name() -> None:
    prompt = random_prompt(5, 16, seed=3)
    data = safetensors.torch.save({"encoder.prompt.weight": prompt})
    assert torch.equal(load_prompt_bytes(data), prompt)


def test_bf16_safetensors_is_upcast_to_fp32_exactly() -> None:
    bf16 = random_prompt(6, 32, seed=4).to(torch.bfloat16)
    tensor = load_prompt_bytes(safetensors.torch.save({"prompt_embeddings": bf16}))
    prompt = validate_prompt(tensor, d_model=32, max_length=10)
    assert prompt.embeddings.dtype == torch.float32
    assert torch.equal(prompt.embeddings, bf16.float())


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8", "<f2"])
def test_npy_of_any_float_dtype_and_byte_order(dtype: str) -> None:
    array = np.arange(24, dtype=np.float64).reshape(4, 6).astype(dtype) / 7
    loaded = load_prompt_bytes(npy_bytes(array))
    assert loaded.dtype == torch.float32
    assert np.array_equal(loaded.numpy(), array.astype(np.float32))


def test_fortran_ordered_npy_keeps_its_values() -> None:
    array = np.asfortranarray(random_prompt(5, 8, seed=5).numpy())
    data = npy_bytes(array)
    assert b"'fortran_order': True" in data[:128]
    assert np.array_equal(load_prompt_bytes(data).numpy(), array)


def test_extension_less_npy_like_t5x_checkpoints(tmp_path: Path) -> None:
    prompt = random_prompt(9, 24, seed=6)
    path = tmp_path / "prompt_embeddings"  # T5X writes arrays without an extension
    path.write_bytes(npy_bytes(prompt.numpy()))
    assert torch.equal(load_prompt_bytes(path.read_bytes()), prompt)


@pytest.mark.parametrize("folder", ["", "my-adapter/"])
def test_peft_zip_gives_the_encoder_rows(folder: str) -> None:
    weights, encoder = seq2seq_weights(4, 16)
    loaded = load_prompt_bytes(zip_bytes(peft_members(weights, peft_config(4, 16)), folder))
    assert torch.equal(loaded, encoder)


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_peft_tar_and_tar_gz_give_the_encoder_rows(mode: str) -> None:
    weights, encoder = seq2seq_weights(4, 16)
    data = tar_bytes(peft_members(weights, peft_config(4, 16)), mode, folder="adapter/")
    assert data.startswith(b"\x1f\x8b") == (mode == "w:gz")
    assert torch.equal(load_prompt_bytes(data), encoder)


def test_seq2seq_peft_rule_takes_rows_before_n() -> None:
    """PEFT stores `[num_transformer_submodules * n, d]` and feeds rows `[:n]` to the encoder."""
    weights, encoder = seq2seq_weights(3, 8)
    loaded = load_prompt_bytes(zip_bytes(peft_members(weights, peft_config(3, 8))))
    assert loaded.shape == (3, 8)
    assert torch.equal(loaded, encoder)
    assert not torch.equal(loaded, weights[3:])


def test_single_submodule_peft_adapter_uses_all_rows() -> None:
    prompt = random_prompt(5, 8, seed=7)
    config = peft_config(5, 8, task_type="CAUSAL_LM", num_transformer_submodules=1)
    assert torch.equal(load_prompt_bytes(zip_bytes(peft_members(prompt, config))), prompt)


def test_peft_export_holds_encoder_block_then_decoder_block() -> None:
    prompt = random_prompt(4, 8, seed=8)
    with zipfile.ZipFile(io.BytesIO(dump_prompt(prompt, PromptFormat.PEFT, base_model="tiny"))) as archive:
        config = json.loads(archive.read("adapter_config.json"))
        weights = safetensors.torch.load(archive.read("adapter_model.safetensors"))["prompt_embeddings"]
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "SEQ_2_SEQ_LM"
    assert config["num_virtual_tokens"] == 4 and config["token_dim"] == 8
    assert config["base_model_name_or_path"] == "tiny"
    assert weights.shape == (8, 8)
    assert torch.equal(weights[:4], prompt)


# --- detection by content ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(PromptFormat))
def test_each_format_is_recognised_by_its_bytes_not_a_name(fmt: PromptFormat, tmp_path: Path) -> None:
    prompt = random_prompt(3, 8, seed=9)
    misleading = {PromptFormat.SAFETENSORS: "prompt.npy", PromptFormat.NPY: "adapter.zip", PromptFormat.PEFT: "x.pt"}
    path = tmp_path / misleading[fmt]
    path.write_bytes(dump_prompt(prompt, fmt))
    assert torch.equal(load_prompt_bytes(path.read_bytes()), prompt)


def test_tar_whose_first_member_is_named_like_a_pickle_is_still_a_tar() -> None:
    weights, encoder = seq2seq_weights(2, 8)
    members = {"notes.pkl": b"not really", **peft_members(weights, peft_config(2, 8))}
    assert torch.equal(load_prompt_bytes(tar_bytes(members)), encoder)


# --- refusals ----------------------------------------------------------------------------------


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(UnsupportedFormat, match="empty"):
        load_prompt_bytes(b"")


@pytest.mark.parametrize(
    "data",
    [bytes(range(256)) * 4, b"hello, I am a prompt", b'{"prompt": [1, 2, 3]}', b"\x00" * 64, b"GIF89a" + b"\x00" * 300],
    ids=["binary", "text", "json", "zeros", "gif"],
)
def test_garbage_is_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedFormat, match="unrecognised file format"):
        load_prompt_bytes(data)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_bytes_are_refused_with_the_reason(protocol: int) -> None:
    data = pickle.dumps({"prompt": np.zeros((2, 3), dtype=np.float32)}, protocol=protocol)
    assert data[0] == 0x80
    with pytest.raises(UnsupportedFormat, match="pickle") as info:
        load_prompt_bytes(data)
    assert "arbitrary code" in str(info.value)


def test_handwritten_pickle_header_is_refused() -> None:
    with pytest.raises(UnsupportedFormat, match="pickle"):
        load_prompt_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_file_is_refused_as_a_pickle(zip_format: bool) -> None:
    data = torch_save_bytes({"prompt_embeddings": torch.randn(3, 4)}, zip_format)
    if zip_format:
        assert any(n.endswith("data.pkl") for n in zipfile.ZipFile(io.BytesIO(data)).namelist())
    with pytest.raises(UnsupportedFormat, match="pickle"):
        load_prompt_bytes(data)


def test_npy_of_python_objects_is_refused_as_a_pickle() -> None:
    data = npy_bytes(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert data.startswith(b"\x93NUMPY")
    with pytest.raises(UnsupportedFormat, match="pickle"):
        load_prompt_bytes(data)


@pytest.mark.parametrize("archive", ["zip", "tar"])
def test_peft_adapter_with_only_adapter_model_bin_is_refused(archive: str) -> None:
    members = {
        "adapter_config.json": json.dumps(peft_config(2, 8)).encode(),
        "adapter_model.bin": torch_save_bytes({"prompt_embeddings": torch.randn(4, 8)}),
    }
    data = zip_bytes(members) if archive == "zip" else tar_bytes(members)
    with pytest.raises(UnsupportedFormat, match=re.escape("adapter_model.bin is a pickle")):
        load_prompt_bytes(data)


@pytest.mark.parametrize("peft_type", ["LORA", "PREFIX_TUNING", "P_TUNING", None])
def test_non_prompt_tuning_peft_adapter_is_refused(peft_type: str | None) -> None:
    weights, _ = seq2seq_weights(2, 8)
    data = zip_bytes(peft_members(weights, peft_config(2, 8, peft_type=peft_type)))
    with pytest.raises(InvalidPrompt, match="PROMPT_TUNING"):
        load_prompt_bytes(data)


def test_peft_adapter_without_weights_is_refused() -> None:
    data = zip_bytes({"adapter_config.json": json.dumps(peft_config(2, 8)).encode()})
    with pytest.raises(InvalidPrompt, match=re.escape("adapter_model.safetensors")):
        load_prompt_bytes(data)


def test_peft_adapter_with_bad_config_json_is_refused() -> None:
    weights, _ = seq2seq_weights(2, 8)
    members = {**peft_members(weights, peft_config(2, 8)), "adapter_config.json": b"{not json"}
    with pytest.raises(InvalidPrompt, match="not valid JSON"):
        load_prompt_bytes(zip_bytes(members))


@pytest.mark.parametrize("n", [None, 0, -1, "4", 2.5])
def test_peft_adapter_needs_a_positive_integer_num_virtual_tokens(n: object) -> None:
    weights, _ = seq2seq_weights(2, 8)
    config = peft_config(2, 8)
    config["num_virtual_tokens"] = n
    with pytest.raises(InvalidPrompt, match="num_virtual_tokens"):
        load_prompt_bytes(zip_bytes(peft_members(weights, config)))


def test_peft_adapter_with_fewer_rows_than_num_virtual_tokens_is_refused() -> None:
    weights, _ = seq2seq_weights(2, 8)  # 4 rows
    with pytest.raises(InvalidPrompt, match="num_virtual_tokens=5"):
        load_prompt_bytes(zip_bytes(peft_members(weights, peft_config(5, 8))))


def test_zip_that_is_not_a_peft_adapter_is_unsupported() -> None:
    with pytest.raises(UnsupportedFormat, match="not a PEFT adapter"):
        load_prompt_bytes(zip_bytes({"prompt.npy": npy_bytes(np.zeros((2, 2), dtype=np.float32))}))


def test_corrupt_zip_is_refused() -> None:
    with pytest.raises(InvalidPrompt, match="zip file is corrupt"):
        load_prompt_bytes(b"PK\x03\x04" + b"\x00" * 200)


def test_gzip_that_is_not_a_tar_is_unsupported() -> None:
    with pytest.raises(UnsupportedFormat, match="tar"):
        load_prompt_bytes(gzip.compress(b"just some text " * 50))


def _safetensors_with_header(header: bytes, payload: bytes = b"\x00" * 48) -> bytes:
    return len(header).to_bytes(8, "little") + header + payload


@pytest.mark.parametrize(
    "data",
    [
        _safetensors_with_header(b"{not json at all}"),
        _safetensors_with_header(b'{"prompt_embeddings":{"dtype":"F32","shape":[3,4],"data_offsets":[0,99]}}'),
        _safetensors_with_header(b'{"prompt_embeddings":{"dtype":"XX","shape":[3,4],"data_offsets":[0,48]}}'),
        safetensors.torch.save({"prompt_embeddings": torch.zeros(3, 4)})[:-4],
    ],
    ids=["invalid-json", "offsets-past-end", "unknown-dtype", "truncated"],
)
def test_corrupt_safetensors_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidPrompt, match="safetensors file could not be read"):
        load_prompt_bytes(data)


def test_multi_tensor_safetensors_without_prompt_embeddings_is_refused() -> None:
    data = safetensors.torch.save({"a": torch.zeros(2, 8), "b": torch.ones(2, 8)})
    with pytest.raises(InvalidPrompt, match="2 tensors and none is named 'prompt_embeddings'"):
        load_prompt_bytes(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (npy_bytes(np.zeros((3, 4), dtype=np.int32)), "floating-point"),
        (npy_bytes(np.zeros((3, 4), dtype=np.float32))[:-5], "could not be read"),
        (npy_bytes(np.zeros((3, 4), dtype=np.complex64)), "floating-point"),
    ],
    ids=["int", "truncated", "complex"],
)
def test_unusable_npy_is_an_invalid_prompt(data: bytes, message: str) -> None:
    with pytest.raises(InvalidPrompt, match=message):
        load_prompt_bytes(data)


# --- validate_prompt ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64,), (2, 3, 64), (1, 1, 3, 64), ()])
def test_validate_refuses_wrong_rank(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidPrompt, match="2-D"):
        validate_prompt(torch.zeros(shape), d_model=64, max_length=10)


def test_validate_squeezes_a_leading_batch_of_one() -> None:
    tensor = random_prompt(3, 64, seed=10)
    prompt = validate_prompt(tensor.unsqueeze(0), d_model=64, max_length=10)
    assert torch.equal(prompt.embeddings, tensor)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_validate_refuses_non_float_dtypes(dtype: torch.dtype) -> None:
    with pytest.raises(InvalidPrompt, match="floating-point"):
        validate_prompt(torch.zeros(3, 64, dtype=dtype), d_model=64, max_length=10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_validate_refuses_non_finite_values(bad: float) -> None:
    tensor = random_prompt(3, 64, seed=10)
    tensor[2, 17] = bad
    with pytest.raises(InvalidPrompt, match="NaN or infinite"):
        validate_prompt(tensor, d_model=64, max_length=10)


def test_validate_refuses_values_that_overflow_fp32() -> None:
    tensor = torch.full((2, 8), 1e300, dtype=torch.float64)
    with pytest.raises(InvalidPrompt, match="NaN or infinite"):
        validate_prompt(tensor, d_model=8, max_length=10)


def test_validate_refuses_wrong_d_model() -> None:
    with pytest.raises(InvalidPrompt, match=r"width is 768 but the served model's d_model is 64"):
        validate_prompt(torch.zeros(3, 768), d_model=64, max_length=10)


def test_validate_without_d_model_accepts_any_width() -> None:
    assert validate_prompt(torch.zeros(3, 100), d_model=None, max_length=10).d_model == 100


def test_validate_refuses_zero_rows() -> None:
    with pytest.raises(InvalidPrompt, match="0 rows"):
        validate_prompt(torch.zeros(0, 64), d_model=64, max_length=10)


def test_validate_length_limit_is_inclusive() -> None:
    assert validate_prompt(torch.zeros(10, 64), d_model=64, max_length=10).length == 10
    with pytest.raises(InvalidPrompt, match="11 rows; the limit is 10"):
        validate_prompt(torch.zeros(11, 64), d_model=64, max_length=10)


def test_validate_accepts_large_magnitudes() -> None:
    tensor = random_prompt(5, 64, seed=12, scale=1000.0)
    tensor[0, 0] = -1000.0
    prompt = validate_prompt(tensor, d_model=64, max_length=10)
    assert torch.equal(prompt.embeddings, tensor)
    assert prompt.embeddings.norm(dim=1).min() > 1000


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_validate_stores_float32(dtype: torch.dtype) -> None:
    tensor = random_prompt(3, 8, seed=13).to(dtype)
    prompt = validate_prompt(tensor, d_model=8, max_length=10)
    assert prompt.embeddings.dtype == torch.float32
    assert torch.equal(prompt.embeddings, tensor.float())


def test_sha256_is_of_the_float32_values() -> None:
    tensor = random_prompt(3, 8, seed=14)
    prompt = validate_prompt(tensor, d_model=8, max_length=10)
    assert prompt.sha256 == hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
    other = tensor.clone()
    other[0, 0] += 1
    assert validate_prompt(other, d_model=8, max_length=10).sha256 != prompt.sha256
