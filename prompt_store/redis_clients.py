"""Every Redis client softserve opens, with the same options: connect and reply timeouts, and explicit retries.

A client without a reply timeout hangs its caller for as long as a stalled Redis stays stalled; a client with
redis-py's default retries makes every call wait several times over. So every client (the prompt store's,
the job store's, the training queue's, the worker's, the registry sync's and the rate limiter's) is built
here: it waits `timeout_s` to connect and for a reply, and retries only as its caller asks.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry


def connect(url: str, timeout_s: float, *, retries: int = 1, reply_wait_s: float | None = None) -> redis.Redis:
    """A client for `url`. `retries` immediate retries on a broken connection (a pooled connection can be stale
    after a Redis restart), never on a timeout (that would make each caller wait twice while Redis is stalled);
    `reply_wait_s` to wait longer than `timeout_s` for a reply."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=reply_wait_s or timeout_s,
        retry=Retry(NoBackoff(), retries, supported_errors=(redis.ConnectionError,)),
    )


def connect_async(url: str, timeout_s: float, *, retries: int = 0) -> aioredis.Redis:
    """An asyncio client for `url`, with the same timeouts; no retries by default: the listeners that use it
    must see a lost connection, to reconcile after it."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        # asyncio's own Retry: redis-py converts a sync one with a UserWarning on stderr for every client.
        retry=AsyncRetry(NoBackoff(), retries, supported_errors=(redis.ConnectionError,)),
    )
