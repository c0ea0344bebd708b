"""BatchRunner: decoding groups, and out-of-memory handling (split once, then 503)."""

from __future__ import annotations

import pytest
import torch

from server.errors import Overloaded
from server.serving.batch_runner import BatchRunner, GenerateWork
from server.serving.model import Decoding, FrozenT5, Generation, Row
from server.testing.reference import random_prompt


class RecordingModel:
    """The real tiny model, recording each generate call's size; optionally out of memory above a size.

    CUDA memory cannot run out on a CPU-only machine, so the error is raised here on purpose.
    """

    def __init__(self, model: FrozenT5, oom_above: int | None = None) -> None:
        self.model = model
        self.oom_above = oom_above
        self.calls: list[int] = []

    def generate(self, rows: list[Row], decoding: Decoding, limits: list[int]) -> list[Generation]:
        self.calls.append(len(rows))
        if self.oom_above is not None and len(rows) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return self.model.generate(rows, decoding, limits)


def works(model: FrozenT5, decodings: list[Decoding]) -> list[GenerateWork]:
    ids = model.tokenize(["an input"])[0]
    return [
        GenerateWork(Row(random_prompt(3 + i, model.d_model, seed=i), ids), ("t", f"task{i}"), decoding, 4)
        for i, decoding in enumerate(decodings)
    ]


def test_greedy_rows_share_one_call_and_seeded_samples_run_alone(tiny: FrozenT5) -> None:
    recorder = RecordingModel(tiny)
    greedy = [Decoding(), Decoding(temperature=0.5), Decoding()]  # temperature is moot without sampling
    seeded = [Decoding(do_sample=True, seed=3), Decoding(do_sample=True, seed=3)]
    beams = [Decoding(num_beams=2), Decoding(num_beams=2)]
    results = BatchRunner(recorder)(works(tiny, greedy + seeded + beams))  # type: ignore[arg-type]
    assert sorted(recorder.calls) == [1, 1, 2, 3]
    assert all(isinstance(r, Generation) for r in results)


def test_out_of_memory_splits_the_batch_and_retries(tiny: FrozenT5) -> None:
    batch = works(tiny, [Decoding()] * 4)
    expected = BatchRunner(tiny)(batch)
    recorder = RecordingModel(tiny, oom_above=2)
    assert BatchRunner(recorder)(batch) == expected  # type: ignore[arg-type]
    assert recorder.calls == [4, 2, 2]


def test_out_of_memory_twice_fails_the_rows_with_503(tiny: FrozenT5) -> None:
    recorder = RecordingModel(tiny, oom_above=0)
    results = BatchRunner(recorder)(works(tiny, [Decoding()] * 4))  # type: ignore[arg-type]
    assert recorder.calls == [4, 2, 2]
    assert all(isinstance(r, Overloaded) for r in results)
    with pytest.raises(Overloaded, match="memory"):
        raise results[0]  # type: ignore[misc]
