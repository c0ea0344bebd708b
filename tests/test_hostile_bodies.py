"""Hostile bodies and slow clients over real sockets against a real `softserve serve` process (its engine in a
process of its own): 60 MB bodies of every request schema's shape never stall the event loop nor get the
engine restarted, bodies that trickle in are closed, one address cannot hold every connection, and a full
queue sheds requests before their body is read."""

from __future__ import annotations

import json
import multiprocessing
import re
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import httpx
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import strict_json
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from tests.serving import server_process
from tests.test_hostile_http import GIVE_UP_S, closed_by_server, connect, npy_bytes

FAST_FLAGS = ("--warmup", "false")
# Where only the front door is tested, the engine runs as a thread: its process would cost a start-up (seconds of
# CPU) and test nothing more.
FRONT_DOOR_FLAGS = (*FAST_FLAGS, "--engine", "thread")
BIG = 60 * 1024 * 1024
HEALTH_P99_S = 0.25  # the old code stalled /health 7-10 s on one such body; a loaded 2-core CI box needs slack


def repeated(head: bytes, item: bytes, tail: bytes, size: int) -> bytes:
    """`head` + `item` repeated (comma-separated) to about `size` bytes + `tail`."""
    count = max(1, (size - len(head) - len(tail)) // (len(item) + 1))
    return head + (item + b",") * (count - 1) + item + tail  # a bytes product: no list of millions of items


def body_shapes(size: int) -> Iterator[tuple[str, str, bytes]]:
    """(name, route, body) of about `size` bytes in every shape a request schema lets a client grow; each body is
    built when its turn comes, so only one is held at a time."""
    chat = b'{"model": "t", "messages": [{"role": "user", "content": ['
    shapes: dict[str, tuple[str, Callable[[], bytes]]] = {
        "chat content parts": (
            "/v1/chat/completions",
            lambda: repeated(chat, b'{"type":"text","text":""}', b"]}]}", size),
        ),
        "chat messages": (
            "/v1/chat/completions",
            lambda: repeated(b'{"model": "t", "messages": [', b'{"role":"user","content":""}', b"]}", size),
        ),
        "logit_bias": (
            "/v1/chat/completions",
            lambda: (
                b'{"model": "t", "messages": [{"role": "user", "content": "x"}], "logit_bias": {'
                + ",".join(map('"{}":1'.format, range(size // 12))).encode()
                + b"}}"
            ),
        ),
        "tools": (
            "/v1/chat/completions",
            lambda: repeated(b'{"model": "t", "messages": [], "tools": [', b"{}", b"]}", size),
        ),
        "prompt list": ("/v1/completions", lambda: repeated(b'{"model": "t", "prompt": [', b'""', b"]}", size)),
        "generate inputs": ("/v1/generate", lambda: repeated(b'{"task_id": "t", "inputs": [', b'""', b"]}", size)),
        "classify labels": (
            "/v1/classify",
            lambda: repeated(b'{"task_id": "t", "inputs": "x", "labels": [', b'"a"', b"]}", size),
        ),
        "nested brackets": ("/v1/generate", lambda: b"[" * size),
        "nested objects": ("/v1/generate", lambda: b'{"a":' * (size // 5)),
        "numbers": (
            "/v1/generate",
            lambda: repeated(b'{"task_id": "t", "inputs": "x", "version": [', b"1", b"]}", size),
        ),
        "giant string": ("/v1/generate", lambda: b'{"task_id": "t", "inputs": "' + b"x" * size + b'"}'),
        "training examples": (
            "/v1/training-jobs",
            lambda: repeated(b'{"task_id": "t", "train": [', b'{"input":"a","target":"b"}', b"]}", size),
        ),
        "activate": ("/v1/prompts/t/activate", lambda: repeated(b'{"version": [', b"1", b"]}", size)),
    }
    for name, (path, build) in shapes.items():
        yield name, path, build()


def probe_health(url: str, probing: EventType, stop: EventType, durations: Queue) -> None:
    """Times `GET /health` over one keep-alive connection until `stop` (`probing` once it has begun); puts the
    durations, or a failure."""
    times: list[float] = []
    with httpx.Client(base_url=url, timeout=GIVE_UP_S) as http:
        while not stop.is_set():
            started = time.perf_counter()
            status = http.get("/health").status_code
            times.append(time.perf_counter() - started)
            probing.set()
            if status != 200:
                durations.put(f"/health answered {status}")
                return
    durations.put(times)


@contextmanager
def health_probed(url: str) -> Iterator[Callable[[], float]]:
    """Probes `/health` from a process of its own (the test's clients building and sending 60 MB bodies hold this
    process's GIL, which must not count as the server's latency); yields a function giving its p99 once done."""
    context = multiprocessing.get_context("spawn")
    probing, stop, durations = context.Event(), context.Event(), context.Queue()
    prober = context.Process(target=probe_health, args=(url, probing, stop, durations), daemon=True)
    prober.start()
    result: list[float] = []
    assert probing.wait(GIVE_UP_S), "the probe did not start"
    try:
        yield lambda: statistics.quantiles(result, n=100)[98]
    finally:
        stop.set()
        outcome = durations.get(timeout=GIVE_UP_S)
        prober.join(timeout=GIVE_UP_S)
    assert isinstance(outcome, list) and len(outcome) >= 10, outcome
    result.extend(outcome)
    cuts = statistics.quantiles(result, n=100)
    print(f"/health: {len(result)} probes, p50 {cuts[49] * 1000:.1f} ms, p99 {cuts[98] * 1000:.1f} ms")  # `-s` shows it


def post_raw(
    url: str, path: str, body: bytes, chunked: bool, method: str = "POST", media_type: str = "application/json"
) -> tuple[int, dict]:
    """Sends `body` over a raw socket, with its `Content-Length` or chunked, stopping as soon as the server answers
    (a server that refuses a body early must not wait for the rest); returns the status and the JSON answer."""
    sock = connect(url)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {media_type}\r\n{framing}\r\n\r\n".encode())
    sock.setblocking(False)
    pieces = [body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)]
    try:
        for piece in pieces:
            if answered(sock):
                break
            sock.setblocking(True)
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sock.setblocking(False)
        else:
            if chunked:
                sock.setblocking(True)
                sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed; the answer is read below
    return read_answer(sock)


def answered(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    sock.setblocking(True)
    sock.settimeout(GIVE_UP_S)
    received = b""
    with sock:
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < content_length(received):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload[: content_length(received)])


def content_length(received: bytes) -> int:
    found = re.search(rb"(?im)^content-length: *(\d+)", received.partition(b"\r\n\r\n")[0])
    return int(found.group(1)) if found else 1 << 30


def engine_restarts(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=GIVE_UP_S).text
    found = re.search(r"^softserve_engine_restarts_total (\S+)$", metrics, re.MULTILINE)
    assert found is not None, "the server exports no engine restart counter"
    return float(found.group(1))


def children(process: psutil.Process) -> set[int]:
    return {child.pid for child in process.children(recursive=True)}


def upload_prompt(url: str, task_id: str = "t", headers: dict[str, str] | None = None) -> None:
    files = {"file": ("p", npy_bytes())}
    response = httpx.put(f"{url}/v1/prompts/{task_id}", files=files, headers=headers, timeout=GIVE_UP_S)
    assert response.status_code == 201, response.text


# --- bounded parsing ------------------------------------------------------------------------------


@pytest.mark.timing
def test_60_mb_bodies_of_every_shape_are_refused_without_stalling_the_server(tmp_path: Path) -> None:
    with server_process(tmp_path, *FAST_FLAGS) as (process, url):
        upload_prompt(url)
        engine = children(psutil.Process(process.pid))
        assert engine, "the engine runs in a process of its own"
        shapes = body_shapes(BIG)
        with health_probed(url) as health_p99:
            for name, path, body in shapes:
                for chunked in (False, True):  # refused by its Content-Length, or counted as it streams
                    status, answer = post_raw(url, path, body, chunked)
                    assert (status, answer["error"]["code"]) == (413, "body_too_large"), (name, chunked, answer)
                    assert "max_json_body_bytes" in answer["error"]["message"]
            form = b"a=&" * (BIG // 3)  # no route takes a URL-encoded form, but one with form fields would parse it
            status, answer = post_raw(url, "/v1/prompts/u", form, False, "PUT", "application/x-www-form-urlencoded")
            assert (status, answer["error"]["code"]) == (413, "body_too_large"), answer
        assert health_p99() <= HEALTH_P99_S, f"/health p99 {health_p99() * 1000:.0f} ms"
        assert engine_restarts(url) == 0
        assert children(psutil.Process(process.pid)) == engine  # the same engine process, never killed
        response = httpx.post(f"{url}/v1/generate", json={"task_id": "t", "inputs": "x"}, timeout=GIVE_UP_S)
        assert response.status_code == 200, response.text


@pytest.mark.timing
def test_bodies_under_the_byte_limit_with_millions_of_values_are_refused_before_parsing(tmp_path: Path) -> None:
    json_limit = Settings().max_inputs_per_request * 4 * 64 * Settings().max_input_tokens  # the derived default
    with server_process(tmp_path, *FAST_FLAGS) as (_, url):
        upload_prompt(url)
        shapes = body_shapes(json_limit)
        with health_probed(url) as health_p99:
            for name, path, body in shapes:
                status, answer = post_raw(url, path, body, chunked=False)
                code = "body_too_large" if name == "giant string" else "body_too_complex"
                assert (status, answer["error"]["code"]) in ((413, code), (422, "invalid_request")), (name, answer)
                if name != "giant string":
                    assert "max_json_values" in answer["error"]["message"], (name, answer)
        assert health_p99() <= HEALTH_P99_S, f"/health p99 {health_p99() * 1000:.0f} ms"
        assert engine_restarts(url) == 0
        assert httpx.get(f"{url}/v1/training-jobs", timeout=GIVE_UP_S).json()["jobs"] == []  # nothing queued


def test_commas_and_brackets_inside_strings_are_not_values(tmp_path: Path) -> None:
    """Text full of JSON punctuation is an input like any other: the value count skips strings."""
    text = '[{"a": 1}, [2, 3]], ' * 200  # 4,000 characters, 1,200 of them brackets and commas
    body = {"task_id": "t", "inputs": [text] * 64, "parameters": {"max_new_tokens": 1}}
    with server_process(tmp_path, *FRONT_DOOR_FLAGS, "--max-json-values", "1000") as (_, url):
        upload_prompt(url)
        response = httpx.post(f"{url}/v1/generate", json=body, timeout=GIVE_UP_S)
        assert response.status_code in (200, 422), response.text
        assert response.json().get("error", {}).get("code") != "body_too_complex"
        too_many = {"task_id": "t", "inputs": ["x"] * 1001}
        refused = httpx.post(f"{url}/v1/generate", json=too_many, timeout=GIVE_UP_S)
        assert (refused.status_code, refused.json()["error"]["code"]) == (413, "body_too_complex")


# --- slow clients ---------------------------------------------------------------------------------

TRICKLE_HEAD = (
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
)


def trickler(url: str, count: int, every_s: float, stop: threading.Event) -> threading.Thread:
    """`count` sockets that each send a request head, then a byte of its body every `every_s`; a socket the
    server closes is opened again (a hostile client keeps its count)."""

    def opened() -> socket.socket:
        sock = connect(url)
        sock.sendall(TRICKLE_HEAD)
        return sock

    def run() -> None:
        socks = [opened() for _ in range(count)]
        while not stop.wait(every_s):
            for i, sock in enumerate(socks):
                try:
                    sock.send(b" ")
                except OSError:
                    sock.close()
                    socks[i] = opened()
        for sock in socks:
            sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.timing
def test_70_trickling_sockets_from_one_address_keep_no_one_out(tmp_path: Path) -> None:
    """At the caps, bodies behind the minimum rate are closed before anyone is refused (the deadlines are set far
    off here, so only the caps can help)."""
    keys = ApiKeys(Settings(data_dir=tmp_path).keys_file)
    other = {"Authorization": f"Bearer {keys.add('other')}"}
    caps = ("--max-connections", "64", "--max-connections-per-client", "48")
    far_off = ("--body-timeout-s", "300", "--body-deadline-s", "300", "--body-rate-grace-s", "300")
    with server_process(tmp_path, *FAST_FLAGS, *caps, *far_off, "--header-timeout-s", "300") as (_, url):
        upload_prompt(url, headers=other)
        stop = threading.Event()
        attack = trickler(url, 70, every_s=0.5, stop=stop)
        try:
            deadline = time.monotonic() + 5
            answered = 0
            while time.monotonic() < deadline:  # a fresh connection each time: each must find room
                health = httpx.get(f"{url}/health", timeout=1.0)
                assert health.status_code == 200, health.text
                generate = {"task_id": "t", "inputs": "x", "parameters": {"max_new_tokens": 2}}
                response = httpx.post(f"{url}/v1/generate", json=generate, headers=other, timeout=1.0)
                assert response.status_code == 200, response.text
                answered += 1
            assert answered >= 3
        finally:
            stop.set()
            attack.join(timeout=GIVE_UP_S)


def trickle_body(sock: socket.socket, every_s: float, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        while not stop.wait(every_s):
            try:
                sock.send(b" ")
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.timing
def test_a_body_behind_the_minimum_rate_or_past_its_deadline_is_closed(tmp_path: Path) -> None:
    """Each byte used to move the body's deadline on: a byte every 0.2 s held a connection for ever."""
    rate = ("--min-body-bytes-per-s", "50", "--body-rate-grace-s", "1", "--body-deadline-s", "3")
    with server_process(tmp_path, *FAST_FLAGS, *rate, "--body-timeout-s", "300") as (_, url):
        slow, steady = connect(url), connect(url)
        for sock in (slow, steady):
            sock.sendall(TRICKLE_HEAD)
        stop = threading.Event()
        senders = [trickle_body(slow, 0.2, stop), trickle_body(steady, 0.01, stop)]  # 5 B/s, and ~100 B/s
        started = time.monotonic()
        try:
            assert closed_by_server(slow)  # 5 B/s < 50 B/s once its 1 s of grace is over
            slow_closed_after = time.monotonic() - started
            assert closed_by_server(steady)  # fast enough, but not whole 3 s after its head
            steady_closed_after = time.monotonic() - started
            assert slow_closed_after < 2.5 < steady_closed_after < 10, (slow_closed_after, steady_closed_after)
        finally:
            stop.set()
            for sender in senders:
                sender.join(timeout=GIVE_UP_S)
            slow.close()
            steady.close()
        assert httpx.get(f"{url}/health", timeout=GIVE_UP_S).status_code == 200


def connect_from(url: str, source: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((host, int(port)))
    return sock


def test_one_address_gets_at_most_its_cap_of_busy_connections(tmp_path: Path) -> None:
    """Busy connections (bodies arriving fast enough) are not closed to make room: the address's next request
    gets 503 `too_many_connections`, while another address is served."""
    flags = ("--max-connections-per-client", "4", "--min-body-bytes-per-s", "5", "--body-rate-grace-s", "1")
    with server_process(tmp_path, *FRONT_DOOR_FLAGS, *flags) as (_, url):
        busy = [connect(url) for _ in range(4)]
        stop = threading.Event()
        senders = []
        for sock in busy:
            sock.sendall(TRICKLE_HEAD)
            senders.append(trickle_body(sock, 0.02, stop))  # ~50 B/s: busy, not stuck
        try:
            wait_until(lambda: refused_by_cap(url, "127.0.0.1"))
            other = connect_from(url, "127.0.0.2")
            other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_answer(other) == (200, {"status": "ok"})
        finally:
            stop.set()
            for sender in senders:
                sender.join(timeout=GIVE_UP_S)
            for sock in busy:
                sock.close()
        wait_until(lambda: httpx.get(f"{url}/health", timeout=GIVE_UP_S).status_code == 200)


def refused_by_cap(url: str, source: str) -> bool:
    sock = connect_from(url, source)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    status, answer = read_answer(sock)
    return status == 503 and answer["error"]["code"] == "too_many_connections"


def wait_until(condition: Callable[[], bool], timeout_s: float = GIVE_UP_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.05)


# --- shedding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/chat/completions"])
def test_a_full_queue_sheds_before_the_body_is_read(tmp_path: Path, path: str) -> None:
    """The 503 comes while the body is still unsent (it never will be), and the connection stays usable."""
    queue = ("--max-queue-size", "1", "--shed-delay-ms", "0", "--max-active-rows", "1")
    long_rows = ("--max-new-tokens", "4096", "--max-beam-tokens", "4096")
    with server_process(tmp_path, *FRONT_DOOR_FLAGS, *queue, *long_rows) as (_, url):
        upload_prompt(url)
        long_row = {"task_id": "t", "inputs": "x", "parameters": {"max_new_tokens": 4096, "ignore_eos": True}}
        with connect(url) as holder:  # holds the queue's one place until it hangs up, which cancels its row
            body = json.dumps(long_row).encode()
            holder.sendall(json_request_head("/v1/generate", len(body)) + body)
            wait_until(lambda: engine_rows(url) >= 1)
            sock = connect(url)
            sock.sendall(
                json_request_head(path, 1000)
            )  # no body at all: only a server that does not read it can answer
            status, answer = read_answer(sock)
            assert (status, answer["error"]["code"]) == (503, "overloaded")
        metrics = httpx.get(f"{url}/metrics", timeout=GIVE_UP_S).text
        assert f'softserve_requests_total{{route="{path}",status="503"}} 1.0' in metrics
        assert 'softserve_rejections_total{reason="overloaded"} 1.0' in metrics


def json_request_head(path: str, length: int) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()


def engine_rows(url: str) -> float:
    """Rows in the decoder step or waiting for it."""
    metrics = httpx.get(f"{url}/metrics", timeout=GIVE_UP_S).text
    found = re.findall(r"^softserve_engine_(?:active|waiting)_rows (\S+)$", metrics, re.MULTILINE)
    return sum(float(value) for value in found)


# --- the value count ------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{},:"\\ab\u00e9'),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(alphabet='[{,"\\a'), children, max_size=6)
    ),
    max_leaves=40,
)


def counted_values(value: object) -> int:
    """What `max_json_values` counts, from the value itself: each container and string, and each comma."""
    if isinstance(value, str):
        return 1
    if isinstance(value, list):
        return 1 + max(0, len(value) - 1) + sum(counted_values(item) for item in value)
    if isinstance(value, dict):
        return 1 + max(0, len(value) - 1) + sum(1 + counted_values(item) for item in value.values())
    return 0


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.integers(0, 60), st.booleans())
def test_the_value_count_is_exact_whatever_the_strings_hold(value: object, limit: int, ascii_only: bool) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    by_counts = strict_json.values_over_by_counts(body, limit)
    walked = strict_json.walked_values_over(body, limit)
    assert walked == (counted_values(value) > limit)
    assert by_counts in (None, walked)
