"""`ProcessLink`: the engine in another process, reached over ZeroMQ from the event loop.

With `engine_address` empty the link starts the engine itself, as a child on an `ipc://` socket in a private
temporary directory, and restarts it when it dies (after 1 s, doubling to 30 s while it keeps dying young).
With an address it connects to an engine started by `softserve engine` and shared with other API processes;
when that engine goes away the link waits for one to answer there again (ZeroMQ reconnects by itself).

The link is one DEALER socket, used only on the loop. It pings every `HEARTBEAT_S` and hears a `Hello` back.
The engine is down (`down(reason)`, and every row in flight is lost) when the child exits, when nothing is heard
for `DEAD_AFTER_S`, or when a `Hello` says the engine restarted or has forgotten this client. Each
(re)connection is a new socket with a new identity, so nothing of an earlier connection reaches the engine;
`up()` follows the new connection's first `Hello`.
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
from typing import Any

import zmq
import zmq.asyncio

from server.engine.link import Deliver, Down, Up
from server.engine.process import HEARTBEAT_S, SETTINGS_VARIABLE
from server.engine.protocol import Cancel, EngineRequest
from server.engine.wire import EventBatch, Hello, Message, Ping, Submit, WireError, decode, encode
from server.serving.load_errors import ModelLoadError
from server.settings import Settings

log = logging.getLogger(__name__)

DEAD_AFTER_S = 2.0  # nothing heard from the engine this long: it is down
START_TIMEOUT_S = 600.0  # a child's model load and warm-up (a hub download included) must end within this
RESTART_BACKOFF_S = (1.0, 30.0)  # first wait before restarting a dead child, and the most it grows to
STOP_WAIT_S = 10.0  # a child asked to stop (SIGTERM) gets this long before it is killed
STDERR_CHUNK = 65536


class EngineStartFailed(ModelLoadError):
    """The engine did not come up; the message says why in one line (most often: the model cannot load)."""


class ProcessLink:
    def __init__(
        self,
        settings: Settings,
        dead_after_s: float = DEAD_AFTER_S,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.dead_after_s = dead_after_s
        self.start_timeout_s = start_timeout_s
        self.spawns = not settings.engine_address
        self.address = settings.engine_address
        self.child: asyncio.subprocess.Process | None = None
        self._deliver: Deliver | None = None
        self._context = zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []  # the current connection's reader and pinger
        self._engine_id: str | None = None  # of the current connection's first `Hello`
        self._greeted: asyncio.Future[None] | None = None
        self._trouble: asyncio.Future[str] | None = None
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
            await self._connect(self.start_timeout_s)
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
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._disconnect()
        await self._end_child(STOP_WAIT_S)
        self._context.destroy(linger=0)
        if self._remove_temp_dir is not None:
            self._remove_temp_dir()

    # Connections.

    async def _connect(self, timeout: float | None) -> None:
        """Starts a child (when this link starts its engine) and a new connection; returns on its first `Hello`."""
        loop = asyncio.get_running_loop()
        if self.spawns:
            await self._spawn()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for an engine not connected: it would not know us
        socket.setsockopt(zmq.SNDHWM, 0)  # the API side's admission bounds what waits
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.address)
        self._socket, self._engine_id = socket, None
        self._greeted, self._trouble = loop.create_future(), loop.create_future()
        self._last_heard = time.monotonic()
        self._tasks = [asyncio.create_task(self._read(socket)), asyncio.create_task(self._ping(socket))]
        waiters: list[asyncio.Future[Any]] = [self._greeted]
        if self._child_exit is not None:
            waiters.append(self._child_exit)
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._greeted.done():
            return
        exited = self._child_exit is not None and self._child_exit.done()
        reason = (
            await self._child_exit_reason() if exited else f"no engine answered at {self.address} within {timeout} s"
        )
        await self._disconnect()
        await self._end_child(0)
        raise EngineStartFailed(reason)

    async def _disconnect(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
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

    def _hear(self, hello: Hello) -> None:
        if self._engine_id is None:
            if hello.known:  # an answer to this connection's own pings
                self._engine_id = hello.engine_id
                _resolve(self._greeted, None)
        elif hello.engine_id != self._engine_id:
            _resolve(self._trouble, "the engine restarted")
        elif not hello.known:
            _resolve(self._trouble, "the engine forgot this client (it fell silent too long)")

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
            _resolve(self._trouble, f"the engine is unreachable ({sent.exception()})")

    # Supervision.

    async def _supervise(self, down: Down, up: Up) -> None:
        backoff, up_since = RESTART_BACKOFF_S[0], time.monotonic()
        while True:
            reason = await self._watch()
            await self._disconnect()  # first: nothing of this connection is delivered after `down`
            log.error("the engine at %s is down: %s", self.address, reason)
            down(reason)
            if time.monotonic() - up_since > RESTART_BACKOFF_S[1]:
                backoff = RESTART_BACKOFF_S[0]  # it had been fine a while: not a crash loop
            while True:
                await self._end_child(0)
                if self.spawns:
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

    async def _watch(self) -> str:
        """Returns why the engine is down, once it is."""
        assert self._trouble is not None
        waiters: list[asyncio.Future[Any]] = [self._trouble]
        if self._child_exit is not None:
            waiters.append(self._child_exit)
        checked = time.monotonic()
        while True:
            await asyncio.wait(waiters, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
            if self._child_exit is not None and self._child_exit.done():
                return await self._child_exit_reason()
            if self._trouble.done():
                return self._trouble.result()
            now = time.monotonic()
            silent = now - self._last_heard
            # Only when this loop itself was awake: after a blocked loop the reader has not read what came yet.
            if silent > self.dead_after_s and now - checked < 2 * HEARTBEAT_S:
                return f"no answer from the engine for {silent:.1f} s"
            checked = now

    # The child.

    async def _spawn(self) -> None:
        env = {**os.environ, SETTINGS_VARIABLE: self.settings.model_dump_json()}
        command = ["-m", "server.engine.process", "--address", self.address, "--parent-pid", str(os.getpid())]
        self.child = await asyncio.create_subprocess_exec(
            sys.executable, *command, env=env, stderr=asyncio.subprocess.PIPE
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
