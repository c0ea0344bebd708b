"""`InferenceService`: the hot path between a validated request and the executor (engine or batcher).

Checks what the request alone decides (row count, sizes), then whether the queue has room; resolves
the task's prompt; bounds the templated text before building it; templates and tokenizes in a worker
thread; checks the token limits and each row's model cost; queues one work item per input row, waits
(with a deadline) for the rows, and shapes the response. Permanent refusals (422) come before
transient ones (503, 429), and cheap checks before expensive work.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

from pydantic import ValidationError

from prompt_store.records import INPUT_PLACEHOLDER
from server.errors import ClientDisconnected, DeadlineExceeded, InvalidInput
from server.registry.registry import PromptRegistry, ResolvedPrompt
from server.serving.batch_runner import AnyWork, ClassifyWork, GenerateWork, Work
from server.serving.ensemble import EnsembleInference
from server.serving.executor import Executor
from server.serving.limits import ServingLimits
from server.serving.model import Decoding, FrozenT5, Generation, Row
from server.serving.ranking import classify_output, label_scores
from server.serving.schemas import (
    MAX_LABELS,
    ClassifyRequest,
    ClassifyResponse,
    GenerateOutput,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
)
from server.tenancy.rate_limits import TenantRateLimits

ClientGone = Callable[[], Awaitable[None]]
R = TypeVar("R")
Outcome = TypeVar("Outcome")


class Streaming(Protocol):
    """A streamed row: iterating yields its tokens (`index`, `token_id`, `text`), then `result` is set."""

    result: Generation | None

    def __aiter__(self) -> AsyncGenerator[Any, None]: ...


@runtime_checkable
class StreamingExecutor(Executor, Protocol):
    def open_stream(self, work: GenerateWork, tenant: str, deadline: float) -> Streaming: ...


@dataclass(frozen=True)
class GenerateRows(Generic[Outcome]):
    """A generate request's admitted rows: the prompt version serving them, the soft prompt's length, each row's
    input tokens (templated, `</s>` included) and each row's outcome (its generation, or its token stream)."""

    version: int
    prompt_length: int
    input_tokens: list[int]
    outcomes: list[Outcome]

    @classmethod
    def of(
        cls, resolved: ResolvedPrompt, works: Sequence[GenerateWork], outcomes: list[Outcome]
    ) -> GenerateRows[Outcome]:
        lengths = [len(work.row.input_ids) for work in works]
        return cls(resolved.version, resolved.embeddings.shape[0], lengths, outcomes)


class InferenceService:
    def __init__(
        self,
        model: FrozenT5,
        registry: PromptRegistry,
        executor: Executor,
        limits: ServingLimits,
        rate_limits: TenantRateLimits,
    ) -> None:
        self.model = model
        self.registry = registry
        self.executor = executor
        self.limits = limits
        self.rate_limits = rate_limits
        self.max_chars = limits.max_chars
        # Tokenizing is CPU work: off the event loop, and no more at once than there are cores.
        self._tokenizing = asyncio.Semaphore(os.cpu_count() or 1)
        self.ensembles = EnsembleInference(self)

    async def generate(
        self, tenant: str, request: GenerateRequest, client_gone: ClientGone | None = None
    ) -> GenerateResponse:
        if request.ensemble:
            return await self.ensembles.generate(tenant, request, client_gone)
        rows = await self.generate_rows(tenant, request, client_gone)
        outputs = [
            GenerateOutput(text=g.text, num_tokens=len(g.token_ids), finish_reason=g.finish_reason)
            for g in rows.outcomes
        ]
        return GenerateResponse(task_id=request.task_id, prompt_version=rows.version, outputs=outputs)

    async def generate_rows(
        self, tenant: str, request: GenerateRequest, client_gone: ClientGone | None = None
    ) -> GenerateRows[Generation]:
        """`generate`'s rows with what they were given: their token counts besides their generations."""
        resolved, works = await self._generate_works(tenant, request)
        return GenerateRows.of(resolved, works, await self._run(works, tenant, client_gone))

    async def generate_stream(self, tenant: str, request: GenerateRequest) -> tuple[int, Streaming]:
        """Checks and admits a one-input request like `generate`, then hands back the prompt version and the
        row's token stream (its consumer stopping early cancels the row)."""
        self._streaming_executor()
        inputs = request.inputs
        if isinstance(inputs, list) and len(inputs) != 1:
            raise InvalidInput(f"a streamed request carries exactly one input ({len(inputs)} given)")
        rows = await self.open_streams(tenant, request)
        return rows.version, rows.outcomes[0]

    async def open_streams(self, tenant: str, request: GenerateRequest) -> GenerateRows[Streaming]:
        """Checks and admits a request like `generate`, then opens one token stream per input, all at once (each
        stream's consumer stopping early cancels its row)."""
        executor = self._streaming_executor()
        resolved, works = await self._generate_works(tenant, request)
        if works[0].decoding.num_beams > 1:  # one decoding for every row
            raise InvalidInput("beam search cannot stream: use num_beams 1, or a request without `stream`")
        await self._admit(works, tenant)
        executor.check_room(len(works))  # no await from here on: every row is opened, or none
        deadline = self._deadline()
        return GenerateRows.of(resolved, works, [executor.open_stream(work, tenant, deadline) for work in works])

    def _streaming_executor(self) -> StreamingExecutor:
        if not isinstance(self.executor, StreamingExecutor):
            raise InvalidInput("streaming needs the continuous scheduler (this server runs `--scheduler static`)")
        return self.executor

    async def _generate_works(self, tenant: str, request: GenerateRequest) -> tuple[ResolvedPrompt, list[GenerateWork]]:
        texts = self._admissible_texts(request.inputs)
        resolved = await self.registry.resolve(tenant, request.task_id, request.version)
        params = self._parameters(resolved, request.parameters)
        decoding = Decoding(
            do_sample=params.do_sample,
            num_beams=params.num_beams,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
        )
        task = (tenant, request.task_id)
        rows, _ = await self._tokenized(resolved, texts)
        return resolved, [GenerateWork(row, task, decoding, params.max_new_tokens) for row in rows]

    async def classify(
        self, tenant: str, request: ClassifyRequest, client_gone: ClientGone | None = None
    ) -> ClassifyResponse:
        if request.ensemble:
            return await self.ensembles.classify(tenant, request, client_gone)
        resolved, labels, works = await self._classify_works(tenant, request)
        results = await self._run(works, tenant, client_gone)
        targets = works[0].targets
        outputs = [classify_output(labels, s) for s in label_scores(results, targets, request.length_normalize)]
        return ClassifyResponse(task_id=request.task_id, prompt_version=resolved.version, outputs=outputs)

    async def _classify_works(
        self, tenant: str, request: ClassifyRequest
    ) -> tuple[ResolvedPrompt, list[str], list[ClassifyWork]]:
        texts = self._admissible_texts(request.inputs)
        resolved = await self.registry.resolve(tenant, request.task_id, request.version)
        labels = self._admissible_labels(request.labels or resolved.task.metadata.labels)
        rows, targets = await self._tokenized(resolved, texts, labels)
        self._check_lengths(targets, "label")
        task = (tenant, request.task_id)
        return resolved, labels, [ClassifyWork(row, task, targets) for row in rows]

    def _admissible_texts(self, inputs: str | list[str]) -> list[str]:
        """What the request alone decides, before any lookup or tokenizing: permanent refusals (422) first,
        then room in the queue (503), so that a client retrying a 503 is not retrying a request that can never
        be served."""
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not texts:
            raise InvalidInput("inputs is empty")
        if len(texts) > self.limits.max_inputs_per_request:
            raise InvalidInput(f"{len(texts)} inputs in one request; the limit is {self.limits.max_inputs_per_request}")
        self._check_chars(texts, "input")
        self.executor.check_room(len(texts))
        return texts

    def _admissible_labels(self, labels: list[str] | None) -> list[str]:
        if not labels:
            raise InvalidInput("no labels: pass `labels` or upload the task with metadata labels")
        if len(labels) > MAX_LABELS:  # stored before uploads were checked (a request's own are checked already)
            raise InvalidInput(f"{len(labels)} labels; the limit is {MAX_LABELS}")
        if len(set(labels)) != len(labels):
            raise InvalidInput("labels must be distinct")
        self._check_chars(labels, "label")
        return labels

    def _check_chars(self, texts: list[str], what: str) -> None:
        for i, text in enumerate(texts):
            if len(text) > self.max_chars:
                raise InvalidInput(f"{what} {i} has {len(text)} characters; the limit is {self.max_chars}")

    def _parameters(self, resolved: ResolvedPrompt, given: GenerateParameters | None) -> GenerateParameters:
        merged: dict[str, Any] = dict(resolved.task.metadata.parameters or {})
        if given is not None:
            merged.update(given.model_dump(exclude_unset=True))
        try:
            params = GenerateParameters.model_validate(merged)
        except ValidationError as error:  # defaults stored under older, looser rules
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5])
            raise InvalidInput(
                f"the task's default parameters, with this request's, are not valid: {problems}"
            ) from None
        self.limits.check_decoding(params.max_new_tokens, params.num_beams)
        return params

    async def _tokenized(
        self, resolved: ResolvedPrompt, texts: list[str], labels: list[str] | None = None
    ) -> tuple[list[Row], list[list[int]]]:
        """Rows of the templated inputs, and the labels' token ids: built and tokenized in a worker thread."""
        template = resolved.task.metadata.input_template
        self._check_templated_chars(template, texts)
        async with self._tokenizing:
            token_ids = await asyncio.to_thread(self._template_and_tokenize, template, texts, labels or [])
        input_ids, label_ids = token_ids[: len(texts)], token_ids[len(texts) :]
        self._check_lengths(input_ids, "input")
        return [Row(resolved.embeddings, ids) for ids in input_ids], label_ids

    def _check_templated_chars(self, template: str | None, texts: list[str]) -> None:
        """A templated text's length is known before it is built: a template that repeats `{input}` cannot turn
        a small request into a large one."""
        if not template:
            return
        slots = template.count(INPUT_PLACEHOLDER)
        fixed = len(template) - slots * len(INPUT_PLACEHOLDER)
        for i, text in enumerate(texts):
            length = fixed + slots * len(text)
            if length > self.max_chars:
                raise InvalidInput(
                    f"input {i} is {length} characters once placed in the task's input template; "
                    f"the limit is {self.max_chars}"
                )

    def _template_and_tokenize(self, template: str | None, texts: list[str], labels: list[str]) -> list[list[int]]:
        if template:
            texts = [template.replace(INPUT_PLACEHOLDER, text) for text in texts]
        return self.model.tokenize(texts + labels)

    def _check_lengths(self, token_ids: list[list[int]], what: str) -> None:
        limit = self.limits.max_input_tokens
        for i, ids in enumerate(token_ids):
            if len(ids) > limit:
                raise InvalidInput(f"{what} {i} has {len(ids)} tokens; the limit is {limit}")

    def _check_costs(self, works: Sequence[AnyWork]) -> None:
        """A row costlier than a whole model call could never be batched within the budget."""
        limit = self.limits.max_batch_tokens
        for i, work in enumerate(works):
            if work.cost > limit:
                raise InvalidInput(
                    f"input {i} costs {work.cost} tokens of one model call (prompt + input, times num_beams; for "
                    f"classify plus labels * the longest label); the limit is {limit}: use fewer or shorter labels, "
                    "fewer beams or a shorter input"
                )

    def _deadline(self) -> float:
        return time.monotonic() + self.limits.request_timeout_s

    async def _admit(self, works: Sequence[AnyWork], tenant: str) -> None:
        self._check_costs(works)
        await self.rate_limits.admit(tenant, sum(work.cost for work in works))  # what it puts into model calls

    async def _run(
        self, works: Sequence[Work[R]], tenant: str, client_gone: ClientGone | None, deadline: float | None = None
    ) -> list[R]:
        """Admits the rows, then waits for them, the deadline, or the client leaving, whichever comes first.

        When the request ends for any reason its rows still queued or running are abandoned: the executor drops
        them (queued), or stops spending work on them at the next group or step. A `deadline` given
        (`time.monotonic()`) marks a request's second submission (an ensemble's tie-break): its rows were admitted
        and paid for with the first, and they share the request's deadline.
        """
        if deadline is None:
            await self._admit(works, tenant)
            deadline = self._deadline()
        futures = self.executor.submit(works, tenant, deadline)
        results = asyncio.gather(*futures)
        watchers: set[asyncio.Future[Any]] = {results}
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        if gone is not None:
            watchers.add(gone)
        try:
            done, _ = await asyncio.wait(
                watchers, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if results in done:
                # A `Work[R]`'s row gets an `R`: the executor runs each work with its own kind's model call.
                return cast("list[R]", results.result())
            if gone is not None and gone in done:
                raise ClientDisconnected("the client closed the connection")
            raise DeadlineExceeded(f"the request did not finish within {self.limits.request_timeout_s:g} s")
        finally:
            self.executor.abandon(works, futures)
            if gone is not None:
                gone.cancel()
            results.cancel()
