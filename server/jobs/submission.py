"""A training job's submission, parsed from what the client sent: a JSON body, or the parts of a form.

No HTTP here: the route hands over the body's bytes or the form's parts, and gets a `Submission` or a
domain error. Client JSON is strict (`NaN`/`Infinity` refused), so every number that reaches a job record
is finite. Parsing takes CPU in proportion to the upload: `TrainingService` runs it off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from server import strict_json
from server.errors import InvalidInput, InvalidRequest
from server.jobs.dataset import Dataset, ExampleSet, json_problem, parse_items, parse_jsonl
from server.jobs.errors import InvalidDataset
from server.jobs.schemas import JobOptions
from server.training import TrainingConfig

FORM_FIELDS = ("task_id", "train", "eval", "config", "activate")
FormParts = Mapping[str, str | bytes]  # a form's fields: text, or a file's bytes
CheckLimits = Callable[[TrainingConfig], None]


@dataclass
class Submission:
    options: JobOptions
    train: ExampleSet
    eval: ExampleSet | None

    @property
    def dataset(self) -> Dataset:
        return Dataset(train=self.train.examples, eval=self.eval.examples if self.eval else [])


def from_json(body: bytes, check_limits: CheckLimits) -> Submission:
    """A JSON body: the job's options and its examples as lists of objects."""
    try:
        data = strict_json.loads(body)
    except (ValueError, RecursionError) as error:
        raise InvalidRequest([_malformed(error)]) from None
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object (or a multipart form with JSONL files)")
    train, evaluation = data.pop("train", None), data.pop("eval", None)
    options = _options(data, check_limits)
    if train is None:
        raise InvalidDataset('train is missing: a list of {"input": ..., "target": ...} objects')
    return Submission(options, parse_items("train", train), parse_items("eval", evaluation) if evaluation else None)


def from_form(parts: FormParts, check_limits: CheckLimits) -> Submission:
    """A multipart form: the options as fields (`config` a JSON object), the examples as JSONL files."""
    unexpected = sorted(set(parts) - set(FORM_FIELDS))
    if unexpected:
        raise InvalidInput(f"unexpected form field(s): {', '.join(unexpected)}")
    raw: dict[str, Any] = {name: parts[name] for name in ("task_id", "activate") if name in parts}
    if "config" in parts:
        raw["config"] = _config(parts["config"])
    options = _options(raw, check_limits)
    train = _jsonl(parts, "train")
    if train is None:
        raise InvalidDataset("the train file is missing (a JSONL form field named `train`)")
    return Submission(options, train, _jsonl(parts, "eval"))


def _options(raw: dict[str, Any], check_limits: CheckLimits) -> JobOptions:
    """The options, checked against the server's limits before any example is parsed (that is the costly part)."""
    try:
        options = JobOptions.model_validate(raw)
    except ValidationError as error:
        raise InvalidRequest(error.errors()) from None
    check_limits(options.config)
    return options


def _jsonl(parts: FormParts, name: str) -> ExampleSet | None:
    part = parts.get(name)
    if part is None:
        return None
    return parse_jsonl(name, part.encode() if isinstance(part, str) else part)


def _config(raw: str | bytes) -> Any:
    try:
        return strict_json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise InvalidInput(f"config is not valid JSON ({json_problem(error)})") from None


def _malformed(error: ValueError | RecursionError) -> dict[str, Any]:
    """A body that is not JSON, reported as FastAPI reports one (a 400 `malformed_json`)."""
    return {"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {json_problem(error)}"}
