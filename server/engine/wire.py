"""The engine's messages as ZeroMQ multipart frames: a compact JSON header, then one raw frame per tensor.

Tensors travel as their bytes (the header names their frame, shape and dtype), never pickled: a frame from an
untrusted peer can at worst be refused. bfloat16, which numpy lacks, travels as its raw bytes like any other
dtype. Events are small and many (one `Token` per row per step), so each is a JSON list `[tag, *fields]`.

A deadline travels as the seconds it has left, not as a `time.monotonic()` value: an engine on another host has
another clock.

`decode` trusts nothing: every value is checked against its dataclass field's annotation (an `int` is an int,
never a bool or a float; a `list[int]` holds only ints; a `Literal` one of its values) and against the field's
`Rule` (numbers in range and finite, lists and strings bounded), so a decoded message cannot break the engine
thread later, and no byte sequence raises anything but `WireError`. The annotations drive it: a field added to
a protocol dataclass travels and is checked without touching this module (a number with no rule of its own is
held to `DEFAULT_RULE`).
"""

from __future__ import annotations

import json
import math
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from functools import cache, partial
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import torch
import zmq

from server.engine.protocol import (
    BeamRow,
    Cancel,
    ClassifyRow,
    Embedded,
    EmbedRow,
    EngineRequest,
    Event,
    Failed,
    Finished,
    Generated,
    GenerateRow,
    Joined,
    Scores,
    StepStats,
    Token,
)

Frame = bytes | bytearray | memoryview
HEARTBEAT_S = 0.5  # how often the engine sends each client its heartbeat, and clients ping
CLIENT_TIMEOUT_S = 5.0  # a connection that carries nothing this long (not even ZMTP heartbeats) is closed
SETTINGS_VARIABLE = "SOFTSERVE_ENGINE_SETTINGS_JSON"  # an engine child's settings, exactly its API process's


def keep_alive(socket: zmq.Socket) -> None:
    """ZMTP heartbeats on `socket`'s connections, sent and answered by libzmq's I/O thread (no GIL, no event
    loop): a connection stays while its peer process lives, and is closed after `CLIENT_TIMEOUT_S` without a
    sign of it."""
    socket.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_S * 1000))
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(CLIENT_TIMEOUT_S * 1000))


class WireError(ValueError):
    """Frames that do not make a message (a peer of another version, or not an engine peer at all)."""


@dataclass(frozen=True)
class Ping:
    """Client -> engine: `new` registers the connection (the engine answers `Hello`); later pings ask whether the
    engine still knows this client (an engine that does not answers `Hello(known=False)`)."""

    new: bool


@dataclass(frozen=True)
class Submit:
    requests: list[EngineRequest]


@dataclass(frozen=True)
class Hello:
    """Engine -> client: the engine is up, its model loaded and warmed up. The answer to a new client's `Ping`,
    then the engine's heartbeat to every client it knows.

    `engine_id` changes when the engine restarts; `known` is false when the engine does not know this client (it
    was forgotten when its connection was lost, and its rows cancelled): either way its rows in flight are lost.
    """

    engine_id: str
    known: bool


@dataclass(frozen=True)
class EventBatch:
    events: list[Event]
    stats: StepStats


Message = Ping | Submit | Cancel | Hello | EventBatch

MESSAGE_TYPES: dict[str, type[Message]] = {
    "ping": Ping,
    "submit": Submit,
    "cancel": Cancel,
    "hello": Hello,
    "events": EventBatch,
}
REQUEST_KINDS: dict[str, type[EngineRequest]] = {
    "generate": GenerateRow,
    "classify": ClassifyRow,
    "beam": BeamRow,
    "embed": EmbedRow,
}
EVENT_TAGS: dict[str, type[Event]] = {
    "J": Joined,
    "T": Token,
    "F": Finished,
    "S": Scores,
    "G": Generated,
    "X": Failed,
    "E": Embedded,
}
_TYPE_OF = {cls: name for name, cls in MESSAGE_TYPES.items()}
_KIND_OF = {cls: kind for kind, cls in REQUEST_KINDS.items()}
_TAG_OF = {cls: tag for tag, cls in EVENT_TAGS.items()}
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_DTYPE_NAME = {dtype: name for name, dtype in DTYPES.items()}

# Bounds of what one message may hold. Far above what an API process sends (its own settings bound that), they
# keep a hostile or broken peer's message from costing the engine more than a big legitimate one.
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_ROWS = 4096  # requests in one submission, and ids in one cancel
MAX_TOKENS = 65536  # token ids in one input, label or generated row
MAX_LABELS = 1024
MAX_EVENTS = 1 << 20  # events in one pass's batch
MAX_TEXT = 4096  # characters of a string (a tenant, a task id, a message)
MAX_PROMPT_ROWS = 65536
MAX_MODEL_WIDTH = 65536  # d_model
MAX_NEW_TOKENS = 1 << 20
MAX_BEAMS = 64
DAY_S = 86400.0
INT64_MAX = 2**63 - 1
TOKEN_ID_MAX = 2**31 - 1
MAX_FLOAT_INT = 2**53  # ints beyond it are not exact as floats (and beyond ~1e308 do not convert at all)


@dataclass(frozen=True)
class Rule:
    """What a field's values may be: each number in it (each number of its lists too) within `[low, high]` and
    finite unless `finite` is false; each list, dict and string in it at most `items` long."""

    low: float = 0
    high: float = TOKEN_ID_MAX
    items: int = MAX_TEXT
    finite: bool = True


DEFAULT_RULE = Rule()  # a field without a rule of its own: a count or a small id, 0 to 2**31 - 1
MAX_TOP_LOGPROBS = 64  # alternatives a token may carry (the API allows fewer)
MAX_GRAMMAR_CHARS = 1 << 22  # a row's grammar text (the API's schemas are far smaller)
RULES: dict[str, Rule] = {
    "request_id": Rule(0, INT64_MAX),
    "request_ids": Rule(0, INT64_MAX, items=MAX_ROWS),
    "requests": Rule(items=MAX_ROWS),
    "seed": Rule(0, INT64_MAX),
    "max_new_tokens": Rule(1, MAX_NEW_TOKENS),
    "num_beams": Rule(1, MAX_BEAMS),
    "temperature": Rule(0.01, 100.0),  # the API's own range: dividing scores by less can overflow them
    "top_p": Rule(math.ulp(0.0), 1.0),  # above zero
    "deadline": Rule(-DAY_S, DAY_S),  # seconds left: already past, or within a day
    "input_ids": Rule(0, TOKEN_ID_MAX, items=MAX_TOKENS),
    "targets": Rule(0, TOKEN_ID_MAX, items=MAX_TOKENS),  # labels, and each label's token ids
    "token_id": Rule(0, TOKEN_ID_MAX),
    "token_ids": Rule(0, TOKEN_ID_MAX, items=MAX_TOKENS),
    "events": Rule(items=MAX_EVENTS),
    "scores": Rule(-math.inf, math.inf, items=MAX_LABELS, finite=False),  # log-probabilities, -inf included
    "step_seconds": Rule(0, DAY_S),
    "left": Rule(0, INT64_MAX, items=64),
    "cache_tokens": Rule(0, INT64_MAX),
    "budget_spent": Rule(0, INT64_MAX),
    "vector": Rule(-math.inf, math.inf, items=MAX_MODEL_WIDTH),  # finite: the engine fails a non-finite row
    "grammar": Rule(items=MAX_GRAMMAR_CHARS),
    "logprobs": Rule(-1, MAX_TOP_LOGPROBS),  # -1: none
    "logprob": Rule(-math.inf, 0.0, finite=False),
    "top_ids": Rule(0, TOKEN_ID_MAX, items=MAX_TOP_LOGPROBS),
    "top_logprobs": Rule(-math.inf, 0.0, items=MAX_TOP_LOGPROBS, finite=False),
}


def encode(message: Message) -> list[Frame]:
    """The frames of one message: the JSON header first, then the tensors' bytes."""
    tensors: list[Frame] = []
    header: dict[str, Any] = {"type": _TYPE_OF[type(message)]}
    if isinstance(message, Submit):
        header["requests"] = [_request_header(request, tensors) for request in message.requests]
    elif isinstance(message, EventBatch):
        header["events"] = [_event_values(event) for event in message.events]
        header["stats"] = asdict(message.stats)
    else:
        header.update(asdict(message))
    return [json.dumps(header, separators=(",", ":")).encode(), *tensors]


def decode(frames: Sequence[Frame]) -> Message:
    """Raises `WireError`, and only that, for frames that are not a valid message."""
    if not frames:
        raise WireError("an empty message")
    if len(frames) > MAX_ROWS + 1:
        raise WireError(f"{len(frames)} frames in one message (at most {MAX_ROWS + 1})")
    header = _header(frames[0])
    kind = header.pop("type", None)
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise WireError(f"an unknown message type {str(kind)[:64]!r}")
    tensors = _Frames(frames)
    message = _dataclass(MESSAGE_TYPES[kind], header, tensors, kind)
    tensors.check_all_taken()
    return message


def _header(frame: Frame) -> dict[str, Any]:
    data = bytes(frame)
    if len(data) > MAX_HEADER_BYTES:
        raise WireError(f"a header of {len(data)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(data)
    except (ValueError, RecursionError) as error:  # not UTF-8 or not JSON; nested too deep to parse
        raise WireError(f"a header that is not JSON ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("a header that is not a JSON object")
    return header


class _Frames:
    """Hands out a message's tensor frames in order: each frame belongs to exactly one tensor."""

    def __init__(self, frames: Sequence[Frame]) -> None:
        self.frames = frames
        self.next = 1

    def take(self, index: int, where: str) -> Frame:
        if index != self.next or index >= len(self.frames):
            raise WireError(f"{where}: names frame {index}, not the message's next one ({self.next})")
        self.next += 1
        return self.frames[index]

    def check_all_taken(self) -> None:
        if self.next != len(self.frames):
            raise WireError(f"{len(self.frames) - self.next} frame(s) that no tensor of the message names")


# A check turns one JSON value into the value its annotation names, or raises `WireError`. Checks are compiled
# once per (annotation, rule): decoding a message is then a walk of small closures (events come by the thousand).
Check = Callable[[Any, _Frames, str], Any]


@cache
def _check(hint: Any, rule: Rule) -> Check:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return _union_check(args, rule)
    if origin is Literal:
        return _literal_check(args)
    if origin is list:
        return _list_check(args[0], rule)
    if origin is dict:
        return _dict_check(args[0], args[1], rule)
    if hint is torch.Tensor:
        return _tensor
    if is_dataclass(hint):
        return partial(_dataclass, hint)
    if hint in _SCALARS:
        return _SCALARS[hint](rule)
    raise TypeError(f"no wire form for {hint}")  # a protocol change this module must learn: found by any test


def _dataclass(cls: type, raw: Any, frames: _Frames, where: str) -> Any:
    if type(raw) is not dict:
        raise WireError(f"{where}: expected an object")
    plan = _plan(cls)
    if not raw.keys() <= plan.names:
        raise WireError(f"{where}: unknown fields {sorted(raw.keys() - plan.names)[:8]}")
    values = {}
    for name, check, required in plan.fields:
        if name in raw:
            values[name] = check(raw[name], frames, name)
        elif required:
            raise WireError(f"{where}: missing field {name!r}")
    if cls is GenerateRow and values.get("deadline") is not None:
        values["deadline"] = time.monotonic() + values["deadline"]  # seconds left, on this host's clock
    return cls(**values)


@dataclass(frozen=True)
class _Plan:
    names: frozenset[str]
    fields: tuple[tuple[str, Check, bool], ...]  # name, check, required


@cache
def _plan(cls: type) -> _Plan:
    hints = get_type_hints(cls)
    plan = tuple(
        (
            field.name,
            _check(hints[field.name], RULES.get(field.name, DEFAULT_RULE)),
            field.default is MISSING and field.default_factory is MISSING,
        )
        for field in fields(cls)
    )
    return _Plan(frozenset(name for name, _, _ in plan), plan)


def _union_check(args: tuple[Any, ...], rule: Rule) -> Check:
    options = tuple(arg for arg in args if arg is not type(None))
    if set(options) == set(REQUEST_KINDS.values()):
        inner = _request
    elif set(options) == set(EVENT_TAGS.values()):
        inner = _event
    elif len(options) == 1:
        inner = _check(options[0], rule)
    else:
        raise TypeError(f"no wire form for a union of {options}")
    if len(options) == len(args):
        return inner

    def optional(raw: Any, frames: _Frames, where: str) -> Any:
        return None if raw is None else inner(raw, frames, where)

    return optional


def _request(raw: Any, frames: _Frames, where: str) -> EngineRequest:
    """A request: an object whose `kind` names its class."""
    kind = raw.pop("kind", None) if type(raw) is dict else None
    cls = REQUEST_KINDS.get(kind) if type(kind) is str else None
    if cls is None:
        raise WireError(f"{where}: an unknown request kind {str(kind)[:64]!r}")
    return _dataclass(cls, raw, frames, where)


def _event(raw: Any, frames: _Frames, where: str) -> Event:
    """An event: a list `[tag, *values]`, its values in the order of its class's fields."""
    tag = raw[0] if type(raw) is list and raw else None
    cls = EVENT_TAGS.get(tag) if type(tag) is str else None
    if cls is None:
        raise WireError(f"{where}: an unknown event {str(tag)[:64]!r}")
    plan = _plan(cls)
    values = raw[1:]
    if len(values) != len(plan.fields):
        raise WireError(f"{where}: {len(values)} values for an event of {len(plan.fields)} fields")
    return cls(*[check(value, frames, name) for value, (name, check, _) in zip(values, plan.fields, strict=True)])


def _literal_check(options: tuple[Any, ...]) -> Check:
    kinds, values = {type(option) for option in options}, frozenset(options)

    def literal(raw: Any, frames: _Frames, where: str) -> Any:
        if type(raw) not in kinds or raw not in values:  # the type first: a list is not hashable, True == 1
            raise WireError(f"{where}: {str(raw)[:64]!r} is not one of {list(options)}")
        return raw

    return literal


def _list_check(item_hint: Any, rule: Rule) -> Check:
    if item_hint is int:  # token ids and request ids, by the thousand: checked in one pass

        def ints(raw: Any, frames: _Frames, where: str) -> list[int]:
            _sized(raw, list, rule, where)
            if not all(type(item) is int and rule.low <= item <= rule.high for item in raw):
                raise WireError(f"{where}: expected integers within [{rule.low:g}, {rule.high:g}]")
            return raw

        return ints
    item = _check(item_hint, rule)

    def items(raw: Any, frames: _Frames, where: str) -> list[Any]:
        return [item(value, frames, where) for value in _sized(raw, list, rule, where)]

    return items


def _dict_check(key_hint: Any, value_hint: Any, rule: Rule) -> Check:
    key, value = _check(key_hint, rule), _check(value_hint, rule)

    def mapping(raw: Any, frames: _Frames, where: str) -> dict[Any, Any]:
        return {key(k, frames, where): value(v, frames, where) for k, v in _sized(raw, dict, rule, where).items()}

    return mapping


def _tensor(raw: Any, frames: _Frames, where: str) -> torch.Tensor:
    """A 2-D `[rows, width]` tensor from the next frame, whose size must be exactly the shape's."""
    header = _dataclass(_TensorHeader, raw, frames, where)
    dtype = DTYPES.get(header.dtype)
    if dtype is None:
        raise WireError(f"{where}: an unknown tensor dtype {header.dtype[:64]!r}")
    data = frames.take(header.frame, where)
    expected, size = math.prod(header.shape) * dtype.itemsize, memoryview(data).nbytes
    if size != expected:
        raise WireError(f"{where}: a tensor frame of {size} bytes for shape {header.shape} {header.dtype}")
    if expected == 0:
        return torch.empty(header.shape, dtype=dtype)
    # A writable copy: torch warns about (and must not write to) the read-only buffer a frame is.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(header.shape)


@dataclass(frozen=True)
class _TensorHeader:
    frame: int
    shape: list[int]
    dtype: str

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or self.shape[0] > MAX_PROMPT_ROWS or self.shape[1] > MAX_MODEL_WIDTH:
            raise WireError(f"a tensor of shape {self.shape}: a prompt is [rows, width] within the wire's bounds")


def _sized(raw: Any, kind: type, rule: Rule, where: str) -> Any:
    if type(raw) is not kind:
        raise WireError(f"{where}: expected a {kind.__name__}")
    if len(raw) > rule.items:
        raise WireError(f"{where}: {len(raw)} items (at most {rule.items})")
    return raw


def _bool_check(rule: Rule) -> Check:
    def boolean(raw: Any, frames: _Frames, where: str) -> bool:
        if type(raw) is not bool:
            raise WireError(f"{where}: expected true or false")
        return raw

    return boolean


def _str_check(rule: Rule) -> Check:
    def string(raw: Any, frames: _Frames, where: str) -> str:
        if type(raw) is not str or len(raw) > rule.items:
            raise WireError(f"{where}: expected a string of at most {rule.items} characters")
        return raw

    return string


def _int_check(rule: Rule) -> Check:
    def integer(raw: Any, frames: _Frames, where: str) -> int:
        if type(raw) is not int or not rule.low <= raw <= rule.high:
            raise WireError(f"{where}: expected an integer within [{rule.low:g}, {rule.high:g}]")
        return raw

    return integer


def _float_check(rule: Rule) -> Check:
    def number(raw: Any, frames: _Frames, where: str) -> float:
        if type(raw) is int:  # JSON has one kind of number: `1` is a float too; compared exactly, however large
            if not rule.low <= raw <= rule.high or abs(raw) > MAX_FLOAT_INT:
                raise WireError(f"{where}: {str(raw)[:32]} is outside [{rule.low:g}, {rule.high:g}]")
            return float(raw)
        if type(raw) is not float:
            raise WireError(f"{where}: expected a number")
        if rule.finite and not math.isfinite(raw):
            raise WireError(f"{where}: expected a finite number")
        return _in_range(raw, rule, where)

    return number


_SCALARS: dict[type, Callable[[Rule], Check]] = {
    bool: _bool_check,
    str: _str_check,
    int: _int_check,
    float: _float_check,
}


def _in_range(number: float, rule: Rule, where: str) -> float:
    # NaN fails both comparisons: refused unless the rule takes non-finite numbers.
    if not rule.low <= number <= rule.high and not (not rule.finite and math.isnan(number)):
        raise WireError(f"{where}: {str(number)[:32]} is outside [{rule.low:g}, {rule.high:g}]")
    return number


def _request_header(request: EngineRequest, tensors: list[Frame]) -> dict[str, Any]:
    header = {field.name: getattr(request, field.name) for field in fields(request)}
    header["kind"] = _KIND_OF[type(request)]
    header["row"] = {"input_ids": request.row.input_ids, "prompt": _tensor_header(request.row.prompt, tensors)}
    if isinstance(request, GenerateRow):
        header["sampling"] = asdict(request.sampling)
        header["deadline"] = None if request.deadline is None else request.deadline - time.monotonic()
    return header


def _tensor_header(tensor: torch.Tensor, tensors: list[Frame]) -> dict[str, Any]:
    """Appends the tensor's bytes to `tensors` and returns what names them. Viewing the bytes as uint8 is what
    lets bfloat16 through numpy's buffer protocol."""
    if tensor.dtype not in _DTYPE_NAME:
        raise WireError(f"tensors of dtype {tensor.dtype} do not travel")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    tensors.append(memoryview(flat.view(torch.uint8).numpy()))
    return {"frame": len(tensors), "shape": list(tensor.shape), "dtype": _DTYPE_NAME[tensor.dtype]}


def _event_values(event: Event) -> list[Any]:
    return [_TAG_OF[type(event)], *(getattr(event, field.name) for field in fields(event))]
