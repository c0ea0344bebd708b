"""What crosses between the HTTP side and the engine: requests in, events out. Plain values only.

A request names its row by `request_id` (unique per client). The engine answers each generate row with
`Joined` (its encoder pass is done and it takes part in the next decoder step), then one `Token` per step,
then exactly one `Finished`; a classify row with `Scores`; a beam row with `Generated`; any row with `Failed`
instead when it cannot be served. `Cancel` ends a row at the next step (its `Finished` says `cancelled`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

FinishReason = Literal["eos", "length", "non_finite", "cancelled", "deadline", "shutdown"]
FailureCode = Literal["non_finite", "overloaded", "inference_failed", "invalid_input"]


@dataclass(frozen=True)
class Sampling:
    """One row's decoding: greedy, or sampling with its own generator (a seeded row draws the same tokens in
    any company)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class RowInput:
    """A row's encoder input: its prompt `[P, d]` (any device or dtype: the engine moves it) and its token ids."""

    prompt: torch.Tensor
    input_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return self.prompt.shape[0] + len(self.input_ids)


@dataclass(frozen=True)
class GenerateRow:
    request_id: int
    tenant: str
    row: RowInput
    sampling: Sampling
    max_new_tokens: int
    ignore_eos: bool = False  # benchmarks: lengths exactly as asked
    deadline: float | None = None  # `time.monotonic()` (system-wide on Linux): the row leaves once past it
    task: str = ""  # the task's id (metrics count the tasks sharing a step)


@dataclass(frozen=True)
class ClassifyRow:
    request_id: int
    tenant: str
    row: RowInput
    targets: list[list[int]]  # each candidate's token ids, EOS included


@dataclass(frozen=True)
class BeamRow:
    """Beam search keeps the static `generate` path: rows of equal settings share one call."""

    request_id: int
    tenant: str
    row: RowInput
    num_beams: int
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


EngineRequest = GenerateRow | ClassifyRow | BeamRow


@dataclass(frozen=True)
class Cancel:
    request_ids: list[int]


# Events: engine -> client.


@dataclass(frozen=True)
class Joined:
    request_id: int


@dataclass(frozen=True)
class Token:
    request_id: int
    token_id: int


@dataclass(frozen=True)
class Finished:
    request_id: int
    reason: FinishReason


@dataclass(frozen=True)
class Scores:
    request_id: int
    scores: list[float]


@dataclass(frozen=True)
class Generated:
    request_id: int
    token_ids: list[int]  # new tokens, EOS included when it ended the row
    reason: FinishReason


@dataclass(frozen=True)
class Failed:
    request_id: int
    code: FailureCode
    message: str


Event = Joined | Token | Finished | Scores | Generated | Failed


@dataclass(frozen=True)
class StepStats:
    """What one pass of the engine loop did: sent with its events, so the HTTP side's metrics see the engine."""

    step_seconds: float = 0.0  # the decoder step's duration (0 when the pass had no step)
    active_rows: int = 0  # rows in the step
    waiting_rows: int = 0  # generate rows not admitted yet
    tasks: int = 0  # distinct tasks among the rows in the step
    left: dict[str, int] = field(default_factory=dict)  # rows that left, by reason
