"""Servers on free loopback ports, for HTTP tests and benches: the real app under uvicorn in a thread, or
`softserve serve` as its own process."""

from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from server.app import create_app
from server.serving.model import FrozenT5
from server.settings import Settings

STOP_WAIT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(settings: Settings, model: FrozenT5 | None = None, timeout_s: float = 60) -> Iterator[str]:
    """Yields the base URL once `/ready` answers 200; shuts the server down on exit."""
    port = free_port()
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
    config = uvicorn.Config(create_app(settings, model), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, timeout_s)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=STOP_WAIT_S)
        if thread.is_alive():  # a server that cannot stop is a bug to show, not a wait that ends in a pass
            faulthandler.dump_traceback(sys.stderr)
            raise RuntimeError(f"the server at {base_url} did not stop within {STOP_WAIT_S:g} s (stacks on stderr)")


def wait_ready(base_url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server at {base_url} exited with {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} was not ready within {timeout_s} s")


@contextmanager
def server_process(data_dir: Path, *flags: str, timeout_s: float = 120) -> Iterator[tuple[subprocess.Popen, str]]:
    """`softserve serve` as its own process (no GIL shared with the test's clients); killed on exit."""
    port = free_port()
    env = {**os.environ, "SOFTSERVE_DATA_DIR": str(data_dir)}
    command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *flags]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout_s, process)
        yield process, url
    finally:
        process.kill()
        process.wait(timeout=30)
