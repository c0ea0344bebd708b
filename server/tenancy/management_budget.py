"""`ManagementBudget`: each tenant's budget a second for every authenticated route but inference (prompts,
listings, `similar`, training jobs, `/v1/info`), which has its own limits (`server.tenancy.rate_limits`).

A request costs 1 when it is admitted; a listing then `spend`s 1 per task it read, once that is known. The
window is fixed (one second): what a request overdraws is owed until the window ends, so a tenant whose
`similar` compared 1,500 tasks is refused for the rest of that second. (A sliding window would forgive the
overdraft as the previous window's weight decays, and a loop of expensive listings would never be refused.)
At most the budget plus one request's cost is spent in any window.

Counters live in the backend's storage, shared by replicas on Redis. If the storage fails, requests are let
through: a rate limiter must not take serving down.
"""

from __future__ import annotations

import logging
import time

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter

from server.errors import RateLimited

log = logging.getLogger(__name__)

NAMESPACE = "MANAGEMENT"  # apart from the inference limits' counters


class ManagementBudget:
    def __init__(self, cost_per_s: int, storage: Storage | None = None) -> None:
        """`cost_per_s` 0: no limit; `storage` None keeps the counters in this process."""
        self._limiter = FixedWindowRateLimiter(storage or MemoryStorage())
        self._item = RateLimitItemPerSecond(cost_per_s, namespace=NAMESPACE) if cost_per_s > 0 else None

    async def admit(self, tenant: str) -> None:
        """Charges the request's 1, or raises `RateLimited` (with the wait) while this second's budget is spent."""
        if self._item is None:
            return
        try:
            if await self._limiter.hit(self._item, tenant):
                return
            reset_time = (await self._limiter.get_window_stats(self._item, tenant)).reset_time
        except Exception:  # storage down: fail open
            log.warning("rate limiter storage failed; admitting the request", exc_info=True)
            return
        raise RateLimited(
            f"tenant budget of {self._item.amount} management cost units/s is spent (a request costs 1, a listing "
            "1 more per task it read); retry later",
            max(1.0, reset_time - time.time()),
        )

    async def spend(self, tenant: str, cost: int) -> None:
        """Charges work already done, in full even past the budget (the rest of the window is refused). Never
        refuses: the work is done."""
        if self._item is None or cost <= 0:
            return
        try:
            await self._limiter.hit(self._item, tenant, cost=cost)  # a fixed window counts a refused hit too
        except Exception:  # storage down: fail open
            log.warning("rate limiter storage failed; a listing's cost is not charged", exc_info=True)
