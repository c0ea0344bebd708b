"""`InferenceService`: the hot path between a validated request and the executor (engine or batcher).

Checks what the request alone decides (row count, sizes), then whether the queue has room; resolves
the task's prompt; bounds the templated text before building it; templates and tokenizes in a worker
thread; checks the token limits and each row's model cost; queues one work item per input row, waits
(with a deadline) for the rows, and shapes the response. Permanent refusals (422) come before
transient ones (503, 429), and cheap checks before expensive work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

from pydantic import ValidationError

from prompt_store.records import INPUT_PLACEHOLDER
from server.cpus import usable_cores
from server.engine.protocol import TokenLogprobs
from server.errors import ClientDisconnected, DeadlineExceeded, InvalidInput
from server.registry.registry import PromptRegistry, ResolvedPrompt
from server.serving.batch_runner import AnyWork, ClassifyWork, EmbedWork, GenerateWork, Work
from server.serving.ensemble import EnsembleInference
from server.serving.executor import ClientGone, Executor
from server.serving.grammar import InvalidGrammar, grammar_text
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
    JsonSchemaGrammar,
    RegexGrammar,
    TokenLogprob,
    TopLogprob,
)
from server.tenancy.rate_limits import TenantRateLimits

R = TypeVar("R")
Outcome = TypeVar("Outcome")


class Streaming(Protocol):
    """A streamed row: iterating yields its tokens (`index`, `token_id`, `text`), then `result` is set."""

    result: Generation | None

    def __aiter__(self) -> AsyncGenerator[Any, None]: ...


class RefundedStream:
    """A row's token stream that gives back, when the row ends with its result, the tokens it reserved and did
    not generate."""

    def __init__(self, stream: Streaming, work: GenerateWork, tenant: str, rate_limits: TenantRateLimits) -> None:
        self.stream, self.work, self.tenant, self.rate_limits = stream, work, tenant, rate_limits

    @property
    def result(self) -> Generation | None:
        return self.stream.result

    async def __aiter__(self) -> AsyncGenerator[Any, None]:
        async for token in self.stream:
            yield token
        if self.stream.result is not None:
            await self.rate_limits.refund(self.tenant, self.work.unused_tokens(self.stream.result))


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
    choices: int = 1  # rows per input (`n`): rows are input-major, choice j of input i at i * choices + j

    @classmethod
    def of(
        cls, resolved: ResolvedPrompt, works: Sequence[GenerateWork], outcomes: list[Outcome], choices: int = 1
    ) -> GenerateRows[Outcome]:
        lengths = [len(work.row.input_ids) for work in works]
        return cls(resolved.version, resolved.embeddings.shape[0], lengths, outcomes, choices)


# Texts this short are tokenized on the event loop (about 0.1 ms for 50 characters with the byte tokenizer of
# `tiny`): handing them to a worker thread costs the API process more CPU than tokenizing them.
TOKENIZE_INLINE_MAX_CHARS = 512
GRAMMAR_BYTES_PER_TOKEN = 4  # compiling a grammar is charged as this many bytes of its text per token


def choice_decoding(decoding: Decoding, choice: int) -> Decoding:
    """Choice j of an input draws with `seed + j`: a seeded request is reproducible, and its choices differ."""
    if choice == 0 or decoding.seed is None:
        return decoding
    return replace(decoding, seed=decoding.seed + choice)


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
        # Tokenizing long texts is CPU work: off the event loop, and no more at once than there are cores.
        self._tokenizing = asyncio.Semaphore(usable_cores())
        self.ensembles = EnsembleInference(self)

    async def generate(
        self, tenant: str, request: GenerateRequest, client_gone: ClientGone | None = None
    ) -> GenerateResponse:
        if request.ensemble:
            return await self.ensembles.generate(tenant, request, client_gone)
        rows = await self.generate_rows(tenant, request, client_gone)
        outputs = [
            GenerateOutput(
                text=g.text,
                num_tokens=len(g.token_ids),
                finish_reason=g.finish_reason,
                logprobs=None if g.logprobs is None else self.token_logprobs(g.token_ids, g.logprobs),
            )
            for g in rows.outcomes
        ]
        return GenerateResponse(task_id=request.task_id, prompt_version=rows.version, outputs=outputs)

    def token_logprobs(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs]) -> list[TokenLogprob]:
        """Each token's log-probability and its alternatives, with the text of each token as the tokenizer writes
        it (one tokenizer call for the row)."""
        alternatives = [i for given in logprobs for i in given.top_ids]
        texts = iter(self.model.tokenizer.convert_ids_to_tokens([*token_ids, *alternatives]))
        token_texts = [next(texts) for _ in token_ids]
        return [
            TokenLogprob(
                id=token_id,
                text=text,
                logprob=given.logprob,
                top_logprobs=[
                    TopLogprob(id=i, text=next(texts), logprob=v)
                    for i, v in zip(given.top_ids, given.top_logprobs, strict=True)
                ],
            )
            for token_id, text, given in zip(token_ids, token_texts, logprobs, strict=True)
        ]

    async def generate_rows(
        self, tenant: str, request: GenerateRequest, client_gone: ClientGone | None = None
    ) -> GenerateRows[Generation]:
        """`generate`'s rows with what they were given: their token counts besides their generations."""
        resolved, works = await self.generate_works(tenant, request)
        choices = self._choices(request, works)
        return GenerateRows.of(resolved, works, await self.run_rows(works, tenant, client_gone), choices)

    async def generate_stream(self, tenant: str, request: GenerateRequest) -> tuple[int, Streaming]:
        """Checks and admits a one-input request like `generate`, then hands back the prompt version and the
        row's token stream (its consumer stopping early cancels the row)."""
        self._streaming_executor()
        inputs = request.inputs
        if isinstance(inputs, list) and len(inputs) != 1:
            raise InvalidInput(f"a streamed request carries exactly one input ({len(inputs)} given)")
        if request.parameters is not None and request.parameters.n > 1:
            raise InvalidInput("a streamed request has one output: use n 1 (the OpenAI routes stream n choices)")
        rows = await self.open_streams(tenant, request)
        return rows.version, rows.outcomes[0]

    async def open_streams(self, tenant: str, request: GenerateRequest) -> GenerateRows[Streaming]:
        """Checks and admits a request like `generate`, then opens one token stream per input, all at once (each
        stream's consumer stopping early cancels its row)."""
        executor = self._streaming_executor()
        resolved, works = await self.generate_works(tenant, request)
        if works[0].decoding.num_beams > 1:  # one decoding for every row
            raise InvalidInput("beam search cannot stream: use num_beams 1, or a request without `stream`")
        await self._admit(works, tenant)
        executor.check_room(len(works))  # no await from here on: every row is opened, or none
        deadline = self.deadline()
        streams: list[Streaming] = [
            RefundedStream(executor.open_stream(work, tenant, deadline), work, tenant, self.rate_limits)
            for work in works
        ]
        return GenerateRows.of(resolved, works, streams, self._choices(request, works))

    def _streaming_executor(self) -> StreamingExecutor:
        if not isinstance(self.executor, StreamingExecutor):
            raise InvalidInput("streaming needs the continuous scheduler (this server runs `--scheduler static`)")
        return self.executor

    async def generate_works(self, tenant: str, request: GenerateRequest) -> tuple[ResolvedPrompt, list[GenerateWork]]:
        texts = self.admissible_texts(request.inputs)
        resolved = await self.registry.resolve(tenant, request.task_id, request.version)
        params = self._parameters(resolved, request.parameters)
        self._check_choices(params, len(texts))
        self._check_logprobs(params)
        grammar, compile_tokens = await self._grammar(params)
        decoding = Decoding(
            do_sample=params.do_sample,
            num_beams=params.num_beams,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            grammar=grammar,
        )
        task = (tenant, request.task_id)
        rows, _ = await self._tokenized(resolved, texts)
        works = [
            GenerateWork(Row(row.prompt, row.input_ids), task, choice_decoding(decoding, j), params.max_new_tokens)
            for row in rows
            for j in range(params.n)
        ]
        works[0] = replace(works[0], compile_tokens=compile_tokens)
        self.executor.check_room(len(works))
        return resolved, works

    async def embed(
        self,
        tenant: str,
        task_id: str,
        version: int | None,
        texts: list[str],
        client_gone: ClientGone | None = None,
    ) -> tuple[GenerateRows[list[float]], list[list[float]]]:
        """Each text's embedding with the task's prompt (`FrozenT5.embed`), its row checked, charged and batched
        like any other row's (its cost: prompt + input tokens); with the rows' token counts."""
        texts = self.admissible_texts(texts)
        resolved = await self.registry.resolve(tenant, task_id, version)
        rows, _ = await self._tokenized(resolved, texts)
        works = [EmbedWork(row, (tenant, task_id)) for row in rows]
        vectors = await self.run_rows(works, tenant, client_gone)
        lengths = [len(row.input_ids) for row in rows]
        return GenerateRows(resolved.version, resolved.embeddings.shape[0], lengths, vectors), vectors

    async def classify(
        self, tenant: str, request: ClassifyRequest, client_gone: ClientGone | None = None
    ) -> ClassifyResponse:
        if request.ensemble:
            return await self.ensembles.classify(tenant, request, client_gone)
        resolved, labels, works = await self.classify_works(tenant, request)
        results = await self.run_rows(works, tenant, client_gone)
        targets = works[0].targets
        outputs = [classify_output(labels, s) for s in label_scores(results, targets, request.length_normalize)]
        return ClassifyResponse(task_id=request.task_id, prompt_version=resolved.version, outputs=outputs)

    async def classify_works(
        self, tenant: str, request: ClassifyRequest
    ) -> tuple[ResolvedPrompt, list[str], list[ClassifyWork]]:
        texts = self.admissible_texts(request.inputs)
        resolved = await self.registry.resolve(tenant, request.task_id, request.version)
        labels = self._admissible_labels(request.labels or resolved.task.metadata.labels)
        rows, targets = await self._tokenized(resolved, texts, labels)
        self._check_lengths(targets, "label")
        task = (tenant, request.task_id)
        return resolved, labels, [ClassifyWork(row, task, targets) for row in rows]

    def admissible_texts(self, inputs: str | list[str]) -> list[str]:
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

    @staticmethod
    def _choices(request: GenerateRequest, works: Sequence[GenerateWork]) -> int:
        inputs = 1 if isinstance(request.inputs, str) else len(request.inputs)
        return len(works) // inputs

    def _check_choices(self, params: GenerateParameters, inputs: int) -> None:
        rows = inputs * params.n
        if rows > self.limits.max_inputs_per_request:
            raise InvalidInput(
                f"{inputs} inputs x n {params.n} is {rows} rows; a request may carry at most "
                f"{self.limits.max_inputs_per_request}"
            )
        if params.n > 1 and params.num_beams > 1:
            raise InvalidInput("n above 1 needs greedy or sampled decoding, not beam search")

    async def _grammar(self, params: GenerateParameters) -> tuple[str | None, int]:
        """`parameters.grammar` as llguidance's grammar text, compiled (off the event loop, once per text) or refused
        with 422 before anything runs; and the tokens its compiling costs the tenant (none if compiled before)."""
        if params.grammar is None:
            return None, 0
        if params.num_beams > 1 or params.ignore_eos:
            raise InvalidInput("a grammar needs greedy or sampled decoding that may end: not beam search or ignore_eos")
        if not isinstance(self.executor, StreamingExecutor):
            raise InvalidInput(
                "structured output needs the continuous scheduler (this server runs `--scheduler static`)"
            )
        grammar = params.grammar
        value = (
            grammar.json_schema
            if isinstance(grammar, JsonSchemaGrammar)
            else grammar.pattern
            if isinstance(grammar, RegexGrammar)
            else grammar.choices
        )
        try:
            text = await asyncio.to_thread(grammar_text, grammar.type, value)
        except ValueError as error:
            raise InvalidInput(f"parameters.grammar is not valid: {error}") from None
        if len(text) > self.limits.max_grammar_bytes:
            raise InvalidInput(
                f"parameters.grammar compiles to {len(text)} bytes; this server takes at most "
                f"{self.limits.max_grammar_bytes}"
            )
        grammars = self.model.grammars
        if grammars.compiled(text):
            return text, 0
        try:
            async with self._tokenizing:  # compiling is CPU work too: no more at once than there are cores
                await asyncio.to_thread(grammars.compile, text)
        except InvalidGrammar as error:
            raise InvalidInput(f"parameters.grammar does not compile: {error}") from None
        return text, -(-len(text) // GRAMMAR_BYTES_PER_TOKEN)

    def _check_logprobs(self, params: GenerateParameters) -> None:
        if params.logprobs is None:
            return
        if params.logprobs > self.limits.max_top_logprobs:
            raise InvalidInput(
                f"parameters.logprobs is {params.logprobs}; this server reports at most "
                f"{self.limits.max_top_logprobs} alternatives per token"
            )
        if params.num_beams > 1:
            raise InvalidInput("log-probabilities are reported for greedy and sampled decoding, not beam search")
        if not isinstance(self.executor, StreamingExecutor):
            raise InvalidInput(
                "log-probabilities need the continuous scheduler (this server runs `--scheduler static`)"
            )

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
        """Rows of the templated inputs, and the labels' token ids: built and tokenized on the event loop when they
        are short (`TOKENIZE_INLINE_MAX_CHARS`), else in a worker thread."""
        template = resolved.task.metadata.input_template
        labels = labels or []
        chars = self._templated_chars(template, texts) + sum(map(len, labels))
        if chars <= TOKENIZE_INLINE_MAX_CHARS:
            token_ids = self._template_and_tokenize(template, texts, labels)
        else:
            async with self._tokenizing:
                token_ids = await asyncio.to_thread(self._template_and_tokenize, template, texts, labels)
        input_ids, label_ids = token_ids[: len(texts)], token_ids[len(texts) :]
        self._check_lengths(input_ids, "input")
        return [Row(resolved.embeddings, ids) for ids in input_ids], label_ids

    def _templated_chars(self, template: str | None, texts: list[str]) -> int:
        """The characters of the texts once templated, each checked against the limit before it is built: a
        template that repeats `{input}` cannot turn a small request into a large one."""
        if not template:
            return sum(map(len, texts))
        slots = template.count(INPUT_PLACEHOLDER)
        fixed = len(template) - slots * len(INPUT_PLACEHOLDER)
        lengths = [fixed + slots * len(text) for text in texts]
        for i, length in enumerate(lengths):
            if length > self.max_chars:
                raise InvalidInput(
                    f"input {i} is {length} characters once placed in the task's input template; "
                    f"the limit is {self.max_chars}"
                )
        return sum(lengths)

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

    def deadline(self) -> float:
        return time.monotonic() + self.limits.request_timeout_s

    async def _admit(self, works: Sequence[AnyWork], tenant: str) -> None:
        """Charges the tenant what the rows put into model calls and every token they may generate (refunded,
        for what they do not generate, when they end)."""
        self._check_costs(works)
        await self.rate_limits.admit(tenant, sum(work.cost + work.reserved_tokens for work in works))

    async def _refund(self, tenant: str, works: Sequence[Work[R]], results: Sequence[R]) -> None:
        unused = sum(work.unused_tokens(result) for work, result in zip(works, results, strict=True))
        await self.rate_limits.refund(tenant, unused)

    async def run_rows(
        self, works: Sequence[Work[R]], tenant: str, client_gone: ClientGone | None, deadline: float | None = None
    ) -> list[R]:
        """Admits the rows, then waits for them, the deadline, or the client leaving, whichever comes first.

        When the request ends for any reason its rows still queued or running are abandoned: the executor drops
        them (queued), or stops spending work on them at the next group or step. A `deadline` given
        (`time.monotonic()`) marks a request's second submission (an ensemble's tie-break): it is checked and
        charged as the first was, and shares the request's deadline. Rows that end with a result give back what
        they reserved and did not use.
        """
        await self._admit(works, tenant)
        if deadline is None:
            deadline = self.deadline()
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
                outcomes = cast("list[R]", results.result())
                await self._refund(tenant, works, outcomes)
                return outcomes
            if gone is not None and gone in done:
                raise ClientDisconnected("the client closed the connection")
            raise DeadlineExceeded(f"the request did not finish within {self.limits.request_timeout_s:g} s")
        finally:
            self.executor.abandon(works, futures)
            if gone is not None:
                gone.cancel()
            results.cancel()
            # Rows cancelled above end the gathering future with CancelledError, which asyncio logs as an error
            # ("exception was never retrieved") unless someone looks at it.
            results.add_done_callback(lambda gathered: gathered.cancelled() or gathered.exception())
