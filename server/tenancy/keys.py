"""API keys → tenants. Only SHA-256 hashes of keys are stored; a key is shown once, when made.

Auth fails closed. The keys file records `"mode": "keys"` once a key is added, and revoking the last key
keeps it: an empty keys file refuses everyone, it never reopens the server. Open mode (every anonymous
caller is tenant `default`) comes only from having no keys file at all (the embedded quick start), from
`softserve keys open`, or from the `auth` setting. Even then the anonymous caller is never an admin: acting
for another tenant needs a real admin key. A keys file that cannot be read stops start-up, and while the
server runs it makes every request answer 503 until it is fixed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prompt_store import TASK_ID_PATTERN, is_valid_task_id
from prompt_store.atomic import write_atomically
from server.errors import AuthUnavailable, Unauthorized
from server.strict_json import loads as strict_json_loads

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
KEY_PREFIX = "ss-"
KEY_ID_LENGTH = 12  # the first hex digits of a key's hash: what `keys list` shows and `keys revoke` takes

AuthSetting = Literal["auto", "keys", "open"]
FileMode = Literal["keys", "open"]


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool = False


ANONYMOUS = Caller(DEFAULT_TENANT, admin=False)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str = Field(pattern=TASK_ID_PATTERN)
    admin: bool = False
    created_at: float = 0.0

    @property
    def id(self) -> str:
        return self.hash[:KEY_ID_LENGTH]


class KeysFile(BaseModel):
    """The file's content. A file without `mode` (written before modes existed) is in keys mode: only
    `softserve keys add` ever made one."""

    model_config = ConfigDict(extra="ignore", strict=True)

    mode: FileMode = "keys"
    keys: list[KeyEntry] = []


class KeysFileError(Exception):
    """The keys file exists but cannot be used. The message names the file (for operators, not clients)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"the API keys file {path} is unusable: {problem}")


class KeyNotFound(ValueError):
    """`keys revoke` was given something that is not exactly one key's id."""


def parse_keys_file(path: Path, raw: bytes) -> KeysFile:
    try:
        return KeysFile.model_validate(strict_json_loads(raw))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        raise KeysFileError(path, f"{where}: {first['msg']}") from None
    except (ValueError, UnicodeDecodeError) as error:  # not JSON (an empty file included)
        raise KeysFileError(path, f"not valid JSON ({error})") from None


FileSignature = tuple[int, int, int]
NO_FILE: FileSignature = (-1, -1, -1)


class ApiKeys:
    """The keys file, re-read when it changes on disk (so `softserve keys add` needs no restart)."""

    def __init__(self, path: Path, setting: AuthSetting = "auto") -> None:
        self.path = path
        self.setting = setting
        self._signature: FileSignature | None = None
        self._content: KeysFile | None = None  # None: there is no keys file
        self._error: KeysFileError | None = None
        self._seen_keys_mode = False

    def check(self) -> None:
        """Raises `KeysFileError` when the file is unusable: start-up calls it to refuse to serve."""
        self._refresh()
        if self._error is not None:
            raise self._error

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._forget_file()
            return
        except OSError as error:  # e.g. a directory on the way that cannot be searched
            self._signature = None
            self._refused(KeysFileError(self.path, f"it cannot be read ({error.strerror})"))
            return
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            self._content, self._error = parse_keys_file(self.path, self._read()), None
        except KeysFileError as error:
            self._refused(error)
            return
        self._seen_keys_mode = self._seen_keys_mode or self._content.mode == "keys"

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as error:  # not readable, or a directory
            raise KeysFileError(self.path, f"it cannot be read ({error.strerror})") from None

    def _refused(self, error: KeysFileError) -> None:
        if self._error is None or str(self._error) != str(error):  # logged once, not per request
            log.error("%s; every request is refused (503) until it is fixed", error)
        self._content, self._error = None, error

    def _forget_file(self) -> None:
        """No file: open mode, unless this process has already seen keys in use (then it fails closed)."""
        if self._signature == NO_FILE:
            return
        self._signature, self._content, self._error = NO_FILE, None, None
        if self._seen_keys_mode:
            self._refused(KeysFileError(self.path, "it was removed while keys were in use"))

    def _entries(self) -> list[KeyEntry]:
        return self._content.keys if self._content is not None else []

    @property
    def mode(self) -> FileMode:
        """The mode requests are served in: the `auth` setting, else the keys file's, else open (no file)."""
        self._refresh()
        if self.setting != "auto":
            return self.setting
        return self._content.mode if self._content is not None else "open"

    def authenticate(self, authorization: str | None) -> Caller:
        mode = self.mode
        if self._error is not None:
            raise AuthUnavailable(
                "authentication is unavailable: the server's API keys file cannot be read; an operator must fix it"
            )
        if authorization is None and mode == "open":
            return ANONYMOUS
        if not authorization:
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        if not authorization.startswith("Bearer "):
            raise Unauthorized(
                "the Authorization header lacks its `Bearer ` prefix: send `Authorization: Bearer <key>`"
            )
        found = self._match(hash_key(authorization.removeprefix("Bearer ").strip()))
        if found is None:
            raise Unauthorized("invalid API key")
        return Caller(found.tenant, found.admin)

    def _match(self, digest: str) -> KeyEntry | None:
        found = None
        for entry in self._entries():  # compare every entry in constant time
            if hmac.compare_digest(entry.hash, digest):
                found = entry
        return found

    # The `softserve keys` commands. They never overwrite a file they cannot read.

    def _file_entries(self) -> list[KeyEntry]:
        self._refresh()
        if self._error is not None and self._signature != NO_FILE:
            raise self._error
        return self._entries()

    @property
    def file_mode(self) -> FileMode:
        """The mode the keys file records (open when there is none)."""
        self._file_entries()
        return self._content.mode if self._content is not None else "open"

    def add(self, tenant: str, admin: bool = False) -> str:
        """Makes a key for `tenant`; the file is in keys mode from now on."""
        if not is_valid_task_id(tenant):
            raise ValueError(f"invalid tenant name {tenant!r}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        entry = KeyEntry(hash=hash_key(key), tenant=tenant, admin=admin, created_at=time.time())
        self._save(KeysFile(mode="keys", keys=[*self._file_entries(), entry]))
        return key

    def list(self) -> list[dict]:
        return [
            {"id": e.id, "tenant": e.tenant, "admin": e.admin, "created_at": e.created_at} for e in self._file_entries()
        ]

    def revoke(self, key_id: str) -> KeyEntry:
        """Revokes the one key whose id is exactly `key_id`. The mode stays: no keys left refuses everyone."""
        entries = self._file_entries()
        matches = [e for e in entries if key_id and key_id in (e.id, e.hash)]
        if len(matches) != 1:
            problem = f"no key has the id {key_id!r}" if not matches else f"{key_id!r} matches {len(matches)} keys"
            raise KeyNotFound(f"{problem}; give the exact id of one key (`softserve keys list` shows them)")
        self._save(KeysFile(mode=self.file_mode, keys=[e for e in entries if e is not matches[0]]))
        return matches[0]

    def open(self) -> None:
        """Back to open mode (anonymous callers are tenant `default`): only once no keys are left."""
        remaining = len(self._file_entries())
        if remaining:
            raise ValueError(f"{remaining} key(s) exist: revoke them first to open the server")
        self._save(KeysFile(mode="open"))

    def _save(self, content: KeysFile) -> None:
        """Atomically, readable by its owner only (`write_atomically` makes the file 0600)."""
        write_atomically(self.path, content.model_dump_json(indent=2).encode())
        self._signature = None  # read back on next use
