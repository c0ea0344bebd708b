"""`EngineLimits`: what the engine may hold and do in one pass, as plain values (the composition roots, the API
process's and the engine child's, build them from the settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

PASS_BUDGET_TOKENS = 1024  # the default model work of a pass besides its decoder step (`pass_budget_tokens`)
STREAM_PASS_BUDGET_TOKENS = 512  # the default while a row in the step streams (`stream_pass_budget_tokens`)


@dataclass(frozen=True)
class EngineLimits:
    max_active_rows: int  # rows in one decoder step
    max_cached_tokens: int  # what the row cache may hold: rows x (encoder positions + decoder positions)
    max_batch_size: int  # rows joining in one encoder pass
    max_batch_tokens: int  # tokens of one row's model work (a larger row is refused before it gets here)
    pass_budget_tokens: int = PASS_BUDGET_TOKENS  # model work per pass besides the decoder step, in tokens
    stream_pass_budget_tokens: int = STREAM_PASS_BUDGET_TOKENS  # the same, while a row in the step streams


class EngineSettings(Protocol):
    """The settings the engine's limits come from (`server.settings.Settings` has them)."""

    max_active_rows: int
    max_cached_tokens: int
    max_batch_size: int
    max_batch_tokens: int
    pass_budget_tokens: int
    stream_pass_budget_tokens: int


def engine_limits(settings: EngineSettings) -> EngineLimits:
    return EngineLimits(
        max_active_rows=settings.max_active_rows,
        max_cached_tokens=settings.max_cached_tokens,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        pass_budget_tokens=settings.pass_budget_tokens,
        stream_pass_budget_tokens=settings.stream_pass_budget_tokens,
    )
