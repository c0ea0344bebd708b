"""API keys → tenants. Only SHA-256 hashes of keys are stored; a key is shown once, when made.

With no keys in the file, auth is off and every caller is tenant `default`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from prompt_store import is_valid_task_id
from prompt_store.disk import write_atomically
from server.errors import Unauthorized

DEFAULT_TENANT = "default"
KEY_PREFIX = "ss-"


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The keys file, re-read when it changes on disk (so `softserve keys add` needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._entries: list[dict] = []

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._entries, self._mtime = [], None
            return
        if mtime != self._mtime:
            self._entries = json.loads(self.path.read_text() or "{}").get("keys", [])
            self._mtime = mtime

    @property
    def enabled(self) -> bool:
        self._refresh()
        return bool(self._entries)

    def authenticate(self, authorization: str | None) -> Caller:
        self._refresh()
        if not self._entries:
            return Caller(DEFAULT_TENANT, admin=True)
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        digest = hash_key(authorization.removeprefix("Bearer ").strip())
        found = None
        for entry in self._entries:  # compare every entry in constant time
            if hmac.compare_digest(entry["hash"], digest):
                found = entry
        if found is None:
            raise Unauthorized("invalid API key")
        return Caller(found["tenant"], bool(found.get("admin")))

    def add(self, tenant: str, admin: bool = False) -> str:
        if not is_valid_task_id(tenant):
            raise ValueError(f"invalid tenant name {tenant!r}")
        self._refresh()
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        entry = {"hash": hash_key(key), "tenant": tenant, "admin": admin, "created_at": time.time()}
        self._save([*self._entries, entry])
        return key

    def list(self) -> list[dict]:
        self._refresh()
        return [{**e, "hash": e["hash"][:12]} for e in self._entries]

    def revoke(self, hash_prefix: str) -> int:
        self._refresh()
        kept = [e for e in self._entries if not e["hash"].startswith(hash_prefix)]
        removed = len(self._entries) - len(kept)
        if removed:
            self._save(kept)
        return removed

    def _save(self, entries: list[dict]) -> None:
        write_atomically(self.path, json.dumps({"keys": entries}, indent=2).encode())
        self._entries, self._mtime = entries, self.path.stat().st_mtime
