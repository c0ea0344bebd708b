"""The disk backend: immutable versions, the active version, metadata, deletion, tenants, durability."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prompt_store import DiskStore, SoftPrompt, TaskMetadata, TaskNotFound, VersionNotFound
from prompt_store.atomic import write_atomically
from server.testing.reference import random_prompt

D = 16


def prompt(seed: int, length: int = 4) -> SoftPrompt:
    return SoftPrompt(random_prompt(length, D, seed=seed))


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def leftovers(root: Path) -> list[Path]:
    """Temp files and half-deleted directories: anything hidden or ending in `.tmp`."""
    return [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


@pytest.fixture
def store(tmp_path: Path) -> DiskStore:
    return DiskStore(tmp_path / "prompts")


@pytest.fixture
def three_versions(store: DiskStore) -> list[SoftPrompt]:
    prompts = [prompt(1, length=3), prompt(2, length=5), prompt(3, length=7)]
    for p in prompts:
        store.add_version("acme", "sst2", p, model="tiny")
    return prompts


def test_versions_are_numbered_from_one_and_each_keeps_its_prompt(
    store: DiskStore, three_versions: list[SoftPrompt]
) -> None:
    record = store.get_task("acme", "sst2")
    assert [v.version for v in record.versions] == [1, 2, 3]
    assert [v.length for v in record.versions] == [3, 5, 7]
    assert [v.sha256 for v in record.versions] == [p.sha256 for p in three_versions]
    assert all(v.d_model == D and v.model == "tiny" for v in record.versions)
    for version, expected in enumerate(three_versions, start=1):
        loaded = store.load_prompt("acme", "sst2", version)
        assert torch.equal(loaded.embeddings, expected.embeddings)
        assert loaded.sha256 == expected.sha256


def test_a_version_file_never_changes_after_it_is_written(store: DiskStore) -> None:
    store.add_version("acme", "sst2", prompt(1))
    task_dir = store.root / "acme" / "sst2"
    first = (task_dir / "v1.safetensors").read_bytes()
    store.add_version("acme", "sst2", prompt(2))
    store.add_version("acme", "sst2", prompt(1))  # the same values again: still a new version
    store.activate("acme", "sst2", 1)
    assert (task_dir / "v1.safetensors").read_bytes() == first
    record = store.get_task("acme", "sst2")
    assert [v.version for v in record.versions] == [1, 2, 3]
    assert record.versions[0].sha256 == record.versions[2].sha256 != record.versions[1].sha256


def test_the_newest_version_is_active_by_default(store: DiskStore, three_versions: list[SoftPrompt]) -> None:
    assert store.get_task("acme", "sst2").active_version == 3


def test_adding_without_activate_keeps_the_active_version(store: DiskStore) -> None:
    store.add_version("acme", "sst2", prompt(1))
    record = store.add_version("acme", "sst2", prompt(2), activate=False)
    assert record.active_version == 1
    assert [v.version for v in record.versions] == [1, 2]
    assert store.get_task("acme", "sst2").active_version == 1


def test_the_first_version_is_active_even_when_not_asked(store: DiskStore) -> None:
    record = store.add_version("acme", "sst2", prompt(1), activate=False)
    assert record.active_version == 1


def test_rollback_and_roll_forward(store: DiskStore, three_versions: list[SoftPrompt]) -> None:
    record = store.activate("acme", "sst2", 1)
    assert record.active_version == 1
    assert store.get_task("acme", "sst2").active_version == 1
    assert [v.version for v in record.versions] == [1, 2, 3]  # nothing is lost by rolling back
    assert store.activate("acme", "sst2", 3).active_version == 3
    assert store.activate("acme", "sst2", 2).active_version == 2


@pytest.mark.parametrize("version", [0, 4, 99, -1])
def test_activating_an_unknown_version_fails_and_changes_nothing(
    store: DiskStore, three_versions: list[SoftPrompt], version: int
) -> None:
    before = store.get_task("acme", "sst2")
    with pytest.raises(VersionNotFound) as info:
        store.activate("acme", "sst2", version)
    assert info.value.version == version
    assert store.get_task("acme", "sst2") == before


def test_loading_an_unknown_version_or_task(store: DiskStore, three_versions: list[SoftPrompt]) -> None:
    with pytest.raises(VersionNotFound):
        store.load_prompt("acme", "sst2", 4)
    with pytest.raises(TaskNotFound):
        store.load_prompt("acme", "nope", 1)
    with pytest.raises(TaskNotFound):
        store.get_task("acme", "nope")
    with pytest.raises(TaskNotFound):
        store.activate("acme", "nope", 1)


def test_new_versions_merge_metadata(store: DiskStore) -> None:
    store.add_version("acme", "sst2", prompt(1), TaskMetadata(labels=["positive", "negative"], description="sentiment"))
    record = store.add_version("acme", "sst2", prompt(2), TaskMetadata(input_template="sentence: {input}"))
    assert record.metadata == TaskMetadata(
        labels=["positive", "negative"], description="sentiment", input_template="sentence: {input}"
    )
    record = store.add_version("acme", "sst2", prompt(3), TaskMetadata(labels=["pos", "neg"], parameters={"x": 1}))
    assert record.metadata.labels == ["pos", "neg"]
    assert record.metadata.description == "sentiment"
    assert record.metadata.input_template == "sentence: {input}"
    assert record.metadata.parameters == {"x": 1}
    store.add_version("acme", "sst2", prompt(4))  # no metadata: everything kept
    assert store.get_task("acme", "sst2").metadata == record.metadata


def test_delete_then_the_task_is_gone(store: DiskStore, three_versions: list[SoftPrompt]) -> None:
    store.add_version("acme", "rte", prompt(9))
    store.delete_task("acme", "sst2")
    with pytest.raises(TaskNotFound):
        store.get_task("acme", "sst2")
    with pytest.raises(TaskNotFound):
        store.load_prompt("acme", "sst2", 1)
    with pytest.raises(TaskNotFound):
        store.activate("acme", "sst2", 1)
    with pytest.raises(TaskNotFound):
        store.delete_task("acme", "sst2")
    assert [r.task_id for r in store.list_tasks("acme")] == ["rte"]
    assert not (store.root / "acme" / "sst2").exists()
    assert leftovers(store.root) == []
    assert torch.equal(store.load_prompt("acme", "rte", 1).embeddings, prompt(9).embeddings)


def test_a_deleted_task_id_starts_again_at_version_one(store: DiskStore, three_versions: list[SoftPrompt]) -> None:
    store.delete_task("acme", "sst2")
    record = store.add_version("acme", "sst2", prompt(7))
    assert [v.version for v in record.versions] == [1]
    assert record.metadata == TaskMetadata()
    assert torch.equal(store.load_prompt("acme", "sst2", 1).embeddings, prompt(7).embeddings)


def test_tenants_are_isolated(store: DiskStore) -> None:
    store.add_version("acme", "sst2", prompt(1), TaskMetadata(labels=["a"]))
    store.add_version("acme", "rte", prompt(2))
    store.add_version("globex", "sst2", prompt(3), TaskMetadata(labels=["g"]))
    assert [r.task_id for r in store.list_tasks("acme")] == ["rte", "sst2"]
    assert [r.task_id for r in store.list_tasks("globex")] == ["sst2"]
    assert store.list_tasks("initech") == []
    assert store.list_tenants() == ["acme", "globex"]
    assert torch.equal(store.load_prompt("globex", "sst2", 1).embeddings, prompt(3).embeddings)
    assert store.get_task("globex", "sst2").metadata.labels == ["g"]
    with pytest.raises(TaskNotFound):
        store.get_task("globex", "rte")
    store.delete_task("globex", "sst2")
    assert store.get_task("acme", "sst2").metadata.labels == ["a"]
    assert torch.equal(store.load_prompt("acme", "sst2", 1).embeddings, prompt(1).embeddings)


@pytest.mark.parametrize("name", ["..", "../acme", "a/b", "", ".hidden", "x" * 65])
def test_unsafe_names_never_reach_the_file_system(store: DiskStore, name: str) -> None:
    store.add_version("acme", "sst2", prompt(1))
    before = files_under(store.root.parent)
    with pytest.raises(TaskNotFound):
        store.add_version("acme", name, prompt(2))
    with pytest.raises(TaskNotFound):
        store.add_version(name, "sst2", prompt(2))
    with pytest.raises(TaskNotFound):
        store.get_task(name, "sst2")
    with pytest.raises(TaskNotFound):
        store.delete_task("acme", name)
    assert store.list_tasks(name) == []
    assert files_under(store.root.parent) == before


def test_writes_leave_no_temp_files(store: DiskStore) -> None:
    for seed in range(3):
        store.add_version("acme", "sst2", prompt(seed), TaskMetadata(description=f"v{seed}"))
    store.activate("acme", "sst2", 1)
    store.add_version("acme", "rte", prompt(5))
    store.delete_task("acme", "rte")
    assert leftovers(store.root) == []
    assert files_under(store.root) == {
        "acme/sst2/task.json",
        "acme/sst2/v1.safetensors",
        "acme/sst2/v2.safetensors",
        "acme/sst2/v3.safetensors",
    }


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    write_atomically(target, b"old")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "inside").write_bytes(b"x")  # os.replace cannot put a file over a non-empty directory
    with pytest.raises(OSError):
        write_atomically(blocked, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "record.json"]
    write_atomically(target, b"newer")
    assert target.read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "record.json"]


def test_records_and_prompts_survive_a_new_store_instance(store: DiskStore) -> None:
    store.add_version("acme", "sst2", prompt(1), TaskMetadata(labels=["yes", "no"], input_template="q: {input}"))
    store.add_version("acme", "sst2", prompt(2, length=9))
    store.activate("acme", "sst2", 1)
    store.add_version("globex", "rte", prompt(3))
    reopened = DiskStore(store.root)
    assert reopened.get_task("acme", "sst2") == store.get_task("acme", "sst2")
    assert reopened.get_task("acme", "sst2").active_version == 1
    assert reopened.get_task("acme", "sst2").metadata.labels == ["yes", "no"]
    assert [r.task_id for r in reopened.list_tasks("globex")] == ["rte"]
    for version, seed, length in [(1, 1, 4), (2, 2, 9)]:
        loaded = reopened.load_prompt("acme", "sst2", version)
        assert torch.equal(loaded.embeddings, prompt(seed, length).embeddings)
    record = reopened.add_version("acme", "sst2", prompt(4))
    assert [v.version for v in record.versions] == [1, 2, 3]
    assert store.get_task("acme", "sst2").active_version == 3  # the first instance reads the same files
