"""The engine in its own process, serving any number of API processes over ZeroMQ.

    API process (ProcessLink, DEALER) ──┐                 ┌── I/O thread: ROUTER + Poller, `ClientTable`
    API process (ProcessLink, DEALER) ──┼── ROUTER ◀─────▶│        ▲ wake (inproc PUSH/PULL) + outbox
    ...                                 ┘                 └── engine thread: `Engine.run` → emit

Sockets are not thread-safe, so each has one thread: the ROUTER and the wake PULL belong to the I/O thread (the
main one), the wake PUSH to the engine thread, which puts each pass's events in an outbox queue and pokes the
I/O thread. Only the I/O thread touches the `ClientTable`.

Clients: each API process is one DEALER, known by its routing id. Its request ids are its own; the table maps
(client, request id) to a process-wide id for the engine and each event back. A client registers with
`Ping(new=True)` and is answered `Hello`.

Liveness, each party judged by its own signs of life:
- A client is alive while its connection is. ZeroMQ's heartbeats (ZMTP PING/PONG) keep it, sent and answered
  by libzmq's I/O threads at both ends, which need neither the API process's event loop nor its GIL: an API
  process whose loop is blocked (a huge body being parsed) keeps its connection and its rows. A connection
  that carries nothing for `CLIENT_TIMEOUT_S` (the process is gone, stopped, or the network is) is closed by
  libzmq; the engine's next send to it fails (ROUTER_MANDATORY), and the client is forgotten: its rows, and
  only its, are cancelled.
- The engine's own sign of life is its heartbeat: a `Hello` to every client every `HEARTBEAT_S`, sent by this
  I/O thread whatever the engine thread is doing. It doubles as the probe that finds lost connections.
A message from a client the engine does not know (it was forgotten, or this engine restarted) is answered
`Hello(known=False)`: its rows are lost, and it says so upward and reconnects.

No frame ends the process: `decode` refuses anything that is not a valid message, and whatever handling one
message raises drops that message only. On tcp only CURVE-authenticated clients get that far (`curve.py`).

The socket is bound only once the model is loaded and warmed up, so a `Hello` means ready.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from server.cpus import serial_thread
from server.engine.curve import EngineKeysError, secure_server, wire_keys
from server.engine.engine import Engine
from server.engine.limits import engine_limits
from server.engine.protocol import (
    LAST_EVENTS,
    Cancel,
    ClassifyRow,
    EngineRequest,
    Event,
    Failed,
    GenerateRow,
    StepStats,
)
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
from server.serving.load_errors import ModelLoadError
from server.serving.model import FrozenT5
from server.settings import Settings

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 256 * 1024 * 1024  # a peer sending a larger frame is disconnected before it is read
DROPPED_LOG_EVERY_S = 10.0  # dropped messages are logged once, then summed up at most this often
Identity = bytes
Outgoing = list[tuple[Identity, Message]]


@dataclass
class Client:
    rows: dict[int, int] = field(default_factory=dict)  # the client's request id -> the engine's


@dataclass(frozen=True)
class Owner:
    identity: Identity
    request_id: int  # the client's
    says_cancelled: bool  # a cancelled generate row ends with `Finished`; a classify or beam row ends silently


class ClientTable:
    """Who is connected, and which engine row is whose. Returns what to send; sends nothing itself."""

    def __init__(self, engine: Engine, engine_id: str) -> None:
        self.engine = engine
        self.engine_id = engine_id
        self.clients: dict[Identity, Client] = {}
        self.owners: dict[int, Owner] = {}  # by engine id, until the row's last event
        self.last_stats = StepStats()  # the latest pass's, sent with refusals
        self._ids = itertools.count(1)

    def receive(self, identity: Identity, message: Message) -> Outgoing:
        client = self.clients.get(identity)
        if client is None and isinstance(message, Ping) and message.new:
            self.clients[identity] = Client()
            return [(identity, Hello(self.engine_id, known=True))]
        if client is None:
            return [(identity, Hello(self.engine_id, known=False))]
        if isinstance(message, Cancel):
            self._cancel(client, message.request_ids)
        elif isinstance(message, Submit):
            return self._submit(identity, client, message)
        return []

    def _submit(self, identity: Identity, client: Client, message: Submit) -> Outgoing:
        requests, refused = [], []
        for request in message.requests:
            problem = self._problem(client, request)
            if problem:
                refused.append(Failed(request.request_id, "invalid_input", problem))
                continue
            engine_id = next(self._ids)
            client.rows[request.request_id] = engine_id
            self.owners[engine_id] = Owner(identity, request.request_id, isinstance(request, GenerateRow))
            requests.append(replace(request, request_id=engine_id))
        self.engine.submit(requests)
        # With the latest pass's stats: a refusal says nothing new of the engine's load.
        return [(identity, EventBatch(refused, self.last_stats))] if refused else []

    def _problem(self, client: Client, request: EngineRequest) -> str:
        """Why the row cannot be served ("" when it can): the wire checked its values, this checks them against
        the model, so that one client's broken row cannot fail the encoder pass other rows share."""
        if request.request_id in client.rows:
            return "this request id is already in flight"
        model = self.engine.model
        if request.row.prompt.shape[1] != model.d_model:
            return f"a prompt of width {request.row.prompt.shape[1]} for a model of d_model {model.d_model}"
        token_lists = [request.row.input_ids, *(request.targets if isinstance(request, ClassifyRow) else [])]
        if any(token >= model.vocab_size for tokens in token_lists for token in tokens):
            return f"a token id outside the model's vocabulary ({model.vocab_size})"
        return ""

    def heartbeats(self) -> Outgoing:
        """The engine's sign of life to every client, and the probe that finds the connections lost since."""
        return [(identity, Hello(self.engine_id, known=True)) for identity in self.clients]

    def _cancel(self, client: Client, request_ids: list[int]) -> None:
        engine_ids = [client.rows[i] for i in request_ids if i in client.rows]
        for engine_id in engine_ids:
            owner = self.owners[engine_id]
            if not owner.says_cancelled:  # no last event will come to end its entries
                del self.owners[engine_id], client.rows[owner.request_id]
        self.engine.cancel(engine_ids)

    def route(self, events: list[Event], stats: StepStats) -> Outgoing:
        """Each client gets its own events, renamed to its ids, and the pass's stats if it had rows in it."""
        self.last_stats = stats
        batches: dict[Identity, list[Event]] = {identity: [] for identity, c in self.clients.items() if c.rows}
        for event in events:
            owner = self.owners.get(event.request_id)
            if owner is None:
                continue  # its client is gone
            if isinstance(event, LAST_EVENTS):
                del self.owners[event.request_id], self.clients[owner.identity].rows[owner.request_id]
            batches.setdefault(owner.identity, []).append(replace(event, request_id=owner.request_id))
        return [(identity, EventBatch(batch, stats)) for identity, batch in batches.items()]

    def forget(self, identity: Identity, why: str) -> None:
        """The client is gone: its rows are cancelled, and their last events, when they come, go nowhere."""
        client = self.clients.pop(identity, None)
        if client is None:
            return
        log.warning("client %s is gone (%s): cancelling its %d row(s)", identity.hex(), why, len(client.rows))
        for engine_id in client.rows.values():
            del self.owners[engine_id]
        self.engine.cancel(list(client.rows.values()))


class Outbox:
    """The engine thread's side: each pass's events go into a queue, and a wake-up to the I/O thread."""

    def __init__(self, wake: zmq.Socket) -> None:
        self.batches: queue.SimpleQueue[tuple[list[Event], StepStats]] = queue.SimpleQueue()
        self._wake = wake

    def emit(self, events: list[Event], stats: StepStats) -> None:
        self.batches.put((events, stats))
        # Wake-ups already queued (Again) are enough: the I/O thread drains every batch on the next one.
        with contextlib.suppress(zmq.Again):
            self._wake.send(b"", zmq.NOBLOCK)

    def drain(self) -> list[tuple[list[Event], StepStats]]:
        taken = []
        while not self.batches.empty():
            taken.append(self.batches.get_nowait())
        return taken


class EngineServer:
    """The I/O thread: the ROUTER, the wake-ups from the engine thread, and the client table."""

    def __init__(self, router: zmq.Socket, table: ClientTable, outbox: Outbox, wake: zmq.Socket) -> None:
        self.router = router
        self.table = table
        self.outbox = outbox
        self.wake = wake
        self.dropped = DroppedMessages()

    def serve(self, stop: threading.Event, parent_pid: int | None) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake, zmq.POLLIN)
        last_heartbeat = 0.0
        while not stop.is_set():
            ready = dict(poller.poll(HEARTBEAT_S * 1000))
            if self.router in ready:
                self._receive_all()
            if self.wake in ready:
                self._drain_wake()
                self.flush()
            now = time.monotonic()
            if now - last_heartbeat >= HEARTBEAT_S:
                self._send(self.table.heartbeats())
                last_heartbeat = now
            if parent_pid is not None and os.getppid() != parent_pid:
                log.error("the API process that started this engine is gone: stopping")
                stop.set()

    def flush(self) -> None:
        for events, stats in self.outbox.drain():
            self._send(self.table.route(events, stats))

    def _receive_all(self) -> None:
        while True:
            try:
                identity, *frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._send(self.table.receive(identity, decode(frames)))
            except WireError as error:
                self.dropped.add(identity, str(error))
            except Exception as error:  # a fault handling one message drops that message, never the engine
                log.exception("handling a message from %s failed", identity.hex())
                self.dropped.add(identity, f"{type(error).__name__}: {error}")

    def _drain_wake(self) -> None:
        while True:
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _send(self, outgoing: Outgoing) -> None:
        for identity, message in outgoing:
            try:
                self.router.send_multipart([identity, *encode(message)], zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as error:  # EHOSTUNREACH: it disconnected
                self.table.forget(identity, str(error))


class DroppedMessages:
    """Messages that were not valid, logged without letting a flood of them flood the log: the first one, then
    a count at most every `DROPPED_LOG_EVERY_S`."""

    def __init__(self) -> None:
        self.total = 0
        self._unlogged = 0
        self._logged_at = -math.inf

    def add(self, identity: Identity, why: str) -> None:
        self.total += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= DROPPED_LOG_EVERY_S:
            log.warning("dropped %d invalid message(s); the latest from %s: %s", self._unlogged, identity.hex(), why)
            self._unlogged, self._logged_at = 0, now


@dataclass
class BoundRouter:
    router: zmq.Socket
    authenticator: ThreadAuthenticator | None  # answers CURVE handshakes (tcp with keys)

    def close(self) -> None:
        self.router.close()
        if self.authenticator is not None:
            self.authenticator.stop()


def bind_router(
    context: zmq.Context, address: str, keys_dir: Path | None = None, insecure_tcp: bool = False
) -> BoundRouter:
    """Raises `EngineKeysError` when a tcp address has no keys (`curve.wire_keys`) and `zmq.ZMQError` for an
    address that cannot be bound (in use, malformed)."""
    keys = wire_keys(address, keys_dir, insecure_tcp)
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone client raises instead of being dropped silently
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client that reconnects keeps its identity
    router.setsockopt(zmq.SNDHWM, 0)  # clients read all the time; their rows bound what waits
    router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    router.setsockopt(zmq.LINGER, 1000)
    keep_alive(router)
    try:
        authenticator = secure_server(context, router, keys) if keys is not None else None
        if address.startswith("tcp://") and keys is None:
            log.warning("the engine at %s serves plaintext tcp: anyone who reaches it can submit rows", address)
        router.bind(address)
    except BaseException:
        router.close(linger=0)
        raise
    return BoundRouter(router, authenticator)


def load_model(settings: Settings) -> FrozenT5:
    """Loads the model on this (the I/O) thread, which stays serial: the model's threads are the engine thread's
    (`prepare_model`), the only thread that runs it (server/cpus.py)."""
    serial_thread()
    return FrozenT5.load(settings.model, settings.device, settings.dtype)


def prepare_model(model: FrozenT5, settings: Settings) -> None:
    """On the engine thread, before its first pass: its torch threads, and the warm-up."""
    model.use_cpu_threads(settings.cpu_threads)
    if settings.warmup:
        model.warmup()


def run_engine_process(settings: Settings, address: str, parent_pid: int | None = None) -> None:
    """Loads the model, then serves clients at `address` until SIGTERM or SIGINT (or, given `parent_pid`, until
    that process is gone). Raises `EngineKeysError` when a tcp address has no usable keys and `zmq.ZMQError` when
    `address` cannot be bound (both before the model loads), and
    `ModelLoadError` when the model cannot load; exits with an error when the engine loop fails (the API process
    then restarts an engine it started).

    The address is bound first, but nothing is read from it before the model is ready: clients that connect
    meanwhile hear their first `Hello` only then."""
    context = zmq.Context()
    try:
        bound = bind_router(context, address, settings.engine_keys_dir, settings.engine_insecure_tcp)
        model = load_model(settings)
    except BaseException:
        context.destroy(linger=0)
        raise
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    wake_address = f"inproc://wake-{uuid.uuid4().hex}"
    wake_in, wake_out = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    wake_in.bind(wake_address)
    wake_out.connect(wake_address)
    outbox = Outbox(wake_out)
    engine = Engine(model, engine_limits(settings), outbox.emit)
    engine_id = uuid.uuid4().hex
    server = EngineServer(bound.router, ClientTable(engine, engine_id), outbox, wake_in)
    failure: list[BaseException] = []
    ready = threading.Event()
    thread = threading.Thread(
        target=_run_engine, args=(engine, settings, ready, stop, failure), name="softserve-engine"
    )
    thread.start()
    ready.wait()  # the model prepared, or the loop failed (`stop` is then set and `serve` returns at once)
    if not failure:
        log.info("engine %s ready at %s (model %s on %s)", engine_id[:8], address, model.model_id, model.device)
    try:
        server.serve(stop, parent_pid)
    finally:
        stop.set()
        thread.join()
        server.flush()  # the rows that ended with the loop (`shutdown`) tell their clients
        bound.close()
        context.destroy(linger=1000)
    if failure:
        raise SystemExit(f"error: the engine loop failed: {type(failure[0]).__name__}: {failure[0]}")


def _run_engine(
    engine: Engine, settings: Settings, ready: threading.Event, stop: threading.Event, failure: list[BaseException]
) -> None:
    try:
        prepare_model(engine.model, settings)
        ready.set()
        engine.run(stop)
    except BaseException as error:
        log.exception("the engine loop failed")
        failure.append(error)
        stop.set()
        ready.set()


def main(argv: list[str] | None = None) -> None:
    """The child an API process starts: its settings come whole from `SOFTSERVE_ENGINE_SETTINGS_JSON`."""
    parser = argparse.ArgumentParser(prog="python -m server.engine.process")
    parser.add_argument("--address", required=True, help="ZeroMQ address to bind (ipc:// or tcp://)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit once this process is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.model_validate_json(os.environ[SETTINGS_VARIABLE])
    try:
        run_engine_process(settings, args.address, args.parent_pid)
    except (ModelLoadError, EngineKeysError) as error:
        print(f"error: {error}", file=sys.stderr)  # the last line, which the API process reports
        sys.exit(1)


if __name__ == "__main__":
    main()
