"""The bodies of generate and classify requests and responses, and the decoding parameters. Pydantic only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from prompt_store import TASK_ID_PATTERN
from prompt_store.records import text_problem

MAX_LABELS = 64
MAX_CHOICES = 128  # outputs per input (`n`): `max_inputs_per_request` bounds inputs x n below it
MAX_GRAMMAR_CHARS = 1 << 16  # a regex's characters (`max_grammar_bytes` bounds a grammar's compiled text below it)
MAX_GRAMMAR_CHOICES = 256
MAX_CHOICE_CHARS = 1024
MAX_TOP_LOGPROBS = 20  # alternatives one token may report (OpenAI's own limit); `max_top_logprobs` may lower it
MIN_TEMPERATURE = 1e-2
# Ceilings of every request schema's lists and strings, checked while the body is validated (the JSON body's size
# and value count are bounded before it is even parsed). The settings set the limits that apply below them
# (`max_inputs_per_request`, `max_input_chars`, ...), checked next, before any other work.
MAX_INPUTS = 4096  # rows one request may list: `max_inputs_per_request` cannot be set higher
MAX_TEXT_CHARS = 1 << 20  # characters of one input, label or text field: `max_input_chars` applies below it

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Inputs = Text | Annotated[list[Text], Field(max_length=MAX_INPUTS)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class JsonSchemaGrammar(StrictModel):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(
        alias="schema", description="the JSON schema every output must validate against"
    )

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class RegexGrammar(StrictModel):
    type: Literal["regex"]
    pattern: str = Field(max_length=MAX_GRAMMAR_CHARS, description="every output matches it whole")


class ChoiceGrammar(StrictModel):
    type: Literal["choice"]
    choices: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHOICE_CHARS)]] = Field(
        min_length=1, max_length=MAX_GRAMMAR_CHOICES, description="every output is one of them"
    )


Grammar = Annotated[JsonSchemaGrammar | RegexGrammar | ChoiceGrammar, Field(discriminator="type")]


class GenerateParameters(StrictModel):
    max_new_tokens: int = Field(20, ge=1)
    num_beams: int = Field(1, ge=1, le=16)
    do_sample: bool = False
    temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        le=100,
        description=f"sampling temperature, at least {MIN_TEMPERATURE:g}: below it sampling is greedy in all but "
        "name and dividing the scores by it can overflow (use `do_sample: false` for greedy)",
    )
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = Field(
        False, description="go on past end-of-sequence until `max_new_tokens` (benchmarks: lengths exactly as asked)"
    )
    n: int = Field(
        1,
        ge=1,
        le=MAX_CHOICES,
        description="outputs per input, input by input; sampled ones draw with `seed`, `seed + 1`, ... (inputs x n "
        "is at most `max_inputs_per_request`; each is charged as a row)",
    )
    grammar: Grammar | None = Field(
        None,
        description="structured output: every output follows a JSON schema, a regex, or is one of a list of choices "
        "(greedy or sampled decoding, not beam search or `ignore_eos`)",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="each generated token's log-probability and this many most likely alternatives' (0: only the "
        "token's own), from the distribution it was chosen from: after undecodable ids and a banned end-of-"
        "sequence are removed, and for sampling after temperature, top-k and top-p (the server's "
        "`max_top_logprobs` caps it)",
    )


def unicode_texts(texts: Any) -> Any:
    """Inputs and labels go to the tokenizer: each must be valid Unicode (`text_problem`). Runs before the type
    checks (whose own message for a lone surrogate does not say what is wrong); other values pass to them."""
    items = [texts] if isinstance(texts, str) else texts if isinstance(texts, list) else []
    for i, text in enumerate(items):
        problem = text_problem(text) if isinstance(text, str) else None
        if problem:
            raise ValueError(problem if isinstance(texts, str) else f"item {i} {problem}")
    return texts


class TextRequest(StrictModel):
    """Inputs and labels go to the tokenizer: they must be valid Unicode."""

    _unicode = field_validator("inputs", "labels", check_fields=False, mode="before")(unicode_texts)


class GenerateRequest(TextRequest):
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    inputs: Inputs = Field(description="one input, or a list (each is one batch row)")
    version: int | None = Field(None, ge=1, description="pin a prompt version; default: the active one")
    parameters: GenerateParameters | None = None
    stream: bool = Field(
        False, description="answer `text/event-stream`: one event per token, then a final event (one input only)"
    )
    ensemble: bool = Field(
        False, description="run every member of the task's ensemble on each input; the text most members give wins"
    )

    @model_validator(mode="after")
    def _ensemble_alone(self) -> GenerateRequest:
        one_prompt_or_the_ensemble(self.ensemble, self.version)
        if self.ensemble and self.stream:
            raise ValueError("an ensemble cannot stream: its text is chosen once every member has finished")
        return self


def one_prompt_or_the_ensemble(ensemble: bool, version: int | None) -> None:
    if ensemble and version is not None:
        raise ValueError("`version` pins one prompt and `ensemble` serves the ensemble's versions: send one of them")


class MemberGeneration(BaseModel):
    """One ensemble member's output for an input: what that version alone would have answered."""

    version: int
    text: str
    num_tokens: int
    finish_reason: str


class TopLogprob(BaseModel):
    id: int
    text: str
    logprob: float


class TokenLogprob(BaseModel):
    """A generated token's log-probability and the most likely alternatives at its step (most likely first)."""

    id: int
    text: str
    logprob: float
    top_logprobs: list[TopLogprob]


class GenerateOutput(BaseModel):
    text: str
    num_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] | None = Field(None, description="with `parameters.logprobs`: one per token")
    votes: dict[str, int] | None = Field(None, description="ensemble: each text the members gave, and how many")
    tie_scores: dict[str, float] | None = Field(
        None, description="ensemble, on a tie: each tied text's log-probability summed over every member"
    )
    members: list[MemberGeneration] | None = Field(None, description="ensemble: each member's own output")


class GenerateResponse(BaseModel):
    task_id: str
    prompt_version: int
    outputs: list[GenerateOutput]
    ensemble_versions: list[int] | None = Field(None, description="ensemble: the members, in the ensemble's order")


class ClassifyRequest(TextRequest):
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    inputs: Inputs
    labels: list[Text] | None = Field(None, min_length=1, max_length=MAX_LABELS)
    version: int | None = Field(None, ge=1)
    length_normalize: bool = False
    ensemble: bool = Field(False, description="run every member of the task's ensemble and average their probs")

    @model_validator(mode="after")
    def _ensemble_alone(self) -> ClassifyRequest:
        one_prompt_or_the_ensemble(self.ensemble, self.version)
        return self


class MemberClassification(BaseModel):
    """One ensemble member's answer for an input: what that version alone would have answered."""

    version: int
    label: str
    probs: dict[str, float]


class ClassifyOutput(BaseModel):
    label: str
    scores: dict[str, float]
    probs: dict[str, float]
    agreement: float | None = Field(None, description="ensemble: the share of members whose own label is `label`")
    members: list[MemberClassification] | None = Field(None, description="ensemble: each member's own answer")


class ClassifyResponse(BaseModel):
    task_id: str
    prompt_version: int
    outputs: list[ClassifyOutput]
    ensemble_versions: list[int] | None = Field(None, description="ensemble: the members, in the ensemble's order")
