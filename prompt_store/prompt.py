"""The soft prompt value type and its validation."""

from __future__ import annotations

import hashlib
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

    @property
    def nbytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()


def validate_prompt(tensor: torch.Tensor, d_model: int | None, max_length: int) -> SoftPrompt:
    """Checks shape, dtype and finiteness (not magnitude: real prompts have norms near 1,000)."""
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise InvalidPrompt(f"a prompt must be a 2-D [length, d_model] tensor, got shape {list(tensor.shape)}")
    if not tensor.is_floating_point():
        raise InvalidPrompt(f"a prompt must hold floating-point values, got {tensor.dtype}")
    length, width = tensor.shape
    if length == 0:
        raise InvalidPrompt("the prompt is empty (0 rows)")
    if length > max_length:
        raise InvalidPrompt(f"the prompt has {length} rows; the limit is {max_length}")
    if d_model is not None and width != d_model:
        raise InvalidPrompt(f"the prompt's width is {width} but the served model's d_model is {d_model}")
    tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidPrompt("the prompt contains NaN or infinite values")
    return SoftPrompt(tensor)
