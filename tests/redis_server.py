"""The `redis_server` fixture: a real `redis-server` on a free port for each test (see `server.testing.redis_server`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.testing.redis_server import REDIS_SERVER, RedisServer

__all__ = ["REDIS_SERVER", "RedisServer", "redis_server"]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed: `make redis` (or `apt-get install redis-server`) installs it")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
