"""`EngineClient`: the HTTP side of the engine. Submits rows, routes each event to the request waiting for it,
counts the rows this process has in the engine (what sheds load before any work), and fails them with 503 when
the engine goes down instead of letting them hang."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from server.engine.link import EngineLink
from server.engine.protocol import (
    EngineRequest,
    Event,
    Failed,
    Finished,
    Generated,
    Joined,
    Scores,
    StepStats,
    Token,
)
from server.errors import InvalidInput, Overloaded
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

RowEvents = asyncio.Queue  # of `Event`: what one row hears from the engine, in order
FINAL = (Finished, Scores, Generated, Failed)


class EngineClient:
    def __init__(self, link: EngineLink, max_queue_size: int, metrics: ServerMetrics) -> None:
        self.link = link
        self.capacity = max_queue_size  # rows in flight: waiting for a place in the decoder step, or in it
        self.metrics = metrics
        self.healthy = False
        self.problem = "the engine is starting"
        self._ids = itertools.count(1)
        self._rows: dict[int, RowEvents] = {}
        self._submitted_at: dict[int, float] = {}  # generate rows not yet given their first token

    async def start(self) -> None:
        await self.link.start(self._deliver, self._down, self._up)

    async def stop(self) -> None:
        await self.link.stop()
        self.healthy = False  # an orderly stop, not an outage
        self._down("the server is shutting down")

    # Admission: the same interface as the static batcher's.

    @property
    def depth(self) -> int:
        return len(self._rows)

    @property
    def is_full(self) -> bool:
        return len(self._rows) >= self.capacity

    def queue_full(self) -> Overloaded:
        return Overloaded(f"the engine has no room ({self.capacity} rows in flight); retry shortly")

    def check_room(self, rows: int) -> None:
        if rows > self.capacity:
            raise InvalidInput(f"{rows} rows in one request; this server queues at most {self.capacity}")
        if not self.healthy:
            raise Overloaded(f"the engine is not available ({self.problem}); retry shortly")
        if len(self._rows) + rows > self.capacity:
            raise self.queue_full()

    def new_id(self) -> int:
        return next(self._ids)

    def submit(self, requests: list[EngineRequest]) -> list[RowEvents]:
        """Hands the rows to the engine (all or none) and returns each row's event queue, in order."""
        self.check_room(len(requests))
        queues: list[RowEvents] = []
        now = time.perf_counter()
        for request in requests:
            events: RowEvents = asyncio.Queue()
            self._rows[request.request_id] = events
            queues.append(events)
            self._submitted_at[request.request_id] = now
        self.link.submit(requests)
        return queues

    def cancel(self, request_ids: list[int]) -> None:
        """The rows' results are no longer wanted: the engine drops them at its next step."""
        live = [i for i in request_ids if i in self._rows]
        for request_id in live:
            del self._rows[request_id]
            self._submitted_at.pop(request_id, None)
        if live and self.healthy:
            self.link.cancel(live)

    def _deliver(self, events: list[Event], stats: StepStats) -> None:
        metrics = self.metrics.engine
        now = time.perf_counter()
        for event in events:
            if isinstance(event, Token):
                metrics.generated_tokens.inc()
                submitted = self._submitted_at.pop(event.request_id, None)
                if submitted is not None:
                    metrics.time_to_first_token.observe(now - submitted)
            elif isinstance(event, Joined):
                metrics.rows_joined.inc()
                submitted = self._submitted_at.get(event.request_id)
                if submitted is not None:
                    self.metrics.queue_wait.observe(now - submitted)
            row = self._rows.get(event.request_id)
            if row is None:
                continue  # cancelled here already
            row.put_nowait(event)
            if isinstance(event, FINAL):
                del self._rows[event.request_id]
                self._submitted_at.pop(event.request_id, None)
        if stats.active_rows:
            metrics.step_duration.observe(stats.step_seconds)
            self.metrics.batch_size.observe(stats.active_rows)
            self.metrics.batch_tasks.observe(stats.tasks)
        metrics.active_rows.set(stats.active_rows)
        metrics.waiting_rows.set(stats.waiting_rows)
        for reason, count in stats.left.items():
            metrics.rows_left.labels(reason).inc(count)

    def _down(self, reason: str) -> None:
        if self.healthy:
            log.error("the engine is down: %s", reason)
        self.healthy, self.problem = False, reason
        self.metrics.engine.engine_up.set(0)
        rows, self._rows = self._rows, {}
        self._submitted_at.clear()
        for request_id, events in rows.items():
            events.put_nowait(Failed(request_id, "overloaded", f"the engine stopped ({reason}); retry shortly"))

    def _up(self) -> None:
        if not self.healthy:
            log.info("the engine is up")
        self.healthy, self.problem = True, ""
        self.metrics.engine.engine_up.set(1)
