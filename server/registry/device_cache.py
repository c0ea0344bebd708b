"""Device-side prompt cache: LRU by bytes, keyed by content so a stale copy is never served.

Pinned entries (the `preload_tasks` setting, and tasks pinned through the API) count toward the budget but are
never evicted. Each lookup is counted by tier: a device hit or miss (`softserve_prompt_lookups_total`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from server.metrics import ServerMetrics


class DevicePromptCache:
    def __init__(self, budget_bytes: int, metrics: ServerMetrics | None = None) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._pinned: set[Hashable] = set()
        self._metrics = metrics

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def pinned_bytes(self) -> int:
        return sum(_size(self._entries[key]) for key in self._pinned)

    def is_pinned(self, key: Hashable) -> bool:
        return key in self._pinned

    def size_of(self, key: Hashable) -> int:
        return _size(self._entries[key])

    def get(self, key: Hashable) -> torch.Tensor | None:
        tensor = self._entries.get(key)
        if tensor is not None:
            self._entries.move_to_end(key)
        if self._metrics is not None:
            (self._metrics.cache_hits if tensor is not None else self._metrics.cache_misses).inc()
            self._metrics.prompt_lookups.labels(tier="device", result="hit" if tensor is not None else "miss").inc()
        return tensor

    def put(self, key: Hashable, tensor: torch.Tensor, pinned: bool = False) -> None:
        """Adds a prompt, evicting the least recently used unpinned ones beyond the budget.

        A request in flight holds its own reference, so eviction never pulls a prompt from under it.
        The entry just added is never the victim, so one prompt larger than the budget is still served.
        """
        if key in self._entries:
            self._entries.move_to_end(key)
        else:
            self._entries[key] = tensor
            self._bytes += _size(tensor)
        if pinned:
            self._pinned.add(key)
        evicted = 0
        while self._bytes > self.budget_bytes:
            victim = next((k for k in self._entries if k not in self._pinned and k != key), None)
            if victim is None:
                break
            self._bytes -= _size(self._entries.pop(victim))
            evicted += 1
        self._report(evicted)

    def unpin(self, predicate: Callable[[Hashable], bool]) -> None:
        """Makes the matching entries evictable again (they stay until the budget needs their room)."""
        self._pinned = {key for key in self._pinned if not predicate(key)}
        self._report(0)

    def discard(self, predicate: Callable[[Hashable], bool]) -> None:
        for key in [k for k in self._entries if predicate(k)]:
            self._bytes -= _size(self._entries.pop(key))
            self._pinned.discard(key)
        self._report(0)

    def _report(self, evicted: int) -> None:
        if self._metrics is not None:
            if evicted:
                self._metrics.cache_evictions.inc(evicted)
            self._metrics.cache_bytes.set(self._bytes)
            self._metrics.cache_prompts.set(len(self._entries))
            self._metrics.cache_pinned.set(len(self._pinned))


def _size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
