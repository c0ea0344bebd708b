"""Turns a batch of work items (any tasks, any prompt lengths) into model calls.

All classify rows of a batch share one encoder pass (their labels are scored in memory-bounded chunks).
Generate rows share one `generate` call per decoding group: greedy rows always share one; beam and
sampled rows are grouped by their settings, and a seeded sampled row runs alone so that its draws do
not depend on its neighbours. Rows of different tasks never need separate calls. Before each group,
rows whose request has ended (client gone, deadline passed) are skipped.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from typing_extensions import Self

from server.errors import ClientDisconnected, NonFiniteScores, Overloaded
from server.metrics import ServerMetrics
from server.serving.model import NON_FINITE, Decoding, FrozenT5, Generation, Row

TaskKey = tuple[str, str]
R = TypeVar("R")


class Work(ABC, Generic[R]):
    """One row's work of one kind: what it costs a model call, which rows may share its call, and the call.

    A kind's `run_group` gets only works of its own kind and one group key (`BatchRunner` groups by it), and
    returns one result (or error) per work: `R` for a `Work[R]`.
    """

    row: Row
    task: TaskKey

    @property
    @abstractmethod
    def cost(self) -> int:
        """Tokens the row adds to a model call (what `max_batch_tokens` counts)."""

    @property
    def reserved_tokens(self) -> int:
        """Tokens the row may yet generate, reserved on its tenant's bill when it is admitted (see `unused`)."""
        return 0

    def unused_tokens(self, result: R) -> int:
        """What the row did not use of `reserved_tokens`: refunded when it ends."""
        return 0

    @abstractmethod
    def group_key(self, index: int) -> Hashable:
        """Works with equal keys share one model call; `index` (the row's place in the batch) makes a key unique."""

    @classmethod
    @abstractmethod
    def run_group(cls, model: FrozenT5, works: Sequence[Self]) -> list[R | Exception]: ...


@dataclass(frozen=True)
class GenerateWork(Work[Generation]):
    row: Row
    task: TaskKey
    decoding: Decoding
    max_new_tokens: int
    compile_tokens: int = 0  # what compiling the request's grammar cost, charged with its first row

    @property
    def cost(self) -> int:
        """Every beam carries the row's encoder output."""
        return self.row.num_tokens * self.decoding.num_beams

    @property
    def reserved_tokens(self) -> int:
        """Every beam may make every new token."""
        return self.max_new_tokens * self.decoding.num_beams + self.compile_tokens

    def unused_tokens(self, result: Generation) -> int:
        return max(0, self.max_new_tokens - len(result.token_ids)) * self.decoding.num_beams

    def group_key(self, index: int) -> Hashable:
        decoding = self.decoding
        if not decoding.do_sample and decoding.num_beams == 1:
            return (
                "greedy",
                decoding.ignore_eos,
            )  # per-row max_new_tokens is exact here: rows are cut to their own limit
        if decoding.do_sample and decoding.seed is not None:
            return ("seeded", index)
        return ("decode", decoding, self.max_new_tokens)

    @classmethod
    def run_group(cls, model: FrozenT5, works: Sequence[Self]) -> list[Generation | Exception]:
        limits = [work.max_new_tokens for work in works]
        generations = model.generate([work.row for work in works], works[0].decoding, limits)
        return [non_finite_error() if g.finish_reason == NON_FINITE else g for g in generations]


@dataclass(frozen=True)
class ClassifyWork(Work[list[float]]):
    row: Row
    task: TaskKey
    targets: list[list[int]]

    @property
    def cost(self) -> int:
        """The encoder's tokens plus the decoder positions scored: each label padded to the longest."""
        return self.row.num_tokens + len(self.targets) * max(map(len, self.targets))

    def group_key(self, index: int) -> Hashable:
        return ("classify",)  # one encoder pass for every classify row

    @classmethod
    def run_group(cls, model: FrozenT5, works: Sequence[Self]) -> list[list[float] | Exception]:
        scores = model.score([work.row for work in works], [work.targets for work in works])
        return [s if all(map(math.isfinite, s)) else non_finite_error() for s in scores]


@dataclass(frozen=True)
class EmbedWork(Work[list[float]]):
    row: Row
    task: TaskKey

    @property
    def cost(self) -> int:
        return self.row.num_tokens

    def group_key(self, index: int) -> Hashable:
        return ("embed",)  # one encoder pass for every embed row

    @classmethod
    def run_group(cls, model: FrozenT5, works: Sequence[Self]) -> list[list[float] | Exception]:
        vectors = model.embed([work.row for work in works])
        return [v.tolist() if bool(v.isfinite().all()) else non_finite_error() for v in vectors]


log = logging.getLogger(__name__)

AnyWork = Work[Any]
WorkResult = Generation | list[float]  # what the works of a batch produce, any kind
Result = WorkResult | Exception


class BatchRunner:
    def __init__(self, model: FrozenT5, metrics: ServerMetrics | None = None) -> None:
        self.model = model
        self.metrics = metrics

    def __call__(self, batch: list[AnyWork]) -> list[Result]:
        started = time.perf_counter()
        results: dict[int, Result] = {}
        for indices in self._groups(batch).values():
            wanted = self._skip_abandoned(batch, indices, results)
            if wanted:
                self._run_group([batch[i] for i in wanted], wanted, results)
        if self.metrics is not None:
            self.metrics.inference_duration.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_tasks.observe(len({work.task for work in batch}))
        return [results[i] for i in range(len(batch))]  # every row has its result or error by now

    def _skip_abandoned(self, batch: list[AnyWork], indices: list[int], results: dict[int, Result]) -> list[int]:
        """The rows of a group still wanted; the others never reach the model (counted as dropped rows)."""
        wanted = [i for i in indices if not batch[i].row.abandoned.is_set()]
        for i in set(indices) - set(wanted):
            results[i] = ClientDisconnected("the request ended before its row reached the model")
        if self.metrics is not None and len(wanted) < len(indices):
            self.metrics.dropped_rows.inc(len(indices) - len(wanted))
        return wanted

    @staticmethod
    def _groups(batch: list[AnyWork]) -> dict[Hashable, list[int]]:
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for i, work in enumerate(batch):
            groups[(type(work), work.group_key(i))].append(i)
        return groups

    def _run_group(self, works: list[AnyWork], indices: list[int], results: dict[int, Result]) -> None:
        try:
            outputs = self._run_splitting_on_oom(works)
        except Exception as error:  # the batcher turns this into a clear per-request error
            if self.metrics is not None:
                self.metrics.batch_failures.inc()
            outputs = [error] * len(works)
        for i, output in zip(indices, outputs, strict=True):
            results[i] = output

    def _run_splitting_on_oom(self, works: list[AnyWork]) -> list[Result]:
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

    def _run_or_give_up(self, works: list[AnyWork]) -> list[Result]:
        try:
            return self._run(works)
        except torch.cuda.OutOfMemoryError:
            _release_cached_memory()
            return [_out_of_memory()] * len(works)

    def _run(self, works: list[AnyWork]) -> list[Result]:
        return works[0].run_group(self.model, works)


def non_finite_error() -> NonFiniteScores:
    return NonFiniteScores(
        "the model's scores for this input are not finite (inf or nan), so it cannot be decoded or ranked: "
        "the task's prompt values or the sampling settings overflow; other inputs are not affected"
    )


def _out_of_memory() -> Overloaded:
    return Overloaded("the model ran out of device memory for this request; retry with fewer or shorter inputs")


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
