"""Where a hub id is loaded from when the hub cannot be reached.

Left to itself, huggingface_hub retries every request five times with backoff (about a minute without network)
and prints each retry twice: its logger has a handler of its own and also passes records to the root logger's.
A server should say at once that it cannot download its model, and load from the cache when it can.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.utils import get_session

from server.serving.load_errors import is_hub_id

HUB_PROBE_TIMEOUT_S = 5.0


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One request to the hub's endpoint (`HF_ENDPOINT`), through the session huggingface_hub downloads with (its
    proxies included), no retries. Any answer counts: the network is there. The session's client, and so the
    type of its errors, depends on huggingface_hub's version (requests, httpx, httpx2): any error is no answer."""
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception:
        return False
    return True


def cache_only(name: str) -> bool:
    """Whether `name` must load from the local cache, without asking the hub: it is a hub id and the hub is
    unreachable, or HF_HUB_OFFLINE is set. A checkpoint directory never asks the hub."""
    if Path(name).is_dir() or not is_hub_id(name):
        return False
    return constants.HF_HUB_OFFLINE or not hub_reachable()


def log_hub_records_once() -> None:
    """huggingface_hub's records go to the root logger alone, formatted as every other record is."""
    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        hub_logger.removeHandler(handler)
