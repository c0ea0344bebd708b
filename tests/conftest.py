from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.serving.model import FrozenT5
from server.settings import Settings
from tests.checkpoints import d768_config, save_checkpoint, t5_small_config
from tests.serving import running_server

# The prompts released with the paper's code ship with the project (see their NOTICE.md).
REAL_PROMPTS = Path(__file__).resolve().parents[1] / "testdata" / "prompts"
if not sorted(REAL_PROMPTS.glob("*.npy")):  # a missing fixture fails the run instead of skipping its tests
    raise RuntimeError(f"the released prompts are missing from {REAL_PROMPTS}")


@pytest.fixture(scope="session")
def tiny() -> FrozenT5:
    return FrozenT5.load("tiny", device="cpu")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_wait_ms=2)


@pytest.fixture
def base_url(settings: Settings, tiny: FrozenT5) -> Iterator[str]:
    with running_server(settings, tiny) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        yield http


@pytest.fixture(scope="session")
def t5_small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model with t5-small's shapes saved with `save_pretrained` (byte tokenizer, 32128 rows)."""
    return save_checkpoint(t5_small_config(), tmp_path_factory.mktemp("t5-small-random"))


@pytest.fixture(scope="session")
def t5_small(t5_small_dir: Path) -> FrozenT5:
    return FrozenT5.load(str(t5_small_dir), device="cpu")


@pytest.fixture(scope="session")
def d768_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(d768_config(), tmp_path_factory.mktemp("d768-random"))


@pytest.fixture(scope="session")
def d768(d768_dir: Path) -> FrozenT5:
    return FrozenT5.load(str(d768_dir), device="cpu")


# A real redis-server per test (AOF on, in the test's tmp dir): see tests/redis_server.py.
from tests.redis_server import redis_server  # noqa: E402, F401
