"""Why the model cannot load, in one line that says what, why and what to do.

`softserve serve` and `softserve worker` print the line and exit non-zero; transformers' own errors name the
wrong cause for the commonest mistakes (a missing directory reads as "Repo id must use alphanumeric chars").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

CHOICES = "pass an existing checkpoint directory, a hub id such as google/t5-base-lm-adapt, or `tiny`"


class ModelLoadError(Exception):
    """The configured model or device cannot be used; the message is written for the operator."""


def checked_device(device: str) -> torch.device:
    """`device` as a torch device that exists on this machine (`auto` picks CUDA when there is one)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ModelLoadError(
            f"cannot use device {device!r}: CUDA is not available here (torch {torch.__version__}, {build}, "
            "sees no GPU); use --device cpu, or auto to take a GPU only when there is one"
        )
    if target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(
            f"cannot use device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            "numbered from 0"
        )
    return target


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def is_hub_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_failure(name: str, error: Exception) -> ModelLoadError:
    """Explains why `from_pretrained(name)` failed, from where `name` points and the error's causes."""
    path = Path(name)
    causes = list(_causes(error))
    if path.is_dir():
        found = f"({_first_line(error).rstrip(': ')})" if (path / "config.json").is_file() else "(no config.json)"
        why = f"the directory is not a T5 checkpoint {found}"
        fix = "it needs config.json, the weights and the tokenizer files, as `save_pretrained` writes them"
    elif path.exists():
        why, fix = "it is a file, not a checkpoint directory", "pass the directory that holds config.json"
    elif not is_hub_id(name):
        why, fix = "no such directory, and it is not a hub id (owner/name)", CHOICES
    elif any(isinstance(cause, LocalEntryNotFoundError) for cause in causes):
        why = (
            "it is not a local directory, it is not in the Hugging Face cache, and the hub could not be reached "
            "to download it (no network, or HF_HUB_OFFLINE is set)"
        )
        fix = "download it once with network access, or pass a checkpoint directory"
    elif any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        why, fix = "no such directory, and no such model on the Hugging Face hub", CHOICES
    else:
        why, fix = f"it could not be read ({_first_line(error)})", CHOICES
    return ModelLoadError(f"cannot load model {name!r}: {why}; {fix}")
