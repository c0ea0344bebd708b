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
class TokenLogprobs:
    """A chosen token's log-probability and the `k` most likely tokens' (most likely first), in the distribution
    it was chosen from: the model's scores with undecodable ids and a banned EOS removed, and for a sampled row
    after its temperature, top-k and top-p (what `transformers` reports as a step's `scores`)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


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
    logprobs: int = -1  # -1: none; k >= 0: each token's log-probability and the k most likely alternatives
    grammar: str | None = None  # llguidance's grammar text: only tokens that keep the text in it are chosen
    streamed: bool = False  # its tokens go out as they come, so a stall shows as a gap (`stream_pass_budget_tokens`)


@dataclass(frozen=True)
class ClassifyRow:
    request_id: int
    tenant: str
    row: RowInput
    targets: list[list[int]]  # each candidate's token ids, EOS included


@dataclass(frozen=True)
class BeamRow:
    """Beam search: `transformers`' own, on the row alone, one decoder step per engine pass."""

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


@dataclass(frozen=True)
class EmbedRow:
    """The encoder's output for the row, mean-pooled over its input's positions (see `Embedded`)."""

    request_id: int
    tenant: str
    row: RowInput


EngineRequest = GenerateRow | ClassifyRow | BeamRow | EmbedRow


@dataclass(frozen=True)
class Cancel:
    request_ids: list[int]


# Events: engine -> client.


@dataclass(frozen=True)
class Joined:
    request_id: int


@dataclass(frozen=True)
class Token:
    """A new token; for a row that asked for log-probabilities, the token's and its most likely alternatives', from
    the distribution it was chosen from (see `server.engine.sampling`)."""

    request_id: int
    token_id: int
    logprob: float | None = None
    top_ids: list[int] | None = None
    top_logprobs: list[float] | None = None


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


@dataclass(frozen=True)
class Embedded:
    """An embed row's vector: the mean of the encoder's outputs over the input's tokens (`</s>` included), the
    soft prompt's positions left out, unnormalized."""

    request_id: int
    vector: list[float]


Event = Joined | Token | Finished | Scores | Generated | Failed | Embedded
LAST_EVENTS = (Finished, Scores, Generated, Failed, Embedded)  # a row's last event: nothing of it follows


@dataclass(frozen=True)
class StepStats:
    """What one pass of the engine loop did: sent with its events, so the HTTP side's metrics see the engine."""

    step_seconds: float = 0.0  # the decoder step's duration (0 when the pass had no step)
    active_rows: int = 0  # rows in the step
    waiting_rows: int = 0  # generate rows waiting for a place, after the pass
    tasks: int = 0  # distinct tasks among the rows in the step
    left: dict[str, int] = field(default_factory=dict)  # rows that left, by reason
    placed_rows: int = 0  # generate rows holding a place in the decoder step, after the pass
    pending_rows: int = 0  # classify and beam rows not done yet, after the pass
    cache_tokens: int = 0  # what the row cache holds, in token positions (rows x (encoder + decoder positions))
    budget_spent: int = 0  # model work of the pass besides its decoder step, in tokens
