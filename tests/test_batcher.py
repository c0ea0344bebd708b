"""TenantFairBatcher without a model: batching limits, fairness, failures, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.errors import InferenceFailed, Overloaded
from server.serving.batcher import TenantFairBatcher


class Recorder:
    """A stand-in model call: doubles each payload and remembers every batch and its thread."""

    def __init__(self, fail_when: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.fail_when = fail_when

    def __call__(self, payloads: list[int]) -> list[int | Exception]:
        self.batches.append(list(payloads))
        self.threads.add(threading.current_thread().name)
        if self.fail_when is not None and self.fail_when in payloads:
            raise RuntimeError("model exploded")
        return [ValueError("bad row") if p < 0 else p * 2 for p in payloads]


def make(recorder: Recorder, **limits: float) -> TenantFairBatcher[int, int]:
    options = {"max_batch_size": 4, "max_batch_tokens": 1000, "max_wait_ms": 20, "max_queue_size": 100}
    options.update(limits)
    return TenantFairBatcher(recorder, **options)  # type: ignore[arg-type]


async def started(batcher: TenantFairBatcher[int, int]) -> TenantFairBatcher[int, int]:
    batcher.start()
    return batcher


def test_results_come_back_in_order_and_batches_respect_the_size_limit() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = await started(make(recorder))
        futures = batcher.submit(list(range(10)), [1] * 10, "t")
        assert await asyncio.gather(*futures) == [p * 2 for p in range(10)]
        assert [len(b) for b in recorder.batches] == [4, 4, 2]
        assert len(recorder.threads) == 1 and next(iter(recorder.threads)).startswith("softserve-model")
        await batcher.stop()

    asyncio.run(scenario())


def test_a_lone_row_runs_after_the_wait_without_a_full_batch() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = await started(make(recorder, max_wait_ms=5))
        assert await asyncio.wait_for(batcher.submit([7], [1], "t")[0], 5) == 14
        await batcher.stop()

    asyncio.run(scenario())


def test_token_budget_splits_batches() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = await started(make(recorder, max_batch_size=10, max_batch_tokens=100))
        await asyncio.gather(*batcher.submit([1, 2, 3, 4], [40, 40, 40, 40], "t"))
        assert [len(b) for b in recorder.batches] == [2, 2]
        await batcher.stop()

    asyncio.run(scenario())


def test_rows_are_taken_round_robin_across_tenants() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = make(recorder)
        flood = batcher.submit(list(range(100, 140)), [1] * 40, "flooder")
        quiet = batcher.submit([1, 2], [1, 1], "quiet")
        batcher.start()
        await asyncio.gather(*flood, *quiet)
        assert sorted(recorder.batches[0]) == [1, 2, 100, 101]
        await batcher.stop()

    asyncio.run(scenario())


def test_a_failing_batch_fails_its_rows_and_the_batcher_keeps_serving() -> None:
    async def scenario() -> None:
        recorder = Recorder(fail_when=13)
        batcher = await started(make(recorder))
        doomed = batcher.submit([13, 14], [1, 1], "t")
        for future in doomed:
            with pytest.raises(InferenceFailed, match="RuntimeError"):
                await future
        assert await batcher.submit([5], [1], "t")[0] == 10
        await batcher.stop()

    asyncio.run(scenario())


def test_a_row_level_error_fails_only_that_row() -> None:
    async def scenario() -> None:
        batcher = await started(make(Recorder()))
        good, bad = batcher.submit([3, -1], [1, 1], "t")
        assert await good == 6
        with pytest.raises(ValueError, match="bad row"):
            await bad
        await batcher.stop()

    asyncio.run(scenario())


def test_a_full_queue_refuses_the_whole_request_and_queues_nothing() -> None:
    async def scenario() -> None:
        batcher = make(Recorder(), max_queue_size=5)
        batcher.submit([1, 2, 3], [1, 1, 1], "t")
        with pytest.raises(Overloaded):
            batcher.submit([4, 5, 6], [1, 1, 1], "t")
        assert batcher.depth == 3
        await batcher.stop()

    asyncio.run(scenario())


def test_cancelled_rows_never_reach_the_model() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = make(recorder)
        futures = batcher.submit([1, 2, 3], [1, 1, 1], "t")
        futures[1].cancel()
        batcher.start()
        await asyncio.gather(futures[0], futures[2])
        assert sorted(p for batch in recorder.batches for p in batch) == [1, 3]
        await batcher.stop()

    asyncio.run(scenario())


def test_stop_fails_rows_still_queued() -> None:
    async def scenario() -> None:
        batcher = make(Recorder())
        future = batcher.submit([1], [1], "t")[0]
        await batcher.stop()
        with pytest.raises(Overloaded):
            await future

    asyncio.run(scenario())
