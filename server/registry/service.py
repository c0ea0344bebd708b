"""`PromptService`: what the prompt routes do besides HTTP: upload, list, read, download, activate, ensemble,
pin, delete.

Everything a task will need to be served is checked at upload, cheapest first, so that a task that is
accepted can be used: the metadata (strict JSON and types, then the server's limits on templates,
default parameters and label sizes), the tenant's quota, then, in a worker thread, the token counts
of the template and labels, the prompt file itself, and whether the task's smallest request fits in
one model call. Files are read with `ReadLimits` (headers and archive directories checked before
anything is allocated or unpacked) by at most `UPLOAD_READERS` threads at once, so a burst of
hostile files cannot take every core. A refused upload changes nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any, BinaryIO

from pydantic import ValidationError

from prompt_store import (
    PromptFormat,
    SoftPrompt,
    TaskMetadata,
    TaskNotFound,
    TaskRecord,
    dump_prompt,
    load_prompt_bytes,
    validate_prompt,
)
from prompt_store.formats import ReadLimits
from prompt_store.records import INPUT_PLACEHOLDER
from server import strict_json
from server.errors import InvalidInput, RateLimited
from server.registry.explain import TASK_EMBEDDINGS_PER_TENANT, PromptExplainer
from server.registry.listing import TaskPage
from server.registry.registry import PromptRegistry
from server.registry.schemas import PromptSummary, UploadMetadata
from server.serving.batch_runner import ClassifyWork, GenerateWork
from server.serving.limits import ServingLimits
from server.serving.model import Decoding, FrozenT5, Row
from server.tenancy.quotas import TaskQuota

UPLOAD_READERS = 2
INVALID = "metadata is invalid: "
PIN_RETRY_AFTER_S = 60


class PromptService:
    def __init__(
        self,
        model: FrozenT5,
        registry: PromptRegistry,
        limits: ServingLimits,
        quota: TaskQuota,
        readers: int = UPLOAD_READERS,
        embeddings_per_tenant: int = TASK_EMBEDDINGS_PER_TENANT,
        max_pinned: int = 0,
    ) -> None:
        """`max_pinned`: tasks a tenant may pin (0: no limit but the prompt cache's budget)."""
        self.model = model
        self.max_pinned = max_pinned
        self.registry = registry
        self.limits = limits
        self.quota = quota
        # nearest tokens, similar tasks
        self.explain = PromptExplainer(model, registry, embeddings_per_tenant=embeddings_per_tenant)
        self.read_limits = ReadLimits(max_rows=limits.max_prompt_length, d_model=model.d_model)
        self._readers = asyncio.Semaphore(readers)

    def parse_metadata(self, raw: str | None) -> UploadMetadata:
        """The `metadata` form field: strict JSON (no `NaN`), strict types, within this server's limits."""
        if raw is None or not raw.strip():
            return UploadMetadata()
        try:
            data = strict_json.loads(raw)
        except (ValueError, RecursionError) as error:
            raise InvalidInput(f"metadata is not valid JSON: {error}") from None
        try:
            metadata = UploadMetadata.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "metadata"
            raise InvalidInput(f"{INVALID}{where}: {first.get('msg')}") from None
        self._check_sizes(metadata)
        return metadata

    async def upload(self, tenant: str, task_id: str, file: BinaryIO, metadata: UploadMetadata) -> TaskRecord:
        """Registers the file's prompt as a new version of the task; returns the task's record."""
        await self.quota.check(tenant, task_id)
        new_metadata = metadata.task_metadata()
        served_with = (await self._current_metadata(tenant, task_id)).merged(new_metadata)
        async with self._readers:
            prompt = await asyncio.to_thread(self._read_prompt, file, served_with)
        return await self.registry.add_version(
            tenant, task_id, prompt, new_metadata, metadata.activate, self.model.model_id
        )

    async def task_page(self, tenant: str, cursor: str | None, limit: int) -> TaskPage:
        return await self.registry.task_page(tenant, cursor, limit)

    async def task(self, tenant: str, task_id: str) -> TaskRecord:
        return await self.registry.task(tenant, task_id)

    def summary(self, record: TaskRecord) -> PromptSummary:
        """The task's listing entry, with its residency on this replica."""
        pinned = self.registry.is_pinned(record.tenant, record.task_id)
        return PromptSummary.of(record, loaded=self.registry.is_loaded(record), pinned=pinned)

    async def download(self, tenant: str, task_id: str, version: int, format: PromptFormat) -> bytes:
        """The version's prompt as a file of `format` (written in a worker thread)."""
        prompt = await self.registry.load_prompt(tenant, task_id, version)
        return await asyncio.to_thread(dump_prompt, prompt.embeddings, format, self.model.model_id)

    async def activate(self, tenant: str, task_id: str, version: int) -> TaskRecord:
        return await self.registry.activate(tenant, task_id, version)

    async def set_ensemble(self, tenant: str, task_id: str, versions: list[int]) -> TaskRecord:
        """Members must be versions of the task (the store checks, atomically) and of the served model's width
        (a task's versions are by construction: checked where the record already says)."""
        record = await self.registry.task(tenant, task_id)
        for version in versions:
            info = record.version_info(version)
            if info is not None and info.d_model != self.model.d_model:
                raise InvalidInput(
                    f"version {version} has d_model {info.d_model}; this server's model has {self.model.d_model}"
                )
        return await self.registry.set_ensemble(tenant, task_id, versions)

    async def delete(self, tenant: str, task_id: str) -> None:
        await self.registry.delete(tenant, task_id)

    async def pin(self, tenant: str, task_id: str) -> PromptSummary:
        """Pins the task's active prompt on every replica: within the tenant's pin quota (429), and only if it fits
        in the cache's budget beside the prompts pinned already (422: it could never be held)."""
        await self.registry.task(tenant, task_id)  # a task that does not exist is 404, whatever the quota
        await self.registry.refresh_pins()  # the quota counts pins made on other replicas too
        if not self.registry.is_pinned(tenant, task_id):
            pinned = self.registry.pinned_count(tenant)
            if self.max_pinned and pinned >= self.max_pinned:
                raise RateLimited(
                    f"this tenant's quota of {self.max_pinned} pinned tasks is used; unpin a task first",
                    retry_after_s=PIN_RETRY_AFTER_S,
                )
        size, room = await self.registry.pin_cost(tenant, task_id)
        if size > room:
            raise InvalidInput(
                f"the prompt of {task_id!r} takes {size} bytes on the device; the prompt cache has {room} bytes "
                f"left beside the prompts pinned already (prompt_cache_mb: {self.registry.cache_budget} bytes)"
            )
        await self.registry.pin(tenant, task_id)
        return self.summary(await self.registry.task(tenant, task_id))

    async def unpin(self, tenant: str, task_id: str) -> PromptSummary:
        record = await self.registry.task(tenant, task_id)  # 404 for a task that does not exist
        if (tenant, task_id) in self.registry.configured_pins:
            raise InvalidInput(f"{task_id!r} is pinned by this server's preload_tasks setting; change it there")
        await self.registry.unpin(tenant, task_id)
        return self.summary(record)

    async def _current_metadata(self, tenant: str, task_id: str) -> TaskMetadata:
        try:
            return (await self.registry.task(tenant, task_id)).metadata
        except TaskNotFound:
            return TaskMetadata()

    def _check_sizes(self, metadata: UploadMetadata) -> None:
        """The server's limits that need no tokenizing: template and label lengths, default parameters."""
        template = metadata.input_template
        if template is not None and len(template) > self.limits.max_template_chars:
            raise InvalidInput(
                f"{INVALID}input_template has {len(template)} characters; the limit is {self.limits.max_template_chars}"
            )
        for i, label in enumerate(metadata.labels or []):
            if len(label) > self.limits.max_chars:
                raise InvalidInput(
                    f"{INVALID}labels.{i} has {len(label)} characters; the limit is {self.limits.max_chars}"
                )
        if metadata.parameters is not None:
            parameters = metadata.parameters
            self.limits.check_decoding(parameters.max_new_tokens, parameters.num_beams, f"{INVALID}parameters.")

    def _read_prompt(self, file: BinaryIO, served_with: TaskMetadata) -> SoftPrompt:
        """Runs in a worker thread: tokenizing and reading the file are the costly steps (texts first)."""
        smallest_input, label_ids = self._tokenize_texts(served_with)
        data = file.read(self.read_limits.max_bytes + 1)  # one byte more tells a file over the cap
        tensor = load_prompt_bytes(data, self.read_limits)
        prompt = validate_prompt(tensor, self.model.d_model, self.limits.max_prompt_length)
        self._check_smallest_request(Row(prompt.embeddings, smallest_input), label_ids, served_with)
        return prompt

    def _tokenize_texts(self, metadata: TaskMetadata) -> tuple[list[int], list[list[int]]]:
        """Token ids of the task's smallest input (its template around an empty input) and of its labels."""
        template = metadata.input_template or INPUT_PLACEHOLDER
        smallest, *label_ids = self.model.tokenize([template.replace(INPUT_PLACEHOLDER, ""), *(metadata.labels or [])])
        limit = self.limits.max_input_tokens
        if len(smallest) > limit:
            raise InvalidInput(f"{INVALID}input_template alone has {len(smallest)} tokens; the limit is {limit}")
        for i, ids in enumerate(label_ids):
            if len(ids) > limit:
                raise InvalidInput(f"{INVALID}labels.{i} has {len(ids)} tokens; the limit is {limit}")
        return smallest, label_ids

    def _check_smallest_request(self, row: Row, label_ids: list[list[int]], metadata: TaskMetadata) -> None:
        """The task's cheapest request must fit in one model call, costed as serving costs it."""
        limit = self.limits.max_batch_tokens
        decoding = Decoding(num_beams=_default_beams(metadata.parameters))
        generate = GenerateWork(row, ("", ""), decoding, max_new_tokens=1)
        if generate.cost > limit:
            raise InvalidInput(
                f"{INVALID}with num_beams {decoding.num_beams}, even an empty input costs {generate.cost} tokens "
                f"of one model call; the limit is {limit}"
            )
        if label_ids and (cost := ClassifyWork(row, ("", ""), label_ids).cost) > limit:
            raise InvalidInput(
                f"{INVALID}with these labels, even an empty input costs {cost} tokens of one model call "
                f"(prompt + input + labels x the longest label); the limit is {limit}"
            )


def _default_beams(parameters: dict[str, Any] | None) -> int:
    """The task's default `num_beams` (stored defaults were checked at their upload; 1 if absent)."""
    beams = (parameters or {}).get("num_beams", 1)
    return beams if type(beams) is int and beams > 0 else 1
