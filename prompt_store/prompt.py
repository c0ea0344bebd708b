"""The soft prompt value type and its validation."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from prompt_store.errors import InvalidPrompt


@dataclass(frozen=True)
class SoftPrompt:
    """A `[length, d_model]` float32 CPU tensor, the unit the registry stores and serves."""

    embeddings: torch.Tensor
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        tensor = self.embeddings.detach().to("cpu", torch.float32).contiguous()
        object.__setattr__(self, "embeddings", tensor)
        object.__setattr__(self, "sha256", hashlib.sha256(tensor.numpy().tobytes()).hexdigest())

    @property
    def length(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.embeddings.shape[1])


def check_prompt_shape(shape: Sequence[int], d_model: int | None, max_length: int) -> None:
    """Checks a `[length, d_model]` shape (or `[1, length, d_model]`) against the limits.

    Used on the shape a file's header declares, before any value is read, and again on the tensor.
    """
    dims = tuple(shape)
    if len(dims) == 3 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) != 2:
        raise InvalidPrompt(f"a prompt must be a 2-D [length, d_model] tensor, got shape {list(shape)}")
    length, width = dims
    if length == 0:
        raise InvalidPrompt("the prompt is empty (0 rows)")
    if length > max_length:
        raise InvalidPrompt(f"the prompt has {length} rows; the limit is {max_length}")
    if d_model is not None and width != d_model:
        raise InvalidPrompt(f"the prompt's width is {width} but the served model's d_model is {d_model}")


def validate_prompt(tensor: torch.Tensor, d_model: int | None, max_length: int) -> SoftPrompt:
    """Checks shape, dtype and finiteness (not magnitude: real prompts have norms near 1,000)."""
    check_prompt_shape(tensor.shape, d_model, max_length)
    if not tensor.is_floating_point():
        raise InvalidPrompt(f"a prompt must hold floating-point values, got {tensor.dtype}")
    if tensor.ndim == 3:
        tensor = tensor[0]
    tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidPrompt("the prompt contains NaN or infinite values")
    return SoftPrompt(tensor)
