"""`EngineExecutor`: the inference service's rows, run by the continuous engine.

Greedy and sampled generate rows decode step by step (and may stream); beam rows and classify rows are whole
calls the engine runs between steps. Each row's events are turned here into its result or its error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.engine.client import EngineClient, RowEvents
from server.engine.protocol import (
    BeamRow,
    ClassifyRow,
    Embedded,
    EmbedRow,
    EngineRequest,
    Event,
    Failed,
    Finished,
    Generated,
    GenerateRow,
    RowInput,
    Sampling,
    Scores,
    Token,
    TokenLogprobs,
)
from server.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    Overloaded,
    ServingError,
)
from server.serving.batch_runner import AnyWork, ClassifyWork, EmbedWork, GenerateWork, non_finite_error
from server.serving.model import FrozenT5, Generation


@dataclass(frozen=True)
class StreamedToken:
    index: int
    token_id: int
    text: str  # the text this token adds (held back while it would end inside a character)
    logprobs: TokenLogprobs | None = None  # when the row asked for them


def token_logprobs(token: Token) -> TokenLogprobs | None:
    if token.logprob is None:
        return None
    return TokenLogprobs(token.logprob, token.top_ids or [], token.top_logprobs or [])


class EngineExecutor:
    def __init__(self, client: EngineClient, model: FrozenT5) -> None:
        self.client = client
        self.model = model
        self._request_ids: dict[asyncio.Future[Any], int] = {}

    @property
    def is_full(self) -> bool:
        return self.client.is_full

    def queue_full(self) -> Overloaded:
        return self.client.queue_full()

    def check_room(self, rows: int) -> None:
        self.client.check_room(rows)

    def submit(self, works: Sequence[AnyWork], tenant: str, deadline: float) -> list[asyncio.Future[Any]]:
        requests = [self._request(work, tenant, deadline) for work in works]
        queues = self.client.submit(requests, [work.task[1] for work in works])
        futures: list[asyncio.Future[Any]] = []
        for request, events in zip(requests, queues, strict=True):
            future = asyncio.ensure_future(self._result(request, events))
            self._request_ids[future] = request.request_id
            future.add_done_callback(self._request_ids.pop)
            futures.append(future)
        return futures

    def abandon(self, works: Sequence[AnyWork], futures: Sequence[asyncio.Future[Any]]) -> None:
        ids = [self._request_ids[f] for f in futures if not f.done() and f in self._request_ids]
        self.client.cancel(ids)
        for future in futures:
            future.cancel()

    async def stop(self) -> None:
        await self.client.stop()

    def open_stream(self, work: GenerateWork, tenant: str, deadline: float) -> TokenStream:
        request = self._request(work, tenant, deadline, streamed=True)
        (events,) = self.client.submit([request], [work.task[1]])
        return TokenStream(self, request.request_id, events)

    def _request(self, work: AnyWork, tenant: str, deadline: float, streamed: bool = False) -> EngineRequest:
        request_id = self.client.new_id()
        row = RowInput(work.row.prompt, work.row.input_ids)
        if isinstance(work, ClassifyWork):
            return ClassifyRow(request_id, tenant, row, work.targets)
        if isinstance(work, EmbedWork):
            return EmbedRow(request_id, tenant, row)
        assert isinstance(work, GenerateWork)
        d = work.decoding
        if d.num_beams > 1:
            return BeamRow(
                request_id, tenant, row, d.num_beams, work.max_new_tokens, d.do_sample, d.temperature, d.top_p, d.seed,
                d.ignore_eos,
            )  # fmt: skip
        sampling = Sampling(d.do_sample, d.temperature, d.top_p, d.seed)
        logprobs = -1 if d.logprobs is None else d.logprobs
        return GenerateRow(
            request_id,
            tenant,
            row,
            sampling,
            work.max_new_tokens,
            d.ignore_eos,
            deadline,
            work.task[1],
            logprobs,
            d.grammar,
            streamed,
        )

    async def _result(self, request: EngineRequest, events: RowEvents) -> Generation | list[float]:
        tokens: list[int] = []
        logprobs: list[TokenLogprobs] = []
        while True:
            event: Event = await events.get()
            if isinstance(event, Token):
                tokens.append(event.token_id)
                if (given := token_logprobs(event)) is not None:
                    logprobs.append(given)
            elif isinstance(event, Finished):
                raise_unless_done(event)
                return replace(self.model.finished(tokens, event.reason), logprobs=logprobs or None)
            elif isinstance(event, Scores):
                return event.scores
            elif isinstance(event, Embedded):
                return event.vector
            elif isinstance(event, Generated):
                return self.model.finished(event.token_ids, event.reason)
            elif isinstance(event, Failed):
                raise failure(event)


class TokenStream:
    """One streamed row: its tokens as they come, each with the text it adds, then its `Generation`."""

    def __init__(self, executor: EngineExecutor, request_id: int, events: RowEvents) -> None:
        self.executor = executor
        self.request_id = request_id
        self.events = events
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.result: Generation | None = None

    async def __aiter__(self) -> AsyncIterator[StreamedToken]:
        """Yields each token; sets `result` at the end. Raises the row's error, if it ends with one; a consumer
        that stops early (its client left) cancels the row."""
        text = IncrementalText(self.executor.model.tokenizer)
        eos = self.executor.model.eos_token_id
        try:
            while True:
                event = await self.events.get()
                if isinstance(event, Token):
                    self.tokens.append(event.token_id)
                    added = "" if event.token_id == eos else text.added(self.tokens)
                    given = token_logprobs(event)
                    if given is not None:
                        self.logprobs.append(given)
                    yield StreamedToken(len(self.tokens) - 1, event.token_id, added, given)
                elif isinstance(event, Finished):
                    raise_unless_done(event)
                    generation = self.executor.model.finished(self.tokens, event.reason)
                    self.result = replace(generation, logprobs=self.logprobs or None)
                    return
                elif isinstance(event, Failed):
                    raise failure(event)
        finally:
            if self.result is None:
                self.executor.client.cancel([self.request_id])


class IncrementalText:
    """The text each new token adds, decoding only a window of the latest tokens (not the whole row each
    time): the window starts one token before the last text shown, so a piece's leading space (which a
    decode drops at its start) is kept, and text ending in an unfinished character is held back."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.prefix = 0  # the window's first token
        self.read = 0  # tokens whose text has been shown

    def added(self, tokens: list[int]) -> str:
        shown = self.tokenizer.decode(tokens[self.prefix : self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(tokens[self.prefix :], skip_special_tokens=True)
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(tokens)
        return text[len(shown) :]


def raise_unless_done(event: Finished) -> None:
    """A row that ended for a reason other than its own end has no result: its error."""
    if event.reason in ("eos", "length"):
        return
    if event.reason == "non_finite":
        raise non_finite_error()
    if event.reason == "deadline":
        raise DeadlineExceeded("the request did not finish within its deadline")
    if event.reason == "cancelled":
        raise ClientDisconnected("the request was cancelled")
    raise Overloaded("the server is shutting down")


def failure(event: Failed) -> ServingError:
    if event.code == "non_finite":
        return non_finite_error()
    if event.code == "overloaded":
        return Overloaded(event.message)
    if event.code == "invalid_input":
        return InvalidInput(event.message)
    return InferenceFailed(event.message)
