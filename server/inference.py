"""`InferenceService`: the hot path between a validated request and the batcher.

Resolve the task's prompt, apply its input template, tokenize and check limits, queue one work item
per input row, wait (with a deadline) for the rows, and shape the response.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

from server.admission import TenantRateLimits
from server.batcher import MixedTaskBatcher
from server.errors import ClientDisconnected, DeadlineExceeded, InvalidInput
from server.model import Decoding, FrozenT5, Generation, Row
from server.registry import PromptRegistry, ResolvedPrompt
from server.runner import ClassifyWork, GenerateWork, Work
from server.schemas import (
    ClassifyOutput,
    ClassifyRequest,
    ClassifyResponse,
    GenerateOutput,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
)
from server.settings import Settings

ClientGone = Callable[[], Awaitable[None]]


class InferenceService:
    def __init__(
        self,
        model: FrozenT5,
        registry: PromptRegistry,
        batcher: MixedTaskBatcher[Work],
        settings: Settings,
        rate_limits: TenantRateLimits | None = None,
    ) -> None:
        self.model = model
        self.registry = registry
        self.batcher = batcher
        self.settings = settings
        self.rate_limits = rate_limits or TenantRateLimits.from_settings(settings)

    async def generate(
        self, tenant: str, request: GenerateRequest, client_gone: ClientGone | None = None
    ) -> GenerateResponse:
        self._shed_if_full(request.inputs)
        resolved = await self.registry.resolve(tenant, request.task_id, request.version)
        params = self._parameters(resolved, request.parameters)
        decoding = Decoding(
            do_sample=params.do_sample,
            num_beams=params.num_beams,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
        )
        task = (tenant, request.task_id)
        rows = self._rows(resolved, request.inputs)
        works: list[Work] = [GenerateWork(row, task, decoding, params.max_new_tokens) for row in rows]
        results: list[Generation] = await self._run(works, tenant, client_gone)
        outputs = [
            GenerateOutput(text=g.text, num_tokens=len(g.token_ids), finish_reason=g.finish_reason) for g in results
        ]
        return GenerateResponse(task_id=request.task_id, prompt_version=resolved.version, outputs=outputs)

    async def classify(
        self, tenant: str, request: ClassifyRequest, client_gone: ClientGone | None = None
    ) -> ClassifyResponse:
        self._shed_if_full(request.inputs)
        resolved = await self.registry.resolve(tenant, request.task_id, request.version)
        labels = request.labels or resolved.task.metadata.labels
        if not labels:
            raise InvalidInput("no labels: pass `labels` or upload the task with metadata labels")
        if len(set(labels)) != len(labels):
            raise InvalidInput("labels must be distinct")
        targets = self.model.tokenize(labels)
        self._check_lengths(targets, "label")
        task = (tenant, request.task_id)
        works: list[Work] = [ClassifyWork(row, task, targets) for row in self._rows(resolved, request.inputs)]
        results: list[list[float]] = await self._run(works, tenant, client_gone)
        if request.length_normalize:
            results = [[s / len(t) for s, t in zip(scores, targets, strict=True)] for scores in results]
        outputs = [_classify_output(labels, scores) for scores in results]
        return ClassifyResponse(task_id=request.task_id, prompt_version=resolved.version, outputs=outputs)

    def _shed_if_full(self, inputs: str | list[str]) -> None:
        """Refuses at once, before any lookup or tokenizing, so overload costs as little as possible."""
        self.batcher.check_room(1 if isinstance(inputs, str) else len(inputs))

    def _parameters(self, resolved: ResolvedPrompt, given: GenerateParameters | None) -> GenerateParameters:
        merged: dict[str, Any] = dict(resolved.task.metadata.parameters or {})
        if given is not None:
            merged.update(given.model_dump(exclude_unset=True))
        params = GenerateParameters.model_validate(merged)
        if params.max_new_tokens > self.settings.max_new_tokens:
            raise InvalidInput(
                f"max_new_tokens is {params.max_new_tokens}; this server's limit is {self.settings.max_new_tokens}"
            )
        return params

    def _rows(self, resolved: ResolvedPrompt, inputs: str | list[str]) -> list[Row]:
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not texts:
            raise InvalidInput("inputs is empty")
        if len(texts) > self.settings.max_inputs_per_request:
            raise InvalidInput(
                f"{len(texts)} inputs in one request; the limit is {self.settings.max_inputs_per_request}"
            )
        template = resolved.task.metadata.input_template
        if template:
            texts = [template.replace("{input}", text) for text in texts]
        token_ids = self.model.tokenize(texts)
        self._check_lengths(token_ids, "input")
        return [Row(resolved.embeddings, ids) for ids in token_ids]

    def _check_lengths(self, token_ids: list[list[int]], what: str) -> None:
        limit = self.settings.max_input_tokens
        for i, ids in enumerate(token_ids):
            if len(ids) > limit:
                raise InvalidInput(f"{what} {i} has {len(ids)} tokens; the limit is {limit}")

    async def _run(self, works: list[Work], tenant: str, client_gone: ClientGone | None) -> list[Any]:
        """Waits for the rows, the deadline, or the client leaving, whichever comes first.

        Rows of a request that timed out or whose client left are dropped before they reach the model.
        """
        await self.rate_limits.admit(tenant, sum(len(w.row.input_ids) for w in works))
        futures = self.batcher.submit(works, [w.row.num_tokens for w in works], tenant)
        results = asyncio.gather(*futures)
        watchers: set[asyncio.Future[Any]] = {results}
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        if gone is not None:
            watchers.add(gone)
        try:
            done, _ = await asyncio.wait(
                watchers, timeout=self.settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if results in done:
                return results.result()
            if gone is not None and gone in done:
                raise ClientDisconnected("the client closed the connection")
            raise DeadlineExceeded(f"the request did not finish within {self.settings.request_timeout_s:g} s")
        finally:
            if gone is not None:
                gone.cancel()
            results.cancel()  # cancels rows still queued; a no-op once done


def _classify_output(labels: list[str], scores: list[float]) -> ClassifyOutput:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    best = max(range(len(labels)), key=scores.__getitem__)
    return ClassifyOutput(
        label=labels[best],
        scores=dict(zip(labels, scores, strict=True)),
        probs={label: w / total for label, w in zip(labels, weights, strict=True)},
    )
