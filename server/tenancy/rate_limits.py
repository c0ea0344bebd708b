"""Per-tenant rate limits (requests/s and tokens/s), on the `limits` library.

Counters live in the storage the backend gives (`server.backend`): this process's memory, or Redis when
the registry uses Redis, so replicas share them. If the storage fails, requests are let through: a rate
limiter must not take serving down.
"""

from __future__ import annotations

import logging
import time

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from server.errors import InvalidInput, RateLimited

log = logging.getLogger(__name__)


class TenantRateLimits:
    def __init__(self, requests_per_s: int, tokens_per_s: int, storage: Storage | None = None) -> None:
        """0 turns a limit off; `storage` None keeps the counters in this process."""
        self._limiter = SlidingWindowCounterRateLimiter(storage or MemoryStorage())
        self._limits: list[tuple[RateLimitItem, str, bool]] = []
        if requests_per_s > 0:
            self._limits.append((RateLimitItemPerSecond(requests_per_s), "requests", False))
        if tokens_per_s > 0:
            self._limits.append((RateLimitItemPerSecond(tokens_per_s), "tokens", True))

    async def admit(self, tenant: str, tokens: int) -> None:
        """Charges `tenant` one request and its full `tokens`, or raises `RateLimited` with a wait time.

        A request costing more than a whole second's budget could never be admitted: `InvalidInput`, decided
        before anything is charged (a 429 would have its client retry forever).
        """
        self._refuse_unaffordable(tokens)
        for item, what, by_tokens in self._limits:
            cost = tokens if by_tokens else 1
            try:
                allowed = await self._limiter.hit(item, tenant, cost=cost)
                if allowed:
                    continue
                stats = await self._limiter.get_window_stats(item, tenant)
            except RateLimited:
                raise
            except Exception:  # storage down: fail open
                log.warning("rate limiter storage failed; admitting the request", exc_info=True)
                return
            wait = max(1.0, stats.reset_time - time.time())
            raise RateLimited(f"tenant rate limit of {item.amount} {what}/s reached; retry later", wait)

    async def refund(self, tenant: str, tokens: int) -> None:
        """Gives back tokens charged by `admit` that were not used (a row reserved `max_new_tokens` and ended
        sooner). The window they go back to is the current one: a refund after the window of its charge turned
        returns a little more than that window still counted of them (at most the refund)."""
        if tokens <= 0:
            return
        for item, _, by_tokens in self._limits:
            if by_tokens:
                try:
                    await self._limiter.hit(item, tenant, cost=-tokens)
                except Exception:  # storage down: the tokens stay charged
                    log.warning("rate limiter storage failed; a refund of %d tokens is lost", tokens, exc_info=True)

    def _refuse_unaffordable(self, tokens: int) -> None:
        for item, _, by_tokens in self._limits:
            if by_tokens and tokens > item.amount:
                raise InvalidInput(
                    f"this request costs {tokens} tokens (its rows' prompt and input tokens, and every token they "
                    f"may generate); a tenant may use at most {item.amount} tokens per second, so it can never be "
                    "admitted: send fewer or shorter inputs, or a lower max_new_tokens"
                )
