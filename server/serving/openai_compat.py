"""OpenAI's completions and chat completions, served by `InferenceService`: a task is a model.

`model` names a task of the caller's tenant (`task@N` pins version N); each prompt is one row, templated with the
task's `input_template`. OpenAI's parameters, with OpenAI's defaults, decide the decoding (the task's default
`parameters` are for `/v1/generate`): temperature 1 samples, 0 is greedy. Stop strings cut each row's text as it
streams and end the row. Everything else (limits, rate limits, fairness, deadlines) is `InferenceService`'s.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase

from prompt_store import TASK_ID_PATTERN, TaskNotFound, TaskRecord, VersionNotFound
from server.engine.protocol import TokenLogprobs
from server.errors import ClientDisconnected, InvalidParameter, ModelNotFound, UnsupportedParameter
from server.serving.model import Generation
from server.serving.openai_schemas import (
    UNSUPPORTED,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    FinishReason,
    ModelCard,
    ModelList,
    SamplingRequest,
    TopChatLogprob,
    Usage,
)
from server.serving.schemas import MIN_TEMPERATURE, GenerateParameters, GenerateRequest, JsonSchemaGrammar
from server.serving.service import ClientGone, GenerateRows, InferenceService, Streaming
from server.serving.stop_strings import StopCutter

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions; chat's is "as many as the model allows"
FINISH_REASONS: dict[str, FinishReason] = {"eos": "stop", "length": "length"}
MODEL_NAME = re.compile(rf"(?P<task>{TASK_ID_PATTERN.strip('^$')})(?:@(?P<version>[1-9][0-9]{{0,17}}))?")
T = TypeVar("T")
Chunks = AsyncGenerator[dict[str, Any], None]


@dataclass(frozen=True)
class TaskModel:
    task_id: str
    version: int | None

    @classmethod
    def parse(cls, name: str) -> TaskModel:
        match = MODEL_NAME.fullmatch(name)
        if match is None:
            raise model_not_found(name)
        version = match.group("version")
        return cls(match.group("task"), int(version) if version else None)


def model_not_found(name: str) -> ModelNotFound:
    return ModelNotFound(
        f"the model {name!r} does not exist: a model is one of your tasks (`GET /v1/models`), or `task@version`"
    )


@dataclass(frozen=True)
class RowPiece:
    """Text a row adds; its last piece also says why it ended and how many tokens it took. With log-probabilities
    asked for, the tokens whose text it carries (or holds back), each with its log-probabilities."""

    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    logprobs: tuple[tuple[int, TokenLogprobs], ...] = ()


class LogprobShapes:
    """Tokens' log-probabilities in OpenAI's two shapes; a token's text is what it decodes to alone."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion(self, pairs: Sequence[tuple[int, TokenLogprobs]]) -> CompletionLogprobs:
        tokens = [self._text(token_id) for token_id, _ in pairs]
        offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
        tops = [
            {self._text(i): v for i, v in zip(given.top_ids, given.top_logprobs, strict=True)} for _, given in pairs
        ]
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[given.logprob for _, given in pairs], top_logprobs=tops, text_offset=offsets
        )

    def chat(self, pairs: Sequence[tuple[int, TokenLogprobs]]) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> TopChatLogprob:
            text = self._text(token_id)
            return TopChatLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        content = [
            ChatTokenLogprob(
                **entry(token_id, given.logprob).model_dump(),
                top_logprobs=[entry(i, v) for i, v in zip(given.top_ids, given.top_logprobs, strict=True)],
            )
            for token_id, given in pairs
        ]
        return ChatLogprobs(content=content)


def answer_head(prefix: str, task_id: str, version: int) -> dict[str, Any]:
    """What a response (`Answer`) says besides its choices; `model` is the version that served it."""
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": f"{task_id}@{version}"}


class OpenAIService:
    def __init__(self, inference: InferenceService) -> None:
        self.inference = inference
        self.logprobs = LogprobShapes(inference.model.tokenizer)

    async def models(self, tenant: str, cursor: str | None, limit: int) -> ModelList:
        page = await self.inference.registry.task_page(tenant, cursor, limit)
        cards = [self._card(r.task_id, r, r.created_at) for r in page.records]
        return ModelList(data=cards, has_more=page.has_more, next_cursor=page.next_cursor)

    async def model(self, tenant: str, name: str) -> ModelCard:
        wanted = TaskModel.parse(name)
        try:
            record = await self.inference.registry.task(tenant, wanted.task_id)
        except TaskNotFound:
            raise model_not_found(name) from None
        created = record.created_at
        if wanted.version is not None:
            info = record.version_info(wanted.version)
            if info is None:
                raise model_not_found(name)
            created = info.created_at
        return self._card(name, record, created)

    def _card(self, name: str, record: TaskRecord, created: float) -> ModelCard:
        """A card with the task's residency on this replica (a router picks the replica that holds it)."""
        registry = self.inference.registry
        pinned = registry.is_pinned(record.tenant, record.task_id)
        return ModelCard(
            id=name, created=int(created), owned_by=record.tenant, loaded=registry.is_loaded(record), pinned=pinned
        )

    async def embed(
        self, tenant: str, request: EmbeddingRequest, client_gone: ClientGone | None = None
    ) -> EmbeddingList:
        model = TaskModel.parse(request.model)
        d_model = self.inference.model.d_model
        if request.dimensions is not None and request.dimensions != d_model:
            raise UnsupportedParameter(
                "dimensions", f"`dimensions` is {request.dimensions}; this model's embeddings have {d_model}"
            )
        with model_errors(request.model):
            rows, vectors = await self.inference.embed(tenant, model.task_id, model.version, request.texts, client_gone)
        data = [
            Embedding(index=i, embedding=encoded(vector, request.normalize, request.encoding_format))
            for i, vector in enumerate(vectors)
        ]
        tokens = sum(rows.input_tokens)
        return EmbeddingList(
            data=data,
            model=f"{model.task_id}@{rows.version}",
            usage=EmbeddingUsage(
                prompt_tokens=tokens, total_tokens=tokens, soft_prompt_tokens=rows.prompt_length * len(vectors)
            ),
        )

    async def complete(
        self, tenant: str, request: CompletionRequest, client_gone: ClientGone | None = None
    ) -> Completion:
        generate = self._completion_request(request)
        rows, pieces = await self._served_rows(tenant, request, generate, client_gone)
        head = answer_head("cmpl", generate.task_id, rows.version)
        choices = [
            CompletionChoice(
                index=i,
                text=piece.text,
                finish_reason=piece.finish_reason,
                logprobs=self._completion_logprobs(request, piece),
            )
            for i, piece in enumerate(pieces)
        ]
        return Completion(**head, choices=choices, usage=usage(rows, pieces))

    def _completion_logprobs(self, request: SamplingRequest, piece: RowPiece) -> CompletionLogprobs | None:
        return None if request.top_logprobs_wanted is None else self.logprobs.completion(piece.logprobs)

    def _chat_logprobs(self, request: SamplingRequest, piece: RowPiece) -> ChatLogprobs | None:
        return None if request.top_logprobs_wanted is None else self.logprobs.chat(piece.logprobs)

    async def complete_chat(
        self, tenant: str, request: ChatCompletionRequest, client_gone: ClientGone | None = None
    ) -> ChatCompletion:
        generate = self._chat_request(request)
        rows, pieces = await self._served_rows(tenant, request, generate, client_gone)
        head = answer_head("chatcmpl", generate.task_id, rows.version)
        choices = [
            ChatChoice(
                index=index,
                message=AssistantMessage(content=piece.text),
                finish_reason=piece.finish_reason,
                logprobs=self._chat_logprobs(request, piece),
            )
            for index, piece in enumerate(pieces)
            if piece.finish_reason is not None  # a whole row's piece says why it ended
        ]
        return ChatCompletion(**head, choices=choices, usage=usage(rows, pieces))

    async def stream_completion(self, tenant: str, request: CompletionRequest) -> Chunks:
        """Checks and admits the request, then hands back its chunks: refusals come before the stream."""
        generate = self._completion_request(request)
        rows = await self._open_streams(tenant, request, generate)
        return self._completion_chunks(answer_head("cmpl", generate.task_id, rows.version), rows, request)

    async def stream_chat(self, tenant: str, request: ChatCompletionRequest) -> Chunks:
        generate = self._chat_request(request)
        rows = await self._open_streams(tenant, request, generate)
        return self._chat_chunks(answer_head("chatcmpl", generate.task_id, rows.version), rows, request)

    async def _completion_chunks(
        self, head: dict[str, Any], rows: GenerateRows[Streaming], request: SamplingRequest
    ) -> Chunks:
        ends: list[RowPiece] = []
        async with aclosing(rows_text(rows.outcomes, request.stops)) as pieces:
            async for index, piece in pieces:
                if piece.finish_reason is not None:
                    ends.append(piece)
                elif not piece.text:
                    continue
                choice = CompletionChoice(
                    index=index,
                    text=piece.text,
                    finish_reason=piece.finish_reason,
                    logprobs=self._completion_logprobs(request, piece),
                )
                yield chunk_json(Completion(**head, choices=[choice]), request.include_usage)
        if request.include_usage:
            yield Completion(**head, choices=[], usage=usage(rows, ends)).model_dump()

    async def _chat_chunks(
        self, head: dict[str, Any], rows: GenerateRows[Streaming], request: SamplingRequest
    ) -> Chunks:
        def chunk(
            index: int, delta: ChatDelta, finish_reason: FinishReason | None = None, piece: RowPiece | None = None
        ) -> dict[str, Any]:
            logprobs = None if piece is None else self._chat_logprobs(request, piece)
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
            return chunk_json(ChatCompletionChunk(**head, choices=[choice]), request.include_usage)

        for index in range(len(rows.outcomes)):
            yield chunk(index, ChatDelta(role="assistant", content=""))
        ends: list[RowPiece] = []
        async with aclosing(rows_text(rows.outcomes, request.stops)) as pieces:
            async for index, piece in pieces:
                if piece.text or piece.logprobs:
                    yield chunk(index, ChatDelta(content=piece.text), piece=piece)
                if piece.finish_reason is not None:
                    ends.append(piece)
                    yield chunk(index, ChatDelta(), piece.finish_reason)
        if request.include_usage:
            yield ChatCompletionChunk(**head, choices=[], usage=usage(rows, ends)).model_dump()

    def _generate_request(
        self,
        request: SamplingRequest,
        inputs: list[str],
        max_tokens: tuple[str, int],
        grammar: JsonSchemaGrammar | None = None,
    ) -> GenerateRequest:
        """`max_tokens`: the parameter that sets it, and its value."""
        refuse_unsupported(request)
        model = TaskModel.parse(request.model)
        param, max_new_tokens = max_tokens
        limit = self.inference.limits.max_new_tokens
        if max_new_tokens > limit:
            raise InvalidParameter(param, f"{param} is {max_new_tokens}; this server's limit is {limit}")
        sampled = request.temperature is None or request.temperature >= MIN_TEMPERATURE  # OpenAI's default is 1
        parameters = GenerateParameters(  # every field given: the task's defaults do not apply
            max_new_tokens=max_new_tokens,
            num_beams=1,
            do_sample=sampled,
            temperature=request.temperature if sampled and request.temperature is not None else 1.0,
            top_p=request.top_p if request.top_p is not None else 1.0,
            seed=request.seed,
            ignore_eos=False,
            logprobs=request.top_logprobs_wanted,
            n=request.n or 1,
            grammar=grammar,
        )
        return GenerateRequest(task_id=model.task_id, version=model.version, inputs=inputs, parameters=parameters)

    def _completion_request(self, request: CompletionRequest) -> GenerateRequest:
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        return self._generate_request(request, prompts, ("max_tokens", request.max_tokens or COMPLETION_MAX_TOKENS))

    def _chat_request(self, request: ChatCompletionRequest) -> GenerateRequest:
        """Without a length, as many tokens as the server allows (OpenAI's chat: as many as the model allows)."""
        if request.max_completion_tokens is not None:
            max_tokens = ("max_completion_tokens", request.max_completion_tokens)
        else:
            max_tokens = ("max_tokens", request.max_tokens or self.inference.limits.max_new_tokens)
        grammar = response_grammar(request.response_format)
        return self._generate_request(request, [chat_input(request.messages)], max_tokens, grammar)

    async def _served_rows(
        self,
        tenant: str,
        request: SamplingRequest,
        generate: GenerateRequest,
        client_gone: ClientGone | None,
    ) -> tuple[GenerateRows[Any], list[RowPiece]]:
        """Each row whole. Without stop strings, as `/v1/generate` runs them (any scheduler); with them, streamed,
        so that a row ends as soon as its text holds one."""
        if not request.stops:
            with model_errors(request.model):
                rows = await self.inference.generate_rows(tenant, generate, client_gone)
            return rows, [whole_row(generation) for generation in rows.outcomes]
        streams = await self._open_streams(tenant, request, generate)
        pieces = await until_gone(collect(streams.outcomes, request.stops), client_gone)
        return streams, pieces

    async def _open_streams(
        self, tenant: str, request: SamplingRequest, generate: GenerateRequest
    ) -> GenerateRows[Streaming]:
        with model_errors(request.model):
            return await self.inference.open_streams(tenant, generate)


@contextmanager
def model_errors(name: str) -> Iterator[None]:
    """The registry's "no such task / version" as OpenAI's "no such model", naming the model as it was asked for."""
    try:
        yield
    except (TaskNotFound, VersionNotFound):
        raise model_not_found(name) from None


def refuse_unsupported(request: SamplingRequest) -> None:
    for param, (no_ops, why) in UNSUPPORTED.items():
        value = getattr(request, param, None)
        if value is None or any(same_value(value, no_op) for no_op in no_ops):
            continue
        raise UnsupportedParameter(param, f"`{param}` is not supported here: {why}; leave it out")


def same_value(value: object, no_op: object) -> bool:
    """Equal and of the same kind: `0` is not `false` (`logprobs: 0` asks for something)."""
    return value == no_op and isinstance(value, bool) == isinstance(no_op, bool)


def response_grammar(response_format: dict[str, Any] | None) -> JsonSchemaGrammar | None:
    """OpenAI's `response_format` as a grammar: `json_schema` its schema, `json_object` any JSON object, `text` none."""
    kind = None if response_format is None else response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return JsonSchemaGrammar(type="json_schema", schema={"type": "object"})
    spec = response_format.get("json_schema") if response_format is not None else None
    if kind == "json_schema" and isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
        return JsonSchemaGrammar(type="json_schema", schema=spec["schema"])
    raise InvalidParameter(
        "response_format",
        '`response_format` is `{"type": "text"}`, `{"type": "json_object"}`, or '
        '`{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`',
    )


def chat_input(messages: list[ChatMessage]) -> str:
    """A prompt-tuned task is single-turn and its soft prompt is its instruction: the one input is the one user
    message. System, developer, assistant and tool messages, or several user turns, cannot be honoured: refused."""
    roles = [message.role for message in messages]
    if roles != ["user"]:
        raise UnsupportedParameter(
            "messages",
            f"a task is single-turn: send exactly one message, the user's (this request has {', '.join(roles)}); "
            "the task's soft prompt takes the place of a system message",
        )
    text = messages[0].text
    if text is None:
        raise InvalidParameter("messages", "the user message has no content")
    return text


def encoded(vector: list[float], normalize: bool, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of its little-endian float32 bytes; unit length if asked."""
    values = np.asarray(vector, dtype=np.float32)
    if normalize:
        values = values / max(float(np.linalg.norm(values)), np.finfo(np.float32).tiny)
    if encoding_format == "base64":
        return base64.b64encode(values.astype("<f4").tobytes()).decode()
    return values.tolist()


def whole_row(generation: Generation) -> RowPiece:
    logprobs = tuple(zip(generation.token_ids, generation.logprobs or [], strict=False))
    return RowPiece(generation.text, FINISH_REASONS[generation.finish_reason], len(generation.token_ids), logprobs)


def usage(rows: GenerateRows[Any], ends: Sequence[RowPiece]) -> Usage:
    """Each prompt's tokens once, however many choices it has (OpenAI's count); every choice's completion."""
    prompt_tokens = sum(rows.input_tokens[:: rows.choices])
    completion_tokens = sum(end.completion_tokens for end in ends)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        soft_prompt_tokens=rows.prompt_length * len(rows.input_tokens[:: rows.choices]),
    )


def chunk_json(chunk: Completion | ChatCompletionChunk, include_usage: bool) -> dict[str, Any]:
    """OpenAI's chunks carry `usage: null` when the stream ends with a usage chunk, and no `usage` otherwise."""
    return chunk.model_dump(exclude=None if include_usage else {"usage"})


async def row_pieces(stream: Streaming, stops: Sequence[str]) -> AsyncGenerator[RowPiece, None]:
    """A row's text as it streams, without any text from its first stop string on; the row ends there (leaving
    the stream cancels it). Text that may begin a stop string is held back until it is known not to."""
    cutter = StopCutter(stops)
    tokens = 0
    logprobs: list[tuple[int, TokenLogprobs]] = []  # of the tokens since the last piece
    async with aclosing(aiter(stream)) as streamed:
        async for token in streamed:
            tokens += 1
            if token.logprobs is not None:
                logprobs.append((token.token_id, token.logprobs))
            text = cutter.feed(token.text)
            if cutter.stopped:
                yield RowPiece(text, "stop", tokens, tuple(logprobs))
                return
            if text:
                yield RowPiece(text, logprobs=tuple(logprobs))
                logprobs.clear()
    result = stream.result
    assert result is not None  # set when the tokens end without an error
    yield RowPiece(cutter.rest(), FINISH_REASONS[result.finish_reason], len(result.token_ids), tuple(logprobs))


def rows_text(streams: list[Streaming], stops: Sequence[str]) -> AsyncGenerator[tuple[int, RowPiece], None]:
    """Every row's pieces (`row_pieces`), with the row's index, as they come."""
    return interleaved([row_pieces(stream, stops) for stream in streams])


async def interleaved(sources: list[AsyncGenerator[T, None]]) -> AsyncGenerator[tuple[int, T], None]:
    """The sources' items as each comes, with its source's index. The first error ends them all; so does leaving
    early: each source still running is cancelled (a row's stream then cancels its row)."""
    pending = {asyncio.ensure_future(anext(source)): index for index, source in enumerate(sources)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):
                index = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(sources[index]))] = index
                yield index, item
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for source in sources:  # one whose item was left unread waits at its `yield`
            await source.aclose()


async def collect(streams: list[Streaming], stops: Sequence[str]) -> list[RowPiece]:
    """Each row whole: its text up to its first stop string, why it ended and its tokens."""
    texts: list[list[str]] = [[] for _ in streams]
    logprobs: list[list[tuple[int, TokenLogprobs]]] = [[] for _ in streams]
    ends: list[RowPiece | None] = [None] * len(streams)
    async with aclosing(rows_text(streams, stops)) as pieces:
        async for index, piece in pieces:
            texts[index].append(piece.text)
            logprobs[index] += piece.logprobs
            if piece.finish_reason is not None:
                ends[index] = piece
    return [
        RowPiece("".join(text), end.finish_reason, end.completion_tokens, tuple(given))
        for text, given, end in zip(texts, logprobs, ends, strict=True)
        if end is not None
    ]


async def until_gone(work: Awaitable[T], client_gone: ClientGone | None) -> T:
    """`work`'s result, unless the client leaves first: then `work` is cancelled (and with it its rows)."""
    if client_gone is None:
        return await work
    working, gone = asyncio.ensure_future(work), asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait({working, gone}, return_when=asyncio.FIRST_COMPLETED)
        if working in done:
            return working.result()
        raise ClientDisconnected("the client closed the connection")
    finally:
        for future in (working, gone):
            future.cancel()
        await asyncio.gather(working, gone, return_exceptions=True)
