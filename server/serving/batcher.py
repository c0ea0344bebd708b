"""`TenantFairBatcher`: gathers rows of any tasks into batches and runs them on one model thread.

Each submitted row gets a future. One background task fills a batch until `max_batch_size` rows or
`max_batch_tokens` tokens, or until `max_wait_ms` has passed since it began waiting, then hands the
batch to a single worker thread (the only thread that touches the model) and resolves the futures.
Rows are taken round-robin across tenants, so one tenant's flood cannot starve another.
The batcher knows nothing about models: it runs any `run_batch(payloads) -> results` callable, whose
results are `R`s or errors (one per payload, in order); each row's future gets its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from server.errors import InferenceFailed, InvalidInput, Overloaded
from server.stopping import cancel_and_wait

log = logging.getLogger(__name__)

P = TypeVar("P")  # what a row carries to `run_batch`
R = TypeVar("R")  # what `run_batch` gives back for a row


class BatchObserver(Protocol):
    def queue_wait(self, seconds: float) -> None: ...
    def queue_depth(self, rows: int) -> None: ...
    def dropped(self, rows: int) -> None: ...


class _NoObserver:
    def queue_wait(self, seconds: float) -> None:
        pass

    def queue_depth(self, rows: int) -> None:
        pass

    def dropped(self, rows: int) -> None:
        pass


@dataclass
class _Pending(Generic[P, R]):
    payload: P
    cost: int
    future: asyncio.Future[R]
    enqueued_at: float = field(default_factory=time.perf_counter)


class TenantFairBatcher(Generic[P, R]):
    def __init__(
        self,
        run_batch: Callable[[list[P]], Sequence[R | Exception]],
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        max_queue_size: int,
        observer: BatchObserver | None = None,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue_size = max_queue_size
        self._observer = observer or _NoObserver()
        self._queues: OrderedDict[str, deque[_Pending[P, R]]] = OrderedDict()
        self._depth = 0
        self._queued_tokens = 0
        self._has_work = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softserve-model")
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="softserve-batcher")

    async def stop(self) -> None:
        """Stops taking batches; rows still queued fail with `Overloaded`."""
        await cancel_and_wait(self._task)
        self._task = None
        for queue in self._queues.values():
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(Overloaded("the server is shutting down"))
        self._queues.clear()
        self._depth = self._queued_tokens = 0
        self._executor.shutdown(wait=True)

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Runs `fn` on the model thread, between batches (e.g. warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def is_full(self) -> bool:
        """No room for even one more row (what a caller may check before reading a request at all)."""
        return self._depth >= self.max_queue_size

    def queue_full(self) -> Overloaded:
        return Overloaded(f"the request queue is full ({self.max_queue_size} rows); retry shortly")

    def check_room(self, rows: int) -> None:
        """Raises `Overloaded` if `rows` more rows would not fit now: callers check before doing any work.

        `InvalidInput` (permanent) if they could never fit: a client retrying a 503 must eventually succeed.
        """
        if rows > self.max_queue_size:
            raise InvalidInput(f"{rows} rows in one request; this server queues at most {self.max_queue_size}")
        if self._depth + rows > self.max_queue_size:
            raise self.queue_full()

    def submit(self, payloads: Sequence[P], costs: list[int], tenant: str) -> list[asyncio.Future[R]]:
        """Queues rows (all or none) and returns one future per row, in order."""
        self.check_room(len(payloads))
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(tenant, deque())
        futures = []
        for payload, cost in zip(payloads, costs, strict=True):
            item: _Pending[P, R] = _Pending(payload, cost, loop.create_future())
            queue.append(item)
            futures.append(item.future)
        self._depth += len(payloads)
        self._queued_tokens += sum(costs)
        self._observer.queue_depth(self._depth)
        self._has_work.set()
        if self._depth >= self.max_batch_size or self._queued_tokens >= self.max_batch_tokens:
            self._batch_full.set()
        return futures

    async def _loop(self) -> None:
        while True:
            await self._has_work.wait()
            await self._wait_for_fill()
            batch = self._take_batch()
            if batch:
                await self._execute(batch)

    async def _wait_for_fill(self) -> None:
        if self._batch_full.is_set() or self.max_wait_s <= 0:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._batch_full.wait(), self.max_wait_s)

    def _take_batch(self) -> list[_Pending[P, R]]:
        """Takes rows round-robin across tenants up to the batch limits; drops cancelled rows."""
        batch: list[_Pending[P, R]] = []
        tokens = dropped = 0
        while self._queues and len(batch) < self.max_batch_size:
            tenant, queue = next(iter(self._queues.items()))
            item = queue[0]
            if item.future.done():
                dropped += 1
            elif batch and tokens + item.cost > self.max_batch_tokens:
                break
            else:
                batch.append(item)
                tokens += item.cost
            queue.popleft()
            self._depth -= 1
            self._queued_tokens -= item.cost
            del self._queues[tenant]
            if queue:
                self._queues[tenant] = queue  # to the back of the round
        if dropped:
            self._observer.dropped(dropped)
        if self._depth < self.max_batch_size and self._queued_tokens < self.max_batch_tokens:
            self._batch_full.clear()
        if not self._queues:
            self._has_work.clear()
        self._observer.queue_depth(self._depth)
        return batch

    async def _execute(self, batch: list[_Pending[P, R]]) -> None:
        now = time.perf_counter()
        for item in batch:
            self._observer.queue_wait(now - item.enqueued_at)
        payloads = [item.payload for item in batch]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, payloads)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} rows")
        except Exception as error:
            log.exception("batch of %d rows failed", len(batch))
            results = [InferenceFailed(f"inference failed for this batch: {type(error).__name__}")] * len(batch)
        for item, result in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
