"""Hostile clients at the HTTP layer, over real sockets: non-finite JSON literals, error messages that must
not leak internals, and connections that hold sockets without sending a request."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.serving.model import FrozenT5
from server.settings import Settings
from tests.serving import running_server, server_process

D_TINY = 64
GIVE_UP_S = 30.0  # how long a test waits for the server to close a socket (the timeouts it sets are ~1 s)


def npy_bytes(rows: int = 4) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(rows).normal(size=(rows, D_TINY)).astype(np.float32))
    return buffer.getvalue()


@pytest.fixture
def client(tmp_path: Path, tiny: FrozenT5) -> Iterator[httpx.Client]:
    with (
        running_server(Settings(data_dir=tmp_path, max_wait_ms=2), tiny) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        uploaded = http.put(
            "/v1/prompts/t", files={"file": ("p", npy_bytes())}, data={"metadata": '{"labels": ["a", "b"]}'}
        )
        assert uploaded.status_code == 201, uploaded.text
        yield http


def assert_error(response: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "type", "param"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# --- strict JSON bodies ---------------------------------------------------------------------------

TRAIN = '[{"input": "a", "target": "b"}]'
# (path, a body template with one `%s` where a number goes): every route that takes a JSON body.
JSON_ROUTES = [
    ("/v1/generate", '{"task_id": "t", "inputs": "x", "parameters": {"temperature": %s, "do_sample": true}}'),
    ("/v1/generate", '{"task_id": "t", "inputs": "x", "parameters": {"top_p": %s}}'),
    ("/v1/classify", '{"task_id": "t", "inputs": ["x"], "version": %s}'),
    ("/v1/prompts/t/activate", '{"version": %s}'),
    ("/v1/training-jobs", '{"task_id": "t", "train": ' + TRAIN + ', "config": {"learning_rate": %s}}'),
    ("/v1/training-jobs", '{"task_id": "t", "train": [{"input": "a", "target": "b", "weight": %s}]}'),
]
NON_FINITE = ["NaN", "Infinity", "-Infinity"]


@pytest.mark.parametrize(("path", "template"), JSON_ROUTES, ids=[f"{p} #{i}" for i, (p, _) in enumerate(JSON_ROUTES)])
def test_non_finite_literals_are_refused_on_every_json_route(client: httpx.Client, path: str, template: str) -> None:
    for literal in NON_FINITE:
        body = (template % literal).encode()
        for content_type, data in [
            ("application/json", body),
            ("application/json; charset=utf-8", body),
            ("application/json", body.decode().encode("utf-16")),  # Python's json decodes UTF-16 too
        ]:
            response = client.post(path, content=data, headers={"content-type": content_type})
            error = assert_error(response, 400, "malformed_json")
            assert literal.lstrip("-") in error["message"]
    assert client.get("/v1/training-jobs").json()["jobs"] == []  # nothing was queued
    assert client.get("/v1/prompts/t").json()["active_version"] == 1


def test_any_json_media_type_and_a_missing_one_are_strict_too(client: httpx.Client) -> None:
    body = '{"task_id": "t", "inputs": "x", "parameters": {"top_p": NaN}}'
    response = client.post("/v1/generate", content=body, headers={"content-type": "application/vnd.api+json"})
    assert_error(response, 400, "malformed_json")
    job = '{"task_id": "t", "train": ' + TRAIN + ', "config": {"learning_rate": Infinity}}'
    assert_error(client.post("/v1/training-jobs", content=job), 400, "malformed_json")  # no content-type: JSON
    two_types = [("content-type", "application/json"), ("content-type", "multipart/form-data; boundary=x")]
    assert_error(client.post("/v1/generate", content=body, headers=two_types), 400, "malformed_json")


def test_strict_json_still_takes_those_words_inside_strings(client: httpx.Client) -> None:
    body = '{"task_id": "t", "inputs": ["NaN", "-Infinity and beyond"], "parameters": {"max_new_tokens": 2}}'
    response = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert len(response.json()["outputs"]) == 2


# --- error messages never leak internals ----------------------------------------------------------

LEAK = re.compile(r"object at 0x|Traceback|0x[0-9a-fA-F]{8,}")
ODD_VALUES = [None, True, -1, 1.5, 1e308, 2**70, "", "\ud800", [], {}, [1, "a"], {"a": {"b": []}}, "{input!r}"]


def npy_with_header(header: str) -> bytes:
    """A .npy file whose header dict holds `header`: numpy parses headers with `ast.literal_eval`, whose
    errors carry reprs such as `<ast.Call object at 0x7f...>`."""
    magic = b"\x93NUMPY\x01\x00"
    raw = header.encode()
    raw += b" " * ((64 - (len(magic) + 2 + len(raw) + 1) % 64) % 64) + b"\n"
    return magic + len(raw).to_bytes(2, "little") + raw + bytes(4 * 4 * D_TINY)


EVIL_HEADERS = [
    "{'descr': foo(), 'fortran_order': False, 'shape': (4, 64), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (4, x.y), }",
    "{'descr': lambda: 1, 'fortran_order': False, 'shape': (4, 64), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 64), 'x': __import__('os')}",
]


def odd_requests() -> Iterator[tuple[str, str, dict]]:
    """Odd types in every field of every route, and prompt files with hostile headers."""
    for value in ODD_VALUES:
        for field in ("task_id", "inputs", "version", "parameters", "labels", "length_normalize"):
            for path in ("/v1/generate", "/v1/classify"):
                yield "POST", path, {"json": {"task_id": "t", "inputs": "x", field: value}}
        for field in ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "seed"):
            yield "POST", "/v1/generate", {"json": {"task_id": "t", "inputs": "x", "parameters": {field: value}}}
        yield "POST", "/v1/prompts/t/activate", {"json": {"version": value}}
        yield "POST", "/v1/training-jobs", {"json": {"task_id": "t", "train": value}}
        yield "POST", "/v1/training-jobs", {"json": {"task_id": "t", "train": json.loads(TRAIN), "config": value}}
        for key in ("labels", "input_template", "parameters"):
            metadata = json.dumps({key: value})
            yield "PUT", "/v1/prompts/u", {"files": {"file": ("p", npy_bytes())}, "data": {"metadata": metadata}}
    for header in EVIL_HEADERS:
        yield "PUT", "/v1/prompts/u", {"files": {"file": ("p.npy", npy_with_header(header))}}
    for raw in (b"{", b"[" * 100_000, b"\xff\xfe\xfd", b'{"task_id": "t", "inputs": "x", "' + b"k" * 5000 + b'": 1}'):
        yield "POST", "/v1/generate", {"content": raw, "headers": {"content-type": "application/json"}}


def test_no_error_message_leaks_reprs_or_tracebacks(client: httpx.Client) -> None:
    seen = 0
    for method, path, kwargs in odd_requests():
        if "json" in kwargs:  # ensure_ascii keeps a lone surrogate sendable
            kwargs = {"content": json.dumps(kwargs["json"]), "headers": {"content-type": "application/json"}}
        response = client.request(method, path, **kwargs)
        if response.status_code < 400:
            continue
        error = assert_error(response, tuple(range(400, 500)))
        assert not LEAK.search(error["message"]), (method, path, error)
        assert len(error["message"]) <= 1000
        seen += 1
    assert seen > 100
    assert client.get("/health").status_code == 200


# --- connections that hold sockets ----------------------------------------------------------------


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=GIVE_UP_S)
    return sock


def closed_by_server(sock: socket.socket, timeout_s: float = GIVE_UP_S) -> bool:
    """Whether the server closes the socket within `timeout_s` (reading whatever it sends first)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def is_closed_now(sock: socket.socket) -> bool:
    """Whether the server has already closed the socket (without waiting)."""
    return closed_by_server(sock, timeout_s=0.05)


def trickle(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    """Sends `data` a byte every 0.2 s (a slowloris client) until the server closes the socket."""
    for byte in data:
        if stop.wait(0.2):
            return
        try:
            sock.send(bytes([byte]))
        except OSError:
            return


HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
SLOW_BODY_HEAD = (
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
)
FAST_FLAGS = ("--warmup", "false", "--engine", "thread")  # the front door is tested, not the engine process


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(the Content-Length it announced, the body bytes that came) of a response read to EOF."""
    received = bytearray()
    sock.settimeout(GIVE_UP_S)
    try:
        while chunk := sock.recv(1 << 20):
            received += chunk
    except ConnectionResetError:
        pass
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length is not None, head
    return int(length.group(1)), body


def slow_reader(url: str, path: str) -> socket.socket:
    """Asks for `path` and does not read the response (until the test looks at what came)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def test_idle_slow_header_slow_body_and_slow_reading_connections_are_closed(tmp_path: Path) -> None:
    flags = ("--header-timeout-s", "1", "--keep-alive-timeout-s", "1", "--body-timeout-s", "1", *FAST_FLAGS)
    big_prompt = ("--max-prompt-length", "32768", "--max-batch-tokens", "65536")
    with server_process(tmp_path, *flags, *big_prompt) as (_, url):
        big = {"file": ("p", npy_bytes(rows=32768))}  # an 8 MiB download: more than the socket buffers hold
        assert httpx.put(f"{url}/v1/prompts/big", files=big, timeout=GIVE_UP_S).status_code == 201
        not_reading = slow_reader(url, "/v1/prompts/big/versions/1")
        stopped_reading = time.monotonic()
        idle = [connect(url) for _ in range(5)]  # connect and send nothing
        slow_heads = [connect(url) for _ in range(3)]  # a byte at a time, never finishing in time
        stop = threading.Event()
        trickles = [threading.Thread(target=trickle, args=(s, HEAD, stop), daemon=True) for s in slow_heads]
        for thread in trickles:
            thread.start()
        slow_bodies = [connect(url) for _ in range(2)]  # a whole head, then the body stops
        for sock in slow_bodies:
            sock.sendall(SLOW_BODY_HEAD)
        kept_alive = connect(url)  # one complete request, then idle
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            for sock in [*idle, *slow_heads, *slow_bodies, kept_alive]:
                assert closed_by_server(sock)
            time.sleep(max(0.0, stopped_reading + 5 - time.monotonic()))  # well past its 1 s body timeout
            announced, body = read_response(not_reading)
            assert len(body) < announced  # the server dropped it instead of waiting for the reader
            assert httpx.get(f"{url}/health").status_code == 200
        finally:
            stop.set()
            for sock in [*idle, *slow_heads, *slow_bodies, kept_alive, not_reading]:
                sock.close()


def test_idle_connections_beyond_the_cap_make_room_for_real_requests(tmp_path: Path) -> None:
    cap = 8
    with server_process(tmp_path, "--max-connections", str(cap), "--header-timeout-s", "300", *FAST_FLAGS) as (_, url):
        idle = [connect(url) for _ in range(5 * cap)]
        try:
            for _ in range(5):  # each new connection closes the longest-idle one instead of failing
                assert httpx.get(f"{url}/health", timeout=GIVE_UP_S).status_code == 200
            still_open = [sock for sock in idle if not is_closed_now(sock)]
            assert len(still_open) <= cap
        finally:
            for sock in idle:
                sock.close()


def test_beyond_the_cap_with_every_connection_busy_a_request_gets_503_and_its_socket_is_freed(
    tmp_path: Path,
) -> None:
    cap = 4
    flags = ("--max-connections", str(cap), "--body-timeout-s", "300", "--header-timeout-s", "300", *FAST_FLAGS)
    no_minimum_rate = ("--min-body-bytes-per-s", "0")  # else their stalled bodies would be closed to make room
    with server_process(tmp_path, *flags, *no_minimum_rate) as (_, url):
        busy = [connect(url) for _ in range(cap)]  # requests in flight: their bodies are still coming
        for sock in busy:
            sock.sendall(SLOW_BODY_HEAD)
        time.sleep(1.0)  # let the server parse their heads (not yet: they would be idle, and closed to make room)
        extra = connect(url)
        try:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            extra.settimeout(GIVE_UP_S)
            response = extra.makefile("rb").read()  # read to EOF: the server closes this socket
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503") and b"connection: close" in head.lower()
            assert json.loads(body)["error"]["code"] == "too_many_connections"
        finally:
            extra.close()
            for sock in busy:
                sock.close()
        time.sleep(0.3)  # let the server see them gone
        assert httpx.get(f"{url}/health").status_code == 200
