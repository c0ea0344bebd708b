"""The engine's wire against a hostile network: `decode` turns any bytes into a valid message or a `WireError`
(property-based, with hypothesis), a real engine process survives thousands of junk frames and still serves,
tcp serves only CURVE-authorised clients, and liveness judges the right party: an API process whose event loop
is blocked keeps its engine and its rows, while a client that really falls silent loses only its own rows."""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.cli import main as cli_main
from server.engine.curve import ClientKeys, make_keys
from server.engine.process_link import DEAD_AFTER_S, EngineStartFailed, ProcessLink
from server.engine.protocol import (
    BeamRow,
    Cancel,
    ClassifyRow,
    EngineRequest,
    Failed,
    Finished,
    GenerateRow,
    RowInput,
    Sampling,
    StepStats,
    Token,
)
from server.engine.wire import (
    CLIENT_TIMEOUT_S,
    MESSAGE_TYPES,
    EventBatch,
    Hello,
    Message,
    Ping,
    Submit,
    WireError,
    decode,
    encode,
)
from server.metrics import ServerMetrics
from server.serving.model import FrozenT5
from server.testing.reference import random_prompt
from tests.serving import free_port
from tests.test_engine_process import (
    Recorder,
    assert_served_like_generate,
    engine_settings,
    greedy_row,
    linked,
    shared_engine,
)

D_MODEL = 64  # the tiny model's


def valid_messages() -> list[Message]:
    prompt = random_prompt(3, D_MODEL, seed=1)
    requests: list[EngineRequest] = [
        GenerateRow(
            7, "acme", RowInput(prompt, [4, 5, 1]), Sampling(True, 0.7, 0.9, 3), 12, True, time.monotonic() + 9
        ),
        ClassifyRow(9, "other", RowInput(prompt[:0], [6, 1]), [[3, 1], [4, 4, 1]]),
        BeamRow(10, "other", RowInput(prompt.to(torch.bfloat16), [1]), 4, 9, True, 0.5, 0.8, 11, True),
    ]
    events = [Token(1, 42), Finished(1, "eos"), Failed(4, "overloaded", "no room")]
    return [
        Submit(requests),
        Cancel([1, 2, 2**63 - 1]),
        Ping(True),
        Hello("e1", False),
        EventBatch(events, StepStats(0.01, 3, 2, 1, {"eos": 1})),
    ]


def header_of(message: Message) -> tuple[dict[str, Any], list[bytes]]:
    head, *tensors = encode(message)
    return json.loads(bytes(head)), [bytes(frame) for frame in tensors]


VALID = [header_of(message) for message in valid_messages()]

# Values that broke the engine process before: huge numbers, wrong types, unhashable ids, non-finite floats.
HOSTILE_VALUES = [10**400, -(10**400), 2**63, 2**31, -1, 0, 1e400, -1e400, math.nan, 1.5, True, None, "", "7", [], {}]
HOSTILE = st.sampled_from(HOSTILE_VALUES)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | HOSTILE,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value (dict keys and list indices), the value itself included."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        yield from paths(child, (*prefix, key))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    child = value.get(path[0]) if isinstance(value, dict) else value[path[0]]
    copy[path[0]] = replaced(child, path[1:], new)
    return copy


@st.composite
def mutated_frames(draw: st.DrawFn) -> list[bytes]:
    """A valid message with one place in its header replaced by junk, and its tensor frames kept, cut or added."""
    header, tensors = draw(st.sampled_from(VALID))
    path = draw(st.sampled_from(list(paths(header))))
    header = replaced(header, path, draw(st.integers(0, 64) | st.floats(0.05, 1.0) | JSON))  # some stay valid
    text = json.dumps(header, separators=(",", ":"))  # NaN and Infinity literals too: json.loads accepts them
    frames = [text.encode(), *tensors]
    cut = draw(st.integers(0, 2))
    return frames[: len(frames) - cut] if cut < len(frames) else [*frames, draw(st.binary(max_size=64))]


FRAMES = st.one_of(
    mutated_frames(),
    st.lists(st.binary(max_size=64), max_size=4),
    st.builds(lambda value: [json.dumps(value).encode()], JSON),
    st.builds(
        lambda kind, value: [json.dumps({"type": kind, **value}).encode()],
        st.sampled_from(list(MESSAGE_TYPES)),
        st.dictionaries(st.sampled_from(["requests", "request_ids", "new", "engine_id", "known", "events"]), JSON),
    ),
)


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(FRAMES)
def test_decode_gives_a_valid_message_or_a_wire_error_for_any_frames(frames: list[bytes]) -> None:
    try:
        message = decode(frames)
    except WireError:
        return
    assert_valid(message)


def assert_valid(message: Message) -> None:
    """What the engine thread relies on: exact types in range, finite numbers, 2-D prompts; and the message
    travels again unchanged."""
    assert isinstance(message, tuple(MESSAGE_TYPES.values()))
    if isinstance(message, Submit):
        for request in message.requests:
            assert type(request.request_id) is int and 0 <= request.request_id < 2**63
            assert request.row.prompt.dim() == 2
            assert all(type(token) is int and 0 <= token < 2**31 for token in request.row.input_ids)
            if isinstance(request, GenerateRow):
                assert type(request.max_new_tokens) is int and request.max_new_tokens >= 1
                assert request.sampling.seed is None or 0 <= request.sampling.seed < 2**63
                assert 0 < request.sampling.temperature <= 100 and 0 < request.sampling.top_p <= 1
                assert request.deadline is None or math.isfinite(request.deadline)
    if isinstance(message, Cancel):
        assert all(type(request_id) is int for request_id in message.request_ids)
    decode([bytes(frame) for frame in encode(message)])


@pytest.mark.parametrize(
    "header",
    [
        b'{"type":"cancel","request_ids":[1e400]}',
        b'{"type":"cancel","request_ids":[100000000000000000000000000000000]}',
        b'{"type":"cancel","request_ids":[[1]]}',
        b'{"type":"cancel","request_ids":[true]}',
        b'{"type":"ping","new":1}',
        b'{"type":"hello","engine_id":["x"],"known":true}',
        b"[" * 200_000,
        b'{"type":' * 100_000,
        b'{"type":"events","events":[["T",1,2,3]],"stats":{}}',
        b'{"type":"events","events":[["F",1,"bored"]],"stats":{}}',
        b"\xff\xfe\x00",
    ],
)
def test_the_frames_that_ended_the_engine_are_refused(header: bytes) -> None:
    with pytest.raises(WireError):
        decode([header])


@pytest.mark.parametrize(
    ("place", "value"),
    [
        (("deadline",), 10**400),
        (("deadline",), 1e300),
        (("sampling", "seed"), "7"),
        (("sampling", "seed"), 2**64),
        (("sampling", "temperature"), 0),
        (("sampling", "top_p"), 0),
        (("max_new_tokens",), "12"),
        (("max_new_tokens",), 0),
        (("max_new_tokens",), 12.0),
        (("request_id",), [1]),
        (("request_id",), {"a": 1}),
        (("row", "input_ids"), [2**31]),
        (("row", "prompt", "shape"), [3, 64, 1]),
        (("row", "prompt", "shape"), [4, 64]),
        (("row", "prompt", "frame"), 2),
        (("ignore_eos",), 0),
        (("unknown",), 1),
    ],
)
def test_a_generate_row_with_any_value_out_of_its_range_is_refused(place: tuple[str, ...], value: Any) -> None:
    row = GenerateRow(1, "t", RowInput(random_prompt(3, D_MODEL, seed=1), [4, 1]), Sampling(True), 12)
    header, tensors = header_of(Submit([row]))
    header["requests"][0] = replaced(header["requests"][0], place, value)
    with pytest.raises(WireError):
        decode([json.dumps(header).encode(), *tensors])


def test_every_protocol_field_travels_and_is_checked_by_its_annotation() -> None:
    """The decoder is driven by the dataclasses: every field of every message round-trips (a field added to the
    protocol travels without a change here), and a bool where a number belongs is refused in every one."""
    for message in valid_messages():
        header, tensors = header_of(message)
        assert header_of(decode([json.dumps(header).encode(), *tensors]))[0].keys() == header.keys()
    row = GenerateRow(1, "t", RowInput(random_prompt(3, D_MODEL, seed=1), [4, 1]), Sampling(True, seed=5), 12)
    header, tensors = header_of(Submit([row]))
    numbers = [f.name for f in fields(GenerateRow) if f.type in ("int", "float | None")]
    numbers += [f"sampling.{f.name}" for f in fields(Sampling) if f.type in ("float", "int | None")]
    assert len(numbers) >= 6
    for name in numbers:
        place = tuple(name.split("."))
        broken = replaced(header, ("requests", 0, *place), True)
        with pytest.raises(WireError):
            decode([json.dumps(broken).encode(), *tensors])


# A real engine process: `softserve engine` on tcp with CURVE keys, as an operator runs it.


@pytest.fixture(scope="module")
def curve_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    root = tmp_path_factory.mktemp("curve-engine")
    keys, address = root / "keys", f"tcp://127.0.0.1:{free_port()}"
    make_keys(keys)
    with shared_engine(address, root / "engine.log", "--engine-keys-dir", str(keys)) as engine:
        yield address, keys, engine


def dealer(context: zmq.Context, address: str, keys: ClientKeys | None) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.secure(socket)
    socket.connect(address)
    return socket


def heard(socket: zmq.Socket, timeout_s: float) -> Message | None:
    """The next valid message within the timeout, if any."""
    deadline = time.monotonic() + timeout_s
    while socket.poll(max(deadline - time.monotonic(), 0) * 1000):
        try:
            return decode(socket.recv_multipart())
        except WireError:
            continue
    return None


def test_tcp_serves_only_clients_with_an_authorised_key(curve_engine: tuple[str, Path, Any]) -> None:
    """A plaintext peer fails the CURVE handshake, a peer with a key of its own is denied by the allow-list:
    neither hears anything, while the authorised client is greeted at once."""
    address, keys, _ = curve_engine
    stranger_public, stranger_secret = zmq.curve_keypair()
    authorised = ClientKeys.load(keys)
    strangers = [None, ClientKeys(stranger_public, stranger_secret, authorised.engine)]
    with zmq.Context() as context:
        sockets = [dealer(context, address, client) for client in [authorised, *strangers]]
        for socket in sockets:
            socket.send_multipart(encode(Ping(new=True)))
        greeted = heard(sockets[0], 10)
        assert isinstance(greeted, Hello) and greeted.known
        for socket in sockets[1:]:
            assert heard(socket, 2.0) is None


def test_tcp_without_keys_is_refused_at_start_by_both_ends(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as exited:
        cli_main(["engine", "--address", address, "--model", "tiny"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {address} needs CURVE keys: make them with `softserve engine-keys DIR` and give DIR to the engine "
        "and to every API process (--engine-keys-dir), or set --engine-insecure-tcp true to serve anyone who reaches "
        "the port"
    ]

    async def api_side() -> None:
        with pytest.raises(EngineStartFailed, match=r"needs CURVE keys.*--engine-insecure-tcp"):
            async with linked(engine_settings(engine_address=address)):
                pass

    asyncio.run(api_side())


def junk_frames(rng: random.Random) -> list[bytes]:
    """One junk message: random bytes, random JSON, or a valid message with one place replaced by a hostile
    value (some of those stay valid, and are served or refused by the engine as any message)."""
    kind = rng.randrange(4)
    if kind == 0:
        return [rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(1, 4))]
    if kind == 1:
        return [json.dumps(random_json(rng, depth=3)).encode()]
    if kind == 2:
        return [rng.choice([b"[" * 200_000, b'{"type":"cancel","request_ids":[1e400]}', b"\xff"])]
    header, tensors = rng.choice(VALID)
    path = rng.choice(list(paths(header)))
    value = rng.choice([*HOSTILE_VALUES, random_json(rng, depth=2), rng.randrange(300)])
    return [json.dumps(replaced(header, path, value)).encode(), *tensors[: rng.randrange(len(tensors) + 1)]]


def random_json(rng: random.Random, depth: int) -> Any:
    if depth == 0 or rng.random() < 0.4:
        return rng.choice([*HOSTILE_VALUES, rng.random(), rng.randrange(-5, 5), "type", "submit"])
    if rng.random() < 0.5:
        return [random_json(rng, depth - 1) for _ in range(rng.randrange(4))]
    names = ["type", "requests", "request_ids", "new", "kind", "row", "prompt", "events", "stats"]
    return {rng.choice(names): random_json(rng, depth - 1) for _ in range(rng.randrange(4))}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def sync(socket: zmq.Socket) -> None:
    """Returns once the engine has handled everything sent before: a row it refuses at once (a prompt of the
    wrong width) is answered after the messages ahead of it."""
    marker = ClassifyRow(2**62, "sync", RowInput(torch.zeros(1, 1), [1]), [[1]])
    socket.send_multipart(encode(Submit([marker])))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = heard(socket, deadline - time.monotonic())
        if isinstance(message, EventBatch) and any(event.request_id == 2**62 for event in message.events):
            return
    raise AssertionError("the engine did not answer the marker")


def send_junk(socket: zmq.Socket, rng: random.Random, count: int) -> None:
    for _ in range(count):
        socket.send_multipart(junk_frames(rng))
        while socket.poll(0):  # its answers (refusals, served junk rows) are not read by anyone else
            socket.recv_multipart()
    sync(socket)


JUNK_ROUNDS = 3
JUNK_MESSAGES = 2500  # per round
RSS_GROWTH_LIMIT_KIB = 8 * 1024  # per round: a leak of 3.3 KiB a message or more fails


def test_thousands_of_junk_frames_leave_the_engine_serving_with_flat_memory(
    curve_engine: tuple[str, Path, subprocess.Popen[bytes]], tiny: FrozenT5
) -> None:
    """From an authorised client (the worst a stranger could do once it has a key, or a broken client): the
    engine drops or answers each message, and afterwards serves a row exactly. Memory stays flat: after a warm-up
    round, a leak would grow RSS in every round of `JUNK_MESSAGES`, so the rounds after the first must not all grow
    by `RSS_GROWTH_LIMIT_KIB` (one round may: a new shape's buffers, the allocator's arenas under a busy machine;
    one grew 17.6 MiB in a full suite run while its neighbours grew 3-11)."""
    address, keys, engine = curve_engine
    rng = random.Random(18)
    with zmq.Context() as context:
        socket = dealer(context, address, ClientKeys.load(keys))
        socket.send_multipart(encode(Ping(new=True)))
        assert isinstance(heard(socket, 10), Hello)
        # Warm-up: the junk that stays valid is served, and the model's first passes of each shape fill torch's
        # caches (about 20 MiB on `tiny`); after it RSS moves by a few MiB either way.
        send_junk(socket, rng, 1000)
        readings = [rss_kib(engine.pid)]
        for _ in range(JUNK_ROUNDS):
            send_junk(socket, rng, JUNK_MESSAGES)
            readings.append(rss_kib(engine.pid))
    assert engine.poll() is None
    growth = [after - before for before, after in itertools.pairwise(readings)]
    assert min(growth[1:]) < RSS_GROWTH_LIMIT_KIB, readings
    print(f"engine RSS by round (KiB): {readings}")

    async def served() -> None:
        async with linked(engine_settings(engine_address=address, engine_keys_dir=keys)) as (link, recorder):
            row = greedy_row(1, 3, tiny.d_model)
            link.submit([row])
            await recorder.until(lambda: recorder.finished(1))
            assert_served_like_generate(recorder, 1, tiny, row)

    asyncio.run(served())


# Liveness: each party judged by its own signs of life.


def hold_the_gil(seconds: float) -> None:
    """Blocks this thread and every other Python thread of the process: a C call made through `PyDLL` keeps the
    GIL, as a huge body parsed in one C call does (`time.sleep` would release it)."""
    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))


def endless_row(request_id: int, seed: int, d_model: int) -> GenerateRow:
    prompt = random_prompt(3, d_model, seed=seed)
    return GenerateRow(request_id, "t", RowInput(prompt, [1]), Sampling(), 50_000, ignore_eos=True)


def test_a_blocked_event_loop_keeps_its_healthy_engine_and_its_rows(tiny: FrozenT5) -> None:
    """The API process's loop (and its GIL) blocked past `CLIENT_TIMEOUT_S`: the engine keeps the client, its row
    goes on, and the link neither reports the engine down nor restarts it (same pid, restart counter 0)."""
    metrics = ServerMetrics()

    def restarts() -> float | None:
        return metrics.registry.get_sample_value("softserve_engine_restarts_total")

    async def scenario() -> None:
        link, recorder = ProcessLink(engine_settings(), metrics=metrics.engine), Recorder()
        await link.start(recorder.deliver, recorder.down, recorder.up)
        try:
            assert link.child is not None
            pid = link.child.pid
            link.submit([endless_row(1, 5, tiny.d_model)])
            await recorder.until(lambda: len(recorder.tokens(1)) >= 3)
            hold_the_gil(CLIENT_TIMEOUT_S + 1)
            before = len(recorder.tokens(1))
            await recorder.until(lambda: len(recorder.tokens(1)) > before + 20)  # the row lived through it
            await asyncio.sleep(2 * DEAD_AFTER_S)  # time for the link to misjudge, were it going to
            assert recorder.downs == [] and recorder.ups == 1
            assert link.child is not None and link.child.pid == pid and link.child.returncode is None
            assert restarts() == 0
            link.cancel([1])
            await recorder.until(lambda: recorder.finished(1))
            assert recorder.events[1][-1] == Finished(1, "cancelled")
            row = greedy_row(2, 6, tiny.d_model)
            link.submit([row])
            await recorder.until(lambda: recorder.finished(2))
            assert_served_like_generate(recorder, 2, tiny, row)
        finally:
            await link.stop()

    asyncio.run(scenario())


SILENT_CLIENT = """
import sys, time, pickle, zmq
address, frames_file = sys.argv[1:]
socket = zmq.Context().socket(zmq.DEALER)
keys = pickle.loads(open(frames_file, "rb").read())
socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = keys["curve"]
socket.connect(address)
socket.send_multipart(keys["ping"])
socket.recv_multipart()
socket.send_multipart(keys["submit"])
print("submitted", flush=True)
time.sleep(600)
"""


@pytest.mark.timing
def test_a_client_that_falls_silent_loses_its_own_rows_only(
    curve_engine: tuple[str, Path, subprocess.Popen[bytes]], tiny: FrozenT5, tmp_path: Path
) -> None:
    """A stopped API process (SIGSTOP: its libzmq answers no heartbeat) is forgotten after `CLIENT_TIMEOUT_S`:
    its endless row leaves the step as `cancelled`, while B, sharing those steps, keeps its row and its engine."""
    address, keys, engine = curve_engine
    client_keys = ClientKeys.load(keys)
    frames_file = tmp_path / "frames.pickle"
    frames_file.write_bytes(
        pickle.dumps(
            {
                "curve": (client_keys.secret, client_keys.public, client_keys.engine),
                "ping": [bytes(frame) for frame in encode(Ping(new=True))],
                "submit": [bytes(frame) for frame in encode(Submit([endless_row(1, 8, tiny.d_model)]))],
            }
        )
    )
    silent = subprocess.Popen(
        [sys.executable, "-c", SILENT_CLIENT, address, str(frames_file)], stdout=subprocess.PIPE, text=True
    )

    async def scenario() -> None:
        settings = engine_settings(engine_address=address, engine_keys_dir=keys)
        async with linked(settings) as (b, heard_b):
            b.submit([endless_row(1, 9, tiny.d_model)])
            await heard_b.until(lambda: any(stats.active_rows == 2 for stats in heard_b.stats), timeout_s=30)
            os.kill(silent.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            await heard_b.until(lambda: any(s.left.get("cancelled") for s in heard_b.stats), timeout_s=20)
            took = time.monotonic() - stopped
            assert CLIENT_TIMEOUT_S - 1 < took < CLIENT_TIMEOUT_S + 5, took
            assert heard_b.downs == [] and not heard_b.finished(1)
            b.cancel([1])
            await heard_b.until(lambda: heard_b.finished(1))

    try:
        assert silent.stdout is not None and silent.stdout.readline().strip() == "submitted"
        asyncio.run(scenario())
    finally:
        silent.kill()
        silent.wait()
    assert engine.poll() is None


async def greet(router: zmq.asyncio.Socket, engine_id: str) -> bytes:
    """Plays the engine's part of a connection's start: answers the first `Ping(new=True)`; returns who sent it."""
    while True:
        identity, *frames = await router.recv_multipart()
        message = decode(frames)
        if isinstance(message, Ping) and message.new:
            await router.send_multipart([identity, *encode(Hello(engine_id, known=True))])
            return identity


def test_an_engine_that_forgot_the_client_costs_it_its_rows_and_its_connection_only(tmp_path: Path) -> None:
    """`Hello(known=False)` (the engine lost this client's connection a while): the link reports its rows lost and
    reconnects with a new identity to the same engine, which is not counted as a restart. The engine here is a
    bare ROUTER playing its part, so that it can forget on cue."""
    address = f"ipc://{tmp_path}/engine.sock"
    metrics = ServerMetrics()

    async def scenario() -> None:
        context = zmq.asyncio.Context()
        router = context.socket(zmq.ROUTER)
        router.bind(address)
        link, recorder = ProcessLink(engine_settings(engine_address=address), metrics=metrics.engine), Recorder()
        try:
            starting = asyncio.create_task(link.start(recorder.deliver, recorder.down, recorder.up))
            first = await greet(router, "e1")
            await starting
            router.send_multipart([first, *encode(Hello("e1", known=False))])
            await recorder.until(lambda: bool(recorder.downs), timeout_s=10)
            assert "forgot this client" in recorder.downs[0]
            second = await greet(router, "e1")
            await recorder.until(lambda: recorder.ups == 2, timeout_s=10)
            assert second != first and len(recorder.downs) == 1
            assert metrics.registry.get_sample_value("softserve_engine_restarts_total") == 0
        finally:
            await link.stop()
            context.destroy(linger=0)

    asyncio.run(scenario())
