"""Turns a batch of work items (any tasks, any prompt lengths) into model calls.

All classify rows of a batch share one encoder pass and one decoder pass. Generate rows share one
`generate` call per decoding group: greedy rows always share one; beam and sampled rows are grouped
by their settings, and a seeded sampled row runs alone so that its draws do not depend on its
neighbours. Rows of different tasks never need separate calls.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from server.errors import Overloaded
from server.metrics import ServerMetrics
from server.model import Decoding, FrozenT5, Generation, Row


@dataclass(frozen=True)
class GenerateWork:
    row: Row
    task: tuple[str, str]
    decoding: Decoding
    max_new_tokens: int


@dataclass(frozen=True)
class ClassifyWork:
    row: Row
    task: tuple[str, str]
    targets: list[list[int]]


log = logging.getLogger(__name__)

Work = GenerateWork | ClassifyWork
Result = Generation | list[float] | Exception


class BatchRunner:
    def __init__(self, model: FrozenT5, metrics: ServerMetrics | None = None) -> None:
        self.model = model
        self.metrics = metrics

    def __call__(self, batch: list[Work]) -> list[Result]:
        started = time.perf_counter()
        results: list[Result | None] = [None] * len(batch)
        for indices in self._groups(batch).values():
            self._run_group([batch[i] for i in indices], indices, results)
        if self.metrics is not None:
            self.metrics.inference_duration.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_tasks.observe(len({work.task for work in batch}))
        return results  # type: ignore[return-value]

    @staticmethod
    def _groups(batch: list[Work]) -> dict[Hashable, list[int]]:
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for i, work in enumerate(batch):
            groups[_group_key(work, i)].append(i)
        return groups

    def _run_group(self, works: list[Work], indices: list[int], results: list[Result | None]) -> None:
        try:
            outputs = self._run_splitting_on_oom(works)
        except Exception as error:  # the batcher turns this into a clear per-request error
            if self.metrics is not None:
                self.metrics.batch_failures.inc()
            outputs = [error] * len(works)
        for i, output in zip(indices, outputs, strict=True):
            results[i] = output

    def _run_splitting_on_oom(self, works: list[Work]) -> list[Result]:
        """Out of device memory: split the group in two and retry each half once, then give up with 503."""
        try:
            return self._run(works)
        except torch.cuda.OutOfMemoryError:
            log.warning("out of memory on a group of %d rows; splitting it", len(works))
            _release_cached_memory()
        if len(works) == 1:
            return [_out_of_memory()]
        half = len(works) // 2
        return self._run_or_give_up(works[:half]) + self._run_or_give_up(works[half:])

    def _run_or_give_up(self, works: list[Work]) -> list[Result]:
        try:
            return self._run(works)
        except torch.cuda.OutOfMemoryError:
            _release_cached_memory()
            return [_out_of_memory()] * len(works)

    def _run(self, works: list[Work]) -> list[Result]:
        rows = [work.row for work in works]
        first = works[0]
        if isinstance(first, ClassifyWork):
            return list(self.model.score(rows, [w.targets for w in works]))  # type: ignore[union-attr]
        limits = [w.max_new_tokens for w in works]  # type: ignore[union-attr]
        return list(self.model.generate(rows, first.decoding, limits))


def _group_key(work: Work, index: int) -> Hashable:
    if isinstance(work, ClassifyWork):
        return ("classify",)
    decoding = work.decoding
    if not decoding.do_sample and decoding.num_beams == 1:
        return ("greedy",)  # per-row max_new_tokens is exact here: rows are cut to their own limit
    if decoding.do_sample and decoding.seed is not None:
        return ("seeded", index)
    return ("decode", decoding, work.max_new_tokens)


def _out_of_memory() -> Overloaded:
    return Overloaded("the model ran out of device memory for this request; retry with fewer or shorter inputs")


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
