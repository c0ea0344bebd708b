"""The bodies of the OpenAI-compatible routes, in OpenAI's shapes. Pydantic only.

Each request lists the OpenAI parameters it honours, and, typed loosely, those it refuses unless they are given
their no-op value (`UNSUPPORTED`): a parameter a client sends is either honoured or refused by name, never dropped.
Fields OpenAI does not have are refused as everywhere in this API (422, naming them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, field_validator, model_serializer

from prompt_store.records import Utf8Text
from server.serving.schemas import StrictModel, unicode_texts

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each stop string is looked for after every token: its length bounds that work
MAX_MODEL_CHARS = 100

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
ModelName = Annotated[
    str, Field(max_length=MAX_MODEL_CHARS, description="a task id of the caller's tenant; `task@N` pins version N")
]

# Parameter -> (the values that change nothing besides null, why any other is refused): refused with 400, by name.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "one choice per prompt: send a list of prompts, or several requests, for more"),
    "best_of": ((1,), "one choice per prompt"),
    "echo": ((False,), "the prompt is not echoed"),
    "suffix": (("",), "a task continues its input; it does not fill in text"),
    # The completions' integer form has no no-op value (0 asks for the chosen tokens' log-probabilities).
    "logprobs": ((False,), "the engine does not compute log-probabilities"),
    "top_logprobs": ((0,), "the engine does not compute log-probabilities"),
    "logit_bias": (({},), "the engine does not bias tokens"),
    "frequency_penalty": ((0,), "the engine has no repetition penalties"),
    "presence_penalty": ((0,), "the engine has no repetition penalties"),
    "tools": ((), "a prompt-tuned task does not call tools"),
    "tool_choice": (("none",), "a prompt-tuned task does not call tools"),
    "functions": ((), "a prompt-tuned task does not call functions"),
    "function_call": (("none",), "a prompt-tuned task does not call functions"),
    "response_format": (({"type": "text"},), "a task answers plain text"),
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
    user: str | None = Field(None, description="accepted; not used")
    n: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(description="one prompt, or a list (each is one row and one choice)")
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None

    _unicode = field_validator("prompt")(unicode_texts)

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the list of prompts is empty")
        return prompt


class TextPart(StrictModel):
    type: Literal["text"]
    text: Utf8Text


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(StrictModel):
    role: Role
    content: Utf8Text | list[TextPart] | None = None
    name: str | None = Field(None, description="accepted; not used")

    @property
    def text(self) -> str | None:
        """Text parts are joined with line breaks."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="`max_tokens`' newer name")
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


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


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


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
    logprobs: None = None


class ChatCompletionChunk(Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
