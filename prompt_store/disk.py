"""Disk backend: one directory per tenant/task, one safetensors file per version, JSON metadata.

Every file is written atomically (temp file, fsync, rename), so a crash never leaves a half-written
version or task record behind. This is the embedded default and the durable mirror behind Redis.
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import safetensors.torch

from prompt_store.atomic import write_atomically
from prompt_store.errors import TaskNotFound, VersionNotFound
from prompt_store.formats import PROMPT_KEY
from prompt_store.prompt import SoftPrompt
from prompt_store.records import TaskMetadata, TaskRecord, VersionInfo, is_valid_task_id
from prompt_store.store import LoadSource

TASK_FILE = "task.json"
VERSION_FILE = re.compile(r"^v([0-9]+)\.safetensors$")


class DiskStore:
    primary: LoadSource = "disk"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    def _task_dir(self, tenant: str, task_id: str) -> Path:
        if not is_valid_task_id(tenant) or not is_valid_task_id(task_id):
            raise TaskNotFound(task_id)
        return self.root / tenant / task_id

    def _version_path(self, tenant: str, task_id: str, version: int) -> Path:
        return self._task_dir(tenant, task_id) / f"v{version}.safetensors"

    def _write_record(self, record: TaskRecord) -> None:
        path = self._task_dir(record.tenant, record.task_id) / TASK_FILE
        write_atomically(path, record.model_dump_json(indent=2).encode())

    def get_task(self, tenant: str, task_id: str) -> TaskRecord:
        path = self._task_dir(tenant, task_id) / TASK_FILE
        try:
            return TaskRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise TaskNotFound(task_id) from None

    def get_task_traced(self, tenant: str, task_id: str) -> tuple[TaskRecord, LoadSource]:
        return self.get_task(tenant, task_id), "disk"

    def list_tasks(self, tenant: str) -> list[TaskRecord]:
        return self.get_tasks(tenant, self.task_ids(tenant))

    def task_ids(self, tenant: str, after: str | None = None, limit: int | None = None) -> list[str]:
        """The tenant directory's listing is the index: one `scandir`, no file is opened. A task directory whose
        record is not written yet (its first upload is under way) is listed; reading it finds no task."""
        if not is_valid_task_id(tenant):
            return []
        try:
            with os.scandir(self.root / tenant) as entries:
                names = sorted(e.name for e in entries if is_valid_task_id(e.name) and e.is_dir())
        except FileNotFoundError:
            return []
        start = bisect.bisect_right(names, after) if after is not None else 0
        return names[start : None if limit is None else start + limit]

    def get_tasks(self, tenant: str, task_ids: Sequence[str]) -> list[TaskRecord]:
        records = []
        for task_id in task_ids:
            try:
                records.append(self.get_task(tenant, task_id))
            except TaskNotFound:  # deleted meanwhile, or its first record not written yet
                continue
        return records

    def count_tasks(self, tenant: str) -> int:
        if not is_valid_task_id(tenant):
            return 0
        return sum((self.root / tenant / task_id / TASK_FILE).is_file() for task_id in self.task_ids(tenant))

    def list_tenants(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_valid_task_id(p.name))

    def add_version(
        self,
        tenant: str,
        task_id: str,
        prompt: SoftPrompt,
        metadata: TaskMetadata | None = None,
        activate: bool = True,
        model: str = "",
    ) -> TaskRecord:
        with self._lock:
            try:
                record = self.get_task(tenant, task_id)
            except TaskNotFound:
                record = TaskRecord(tenant=tenant, task_id=task_id)
            info = VersionInfo(
                version=record.next_version,
                length=prompt.length,
                d_model=prompt.d_model,
                sha256=prompt.sha256,
                model=model,
            )
            self.write_prompt(tenant, task_id, info.version, prompt)
            record = record.with_new_version(info, metadata, activate)
            self._write_record(record)
            return record

    def write_prompt(self, tenant: str, task_id: str, version: int, prompt: SoftPrompt) -> None:
        data = safetensors.torch.save({PROMPT_KEY: prompt.embeddings}, metadata={"sha256": prompt.sha256})
        write_atomically(self._version_path(tenant, task_id, version), data)

    def load_prompt(self, tenant: str, task_id: str, version: int) -> SoftPrompt:
        path = self._version_path(tenant, task_id, version)
        try:
            tensors = safetensors.torch.load_file(path)
        except FileNotFoundError:
            self.get_task(tenant, task_id)
            raise VersionNotFound(task_id, version) from None
        return SoftPrompt(tensors[PROMPT_KEY])

    def load_prompt_traced(self, tenant: str, task_id: str, version: int) -> tuple[SoftPrompt, LoadSource]:
        return self.load_prompt(tenant, task_id, version), "disk"

    def activate(self, tenant: str, task_id: str, version: int) -> TaskRecord:
        with self._lock:
            record = self.get_task(tenant, task_id)
            if record.version_info(version) is None:
                raise VersionNotFound(task_id, version)
            record = record.model_copy(update={"active_version": version, "updated_at": time.time()})
            self._write_record(record)
            return record

    def set_ensemble(self, tenant: str, task_id: str, versions: list[int]) -> TaskRecord:
        with self._lock:
            record = self.get_task(tenant, task_id)
            missing = next((v for v in versions if record.version_info(v) is None), None)
            if missing is not None:
                raise VersionNotFound(task_id, missing)
            record = record.model_copy(update={"ensemble": list(versions), "updated_at": time.time()})
            self._write_record(record)
            return record

    def _version_files(self, tenant: str, task_id: str) -> dict[int, Path]:
        files = {}
        for path in self._task_dir(tenant, task_id).glob("v*.safetensors"):
            match = VERSION_FILE.match(path.name)
            if match is not None:
                files[int(match[1])] = path
        return files

    def version_hashes(self, tenant: str, task_id: str) -> dict[int, str | None]:
        """Each version file of a task and the sha256 in its header (None: unreadable), without loading tensors."""
        hashes: dict[int, str | None] = {}
        for version, path in self._version_files(tenant, task_id).items():
            try:
                with safetensors.safe_open(path, framework="pt") as handle:
                    hashes[version] = (handle.metadata() or {}).get("sha256")
            except (OSError, safetensors.SafetensorError):
                hashes[version] = None
        return hashes

    def mirror_task(
        self, tenant: str, task_id: str, record: TaskRecord | None, fetch: Callable[[int], SoftPrompt | None]
    ) -> bool:
        """Makes a task on disk exactly `record` (None: no such task), as another backend holds it.

        Version files that are missing or hold other bytes (by sha256) are written from `fetch` (a version it
        returns None for is left for a later repair); files of versions the record does not list are removed;
        the record is written last, so it never lists a version before its file is there.
        Returns True when anything changed. Callers serialize the copies of one task (the Redis store holds a
        per-task file lock), so no lock is held here while `fetch` waits on another backend.
        """
        if record is None:
            try:
                self.delete_task(tenant, task_id)
            except TaskNotFound:
                return False
            return True
        if self._holds(record):
            return False
        on_disk = self.version_hashes(tenant, task_id)
        changed = self._write_missing_versions(record, on_disk, fetch)
        for version in on_disk.keys() - {info.version for info in record.versions}:
            self._version_path(tenant, task_id, version).unlink(missing_ok=True)
            changed = True
        try:
            current: TaskRecord | None = self.get_task(tenant, task_id)
        except TaskNotFound:
            current = None
        if current != record:
            self._write_record(record)
            changed = True
        return changed

    def _holds(self, record: TaskRecord) -> bool:
        """The record is on disk as it is, with a file for each version it lists and no other. Its files are
        then its own: every writer writes a record only after the files it lists (cheap: no file is read)."""
        try:
            current = self.get_task(record.tenant, record.task_id)
        except TaskNotFound:
            return False
        listed = {info.version for info in record.versions}
        return current == record and self._version_files(record.tenant, record.task_id).keys() == listed

    def _write_missing_versions(
        self, record: TaskRecord, on_disk: dict[int, str | None], fetch: Callable[[int], SoftPrompt | None]
    ) -> bool:
        written = False
        for info in record.versions:
            if on_disk.get(info.version) == info.sha256:
                continue
            prompt = fetch(info.version)
            if prompt is not None:
                self.write_prompt(record.tenant, record.task_id, info.version, prompt)
                written = True
        return written

    def delete_task(self, tenant: str, task_id: str) -> None:
        with self._lock:
            task_dir = self._task_dir(tenant, task_id)
            if not (task_dir / TASK_FILE).exists():
                raise TaskNotFound(task_id)
            # Rename first so readers never see a half-deleted task, then remove at leisure.
            graveyard = task_dir.with_name(f".deleted-{task_id}-{time.time_ns()}")
            os.replace(task_dir, graveyard)
            shutil.rmtree(graveyard, ignore_errors=True)
