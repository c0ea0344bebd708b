"""The bodies of the OpenAI-compatible routes, in OpenAI's shapes. Pydantic only.

Each request lists the OpenAI parameters it honours, and, typed loosely, those it refuses unless they are given
their no-op value (`UNSUPPORTED`): a parameter a client sends is either honoured or refused by name, never dropped.
Fields OpenAI does not have are refused as everywhere in this API (422, naming them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, field_validator, model_serializer, model_validator

from prompt_store.records import Utf8Text
from server.serving.schemas import (
    MAX_CHOICES,
    MAX_INPUTS,
    MAX_TEXT_CHARS,
    MAX_TOP_LOGPROBS,
    StrictModel,
    Text,
    unicode_texts,
)

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each stop string is looked for after every token: its length bounds that work
MAX_MODEL_CHARS = 100
# Caps on what is only refused or ignored (the engine has no logit bias, tools or functions; one message is
# served): the named refusal must come from a bounded parse. OpenAI's own limits where it has them.
MAX_USER_CHARS = 256
MAX_NAME_CHARS = 64  # OpenAI's
MAX_LOGIT_BIAS = 300
MAX_TOKEN_KEY_CHARS = 20
MAX_TOOLS = 128  # OpenAI's
MAX_MESSAGES = 256
MAX_CONTENT_PARTS = 256
MAX_RESPONSE_FORMAT_KEYS = 8

ChatText = Annotated[Utf8Text, StringConstraints(max_length=MAX_TEXT_CHARS)]
TokenKey = Annotated[str, StringConstraints(max_length=MAX_TOKEN_KEY_CHARS)]

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
ModelName = Annotated[
    str, Field(max_length=MAX_MODEL_CHARS, description="a task id of the caller's tenant; `task@N` pins version N")
]

# Parameter -> (the values that change nothing besides null, why any other is refused): refused with 400, by name.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "best_of": ((1,), "one choice per prompt"),
    "echo": ((False,), "the prompt is not echoed"),
    "suffix": (("",), "a task continues its input; it does not fill in text"),
    "logit_bias": (({},), "the engine does not bias tokens"),
    "frequency_penalty": ((0,), "the engine has no repetition penalties"),
    "presence_penalty": ((0,), "the engine has no repetition penalties"),
    "tools": ((), "a prompt-tuned task does not call tools"),
    "tool_choice": (("none",), "a prompt-tuned task does not call tools"),
    "functions": ((), "a prompt-tuned task does not call functions"),
    "function_call": (("none",), "a prompt-tuned task does not call functions"),
}


class StreamOptions(StrictModel):
    include_usage: bool = Field(False, description="a last chunk with the request's `usage` (and no choices)")


class SamplingRequest(StrictModel):
    """What completions and chat completions share: the model, decoding, stop strings, streaming."""

    model: ModelName
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_USER_CHARS, description="accepted; not used")
    n: int | None = Field(
        None, ge=1, le=MAX_CHOICES, description="choices per prompt (sampled: seeds `seed`, `seed + 1`, ...)"
    )
    logit_bias: dict[TokenKey, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives each token's log-probability comes with (None: no log-probabilities)."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: Text | Annotated[list[Text], Field(max_length=MAX_INPUTS)] = Field(
        description="one prompt, or a list (each is one row and one choice)"
    )
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="each token's log-probability and this many alternatives'"
    )

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    _unicode = field_validator("prompt", mode="before")(unicode_texts)

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the list of prompts is empty")
        return prompt


class TextPart(StrictModel):
    type: Literal["text"]
    text: ChatText


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(StrictModel):
    role: Role
    content: ChatText | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = Field(None, max_length=MAX_NAME_CHARS, description="accepted; not used")

    @property
    def text(self) -> str | None:
        """Text parts are joined with line breaks."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, description="`max_tokens`' newer name")
    logprobs: bool | None = Field(None, description="each token's log-probability, in `choices[].logprobs`")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="with `logprobs`: this many alternatives per token"
    )
    tools: list[Any] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Any = None
    functions: list[Any] | None = Field(None, max_length=MAX_TOOLS)
    function_call: Any = None
    response_format: dict[str, Any] | None = Field(None, max_length=MAX_RESPONSE_FORMAT_KEYS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        return self

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class Usage(BaseModel):
    prompt_tokens: int = Field(description="input tokens, templated, with `</s>`, over every row")
    completion_tokens: int
    total_tokens: int = Field(description="`prompt_tokens` + `completion_tokens`")
    soft_prompt_tokens: int = Field(description="the soft prompt's length, for each row: not in `total_tokens`")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    loaded: bool = Field(description="softserve: the task's active prompt is on this replica's device now")
    pinned: bool = Field(description="softserve: the task is pinned (never evicted, on every replica)")


class ModelList(BaseModel):
    """OpenAI's list, one page of it: `next_cursor` asks for the next page (null: this is the last)."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
    has_more: bool = False
    next_cursor: str | None = None


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """The legacy completions' shape: per token its text, log-probability, the most likely alternatives (text ->
    log-probability) and where its text begins in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Answer(BaseModel):
    """What every completion and chunk says besides its choices."""

    id: str
    created: int
    model: str = Field(description="the task and the version that served it: `task@N`")


class Completion(Answer):
    """A completion, and each chunk of a streamed one (OpenAI gives both the one shape)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopChatLogprob):
    top_logprobs: list[TopChatLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _given_only(self) -> dict[str, str]:
        """OpenAI's deltas hold only what they add: `{}` in the last one."""
        return {key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class EmbeddingRequest(StrictModel):
    """OpenAI's embeddings request; `model` is a task. Texts only (token arrays are refused as any other type)."""

    model: ModelName
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] = Field(
        description="one text, or a list (each is one row and one embedding)"
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: each vector's little-endian float32 bytes, base64-encoded"
    )
    dimensions: int | None = Field(None, ge=1, description="only the model's `d_model` (the vectors are not cut)")
    user: str | None = Field(None, max_length=MAX_USER_CHARS, description="accepted; not used")
    normalize: bool = Field(True, description="softserve's own: unit length (OpenAI's embeddings are), or the raw mean")

    _unicode = field_validator("input", mode="before")(unicode_texts)

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(description="input tokens, templated, with `</s>`, over every row")
    total_tokens: int
    soft_prompt_tokens: int = Field(description="the soft prompt's length, for each row: not in `total_tokens`")


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str = Field(description="the task and the version that served it: `task@N`")
    usage: EmbeddingUsage
