"""`Engine`: continuous batching of generate rows of any tasks, one decoder step at a time.

    requests ──▶ waiting (round-robin across tenants)
                    │  admitted while there is room (max_active_rows, max_cached_tokens)
                    ▼
               encoder pass (new rows of any tasks together, by the exactness layout)
                    │  cross-attention keys/values computed once per row
                    ▼
               active rows ──▶ decoder step (all rows, each at its own position) ──▶ one token per row
                    ▲                                                             │
                    └──────── rows that finished leave; waiting rows take their place

A row leaves the step it finishes: end-of-sequence, its own `max_new_tokens`, non-finite scores, cancelled (its
client left) or its deadline. Classify rows (one teacher-forced decoder pass) and beam rows (`model.generate`,
the static path) run between steps, so a classify request waits at most one step behind long generations.

`submit` and `cancel` are thread-safe; `run` is the loop, in its own thread (or process), and the only code
that touches the model. `emit` gets each pass's events in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from server.engine.protocol import (
    BeamRow,
    Cancel,
    ClassifyRow,
    EngineRequest,
    Event,
    Failed,
    FailureCode,
    Finished,
    FinishReason,
    Generated,
    GenerateRow,
    Joined,
    RowInput,
    Scores,
    StepStats,
    Token,
)
from server.engine.sampling import RowChoice, TokenChooser, row_generator
from server.errors import ClientDisconnected, NonFiniteScores, Overloaded
from server.serving.batch_runner import AnyWork, BatchRunner, ClassifyWork, GenerateWork
from server.serving.model import Decoding, FrozenT5, Row

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long an idle loop blocks on its inbox before looking at its stop flag again
Emit = Callable[[list[Event], StepStats], None]
Q = TypeVar("Q", GenerateRow, ClassifyRow, BeamRow)


@dataclass(frozen=True)
class EngineLimits:
    max_active_rows: int  # rows in one decoder step
    max_cached_tokens: int  # encoder + decoder tokens the active rows may hold
    max_batch_size: int  # rows in one encoder pass (and one classify or beam call)
    max_batch_tokens: int  # tokens in one encoder pass (and one classify or beam call)


class FairQueue(Generic[Q]):
    """Rows waiting, taken round-robin across tenants (one tenant's flood cannot starve another)."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Q]] = OrderedDict()
        self.size = 0

    def put(self, row: Q) -> None:
        self._queues.setdefault(row.tenant, deque()).append(row)
        self.size += 1

    def peek(self) -> Q | None:
        return next(iter(self._queues.values()))[0] if self._queues else None

    def pop(self) -> Q:
        tenant, rows = next(iter(self._queues.items()))
        row = rows.popleft()
        del self._queues[tenant]
        if rows:
            self._queues[tenant] = rows  # to the back of the round
        self.size -= 1
        return row

    def drain(self) -> Iterator[Q]:
        while self.size:
            yield self.pop()


@dataclass
class ActiveRow:
    request: GenerateRow
    choice: RowChoice
    cost: int  # cached tokens it holds: prompt + input + max_new_tokens
    last_token: int
    generated: int = 0


class Engine:
    def __init__(self, model: FrozenT5, limits: EngineLimits, emit: Emit) -> None:
        self.model = model
        self.limits = limits
        self._emit = emit
        self.decoder = model.decoder
        self.cache = self.decoder.new_cache()
        self.chooser = TokenChooser(model.decodable_vocab, model.eos_token_id)
        self.runner = BatchRunner(model)
        self._inbox: queue.SimpleQueue[list[EngineRequest] | Cancel] = queue.SimpleQueue()
        self._waiting: FairQueue[GenerateRow] = FairQueue()
        self._classify: FairQueue[ClassifyRow] = FairQueue()
        self._beams: FairQueue[BeamRow] = FairQueue()
        self._active: list[ActiveRow] = []  # index == cache slot
        self._cached_tokens = 0
        self._known: set[int] = set()  # request ids in the engine (waiting, active, or queued for a call)
        self._cancelled: set[int] = set()

    # Thread-safe entry points.

    def submit(self, requests: list[EngineRequest]) -> None:
        """One inbox item: the loop takes a submission's rows together, so they join the same pass (an ensemble's
        members share its encoder pass and decoder steps)."""
        self._inbox.put(list(requests))

    def cancel(self, request_ids: list[int]) -> None:
        self._inbox.put(Cancel(list(request_ids)))

    # The loop.

    @torch.inference_mode()
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._take_inbox(block=not self._has_work())
            self._pass()
        self._shut_down()

    @torch.inference_mode()
    def run_once(self) -> None:
        """One pass of the loop without waiting (tests and benches drive the engine pass by pass)."""
        self._take_inbox(block=False)
        self._pass()

    def _pass(self) -> None:
        events: list[Event] = []
        left: Counter[str] = Counter()
        self._serve_classify(events)
        self._serve_beams(events)
        self._admit(events, left)
        tasks = len({a.request.task for a in self._active})
        seconds, stepped = self._step(events, left) if self._active else (0.0, 0)
        if events or stepped:
            self._emit(events, self._stats(seconds, stepped, left, tasks))

    @property
    def idle(self) -> bool:
        """Nothing queued, waiting or running."""
        return self._inbox.empty() and not self._has_work()

    def _has_work(self) -> bool:
        return bool(self._active or self._waiting.size or self._classify.size or self._beams.size)

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                self._take(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _take(self, item: list[EngineRequest] | Cancel) -> None:
        if isinstance(item, Cancel):
            self._cancelled.update(i for i in item.request_ids if i in self._known)
            return
        for request in item:
            self._known.add(request.request_id)
            if isinstance(request, GenerateRow):
                self._waiting.put(request)
            elif isinstance(request, ClassifyRow):
                self._classify.put(request)
            else:
                self._beams.put(request)

    def _forget(self, request_id: int) -> None:
        self._known.discard(request_id)
        self._cancelled.discard(request_id)

    def _stats(self, seconds: float, stepped: int, left: Counter[str], tasks: int = 0) -> StepStats:
        return StepStats(seconds, stepped, self._waiting.size, tasks, dict(left))

    # Admission: waiting rows join the active set, encoded together.

    def _admit(self, events: list[Event], left: Counter[str]) -> None:
        joining: list[GenerateRow] = []
        tokens = 0
        now = time.monotonic()
        while self._waiting.size and len(self._active) + len(joining) < self.limits.max_active_rows:
            row = self._waiting.peek()
            assert row is not None
            ended = self._ended(row, now)
            if ended is not None:
                self._waiting.pop()
                self._finish(row.request_id, ended, events, left)
                continue
            cost = row.row.num_tokens + row.max_new_tokens
            holding = self._active or joining
            if holding and self._cached_tokens + cost > self.limits.max_cached_tokens:
                break  # waits for rows to leave; a row alone may always run
            if joining and (
                len(joining) >= self.limits.max_batch_size or tokens + row.row.num_tokens > self.limits.max_batch_tokens
            ):
                break
            joining.append(self._waiting.pop())
            tokens += row.row.num_tokens
            self._cached_tokens += cost
        if joining:
            self._join(joining, events, left)

    def _join(self, joining: list[GenerateRow], events: list[Event], left: Counter[str]) -> None:
        try:
            hidden, mask = self.model.encode([self._model_row(r.row) for r in joining])
            self.decoder.join(self.cache, hidden, mask)
        except Exception as error:  # out of memory, or a fault: these rows fail, the engine goes on
            log.exception("encoder pass of %d rows failed", len(joining))
            for row in joining:
                self._cached_tokens -= row.row.num_tokens + row.max_new_tokens
                self._fail(row.request_id, *_failure(error), events)
                left["failed"] += 1
            return
        start = self.model.model.config.decoder_start_token_id
        for row in joining:
            choice = RowChoice(row.sampling, row_generator(row.sampling, self.model.device), row.ignore_eos)
            self._active.append(ActiveRow(row, choice, row.row.num_tokens + row.max_new_tokens, start))
            events.append(Joined(row.request_id))

    def _model_row(self, row: RowInput) -> Row:
        return Row(self.model.prompt_on_device(row.prompt), row.input_ids)

    # The decoder step.

    def _step(self, events: list[Event], left: Counter[str]) -> tuple[float, int]:
        now = time.monotonic()
        gone = {}
        for slot, active in enumerate(self._active):
            ended = self._ended(active.request, now)
            if ended is not None:
                gone[slot] = ended
        self._leave(gone, events, left)
        if not self._active:
            return 0.0, 0
        started = time.perf_counter()
        stepped = len(self._active)
        try:
            tokens = torch.tensor([a.last_token for a in self._active], device=self.model.device)
            logits = self.decoder.step(self.cache, tokens)
            chosen, broken = self.chooser.choose(logits, [a.choice for a in self._active])
        except Exception as error:
            log.exception("decoder step of %d rows failed", stepped)
            for active in self._active:
                self._fail(active.request.request_id, *_failure(error), events)
            left["failed"] += stepped
            self._reset()
            return time.perf_counter() - started, stepped
        seconds = time.perf_counter() - started
        finished: dict[int, FinishReason] = {}
        for slot, (active, token, bad) in enumerate(zip(self._active, chosen, broken, strict=True)):
            if bad:
                finished[slot] = "non_finite"
                continue
            active.last_token = token
            active.generated += 1
            events.append(Token(active.request.request_id, token))
            if token == self.model.eos_token_id and not active.request.ignore_eos:
                finished[slot] = "eos"
            elif active.generated >= active.request.max_new_tokens:
                finished[slot] = "length"
        self._leave(finished, events, left)
        return seconds, stepped

    def _ended(self, row: GenerateRow, now: float) -> FinishReason | None:
        if row.request_id in self._cancelled:
            return "cancelled"
        if row.deadline is not None and now >= row.deadline:
            return "deadline"
        return None

    def _leave(self, reasons: dict[int, FinishReason], events: list[Event], left: Counter[str]) -> None:
        if not reasons:
            return
        for slot, reason in reasons.items():
            active = self._active[slot]
            self._cached_tokens -= active.cost
            self._finish(active.request.request_id, reason, events, left)
        order = self.cache.release(list(reasons))
        self._active = [self._active[old] for old in order]

    def _finish(self, request_id: int, reason: FinishReason, events: list[Event], left: Counter[str]) -> None:
        events.append(Finished(request_id, reason))
        left[reason] += 1
        self._forget(request_id)

    def _fail(self, request_id: int, code: FailureCode, message: str, events: list[Event]) -> None:
        events.append(Failed(request_id, code, message))
        self._forget(request_id)

    def _reset(self) -> None:
        """After a failed step: every active row has been failed; start from an empty cache."""
        self._active = []
        self._cached_tokens = 0
        self.cache = self.decoder.new_cache()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # Classify and beam rows: whole calls between steps, through the static path's batch runner.

    def _serve_classify(self, events: list[Event]) -> None:
        if self._classify.size:
            rows = list(self._classify.drain())
            works = [ClassifyWork(self._model_row(r.row), (r.tenant, ""), r.targets) for r in rows]
            self._run_calls(rows, works, events)

    def _serve_beams(self, events: list[Event]) -> None:
        if self._beams.size:
            rows = list(self._beams.drain())
            works = [GenerateWork(self._model_row(r.row), (r.tenant, ""), _decoding(r), r.max_new_tokens) for r in rows]
            self._run_calls(rows, works, events)

    def _run_calls(self, rows: list[ClassifyRow] | list[BeamRow], works: list[AnyWork], events: list[Event]) -> None:
        """Runs the rows in calls of at most `max_batch_size` rows and `max_batch_tokens` tokens; rows cancelled
        meanwhile are skipped."""
        for start, end in _chunks([w.cost for w in works], self.limits.max_batch_size, self.limits.max_batch_tokens):
            for row, work in zip(rows[start:end], works[start:end], strict=True):
                if row.request_id in self._cancelled:
                    work.row.abandoned.set()
            results = self.runner(works[start:end])
            for row, result in zip(rows[start:end], results, strict=True):
                if isinstance(result, ClientDisconnected):
                    self._forget(row.request_id)
                elif isinstance(result, Exception):
                    self._fail(row.request_id, *_failure(result), events)
                elif isinstance(row, ClassifyRow):
                    events.append(Scores(row.request_id, list(result)))
                    self._forget(row.request_id)
                else:
                    events.append(Generated(row.request_id, result.token_ids, result.finish_reason))
                    self._forget(row.request_id)

    def _shut_down(self) -> None:
        """The loop stopped: every row still here ends (`shutdown`), so no caller waits forever."""
        self._take_inbox(block=False)
        events: list[Event] = []
        left: Counter[str] = Counter()
        for active in self._active:
            self._finish(active.request.request_id, "shutdown", events, left)
        for row in self._waiting.drain():
            self._finish(row.request_id, "shutdown", events, left)
        for other in [*self._classify.drain(), *self._beams.drain()]:
            self._fail(other.request_id, "overloaded", "the engine is shutting down", events)
        self._active = []
        if events:
            self._emit(events, self._stats(0.0, 0, left))


def _decoding(row: BeamRow) -> Decoding:
    return Decoding(
        do_sample=row.do_sample,
        num_beams=row.num_beams,
        temperature=row.temperature,
        top_p=row.top_p,
        seed=row.seed,
        ignore_eos=row.ignore_eos,
    )


def _chunks(costs: list[int], max_rows: int, max_tokens: int) -> Iterator[tuple[int, int]]:
    start, tokens = 0, 0
    for i, cost in enumerate(costs):
        if i > start and (i - start >= max_rows or tokens + cost > max_tokens):
            yield start, i
            start, tokens = i, 0
        tokens += cost
    if start < len(costs):
        yield start, len(costs)


def _failure(error: Exception) -> tuple[FailureCode, str]:
    if isinstance(error, NonFiniteScores):
        return "non_finite", str(error)
    if isinstance(error, (Overloaded, torch.cuda.OutOfMemoryError)):
        return "overloaded", "the model ran out of device memory for this request; retry with fewer or shorter inputs"
    return "inference_failed", f"inference failed: {type(error).__name__}"
