"""`ProcessLink`: the engine in another process, reached over ZeroMQ from the event loop.

With `engine_address` empty the link starts the engine itself, as a child on an `ipc://` socket in a private
temporary directory, and restarts it when it dies (after 1 s, doubling to 30 s while it keeps dying young).
With an address it connects to an engine started by `softserve engine` and shared with other API processes;
when that engine goes away the link waits for one to answer there again (ZeroMQ reconnects by itself).

The link is one DEALER socket, used only on the loop. Its connection is kept by ZeroMQ's own heartbeats, which
libzmq's I/O thread sends and answers without the event loop or the GIL: a loop blocked for any time (a huge
body being parsed) does not lose this process its place in the engine, nor its rows (`process.py`). The link
judges the engine only by the engine's own signs of life:
- the engine is down when the child exits, or when no `Hello` (the engine's heartbeat, every `HEARTBEAT_S`)
  came for `DEAD_AFTER_S` while this loop itself was awake to read it. A child that is silent so is hung: it
  is killed and started again (`softserve_engine_restarts_total`).
- a `Hello` that says the engine does not know this client (it lost the connection a while), or that another
  engine answers at the address, or a send that fails, loses only this connection: its rows in flight fail,
  and a new connection is made to the same engine. A healthy child is never killed for it.
Either way `down(reason)` is called, every row in flight is lost, and `up()` follows the new connection's first
`Hello`. Each (re)connection is a new socket with a new identity, so nothing of an earlier connection reaches
the engine. The link pings every `HEARTBEAT_S`: the first ping registers it, later ones ask whether the engine
still knows it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from server.engine.curve import ClientKeys, EngineKeysError, wire_keys
from server.engine.link import Deliver, Down, Up
from server.engine.protocol import Cancel, EngineRequest
from server.engine.wire import (
    HEARTBEAT_S,
    SETTINGS_VARIABLE,
    EventBatch,
    Hello,
    Message,
    Ping,
    Submit,
    WireError,
    decode,
    encode,
    keep_alive,
)
from server.metrics import EngineMetrics
from server.serving.load_errors import ModelLoadError
from server.settings import Settings
from server.stopping import cancel_and_wait

log = logging.getLogger(__name__)

DEAD_AFTER_S = 2.0  # nothing heard from the engine this long: it is down
START_TIMEOUT_S = 600.0  # a child's model load and warm-up (a hub download included) must end within this
RESTART_BACKOFF_S = (1.0, 30.0)  # first wait before restarting a dead child, and the most it grows to
WAITING_LOG_S = 10.0  # how often an API process waiting for a standalone engine says so
STOP_WAIT_S = 10.0  # a child asked to stop (SIGTERM) gets this long before it is killed
STDERR_CHUNK = 65536


class EngineStartFailed(ModelLoadError):
    """The engine did not come up; the message says why in one line (most often: the model cannot load)."""


@dataclass(frozen=True)
class Outage:
    """Why the current connection ended. `engine_lost`: the engine itself exited or hung (a child is started
    again); otherwise only this connection's rows are lost and the engine is fine."""

    reason: str
    engine_lost: bool


class ProcessLink:
    def __init__(
        self,
        settings: Settings,
        dead_after_s: float = DEAD_AFTER_S,
        start_timeout_s: float = START_TIMEOUT_S,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.dead_after_s = dead_after_s
        self.start_timeout_s = start_timeout_s
        self.metrics = metrics or EngineMetrics(CollectorRegistry())
        self.spawns = not settings.engine_address
        self.address = settings.engine_address
        self.child: asyncio.subprocess.Process | None = None
        self._keys: ClientKeys | None = None  # CURVE keys of a tcp engine
        self._deliver: Deliver | None = None
        self._context = zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []  # the current connection's reader and pinger
        self._engine_id: str | None = None  # of the current connection's first `Hello`
        self._latest_engine_id: str | None = None  # of the latest connection: another one means a restart
        self._greeted: asyncio.Future[None] | None = None
        self._trouble: asyncio.Future[Outage] | None = None
        self._last_heard = 0.0
        self._child_exit: asyncio.Task[int] | None = None
        self._child_said = ""  # the child's last line on stderr: why it exited, as it put it
        self._stderr_task: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._remove_temp_dir: weakref.finalize | None = None

    async def start(self, deliver: Deliver, down: Down, up: Up) -> None:
        """Raises `EngineStartFailed` when no engine answers within `start_timeout_s`, or the child exits first."""
        self._deliver = deliver
        if self.spawns:
            temp_dir = tempfile.mkdtemp(prefix="softserve-engine-")
            # Removed by `stop`, or at the latest when this interpreter exits without it.
            self._remove_temp_dir = weakref.finalize(self, shutil.rmtree, temp_dir, ignore_errors=True)
            self.address = f"ipc://{temp_dir}/engine.sock"
        try:
            keys_dir = wire_keys(self.address, self.settings.engine_keys_dir, self.settings.engine_insecure_tcp)
            self._keys = ClientKeys.load(keys_dir) if keys_dir is not None else None
            if self._keys is None and self.address.startswith("tcp://"):
                log.warning("plaintext tcp to the engine at %s (engine_insecure_tcp): unauthenticated", self.address)
            await self._connect(self.start_timeout_s)
        except EngineKeysError as error:
            await self.stop()
            raise EngineStartFailed(str(error)) from None
        except BaseException:
            await self.stop()
            raise
        self._supervisor = asyncio.create_task(self._supervise(down, up))
        up()

    def submit(self, requests: list[EngineRequest]) -> None:
        self._send(Submit(requests))

    def cancel(self, request_ids: list[int]) -> None:
        self._send(Cancel(request_ids))

    async def stop(self) -> None:
        await cancel_and_wait(self._supervisor)
        await self._disconnect()
        await self._end_child(STOP_WAIT_S)
        self._context.destroy(linger=0)
        if self._remove_temp_dir is not None:
            self._remove_temp_dir()

    # Connections.

    async def _connect(self, timeout: float | None) -> None:
        """Starts a child (when this link starts its engine and has none running) and a new connection; returns
        on its first `Hello`."""
        loop = asyncio.get_running_loop()
        if self.spawns and self.child is None:
            await self._spawn()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for an engine not connected: it would not know us
        socket.setsockopt(zmq.SNDHWM, 0)  # the API side's admission bounds what waits
        # While the loop is blocked libzmq goes on reading (and so answering heartbeats): what arrives waits here,
        # bounded by this process's rows in flight.
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        keep_alive(socket)
        if self._keys is not None:
            self._keys.secure(socket)
        socket.connect(self.address)
        self._socket, self._engine_id = socket, None
        self._greeted, self._trouble = loop.create_future(), loop.create_future()
        self._last_heard = time.monotonic()
        self._tasks = [asyncio.create_task(self._read(socket)), asyncio.create_task(self._ping(socket))]
        waiters: list[asyncio.Future[Any]] = [self._greeted]
        if self._child_exit is not None:
            waiters.append(self._child_exit)
        await self._wait_for_answer(waiters, timeout)
        if self._greeted.done():
            self._count_restart()
            return
        exited = self._child_exit is not None and self._child_exit.done()
        reason = (
            await self._child_exit_reason() if exited else f"no engine answered at {self.address} within {timeout} s"
        )
        await self._disconnect()
        await self._end_child(0)
        raise EngineStartFailed(reason)

    async def _wait_for_answer(self, waiters: list[asyncio.Future[Any]], timeout: float | None) -> None:
        """Until the first `Hello` (or the child's exit, or `timeout`); an engine started elsewhere is waited for
        with a line in the log every `WAITING_LOG_S`, saying where and how to start one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.spawns:
            log.info("waiting for an engine at %s", self.address)
        while not any(waiter.done() for waiter in waiters):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            step = WAITING_LOG_S if left is None else min(WAITING_LOG_S, left)
            await asyncio.wait(waiters, timeout=step, return_when=asyncio.FIRST_COMPLETED)
            if not self.spawns and not any(waiter.done() for waiter in waiters):
                log.warning(
                    "waiting for an engine at %s: none answers yet (start one with `softserve engine --address %s`)",
                    self.address,
                    self.address,
                )

    async def _disconnect(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            frames = await socket.recv_multipart()
            try:
                message = decode(frames)
            except WireError as error:
                log.warning("dropped a message from the engine: %s", error)
                continue
            self._last_heard = time.monotonic()
            if isinstance(message, Hello):
                self._hear(message)
            elif isinstance(message, EventBatch) and self._deliver is not None:
                self._deliver(message.events, message.stats)

    def _count_restart(self) -> None:
        """A connection greeted by another engine than the latest one: the engine restarted."""
        if self._latest_engine_id not in (None, self._engine_id):
            self.metrics.restarts.inc()
        self._latest_engine_id = self._engine_id

    def _hear(self, hello: Hello) -> None:
        if self._engine_id is None:
            if hello.known:  # an answer to this connection's own pings
                self._engine_id = hello.engine_id
                _resolve(self._greeted, None)
        elif hello.engine_id != self._engine_id:
            _resolve(self._trouble, Outage("another engine answers at the address (the engine restarted)", False))
        elif not hello.known:
            _resolve(self._trouble, Outage("the engine forgot this client (its connection was lost a while)", False))

    async def _ping(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            # `new` until the first `Hello`: a ping dropped while the engine was not there yet costs nothing.
            await _sent(socket, encode(Ping(new=self._engine_id is None)))
            await asyncio.sleep(HEARTBEAT_S)

    def _send(self, message: Message) -> None:
        """Never blocks: a message that cannot go now means the engine is not there, which is trouble."""
        if self._socket is None:
            return  # between connections: the caller has been told the engine is down
        self._socket.send_multipart(encode(message), zmq.DONTWAIT, copy=False).add_done_callback(self._check_sent)

    def _check_sent(self, sent: asyncio.Future[Any]) -> None:
        if not sent.cancelled() and sent.exception() is not None:
            _resolve(self._trouble, Outage(f"the engine is unreachable ({sent.exception()})", False))

    # Supervision.

    async def _supervise(self, down: Down, up: Up) -> None:
        backoff, up_since = RESTART_BACKOFF_S[0], time.monotonic()
        while True:
            outage = await self._watch()
            await self._disconnect()  # first: nothing of this connection is delivered after `down`
            what = "is down" if outage.engine_lost else "lost this connection (the engine goes on)"
            log.error("the engine at %s %s: %s", self.address, what, outage.reason)
            down(outage.reason)
            if time.monotonic() - up_since > RESTART_BACKOFF_S[1]:
                backoff = RESTART_BACKOFF_S[0]  # it had been fine a while: not a crash loop
            if outage.engine_lost:
                await self._end_child(0)
            while True:
                if self.spawns and self.child is None:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
                try:
                    await self._connect(self.start_timeout_s if self.spawns else None)
                    break
                except (EngineStartFailed, OSError) as error:  # OSError: the child could not be started
                    log.error("the engine did not come back: %s", error)
            up_since = time.monotonic()
            log.info("the engine at %s is up again", self.address)
            up()

    async def _watch(self) -> Outage:
        """Returns why the current connection ended, once it has."""
        assert self._trouble is not None
        waiters: list[asyncio.Future[Any]] = [self._trouble]
        if self._child_exit is not None:
            waiters.append(self._child_exit)
        checked = time.monotonic()
        while True:
            await asyncio.wait(waiters, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
            if self._child_exit is not None and self._child_exit.done():
                return Outage(await self._child_exit_reason(), engine_lost=True)
            if self._trouble.done():
                return self._trouble.result()
            now = time.monotonic()
            silent = now - self._last_heard
            # Only when this loop itself was awake: after a blocked loop the reader has not read what came yet.
            if silent > self.dead_after_s and now - checked < 2 * HEARTBEAT_S:
                return Outage(f"no answer from the engine for {silent:.1f} s", engine_lost=True)
            checked = now

    # The child.

    async def _spawn(self) -> None:
        env = {**os.environ, SETTINGS_VARIABLE: self.settings.model_dump_json()}
        command = ["-m", "server.engine.process", "--address", self.address, "--parent-pid", str(os.getpid())]
        # A session of its own: Ctrl-C in a terminal signals the foreground group, and an engine child that took it
        # died mid-import with a 40-line traceback while the server reported it killed. This process handles the
        # Ctrl-C and stops its child in order. (A signal mask or SIG_IGN would not pass: uvloop's spawn resets both.)
        self.child = await asyncio.create_subprocess_exec(
            sys.executable, *command, env=env, stderr=asyncio.subprocess.PIPE, start_new_session=True
        )
        log.info("started engine process %d at %s", self.child.pid, self.address)
        self._child_said = ""
        self._child_exit = asyncio.create_task(self.child.wait())
        self._stderr_task = asyncio.create_task(self._relay_stderr(self.child))

    async def _relay_stderr(self, child: asyncio.subprocess.Process) -> None:
        """The child's log goes on to ours (in chunks: a line has no length limit); its last line is kept, to say
        why it exited."""
        assert child.stderr is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tail = ""
        while chunk := await child.stderr.read(STDERR_CHUNK):
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            tail = (tail + text)[-STDERR_CHUNK:]
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        self._child_said = lines[-1] if lines else ""

    async def _child_exit_reason(self) -> str:
        """Why the child exited; when it failed by itself, its last line says why (`error: ...`)."""
        assert self.child is not None and self._stderr_task is not None
        await self._stderr_task  # its last lines, read to the end
        code = self.child.returncode or 0
        if code < 0:
            return f"the engine process was killed by signal {-code}"
        said = f": {self._child_said}" if code > 0 and self._child_said else ""
        return f"the engine process exited with status {code}{said}"

    async def _end_child(self, grace_s: float) -> None:
        """Asks the child to stop (SIGTERM), kills it after `grace_s`, and waits for it and its stderr."""
        child, exited, relay = self.child, self._child_exit, self._stderr_task
        if child is None or exited is None:
            return
        if not exited.done():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
            try:
                await asyncio.wait_for(asyncio.shield(exited), grace_s or None)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
            await exited
        if relay is not None:
            await relay
        self.child = self._child_exit = self._stderr_task = None


async def _sent(socket: zmq.asyncio.Socket, frames: list[bytes | bytearray | memoryview]) -> None:
    """Sends without waiting: with no engine connected the message is dropped (a ping is sent again anyway)."""
    with contextlib.suppress(zmq.Again):
        await socket.send_multipart(frames, zmq.DONTWAIT)


def _resolve(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)
