"""`EnsembleInference`: requests with `"ensemble": true`, served by every member of the task's ensemble at once.

Only a frozen model with soft prompts makes this cheap (the paper's §6): N prompts of one task are N rows of
one batch on one model. A request builds its rows exactly as the single-prompt request of its first member
would, copies them for the other members (the same input tokens after each member's prompt) and submits them
all together, so that they share encoder passes and decoder steps (the static batcher: one batch). A row does
not depend on its neighbours, so each member's result equals that version served alone; the ensemble only
combines them:

- classify: the members' label probabilities are averaged (`probs`, which picks `label`; `scores` are the
  members' scores averaged); `agreement` is the share of members whose own label is the ensemble's, the
  paper's uncertainty signal.
- generate: the text most members gave wins (`votes`). A tie is broken by each tied text's log-probability
  summed over every member: each candidate's tokens (those its first voter generated, end-of-sequence included
  when it ended the text) are scored teacher-forced, as classify scores a label, exactly, in a second
  submission (`tie_scores`), checked and charged as the first was (its worst size is checked before the
  first runs). Equal sums keep the text whose first voter comes first in the ensemble.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from server.errors import InvalidInput
from server.registry.registry import PromptRegistry, ResolvedPrompt
from server.serving.batch_runner import AnyWork, ClassifyWork, GenerateWork
from server.serving.executor import ClientGone, Executor
from server.serving.limits import ServingLimits
from server.serving.model import Generation, Row
from server.serving.ranking import classify_output, label_scores
from server.serving.schemas import (
    ClassifyOutput,
    ClassifyRequest,
    ClassifyResponse,
    GenerateOutput,
    GenerateRequest,
    GenerateResponse,
    MemberClassification,
    MemberGeneration,
)

W = TypeVar("W", bound=AnyWork)
RequestT = TypeVar("RequestT", GenerateRequest, ClassifyRequest)


class MemberRows(Protocol):
    """What an ensemble needs of the inference service (`InferenceService` is one): its checks, its rows built
    exactly as for a single-prompt request, and their model calls."""

    registry: PromptRegistry
    executor: Executor
    limits: ServingLimits

    def deadline(self) -> float: ...

    def admissible_texts(self, inputs: str | list[str]) -> list[str]: ...

    async def generate_works(
        self, tenant: str, request: GenerateRequest
    ) -> tuple[ResolvedPrompt, list[GenerateWork]]: ...

    async def classify_works(
        self, tenant: str, request: ClassifyRequest
    ) -> tuple[ResolvedPrompt, list[str], list[ClassifyWork]]: ...

    async def run_rows(
        self, works: Sequence[W], tenant: str, client_gone: ClientGone | None, deadline: float | None = None
    ) -> list[Any]: ...


class EnsembleInference:
    """The ensemble side of an `InferenceService`: its checks, rows and model calls, for every member at once."""

    def __init__(self, service: MemberRows) -> None:
        self.service = service

    async def generate(
        self, tenant: str, request: GenerateRequest, client_gone: ClientGone | None = None
    ) -> GenerateResponse:
        service = self.service
        deadline = service.deadline()
        if request.parameters is not None and (request.parameters.logprobs is not None or request.parameters.n > 1):
            raise InvalidInput("an ensemble's text is chosen by vote: one output per input, with no log-probabilities")
        versions = await self._versions(tenant, request)
        first, works = await service.generate_works(tenant, as_member(request, versions[0]))
        members = await self._members(tenant, request.task_id, first, versions)
        self._check_tie_break_fits(works, len(members))
        rows = for_members(works, members)
        generations = await service.run_rows(rows, tenant, client_gone)
        per_input = [generations[i : i + len(members)] for i in range(0, len(generations), len(members))]
        tie_scores = await self._break_ties(tenant, works, members, per_input, client_gone, deadline)
        outputs = [vote_output(versions, gens, scores) for gens, scores in zip(per_input, tie_scores, strict=True)]
        return GenerateResponse(
            task_id=request.task_id, prompt_version=versions[0], outputs=outputs, ensemble_versions=versions
        )

    async def classify(
        self, tenant: str, request: ClassifyRequest, client_gone: ClientGone | None = None
    ) -> ClassifyResponse:
        service = self.service
        versions = await self._versions(tenant, request)
        first, labels, works = await service.classify_works(tenant, as_member(request, versions[0]))
        members = await self._members(tenant, request.task_id, first, versions)
        results = await service.run_rows(for_members(works, members), tenant, client_gone)
        scores = label_scores(results, works[0].targets, request.length_normalize)
        outputs = [
            averaged_output(labels, versions, scores[i : i + len(members)]) for i in range(0, len(scores), len(members))
        ]
        return ClassifyResponse(
            task_id=request.task_id, prompt_version=versions[0], outputs=outputs, ensemble_versions=versions
        )

    async def _versions(self, tenant: str, request: GenerateRequest | ClassifyRequest) -> list[int]:
        """The task's ensemble, once the request alone is known to be servable and its rows fit the queue."""
        texts = self.service.admissible_texts(request.inputs)
        record = await self.service.registry.task(tenant, request.task_id)
        if not record.ensemble:
            raise InvalidInput(
                f"task '{request.task_id}' has no ensemble: set one with PUT /v1/prompts/{request.task_id}/ensemble"
            )
        self.service.executor.check_room(len(texts) * len(record.ensemble))
        return list(record.ensemble)

    async def _members(
        self, tenant: str, task_id: str, first: ResolvedPrompt, versions: list[int]
    ) -> list[ResolvedPrompt]:
        """The first member's prompt came with its rows; the others load at the same time."""
        others = await asyncio.gather(*(self.service.registry.resolve(tenant, task_id, v) for v in versions[1:]))
        return [first, *others]

    def _check_tie_break_fits(self, works: Sequence[GenerateWork], members: int) -> None:
        """A tie-break scores up to one candidate per member, each as long as `max_new_tokens` and its end, on
        every member's row: refused before anything runs if such a row could not fit one model call."""
        limit = self.service.limits.max_batch_tokens
        for i, work in enumerate(works):
            worst = work.row.num_tokens + members * (work.max_new_tokens + 1)
            if worst > limit:
                raise InvalidInput(
                    f"input {i} of this ensemble of {members} could need a tie-break of {worst} tokens in one model "
                    f"call (prompt + input + members * (max_new_tokens + 1)); the limit is {limit}: use fewer "
                    "max_new_tokens, a shorter input or a smaller ensemble"
                )

    async def _break_ties(
        self,
        tenant: str,
        works: Sequence[GenerateWork],
        members: Sequence[ResolvedPrompt],
        per_input: Sequence[Sequence[Generation]],
        client_gone: ClientGone | None,
        deadline: float,
    ) -> list[dict[str, float] | None]:
        """Each tied input's candidates scored by every member, in one submission; None where no tie."""
        tied = {i: candidates for i, gens in enumerate(per_input) if len(candidates := leaders(gens)) > 1}
        if not tied:
            return [None] * len(per_input)
        scoring = [
            ClassifyWork(Row(member.embeddings, works[i].row.input_ids), works[i].task, [c.token_ids for c in cands])
            for i, cands in tied.items()
            for member in members
        ]
        scores = await self.service.run_rows(scoring, tenant, client_gone, deadline)
        summed: list[dict[str, float] | None] = [None] * len(per_input)
        for n, (i, candidates) in enumerate(tied.items()):
            by_member = scores[n * len(members) : (n + 1) * len(members)]
            summed[i] = {c.text: sum(s[j] for s in by_member) for j, c in enumerate(candidates)}
        return summed


def as_member(request: RequestT, version: int) -> RequestT:
    """The request as the single-prompt request of one member (its rows are built exactly so)."""
    return request.model_copy(update={"version": version, "ensemble": False})


def for_members(works: Sequence[W], members: Sequence[ResolvedPrompt]) -> list[W]:
    """Each input's row once per member, input by input: the same input tokens after each member's prompt."""
    return [replace(work, row=Row(member.embeddings, work.row.input_ids)) for work in works for member in members]


def tally(generations: Sequence[Generation]) -> dict[str, int]:
    """Votes per text, most first; texts with equal votes in the order of their first voter."""
    counts = Counter(g.text for g in generations)  # in order of first appearance
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def leaders(generations: Sequence[Generation]) -> list[Generation]:
    """The first voter's generation of each text with the most votes, in the order of those voters."""
    votes = tally(generations)
    top = max(votes.values())
    firsts = {g.text: g for g in reversed(generations)}  # the first generation of each text wins
    return [firsts[text] for text, count in votes.items() if count == top]


def vote_output(
    versions: Sequence[int], generations: Sequence[Generation], tie_scores: dict[str, float] | None
) -> GenerateOutput:
    candidates = leaders(generations)
    winner = candidates[0]
    if tie_scores is not None:
        winner = max(candidates, key=lambda c: tie_scores[c.text])  # the first of equal sums
    return GenerateOutput(
        text=winner.text,
        num_tokens=len(winner.token_ids),
        finish_reason=winner.finish_reason,
        votes=tally(generations),
        tie_scores=tie_scores,
        members=[
            MemberGeneration(version=v, text=g.text, num_tokens=len(g.token_ids), finish_reason=g.finish_reason)
            for v, g in zip(versions, generations, strict=True)
        ],
    )


def averaged_output(labels: list[str], versions: Sequence[int], scores: Sequence[list[float]]) -> ClassifyOutput:
    """The members' probabilities averaged (they pick the label), their scores averaged, and their agreement."""
    answers = [classify_output(labels, s) for s in scores]
    probs = {label: sum(a.probs[label] for a in answers) / len(answers) for label in labels}
    label = max(labels, key=probs.__getitem__)
    return ClassifyOutput(
        label=label,
        scores={label: sum(a.scores[label] for a in answers) / len(answers) for label in labels},
        probs=probs,
        agreement=sum(a.label == label for a in answers) / len(answers),
        members=[
            MemberClassification(version=v, label=a.label, probs=a.probs)
            for v, a in zip(versions, answers, strict=True)
        ],
    )
