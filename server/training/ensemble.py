"""`EnsembleTrainer`: the N prompts of a job with `ensemble_size` N, trained one after another.

Member k is exactly the one-prompt run of the same data and recipe with seed `seed + k` (`TrainingConfig.member`):
its own init, batch order, evaluations and early stop, so the job's first member is the prompt the same config
with `ensemble_size` 1 trains. The members run in turn on one trainer at a time (a member's memory is freed
before the next starts). A checkpoint is the running member's own, carrying the members finished before it
(`TrainingCheckpoint.finished_members`), so a resumed job goes on inside the member it stopped in; a checkpoint is
also taken as each member finishes. Progress and history count steps on across members: member k's step s is
reported as the steps its predecessors ran plus s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from prompt_store import SoftPrompt
from server.serving.model import FrozenT5
from server.training.recipe import TrainingConfig
from server.training.trainer import (
    CheckpointCallback,
    ExampleLike,
    ProgressCallback,
    PromptTrainer,
    StopSignal,
    TrainingCheckpoint,
    TrainingResult,
)


@dataclass
class EnsembleResult(TrainingResult):
    """The first member's result (its prompt, evaluations, labels), the job's whole history and steps, and every
    member's own result in `members`."""

    members: list[TrainingResult] = field(default_factory=list)

    @classmethod
    def of(cls, members: list[TrainingResult]) -> EnsembleResult:
        first = members[0]
        return cls(
            prompt=first.prompt,
            best_step=first.best_step,
            best_eval=first.best_eval,
            history=joined_history(members, []),
            losses=[loss for member in members for loss in member.losses],
            steps_run=sum(member.steps_run for member in members),
            stopped_early=any(member.stopped_early for member in members),
            labels=first.labels,
            members=members,
        )


class EnsembleTrainer:
    """`PromptTrainer`'s interface for a job (`train`, `history`, `checkpoint`), over the members in turn."""

    def __init__(
        self,
        model: FrozenT5,
        train: Iterable[ExampleLike],
        eval: Iterable[ExampleLike] | None,
        config: TrainingConfig,
        *,
        source_prompt: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.train_examples = list(train)
        self.eval_examples = list(eval or [])
        self.config = config
        self.source_prompt = source_prompt
        self.finished: list[TrainingResult] = []
        self.current = self._member(0)

    def _member(self, index: int) -> PromptTrainer:
        return PromptTrainer(
            self.model,
            self.train_examples,
            self.eval_examples,
            self.config.member(index),
            source_prompt=self.source_prompt,
        )

    @property
    def history(self) -> list[dict[str, Any]]:
        return joined_history(self.finished, self.current.history)

    def checkpoint(self) -> TrainingCheckpoint:
        return self._with_finished(self.current.checkpoint())

    def _with_finished(self, checkpoint: TrainingCheckpoint) -> TrainingCheckpoint:
        checkpoint.finished_members = [result_state(result) for result in self.finished]
        return checkpoint

    def train(
        self,
        *,
        on_progress: ProgressCallback | None = None,
        should_stop: StopSignal | None = None,
        checkpoint_every: int | None = None,
        on_checkpoint: CheckpointCallback | None = None,
        resume_from: TrainingCheckpoint | None = None,
    ) -> EnsembleResult:
        """Runs the members not finished yet (after `resume_from`'s) and returns them all; raises as
        `PromptTrainer.train` does, with the running member's state in `checkpoint()`."""
        if resume_from is not None:
            self.finished = [result_from_state(state) for state in resume_from.finished_members]
            self.current = self._member(len(self.finished))
        while True:
            offset = sum(result.steps_run for result in self.finished)
            self.finished.append(
                self.current.train(
                    on_progress=_shifted_progress(on_progress, offset),
                    should_stop=should_stop,
                    checkpoint_every=checkpoint_every,
                    on_checkpoint=None if on_checkpoint is None else lambda c: on_checkpoint(self._with_finished(c)),
                    resume_from=resume_from,
                )
            )
            resume_from = None
            if len(self.finished) == self.config.ensemble_size:
                return EnsembleResult.of(self.finished)
            self.current = self._member(len(self.finished))
            if on_checkpoint is not None:  # the member just finished is never trained again
                on_checkpoint(self.checkpoint())


def trainer_for(
    model: FrozenT5,
    train: Iterable[ExampleLike],
    eval: Iterable[ExampleLike] | None,
    config: TrainingConfig,
    *,
    source_prompt: torch.Tensor | None = None,
) -> PromptTrainer | EnsembleTrainer:
    """The trainer a job's config asks for: one prompt, or an ensemble's."""
    kind = EnsembleTrainer if config.ensemble_size > 1 else PromptTrainer
    return kind(model, train, eval, config, source_prompt=source_prompt)


def _shifted_progress(on_progress: ProgressCallback | None, offset: int) -> ProgressCallback | None:
    if on_progress is None:
        return None
    return lambda step, loss, metrics: on_progress(offset + step, loss, metrics)


def joined_history(finished: Sequence[TrainingResult], running: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The members' history entries in turn, each step counted on from the steps of the members before it."""
    entries: list[dict[str, Any]] = []
    offset = 0
    for history, steps in [*((r.history, r.steps_run) for r in finished), (running, 0)]:
        entries.extend({**entry, "step": offset + entry["step"]} for entry in history)
        offset += steps
    return entries


def result_state(result: TrainingResult) -> dict[str, Any]:
    """A finished member as plain containers and one tensor (what `torch.load(weights_only=True)` reads back)."""
    return {
        "prompt": result.prompt.embeddings.clone(),
        "best_step": result.best_step,
        "best_eval": result.best_eval,
        "history": result.history,
        "losses": list(result.losses),
        "steps_run": result.steps_run,
        "stopped_early": result.stopped_early,
        "labels": list(result.labels),
    }


def result_from_state(state: dict[str, Any]) -> TrainingResult:
    return TrainingResult(**{**state, "prompt": SoftPrompt(state["prompt"])})
