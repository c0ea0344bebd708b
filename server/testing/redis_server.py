"""A real `redis-server` for tests and benches: free port, AOF in a temp dir, stop/kill/restart on the same data,
and pause/resume (SIGSTOP/SIGCONT: a stalled Redis, which accepts connections and answers nothing).

Configured as production is (docker-compose.yml): `appendonly yes`, `appendfsync everysec`,
`maxmemory-policy noeviction`; RDB snapshots off so the AOF alone proves durability.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.testing.processes import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> redis.Redis:
        """A plain client; it does not retry, so calls fail at once while the server is down."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))

    def start(self, timeout_s: float = 10) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.data_dir),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
            "save": "",
            "logfile": str(self.data_dir / "redis.log"),
        }
        argv = [REDIS_SERVER, *(item for name, value in options.items() for item in (f"--{name}", value))]
        self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.ConnectionError:
                if not self.running:
                    raise RuntimeError(f"redis-server exited; see {self.data_dir / 'redis.log'}") from None
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout_s} s")

    def pause(self) -> None:
        """Stalls Redis (SIGSTOP): the kernel still accepts connections and buffers commands; nothing answers."""
        assert self._process is not None and self.running
        os.kill(self._process.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Ends a stall (SIGCONT): Redis runs whatever was buffered meanwhile."""
        if self._paused and self._process is not None:
            os.kill(self._process.pid, signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        """A clean shutdown: Redis flushes its AOF before it exits."""
        self.resume()
        if not self.running:
            return
        try:
            with self.client() as client:
                client.shutdown(nosave=False)
        except redis.ConnectionError:
            pass
        self._wait_exit()

    def kill(self) -> None:
        """A crash (SIGKILL): with `appendfsync everysec` at most the last second of writes is lost."""
        self._paused = False  # SIGKILL ends a stopped process too
        if self.running:
            assert self._process is not None
            self._process.kill()
            self._wait_exit()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _wait_exit(self) -> None:
        assert self._process is not None
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
