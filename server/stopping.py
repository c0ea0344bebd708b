"""Stopping background tasks at shutdown, even those that swallow a cancellation.

A cancel can be lost: redis-py turns a `CancelledError` that lands as its own read timeout fires into a
`TimeoutError`, which its `Retry` answers with another read. A shutdown that cancels such a task once and
waits for it waits forever (seen as a replica that never exited, about once in a hundred stops).
`cancel_and_wait` cancels again until the task ends, and gives up on it, loudly, rather than hang.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

CANCEL_EVERY_S = 0.1
PATIENCE_S = 5.0


async def cancel_and_wait(*tasks: asyncio.Task | None, patience_s: float = PATIENCE_S) -> None:
    """Cancels `tasks` (None entries are skipped) every `CANCEL_EVERY_S` until each has ended, for at most
    `patience_s`; what they raised is retrieved and dropped, as `gather(..., return_exceptions=True)` does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    started = [task for task in tasks if task is not None]
    running = {task for task in started if not task.done()}
    while running and loop.time() < deadline:
        for task in running:
            task.cancel()
        _, running = await asyncio.wait(running, timeout=min(CANCEL_EVERY_S, max(deadline - loop.time(), 0.0)))
    for task in running:
        log.warning("task %s did not stop within %g s of being cancelled; left behind", task.get_name(), patience_s)
    for task in started:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: asyncio logs an exception no one retrieved
