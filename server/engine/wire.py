"""The engine's messages as ZeroMQ multipart frames: a compact JSON header, then one raw frame per tensor.

Tensors travel as their bytes (the header names their frame, shape and dtype), never pickled: a frame from an
untrusted peer can at worst be refused. bfloat16, which numpy lacks, travels as its raw bytes like any other
dtype. Events are small and many (one `Token` per row per step), so each is a JSON list `[tag, *fields]`.

A deadline travels as the seconds it has left, not as a `time.monotonic()` value: an engine on another host has
another clock.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from server.engine.protocol import (
    BeamRow,
    Cancel,
    ClassifyRow,
    EngineRequest,
    Event,
    Failed,
    Finished,
    Generated,
    GenerateRow,
    Joined,
    RowInput,
    Sampling,
    Scores,
    StepStats,
    Token,
)

Frame = bytes | bytearray | memoryview


class WireError(ValueError):
    """Frames that do not make a message (a peer of another version, or not an engine peer at all)."""


@dataclass(frozen=True)
class Ping:
    """Client -> engine, every heartbeat: "I am alive". `new` until the client's first `Hello`, so the engine
    can tell a newcomer from a client it has forgotten."""

    new: bool


@dataclass(frozen=True)
class Submit:
    requests: list[EngineRequest]


@dataclass(frozen=True)
class Hello:
    """Engine -> client, the answer to every `Ping`: the engine is up, its model loaded and warmed up.

    `engine_id` changes when the engine restarts; `known` is false when the engine has forgotten this client
    (and cancelled its rows) after it fell silent: either way the client's rows in flight are lost.
    """

    engine_id: str
    known: bool


@dataclass(frozen=True)
class EventBatch:
    events: list[Event]
    stats: StepStats


Message = Ping | Submit | Cancel | Hello | EventBatch

REQUEST_KINDS: dict[str, type[EngineRequest]] = {"generate": GenerateRow, "classify": ClassifyRow, "beam": BeamRow}
EVENT_TAGS: dict[str, type[Event]] = {
    "J": Joined,
    "T": Token,
    "F": Finished,
    "S": Scores,
    "G": Generated,
    "X": Failed,
}
_KIND_OF = {cls: kind for kind, cls in REQUEST_KINDS.items()}
_TAG_OF = {cls: tag for tag, cls in EVENT_TAGS.items()}
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_DTYPE_NAME = {dtype: name for name, dtype in DTYPES.items()}


def encode(message: Message) -> list[Frame]:
    """The frames of one message: the JSON header first, then the tensors' bytes."""
    tensors: list[Frame] = []
    if isinstance(message, Submit):
        header: dict[str, Any] = {
            "type": "submit",
            "requests": [_request_header(request, tensors) for request in message.requests],
        }
    elif isinstance(message, Cancel):
        header = {"type": "cancel", "request_ids": message.request_ids}
    elif isinstance(message, Ping):
        header = {"type": "ping", "new": message.new}
    elif isinstance(message, Hello):
        header = {"type": "hello", "engine_id": message.engine_id, "known": message.known}
    else:
        header = {
            "type": "events",
            "events": [_event_values(event) for event in message.events],
            "stats": asdict(message.stats),
        }
    return [json.dumps(header, separators=(",", ":")).encode(), *tensors]


def decode(frames: Sequence[Frame]) -> Message:
    """Raises `WireError` for frames that are not a message."""
    if not frames:
        raise WireError("an empty message")
    try:
        header = json.loads(bytes(frames[0]))
        kind = header["type"]
        if kind == "submit":
            return Submit([_request(item, frames) for item in header["requests"]])
        if kind == "cancel":
            return Cancel([int(request_id) for request_id in header["request_ids"]])
        if kind == "ping":
            return Ping(bool(header["new"]))
        if kind == "hello":
            return Hello(str(header["engine_id"]), bool(header["known"]))
        if kind == "events":
            return EventBatch([_event(values) for values in header["events"]], StepStats(**header["stats"]))
    except WireError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise WireError(f"a malformed message ({type(error).__name__}: {error})") from None
    raise WireError(f"an unknown message type {kind!r}")


def _request_header(request: EngineRequest, tensors: list[Frame]) -> dict[str, Any]:
    header = {field.name: getattr(request, field.name) for field in fields(request)}
    header["kind"] = _KIND_OF[type(request)]
    header["row"] = {"input_ids": request.row.input_ids, "prompt": _tensor_header(request.row.prompt, tensors)}
    if isinstance(request, GenerateRow):
        header["sampling"] = asdict(request.sampling)
        header["deadline"] = None if request.deadline is None else request.deadline - time.monotonic()
    return header


def _request(header: dict[str, Any], frames: Sequence[Frame]) -> EngineRequest:
    values = dict(header)
    cls = REQUEST_KINDS[values.pop("kind")]
    row = values["row"]
    values["row"] = RowInput(prompt=_tensor(row["prompt"], frames), input_ids=[int(i) for i in row["input_ids"]])
    if cls is GenerateRow:
        values["sampling"] = Sampling(**values["sampling"])
        if values["deadline"] is not None:
            values["deadline"] = time.monotonic() + float(values["deadline"])
    return cls(**values)


def _tensor_header(tensor: torch.Tensor, tensors: list[Frame]) -> dict[str, Any]:
    """Appends the tensor's bytes to `tensors` and returns what names them. Viewing the bytes as uint8 is what
    lets bfloat16 through numpy's buffer protocol."""
    if tensor.dtype not in _DTYPE_NAME:
        raise WireError(f"tensors of dtype {tensor.dtype} do not travel")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    tensors.append(memoryview(flat.view(torch.uint8).numpy()))
    return {"frame": len(tensors), "shape": list(tensor.shape), "dtype": _DTYPE_NAME[tensor.dtype]}


def _tensor(header: dict[str, Any], frames: Sequence[Frame]) -> torch.Tensor:
    dtype = DTYPES.get(header["dtype"])
    if dtype is None:
        raise WireError(f"an unknown tensor dtype {header['dtype']!r}")
    index, shape = int(header["frame"]), [int(size) for size in header["shape"]]
    if not 1 <= index < len(frames) or any(size < 0 for size in shape):
        raise WireError(f"a tensor header that names no frame of its message: {header}")
    data = frames[index]
    expected, size = math.prod(shape) * dtype.itemsize, memoryview(data).nbytes
    if size != expected:
        raise WireError(f"a tensor frame of {size} bytes for shape {shape} {dtype}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # A writable copy: torch warns about (and must not write to) the read-only buffer a frame is.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _event_values(event: Event) -> list[Any]:
    return [_TAG_OF[type(event)], *(getattr(event, field.name) for field in fields(event))]


def _event(values: list[Any]) -> Event:
    tag, *rest = values
    return EVENT_TAGS[tag](*rest)
