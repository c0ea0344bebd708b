"""`EngineLink`: how the HTTP side reaches an engine, wherever it runs (a thread here, or its own process).

The link delivers the engine's events on the event loop, in order, through `deliver`; it calls `down` with a
reason when the engine stops answering (its process died) and `up` once it answers again. `submit` and
`cancel` never block: they hand the requests over and return.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from server.engine.protocol import EngineRequest, Event, StepStats

Deliver = Callable[[list[Event], StepStats], None]
Down = Callable[[str], None]
Up = Callable[[], None]


class EngineLink(Protocol):
    async def start(self, deliver: Deliver, down: Down, up: Up) -> None:
        """Returns once the engine answers (its model loaded and warmed up)."""

    def submit(self, requests: list[EngineRequest]) -> None: ...

    def cancel(self, request_ids: list[int]) -> None: ...

    async def stop(self) -> None: ...
