"""`PromptExplainer`: a prompt read through the model's vocabulary, and the tasks whose prompts are alike.

Nearest tokens (Lester et al. 2021, §7): for each prompt position, the k vocabulary tokens whose input
embeddings are nearest by cosine similarity, in one matrix product on the model's device over the decodable
ids only (T5 checkpoints pad the embedding matrix past the tokenizer). A prompt initialised from class labels
often keeps its labels among its neighbours, so each position also names the task's labels that have a token
among them.

Similar tasks (Vu et al. 2022, SPoT): a prompt's task embedding is the mean of its rows; the caller's other
tasks of the same width rank by the cosine similarity of their active prompts' task embeddings. A ranking
needs every task of the tenant, but reads neither every record nor every prompt each time: the task ids come
from the store's index, the records from the registry's cache (kept current by change notices and
reconciliation), and the task embeddings are kept per tenant by the prompt's sha256 (a version's content never
changes), up to a bound per tenant, so one tenant's tasks never evict another's.

Both compute in worker threads, a few at a time: they only read the model's weights, so they can run beside
the thread that serves batches, and never on the event loop.
"""

from __future__ import annotations

import asyncio

import torch
import torch.nn.functional as F

from prompt_store import TaskNotFound, TaskRecord, VersionInfo, VersionNotFound
from server.registry.registry import PromptRegistry
from server.registry.schemas import NearestTokens, NearToken, PositionNeighbours, SimilarTask, SimilarTasks
from server.serving.model import FrozenT5

MAX_NEIGHBOURS = 100  # the largest k of both readings
EXPLAIN_WORKERS = 2
TASK_EMBEDDINGS_PER_TENANT = 4096  # task embeddings (one d_model vector each) kept for each tenant


@torch.inference_mode()
def nearest_token_ids(prompt: torch.Tensor, vocabulary: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and ids `[P, k]` of each prompt row's k nearest rows of `vocabulary`, best first.

    The vocabulary is not normalised in a copy: the product is divided by its row norms instead (in float32, the
    model's own matrix is read in place)."""
    rows = F.normalize(prompt.float(), dim=-1)
    vocabulary = vocabulary.float()
    similarities = (rows @ vocabulary.T).div_(vocabulary.norm(dim=-1).clamp_min(1e-12))
    return similarities.topk(min(k, vocabulary.shape[0]), dim=-1)


class TaskEmbeddings:
    """Task embeddings by tenant and prompt sha256, at most `per_tenant` of each tenant's. Past its bound a tenant's
    other embeddings are computed again when asked (its own cost), and no tenant ever evicts another's."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._kept: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, tenant: str, sha256: str) -> torch.Tensor | None:
        return self._kept.get(tenant, {}).get(sha256)

    def keep(self, tenant: str, sha256: str, embedding: torch.Tensor) -> None:
        """Kept while the tenant has room: the first ones stay (a full tenant's rankings then still find most of
        theirs, where evicting the least recent would miss every one of a walk larger than the bound)."""
        kept = self._kept.setdefault(tenant, {})
        if len(kept) < self.per_tenant:
            kept[sha256] = embedding

    def retain(self, tenant: str, in_use: set[str]) -> None:
        """Drops the tenant's embeddings of prompts none of its tasks serves now (older versions, deleted tasks),
        so their room goes to the prompts in use."""
        kept = {sha: e for sha, e in self._kept.get(tenant, {}).items() if sha in in_use}
        if kept:
            self._kept[tenant] = kept
        else:
            self._kept.pop(tenant, None)


class PromptExplainer:
    def __init__(
        self,
        model: FrozenT5,
        registry: PromptRegistry,
        workers: int = EXPLAIN_WORKERS,
        embeddings_per_tenant: int = TASK_EMBEDDINGS_PER_TENANT,
    ) -> None:
        self.model = model
        self.registry = registry
        self._workers = asyncio.Semaphore(workers)
        self.task_embeddings = TaskEmbeddings(embeddings_per_tenant)

    async def nearest_tokens(self, tenant: str, task_id: str, version: int, k: int) -> NearestTokens:
        resolved = await self.registry.resolve(tenant, task_id, version)
        labels = resolved.task.metadata.labels or []
        async with self._workers:
            return await asyncio.to_thread(self._nearest_tokens, task_id, version, resolved.embeddings, labels, k)

    def _nearest_tokens(
        self, task_id: str, version: int, prompt: torch.Tensor, labels: list[str], k: int
    ) -> NearestTokens:
        vocabulary = self.model.model.get_input_embeddings().weight[: self.model.decodable_vocab]
        similarities, ids = (t.tolist() for t in nearest_token_ids(prompt, vocabulary, k))
        eos = self.model.eos_token_id
        label_pieces = [set(pieces) - {eos} for pieces in self.model.tokenize(labels)] if labels else []
        positions = []
        for position, (row_ids, row_similarities) in enumerate(zip(ids, similarities, strict=True)):
            texts = self.model.tokenizer.convert_ids_to_tokens(row_ids)
            tokens = [
                NearToken(id=i, text=t, similarity=s) for i, t, s in zip(row_ids, texts, row_similarities, strict=True)
            ]
            near = set(row_ids)
            shown = [label for label, pieces in zip(labels, label_pieces, strict=True) if pieces & near]
            positions.append(PositionNeighbours(position=position, tokens=tokens, labels=shown))
        return NearestTokens(task_id=task_id, version=version, k=len(ids[0]), positions=positions)

    async def similar_tasks(self, tenant: str, task_id: str, k: int) -> SimilarTasks:
        query = _active(await self.registry.task(tenant, task_id))
        query_embedding = await self._task_embedding(tenant, task_id, query) if query is not None else None
        if query is None or query_embedding is None:
            raise TaskNotFound(task_id)
        candidates: list[tuple[str, VersionInfo, torch.Tensor]] = []
        others = [other for other in await self.registry.task_ids(tenant) if other != task_id]
        for record in await self.registry.tasks(tenant, others):
            info = _active(record)
            if info is None or info.d_model != query.d_model:
                continue
            embedding = await self._task_embedding(tenant, record.task_id, info)
            if embedding is not None:  # None: deleted since it was listed
                candidates.append((record.task_id, info, embedding))
        self.task_embeddings.retain(tenant, {query.sha256, *(info.sha256 for _, info, _ in candidates)})
        async with self._workers:
            ranked = await asyncio.to_thread(_rank, query_embedding, [e for _, _, e in candidates], k)
        similar = [
            SimilarTask(task_id=candidates[i][0], version=candidates[i][1].version, similarity=similarity)
            for i, similarity in ranked
        ]
        return SimilarTasks(task_id=task_id, version=query.version, similar=similar, compared=len(candidates))

    async def _task_embedding(self, tenant: str, task_id: str, info: VersionInfo) -> torch.Tensor | None:
        """The mean of the version's rows (float32, CPU), from those kept or read from the store."""
        kept = self.task_embeddings.get(tenant, info.sha256)
        if kept is not None:
            return kept
        try:
            prompt = await self.registry.load_prompt(tenant, task_id, info.version)
        except (TaskNotFound, VersionNotFound):
            return None
        embedding = prompt.embeddings.mean(dim=0)
        self.task_embeddings.keep(tenant, info.sha256, embedding)
        return embedding


def _active(record: TaskRecord) -> VersionInfo | None:
    return record.version_info(record.active_version) if record.active_version is not None else None


def _rank(query: torch.Tensor, others: list[torch.Tensor], k: int) -> list[tuple[int, float]]:
    """Indices of the k `others` most cosine-similar to `query`, best first, with their similarities."""
    if not others:
        return []
    similarities = F.cosine_similarity(query.unsqueeze(0), torch.stack(others), dim=-1)
    best = similarities.topk(min(k, len(others)))
    return list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
