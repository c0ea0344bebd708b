"""The engine in its own process: the wire format, a real child engine, a shared `softserve engine`, and what
happens when an engine dies (down, then up again once one answers)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from server.engine.curve import make_keys
from server.engine.engine import Engine
from server.engine.limits import EngineLimits
from server.engine.process import ClientTable
from server.engine.process_link import EngineStartFailed, ProcessLink
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
from server.engine.wire import EventBatch, Hello, Ping, Submit, WireError, decode, encode
from server.serving.model import Decoding, FrozenT5, Row
from server.settings import Settings
from server.testing.reference import random_prompt
from tests.serving import free_port

FINAL = (Finished, Scores, Generated, Failed)


# The wire.


def frames_of(message: object) -> list[bytes]:
    """What the other end receives: every frame as bytes."""
    return [bytes(frame) for frame in encode(message)]  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requests_round_trip_with_their_tensors_bit_for_bit(dtype: torch.dtype) -> None:
    prompt = random_prompt(5, 16, seed=1).to(dtype)
    deadline = time.monotonic() + 30
    requests: list[EngineRequest] = [
        GenerateRow(7, "acme", RowInput(prompt, [4, 5, 1]), Sampling(True, 0.7, 0.9, 3), 12, True, deadline),
        GenerateRow(8, "acme", RowInput(prompt[:2], [1]), Sampling(), 4),
        ClassifyRow(9, "other", RowInput(prompt[:0], [6, 1]), [[3, 1], [4, 4, 1]]),
        BeamRow(10, "other", RowInput(prompt.T.contiguous(), [1]), 4, 9, True, 0.5, 0.8, 11, True),
    ]
    decoded = decode(frames_of(Submit(requests)))
    assert isinstance(decoded, Submit)
    assert len(decoded.requests) == len(requests)
    for sent, got in zip(requests, decoded.requests, strict=True):
        assert got.row.prompt.dtype == dtype and got.row.prompt.shape == sent.row.prompt.shape
        assert torch.equal(raw_bytes(got.row.prompt), raw_bytes(sent.row.prompt))
        same_tensor: dict[str, object] = {"row": RowInput(sent.row.prompt, got.row.input_ids)}
        if isinstance(sent, GenerateRow) and sent.deadline is not None:
            assert isinstance(got, GenerateRow) and got.deadline is not None
            assert abs(got.deadline - sent.deadline) < 1.0  # travelled as seconds left, not as a clock reading
            same_tensor["deadline"] = sent.deadline
        assert replace(got, **same_tensor) == sent


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_every_event_kind_and_the_small_messages_round_trip() -> None:
    events: list[Event] = [
        Joined(1),
        Token(1, 42),
        Finished(1, "eos"),
        Scores(2, [-1.5, -0.25, float("-inf")]),
        Generated(3, [5, 6, 1], "eos"),
        Failed(4, "overloaded", 'no room: "quoted", ünïcode'),
    ]
    stats = StepStats(0.0123, 3, 2, 1, {"eos": 1, "length": 2})
    assert decode(frames_of(EventBatch(events, stats))) == EventBatch(events, stats)
    for message in (Ping(True), Ping(False), Hello("abc", True), Hello("abc", False), Cancel([1, 2, 3])):
        assert decode(frames_of(message)) == message


def test_frames_that_are_not_a_message_are_refused() -> None:
    good = frames_of(Submit([ClassifyRow(1, "t", RowInput(torch.ones(2, 3), [1]), [[1]])]))
    header = good[0].decode()
    broken = [
        [],
        [b"not json"],
        [b'{"type": "launch"}'],
        [b'{"type": "events", "events": [["?", 1]], "stats": {}}'],
        [good[0]],  # its tensor frame is missing
        [good[0], good[1][:-1]],  # a byte short
        [header.replace('"float32"', '"int64"').encode(), good[1]],
        [header.replace('"kind":"classify"', '"kind":"train"').encode(), good[1]],
    ]
    for frames in broken:
        with pytest.raises(WireError):
            decode(frames)


# Real engines. Each link's events and its down/up calls are recorded.


class Recorder:
    def __init__(self) -> None:
        self.events: dict[int, list[Event]] = defaultdict(list)
        self.stats: list[StepStats] = []
        self.downs: list[str] = []
        self.ups = 0
        self._changed = asyncio.Event()

    def deliver(self, events: list[Event], stats: StepStats) -> None:
        for event in events:
            self.events[event.request_id].append(event)
        self.stats.append(stats)
        self._changed.set()

    def down(self, reason: str) -> None:
        self.downs.append(reason)
        self._changed.set()

    def up(self) -> None:
        self.ups += 1
        self._changed.set()

    def finished(self, request_id: int) -> bool:
        return any(isinstance(event, FINAL) for event in self.events[request_id])

    def tokens(self, request_id: int) -> list[int]:
        return [event.token_id for event in self.events[request_id] if isinstance(event, Token)]

    async def until(self, condition: Callable[[], bool], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), max(deadline - time.monotonic(), 0.01))


@asynccontextmanager
async def linked(settings: Settings, **options: float) -> AsyncIterator[tuple[ProcessLink, Recorder]]:
    link, recorder = ProcessLink(settings, **options), Recorder()
    await link.start(recorder.deliver, recorder.down, recorder.up)
    try:
        yield link, recorder
    finally:
        await link.stop()


def engine_settings(**changes: object) -> Settings:
    values: dict[str, object] = {"model": "tiny", "device": "cpu", "warmup": False, "cpu_threads": 1, **changes}
    return Settings(**values)  # type: ignore[arg-type]


def greedy_row(request_id: int, seed: int, d_model: int, max_new_tokens: int = 10) -> GenerateRow:
    prompt = random_prompt(3 + seed % 4, d_model, seed=seed)
    return GenerateRow(request_id, "t", RowInput(prompt, [5 + seed, 9, 12, 1]), Sampling(), max_new_tokens)


def generated(model: FrozenT5, row: GenerateRow) -> tuple[list[int], str]:
    """What `transformers`' `generate` makes of the row: the reference the engine must match."""
    result = model.generate([Row(row.row.prompt, row.row.input_ids)], Decoding(), [row.max_new_tokens])[0]
    return result.token_ids, result.finish_reason


def assert_served_like_generate(recorder: Recorder, request_id: int, model: FrozenT5, row: GenerateRow) -> None:
    events = recorder.events[request_id]
    tokens, reason = generated(model, row)
    assert events[0] == Joined(request_id)
    assert recorder.tokens(request_id) == tokens
    assert events[-1] == Finished(request_id, reason)  # type: ignore[arg-type]
    assert len(events) == len(tokens) + 2


def test_the_client_table_keeps_each_clients_rows_apart_and_forgets_nothing(tiny: FrozenT5) -> None:
    """The routing of the engine process, driven pass by pass over a real engine: two clients use the same request
    id; a cancelled classify row (which ends without an event) and a forgotten client leave no entries behind."""
    passes: list[tuple[list[Event], StepStats]] = []
    engine = Engine(tiny, EngineLimits(8, 100_000, 8, 100_000), lambda events, stats: passes.append((events, stats)))
    table = ClientTable(engine, "e1")
    row_a, row_b, row_c = (greedy_row(1, seed, tiny.d_model) for seed in (1, 2, 3))
    classify = ClassifyRow(2, "t", RowInput(random_prompt(2, tiny.d_model, seed=4), [1]), [[5, 1]])

    assert table.receive(b"a", Submit([row_a])) == [(b"a", Hello("e1", known=False))]  # not a client yet
    for identity in (b"a", b"b", b"c"):
        assert table.receive(identity, Ping(new=True)) == [(identity, Hello("e1", known=True))]
    assert table.receive(b"a", Submit([row_a])) == []
    assert table.receive(b"b", Submit([row_b, classify])) == []
    assert table.receive(b"c", Submit([row_c])) == []
    [(to, refused)] = table.receive(b"a", Submit([row_a]))
    assert to == b"a" and isinstance(refused, EventBatch) and refused.events[0].request_id == 1
    assert isinstance(refused.events[0], Failed) and refused.events[0].code == "invalid_input"
    table.receive(b"b", Cancel([2]))
    table.forget(b"c", "test")
    assert len(table.owners) == 2

    heard: dict[bytes, list[Event]] = defaultdict(list)
    for _ in range(100):  # passes: more than the rows need
        engine.run_once()
        for events, stats in passes:
            for identity, batch in table.route(events, stats):
                assert isinstance(batch, EventBatch)
                heard[identity] += batch.events
        passes.clear()
    assert set(heard) == {b"a", b"b"}
    for identity, row in ((b"a", row_a), (b"b", row_b)):
        tokens, reason = generated(tiny, row)
        assert [e.token_id for e in heard[identity] if isinstance(e, Token)] == tokens
        assert heard[identity][-1] == Finished(1, reason)  # type: ignore[arg-type]
        assert {e.request_id for e in heard[identity]} == {1}
    assert table.owners == {} and all(not client.rows for client in table.clients.values())
    assert set(table.clients) == {b"a", b"b"}


def test_a_child_engine_serves_rows_exactly_as_generate_and_score(tiny: FrozenT5) -> None:
    rows = [greedy_row(1, 1, tiny.d_model), greedy_row(2, 2, tiny.d_model, max_new_tokens=16)]
    classify = ClassifyRow(3, "u", RowInput(random_prompt(4, tiny.d_model, seed=3), [7, 1]), [[5, 1], [6, 8, 1]])

    async def scenario() -> Path:
        async with linked(engine_settings()) as (link, recorder):
            link.submit([*rows, classify])
            await recorder.until(lambda: all(recorder.finished(i) for i in (1, 2, 3)))
            temp_dir = Path(link.address.removeprefix("ipc://")).parent
            assert temp_dir.is_dir()
        for row in rows:
            assert_served_like_generate(recorder, row.request_id, tiny, row)
        scores = recorder.events[3][-1]
        assert isinstance(scores, Scores)
        expected = tiny.score([Row(classify.row.prompt, classify.row.input_ids)], [classify.targets])[0]
        assert scores.scores == pytest.approx(expected, abs=1e-5)
        assert recorder.downs == [] and recorder.ups == 1
        return temp_dir

    temp_dir = asyncio.run(scenario())
    assert not temp_dir.exists()  # `stop` removed the socket's private directory


def test_a_child_that_cannot_load_its_model_fails_start_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"

    async def scenario() -> None:
        with pytest.raises(EngineStartFailed, match=r"exited with status 1: error: .*no-such-checkpoint"):
            async with linked(engine_settings(model=str(missing))):
                pass

    asyncio.run(scenario())


def test_the_engine_thread_is_the_only_one_that_starts_an_openmp_team(tiny: FrozenT5) -> None:
    """libgomp stops spinning between parallel regions once more threads are in OpenMP teams than there are
    cores, so the engine process loads its model on a serial thread and runs it on the engine thread alone
    (server/cpus.py). Counted from outside: with `--cpu-threads 3` the child has exactly 2 threads more than with
    1, after a warm-up and a row: one team of 3. A second team (the loading thread's) would add 2 more."""

    async def threads_after_a_row(cpu_threads: int) -> int:
        async with linked(engine_settings(cpu_threads=cpu_threads, warmup=True)) as (link, recorder):
            link.submit([greedy_row(1, 1, tiny.d_model)])
            await recorder.until(lambda: recorder.finished(1))
            assert link.child is not None
            return len(os.listdir(f"/proc/{link.child.pid}/task"))

    assert asyncio.run(threads_after_a_row(3)) - asyncio.run(threads_after_a_row(1)) == 2


@pytest.mark.timing
def test_a_killed_child_is_reported_down_then_restarted_and_serves_again(tiny: FrozenT5) -> None:
    async def scenario() -> None:
        async with linked(engine_settings()) as (link, recorder):
            assert link.child is not None
            first_pid = link.child.pid
            os.kill(first_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            await recorder.until(lambda: bool(recorder.downs), timeout_s=10)
            assert time.monotonic() - killed_at < 3
            assert "killed by signal 9" in recorder.downs[0]
            await recorder.until(lambda: recorder.ups == 2)
            assert link.child is not None and link.child.pid != first_pid
            row = greedy_row(1, 4, tiny.d_model)
            link.submit([row])
            await recorder.until(lambda: recorder.finished(1))
            assert_served_like_generate(recorder, 1, tiny, row)
            assert len(recorder.downs) == 1

    asyncio.run(scenario())


@contextmanager
def shared_engine(address: str, log: Path, *flags: str) -> Iterator[subprocess.Popen[bytes]]:
    """`softserve engine` as an operator runs it, for API processes to share; yields once it is ready."""
    env = {**os.environ, "SOFTSERVE_MODEL": "tiny", "SOFTSERVE_WARMUP": "false"}
    command = [sys.executable, "-m", "server.cli", "engine", "--address", address, "--device", "cpu", *flags]
    with log.open("wb") as sink:
        process = subprocess.Popen([*command, "--cpu-threads", "1"], env=env, stderr=sink)
    try:
        deadline = time.monotonic() + 60
        while f"ready at {address}" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_two_api_processes_share_one_engine_and_come_back_with_it(tiny: FrozenT5, tmp_path: Path) -> None:
    """Both links use request id 1: each hears only its own row. When the engine dies both are told, and once an
    engine answers at the address again both are up and served. (ipc: clients that keep reconnecting to a
    loopback TCP port nobody listens on may connect to themselves and take the port.)"""
    address = f"ipc://{tmp_path}/engine.sock"
    settings = engine_settings(engine_address=address)
    rows = [greedy_row(1, 5, tiny.d_model), greedy_row(1, 6, tiny.d_model, max_new_tokens=14)]

    async def scenario() -> None:
        with shared_engine(address, tmp_path / "first.log") as engine:
            async with linked(settings) as (a, heard_a), linked(settings) as (b, heard_b):
                assert a.child is None and b.child is None  # nothing was started: the engine was there
                a.submit([rows[0]])
                b.submit([rows[1]])
                await heard_a.until(lambda: heard_a.finished(1))
                await heard_b.until(lambda: heard_b.finished(1))
                assert_served_like_generate(heard_a, 1, tiny, rows[0])
                assert_served_like_generate(heard_b, 1, tiny, rows[1])

                engine.kill()
                await heard_a.until(lambda: bool(heard_a.downs), timeout_s=10)
                await heard_b.until(lambda: bool(heard_b.downs), timeout_s=10)
                assert "no answer from the engine" in heard_a.downs[0]
                with shared_engine(address, tmp_path / "second.log"):
                    await heard_a.until(lambda: heard_a.ups == 2)
                    await heard_b.until(lambda: heard_b.ups == 2)
                    row = greedy_row(2, 7, tiny.d_model)
                    b.submit([row])
                    await heard_b.until(lambda: heard_b.finished(2))
                    assert_served_like_generate(heard_b, 2, tiny, row)

    asyncio.run(scenario())


def test_a_client_that_goes_away_has_its_rows_cancelled(tiny: FrozenT5, tmp_path: Path) -> None:
    """A's endless row runs until A leaves; B, whose row shares those steps, sees it leave as `cancelled`. (Both rows
    fit `max_cached_tokens` together.)"""
    address, keys = f"tcp://127.0.0.1:{free_port()}", tmp_path / "keys"
    make_keys(keys)
    settings = engine_settings(engine_address=address, engine_keys_dir=keys)
    endless = GenerateRow(1, "a", RowInput(random_prompt(3, tiny.d_model, seed=8), [1]), Sampling(), 50_000, True)
    long_row = GenerateRow(1, "b", RowInput(random_prompt(3, tiny.d_model, seed=9), [1]), Sampling(), 50_000, True)

    async def scenario() -> None:
        with shared_engine(address, tmp_path / "engine.log", "--engine-keys-dir", str(keys)):
            async with linked(settings) as (b, heard_b):
                async with linked(settings) as (a, heard_a):
                    a.submit([endless])
                    await heard_a.until(lambda: len(heard_a.tokens(1)) >= 3)
                    b.submit([long_row])
                    await heard_b.until(lambda: len(heard_b.tokens(1)) >= 3)
                    assert max(stats.active_rows for stats in heard_b.stats) == 2
                await heard_b.until(lambda: any(stats.left.get("cancelled") for stats in heard_b.stats), timeout_s=15)
                b.cancel([1])
                await heard_b.until(lambda: heard_b.finished(1))
                assert heard_b.events[1][-1] == Finished(1, "cancelled")

    asyncio.run(scenario())
