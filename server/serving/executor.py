"""`Executor`: where the inference service sends rows. The static batcher (`StaticExecutor`, one `generate`
call per batch) and the continuous engine (`server.engine.executor.EngineExecutor`) both implement it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from server.errors import Overloaded
from server.serving.batch_runner import AnyWork, WorkResult
from server.serving.batcher import TenantFairBatcher

ClientGone = Callable[[], Awaitable[None]]  # returns once the request's client has left


class Executor(Protocol):
    @property
    def is_full(self) -> bool:
        """No room for even one more row (checked before a request's body is read)."""

    def queue_full(self) -> Overloaded: ...

    def check_room(self, rows: int) -> None:
        """`Overloaded` if `rows` more rows do not fit now; `InvalidInput` if they never could."""

    def submit(self, works: Sequence[AnyWork], tenant: str, deadline: float) -> list[asyncio.Future[Any]]:
        """Queues the rows (all or none); one future per row, resolving to its kind's result or error.
        `deadline` is `time.monotonic()` past which the rows are not wanted."""

    def abandon(self, works: Sequence[AnyWork], futures: Sequence[asyncio.Future[Any]]) -> None:
        """The request ended: rows not done yet are dropped, queued or running."""

    async def stop(self) -> None: ...


class StaticExecutor:
    """The static path: rows gathered into batches, one model call per decoding group."""

    def __init__(self, batcher: TenantFairBatcher[AnyWork, WorkResult]) -> None:
        self.batcher = batcher

    @property
    def is_full(self) -> bool:
        return self.batcher.is_full

    def queue_full(self) -> Overloaded:
        return self.batcher.queue_full()

    def check_room(self, rows: int) -> None:
        self.batcher.check_room(rows)

    def submit(self, works: Sequence[AnyWork], tenant: str, deadline: float) -> list[asyncio.Future[Any]]:
        return list(self.batcher.submit(works, [work.cost for work in works], tenant))

    def abandon(self, works: Sequence[AnyWork], futures: Sequence[asyncio.Future[Any]]) -> None:
        for work in works:
            work.row.abandoned.set()  # the model thread skips them at the next group, or stops at the next step
        for future in futures:
            future.cancel()  # rows still queued are dropped; a no-op once done

    async def stop(self) -> None:
        await self.batcher.stop()
