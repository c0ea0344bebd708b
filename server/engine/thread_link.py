"""`ThreadLink`: the engine in a thread of this process (an app built around a model object in Python)."""

from __future__ import annotations

import asyncio
import threading

from server.engine.engine import Engine
from server.engine.limits import EngineLimits
from server.engine.link import Deliver, Down, Up
from server.engine.protocol import EngineRequest, Event, StepStats
from server.serving.model import FrozenT5


class ThreadLink:
    def __init__(self, model: FrozenT5, limits: EngineLimits) -> None:
        self.model = model
        self.limits = limits
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._engine: Engine | None = None

    async def start(self, deliver: Deliver, down: Down, up: Up) -> None:
        loop = asyncio.get_running_loop()

        def emit(events: list[Event], stats: StepStats) -> None:
            loop.call_soon_threadsafe(deliver, events, stats)

        self._engine = Engine(self.model, self.limits, emit)
        self._thread = threading.Thread(target=self._engine.run, args=(self._stop,), name="softserve-engine")
        self._thread.start()
        up()

    def submit(self, requests: list[EngineRequest]) -> None:
        assert self._engine is not None
        self._engine.submit(requests)

    def cancel(self, request_ids: list[int]) -> None:
        assert self._engine is not None
        self._engine.cancel(request_ids)

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
