"""`cancel_and_wait`: a shutdown is not held up by a task that swallows a cancellation.

redis-py can turn a cancel that lands as its read timeout fires into a retried read; such a task, cancelled
once and awaited, kept a replica from ever stopping (about once in a hundred stops under load). The race
cannot be produced on demand, so these tasks swallow the cancellation the same way, on purpose.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from server.stopping import cancel_and_wait


async def swallows(cancels: int, seen: list[int]) -> None:
    """Sleeps until cancelled; the first `cancels` cancellations are caught and it goes back to sleep."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append(1)
            if len(seen) > cancels:
                raise


def test_a_task_that_swallows_a_cancel_is_cancelled_again_until_it_ends() -> None:
    async def scenario() -> tuple[bool, int]:
        seen: list[int] = []
        task = asyncio.create_task(swallows(3, seen))
        await asyncio.sleep(0)
        await cancel_and_wait(task, patience_s=60)
        return task.cancelled(), len(seen)

    assert asyncio.run(scenario()) == (True, 4)


def test_a_task_that_never_ends_is_left_behind_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[bool, int]:
        seen: list[int] = []
        task = asyncio.create_task(swallows(10**9, seen), name="stubborn")
        await asyncio.sleep(0)
        await cancel_and_wait(task, patience_s=0.3)
        left = not task.done()
        task.get_coro().close()  # it would otherwise hold asyncio.run's own cancel-all at exit
        return left, len(seen)

    with caplog.at_level(logging.WARNING, logger="server.stopping"):
        left, cancels = asyncio.run(scenario())
    assert left and cancels >= 2  # cancelled more than once before it was given up
    assert "stubborn did not stop within 0.3 s" in caplog.text


def test_what_a_stopped_task_raised_is_retrieved_so_asyncio_reports_nothing() -> None:
    async def scenario() -> list[dict]:
        reported: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))

        async def fails() -> None:
            raise ValueError("boom")

        task = asyncio.create_task(fails())
        await asyncio.sleep(0)
        await cancel_and_wait(task, None)
        del task
        gc.collect()
        return reported

    assert asyncio.run(scenario()) == []
