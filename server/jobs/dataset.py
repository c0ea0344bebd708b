"""Train and eval sets: parsed from JSONL uploads or JSON lists, checked before anything is queued.

Every problem is reported with where it is (`train line 7`, or `train item 7` for a JSON body), so a
client can fix its file. Over-long means longer than this server's `max_input_tokens` (`</s>` included):
such an input could not be served, so a prompt trained on it would be trained on what it never sees.

Parsing a large upload takes seconds of CPU: the API runs these functions in a worker thread, never on
the event loop. Lines are strict JSON (no `NaN`/`Infinity`), split on `\n` only (JSON text may hold
U+2028 or U+0085, which `str.splitlines` would split on), and every text must be valid Unicode (a lone
surrogate such as `"\ud800"` parses, but cannot be tokenized).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prompt_store.records import text_problem
from server import strict_json
from server.jobs.errors import InvalidDataset
from server.serving.model import FrozenT5
from server.serving.schemas import MAX_TEXT_CHARS
from server.training import TrainingExample

FIELDS = ("input", "target")
SHAPE = 'each example is {"input": "...", "target": "..."}'
MORE_PROBLEMS_SHOWN = 3
JSON_WHITESPACE = " \t\r"


@dataclass
class ExampleSet:
    """Examples of one split and where each came from (for messages)."""

    name: str
    examples: list[TrainingExample] = field(default_factory=list)
    places: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Dataset:
    """What a job trains from: its examples and, with `init: "task"`, the source task's prompt as it was at
    submission (kept with the job, so that a later change to the source task cannot change the run)."""

    train: list[TrainingExample]
    eval: list[TrainingExample]
    source_prompt: torch.Tensor | None = field(default=None, compare=False)

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            name: [[e.input, e.target] for e in split] for name, split in (("train", self.train), ("eval", self.eval))
        }
        if self.source_prompt is not None:
            data["source_prompt"] = _tensor_to_json(self.source_prompt)
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Dataset:
        raw = json.loads(data)
        examples = {name: [TrainingExample(i, t) for i, t in raw[name]] for name in ("train", "eval")}
        source = raw.get("source_prompt")
        return cls(**examples, source_prompt=_tensor_from_json(source) if source is not None else None)


def _tensor_to_json(tensor: torch.Tensor) -> dict[str, Any]:
    """A float32 tensor as its shape and its little-endian bytes in base64: exact, and a third of decimal text."""
    values = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4")
    return {"shape": list(values.shape), "float32": base64.b64encode(values.tobytes()).decode()}


def _tensor_from_json(data: dict[str, Any]) -> torch.Tensor:
    values = np.frombuffer(base64.b64decode(data["float32"]), dtype="<f4").reshape(data["shape"])
    return torch.from_numpy(values.astype(np.float32))


class _Problems:
    """Counts problems, keeping the first few (a million bad lines must not keep a million messages);
    raises one `InvalidDataset` naming them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.shown: list[str] = []
        self.count = 0

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.shown) < MORE_PROBLEMS_SHOWN:
            self.shown.append(message)

    def raise_if_any(self) -> None:
        if not self.count:
            return
        more = self.count - len(self.shown)
        raise InvalidDataset("; ".join(self.shown) + (f" (and {more} more problem(s) in {self.name})" if more else ""))


def _example(item: Any, place: str, problems: _Problems) -> TrainingExample | None:
    if not isinstance(item, dict):
        problems.add(f"{place}: expected a JSON object; {SHAPE}")
        return None
    missing = [name for name in FIELDS if name not in item]
    extra = sorted(set(item) - set(FIELDS))
    wrong = [name for name in FIELDS if name in item and not isinstance(item[name], str)]
    if missing or extra or wrong:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unexpected field(s) {', '.join(extra)}"] if extra else []
        parts += [f"{', '.join(wrong)} must be a string"] if wrong else []
        problems.add(f"{place}: {'; '.join(parts)}; {SHAPE}")
        return None
    if not item["target"].strip():
        problems.add(f"{place}: the target is empty")
        return None
    for name in FIELDS:
        problem = text_problem(item[name])
        if len(item[name]) > MAX_TEXT_CHARS:
            problem = f"has {len(item[name])} characters; at most {MAX_TEXT_CHARS} are accepted"
        if problem:
            problems.add(f"{place}: the {name} {problem}")
            return None
    return TrainingExample(input=item["input"], target=item["target"])


def _collect(name: str, items: Iterable[tuple[str, Any]], problems: _Problems) -> ExampleSet:
    split = ExampleSet(name)
    for place, item in items:
        example = _example(item, place, problems)
        if example is not None:
            split.examples.append(example)
            split.places.append(place)
    problems.raise_if_any()
    if not split.examples:
        raise InvalidDataset(f"the {name} set is empty")
    return split


def parse_items(name: str, items: Any) -> ExampleSet:
    """A JSON body's list of `{"input", "target"}` objects; items are numbered from 1."""
    if not isinstance(items, list):
        raise InvalidDataset(f"{name} must be a list; {SHAPE}")
    return _collect(name, ((f"{name} item {n}", item) for n, item in enumerate(items, 1)), _Problems(name))


def parse_jsonl(name: str, data: bytes) -> ExampleSet:
    """A JSONL file: one example per line (blank lines are skipped; lines are numbered from 1)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InvalidDataset(f"{name} line {line}: not UTF-8 text") from None
    problems = _Problems(name)

    def lines() -> Iterable[tuple[str, Any]]:
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip(JSON_WHITESPACE):
                continue
            try:
                yield f"{name} line {number}", strict_json.loads(line)
            except (ValueError, RecursionError) as error:
                problems.add(f"{name} line {number}: not valid JSON ({json_problem(error)})")

    return _collect(name, lines(), problems)


def json_problem(error: ValueError | RecursionError) -> str:
    """What is wrong with a JSON text, for a client: where it broke, or why it was refused."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error)  # NaN/Infinity, or an integer of more digits than Python converts


def check_input_lengths(model: FrozenT5, split: ExampleSet, max_input_tokens: int) -> None:
    problems = _Problems(split.name)
    lengths = map(len, model.tokenize([e.input for e in split.examples]))
    for place, length in zip(split.places, lengths, strict=True):
        if length > max_input_tokens:
            problems.add(f"{place}: the input has {length} tokens; this server's limit is {max_input_tokens}")
    problems.raise_if_any()
