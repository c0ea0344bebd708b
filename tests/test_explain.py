"""Reading prompts and reusing them, over real HTTP with the tiny model: nearest vocabulary tokens, similar
tasks, and a training job that starts from another task's prompt (`init: "task"`)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from server.client import AsyncSoftserveClient, SoftserveClient
from server.jobs.dataset import Dataset
from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.testing.reference import random_prompt
from server.training import PromptTrainer, TrainingConfig, TrainingExample
from tests.serving import running_server
from tests.test_prompt_api import registry_state
from tests.training import (
    examples,
    one_torch_thread,  # noqa: F401 (an autouse fixture)
    wait_until_ended,
)

Tenants = tuple[httpx.Client, httpx.Client]


@pytest.fixture
def server(tmp_path: Path, tiny: FrozenT5) -> Iterator[tuple[str, str, str]]:
    """A server with two tenants: its URL, the owner's key and the other tenant's."""
    settings = Settings(data_dir=tmp_path / "data", max_wait_ms=2)
    keys = ApiKeys(settings.keys_file)
    owner_key, other_key = keys.add("owner"), keys.add("other")
    with running_server(settings, tiny) as url:
        yield url, owner_key, other_key


@pytest.fixture
def tenants(server: tuple[str, str, str]) -> Iterator[Tenants]:
    url, owner_key, other_key = server
    with (
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {owner_key}"}, timeout=30) as owner,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {other_key}"}, timeout=30) as other,
    ):
        yield owner, other


def upload(client: httpx.Client, task_id: str, prompt: torch.Tensor, labels: list[str] | None = None) -> None:
    buffer = io.BytesIO()
    np.save(buffer, prompt.numpy())
    data = {"metadata": json.dumps({"labels": labels})} if labels else None
    response = client.put(f"/v1/prompts/{task_id}", files={"file": ("p.npy", buffer.getvalue())}, data=data)
    assert response.status_code == 201, response.text


def vocabulary(tiny: FrozenT5) -> torch.Tensor:
    return tiny.model.get_input_embeddings().weight[: tiny.decodable_vocab].detach()


def token_ids(tiny: FrozenT5, text: str) -> list[int]:
    return [i for i in tiny.tokenize([text])[0] if i != tiny.eos_token_id]


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


# Nearest tokens


def brute_force_neighbours(prompt: torch.Tensor, vocab: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Each row's k most cosine-similar vocabulary rows, one pair at a time in float64."""
    result = []
    for row in prompt.double():
        scored = [(i, float(row @ token / (row.norm() * token.norm()))) for i, token in enumerate(vocab.double())]
        result.append(sorted(scored, key=lambda pair: -pair[1])[:k])
    return result


def test_nearest_tokens_equal_a_brute_force_search(tenants: Tenants, tiny: FrozenT5) -> None:
    owner, _ = tenants
    prompt = random_prompt(4, tiny.d_model, seed=0)
    labels = ["yes", "no"]
    upload(owner, "sst2", prompt, labels)

    response = owner.get("/v1/prompts/sst2/versions/1/nearest-tokens", params={"k": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["task_id"], body["version"], body["k"]) == ("sst2", 1, 7)

    expected = brute_force_neighbours(prompt, vocabulary(tiny), 7)
    assert [p["position"] for p in body["positions"]] == [0, 1, 2, 3]
    label_pieces = {label: set(token_ids(tiny, label)) for label in labels}
    for position, want in zip(body["positions"], expected, strict=True):
        ids = [token["id"] for token in position["tokens"]]
        assert ids == [i for i, _ in want]
        assert [t["similarity"] for t in position["tokens"]] == pytest.approx([s for _, s in want], abs=1e-5)
        assert [t["text"] for t in position["tokens"]] == tiny.tokenizer.convert_ids_to_tokens(ids)
        assert position["labels"] == [label for label in labels if label_pieces[label] & set(ids)]


def test_a_prompt_of_token_embeddings_reads_back_as_those_tokens(tenants: Tenants, tiny: FrozenT5) -> None:
    """Rows that are (scaled) embeddings of known tokens have those tokens at rank 1, with similarity 1; a row
    built from a label's token names that label."""
    owner, _ = tenants
    yes, no = token_ids(tiny, "yes"), token_ids(tiny, "no")
    ids = yes + no
    upload(owner, "sst2", vocabulary(tiny)[ids] * 2.5, ["yes", "no"])

    for k in (1, 3):
        positions = owner.get("/v1/prompts/sst2/versions/1/nearest-tokens", params={"k": k}).json()["positions"]
        assert [p["tokens"][0]["id"] for p in positions] == ids
        assert all(p["tokens"][0]["similarity"] == pytest.approx(1.0, abs=1e-5) for p in positions)
        assert all(len(p["tokens"]) == k for p in positions)
    single = owner.get("/v1/prompts/sst2/versions/1/nearest-tokens", params={"k": 1}).json()["positions"]
    assert [p["labels"] for p in single] == [["yes"]] * len(yes) + [["no"]] * len(no)


# Similar tasks


def test_similar_ranks_a_near_copy_first(tenants: Tenants, tiny: FrozenT5) -> None:
    owner, other = tenants
    base = random_prompt(6, tiny.d_model, seed=1)
    prompts = {
        "copy": base + 0.05 * random_prompt(6, tiny.d_model, seed=9),
        "far": random_prompt(6, tiny.d_model, seed=2),
        "short": random_prompt(3, tiny.d_model, seed=3),  # lengths may differ: the measure uses the mean row
    }
    upload(owner, "base", base)
    for task_id, prompt in prompts.items():
        upload(owner, task_id, prompt)

    body = owner.get("/v1/prompts/base/similar", params={"k": 5}).json()
    assert (body["task_id"], body["version"]) == ("base", 1)
    ranked = body["similar"]
    assert ranked[0]["task_id"] == "copy"
    assert {entry["task_id"] for entry in ranked} == set(prompts)  # every other task, never the task itself
    query = base.double().mean(0)
    for entry in ranked:
        mean = prompts[entry["task_id"]].double().mean(0)
        expected = float(query @ mean / (query.norm() * mean.norm()))
        assert entry["similarity"] == pytest.approx(expected, abs=1e-5)
        assert entry["version"] == 1
    similarities = [entry["similarity"] for entry in ranked]
    assert similarities == sorted(similarities, reverse=True)
    assert [e["task_id"] for e in owner.get("/v1/prompts/base/similar", params={"k": 1}).json()["similar"]] == ["copy"]

    # Another tenant neither reads the owner's task nor sees its tasks ranked among its own.
    assert error_code(other.get("/v1/prompts/base/similar")) == "not_found"
    upload(other, "mine", base)
    assert other.get("/v1/prompts/mine/similar").json()["similar"] == []


def test_bad_k_unknown_versions_and_other_tenants_are_refused(tenants: Tenants, tiny: FrozenT5) -> None:
    owner, other = tenants
    upload(owner, "sst2", random_prompt(4, tiny.d_model, seed=0))
    before = registry_state(owner)
    for k in ("0", "101", "x", "-1"):
        for path in ("/v1/prompts/sst2/versions/1/nearest-tokens", "/v1/prompts/sst2/similar"):
            response = owner.get(path, params={"k": k})
            assert response.status_code == 422 and error_code(response) == "invalid_request", (path, k)
    assert owner.get("/v1/prompts/sst2/versions/1/nearest-tokens", params={"k": 100}).status_code == 200
    assert error_code(owner.get("/v1/prompts/sst2/versions/2/nearest-tokens")) == "not_found"
    assert error_code(owner.get("/v1/prompts/sst2/versions/0/nearest-tokens")) == "invalid_request"
    assert error_code(owner.get("/v1/prompts/nope/versions/1/nearest-tokens")) == "not_found"
    assert error_code(owner.get("/v1/prompts/nope/similar")) == "not_found"
    response = other.get("/v1/prompts/sst2/versions/1/nearest-tokens")
    assert response.status_code == 404 and "owner" not in response.text
    assert registry_state(owner) == before


def test_python_clients_and_the_cli_read_the_same_answers(server: tuple[str, str, str], tiny: FrozenT5) -> None:
    url, owner_key, _ = server
    with SoftserveClient(url, owner_key) as client:
        buffer = io.BytesIO()
        np.save(buffer, random_prompt(3, tiny.d_model, seed=4).numpy())
        for task_id in ("a", "b"):
            client.upload_prompt(task_id, buffer.getvalue())
        nearest, similar = client.nearest_tokens("a", 1, k=2), client.similar_tasks("a", k=3)
    assert [len(p["tokens"]) for p in nearest["positions"]] == [2, 2, 2]
    assert similar["similar"][0]["task_id"] == "b" and similar["similar"][0]["similarity"] == pytest.approx(1.0)

    async def read_async() -> tuple[dict, dict]:
        async with AsyncSoftserveClient(url, owner_key) as client:
            return await client.nearest_tokens("a", 1, k=2), await client.similar_tasks("a", k=3)

    assert asyncio.run(read_async()) == (nearest, similar)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "server.cli", "prompts", "--url", url, "--api-key", owner_key, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    explained = cli("explain", "a", "1", "-k", "2")
    assert explained.returncode == 0, explained.stderr
    assert json.loads(explained.stdout) == nearest
    assert json.loads(cli("similar", "a", "-k", "3").stdout) == similar
    refused = cli("explain", "a", "1", "-k", "0")
    assert refused.returncode == 1 and refused.stderr.startswith("error: 422 invalid_request")


# Transfer: a training job that starts from another task's prompt


def transfer_job(task_id: str, init_task: str, **config: Any) -> dict[str, Any]:
    """One step with a learning rate so small that no float32 value can move: the trained prompt is the start."""
    settings = {"init": "task", "init_task": init_task, "steps": 1, "batch_size": 4, "learning_rate": 1e-30}
    return {"task_id": task_id, "train": examples(8), "config": settings | {"weight_decay": 0} | config}


def trained_prompt(client: httpx.Client, body: dict[str, Any]) -> torch.Tensor:
    response = client.post("/v1/training-jobs", json=body)
    assert response.status_code == 202, response.text
    done = wait_until_ended(client, response.json()["job_id"])
    assert done["state"] == "succeeded", done
    version = done["prompt_version"]
    data = client.get(f"/v1/prompts/{body['task_id']}/versions/{version}", params={"format": "npy"}).content
    return torch.from_numpy(np.load(io.BytesIO(data)))


def test_transfer_init_starts_exactly_from_the_source(tenants: Tenants, tiny: FrozenT5) -> None:
    owner, _ = tenants
    first, second = random_prompt(4, tiny.d_model, seed=5), random_prompt(4, tiny.d_model, seed=6)
    upload(owner, "source", first)
    upload(owner, "source", second)  # now the active version

    assert torch.equal(trained_prompt(owner, transfer_job("same", "source")), second)
    assert torch.equal(trained_prompt(owner, transfer_job("pinned", "source@1")), first)
    assert torch.equal(trained_prompt(owner, transfer_job("shorter", "source@1", prompt_length=2)), first[:2])

    longer = trained_prompt(owner, transfer_job("longer", "source@1", prompt_length=6))
    assert torch.equal(longer[:4], first)
    vocab = vocabulary(tiny)
    assert all(any(torch.equal(row, token) for token in vocab) for row in longer[4:])  # sampled like `vocab`


def test_transfer_refuses_a_task_the_caller_does_not_have(tenants: Tenants, tiny: FrozenT5) -> None:
    owner, other = tenants
    upload(owner, "source", random_prompt(4, tiny.d_model, seed=5))
    before = registry_state(owner)

    for client, init_task in ((other, "source"), (owner, "source@2"), (owner, "nope")):
        response = client.post("/v1/training-jobs", json=transfer_job("target", init_task))
        assert response.status_code == 404 and error_code(response) == "not_found", response.text
        assert "owner" not in response.text
    for config in (
        {"init": "task"},  # no source named
        {"init": "vocab", "init_task": "source"},  # a source the init would not use
        {"init": "task", "init_task": "source@0"},
        {"init": "task", "init_task": "source@latest"},
    ):
        response = owner.post("/v1/training-jobs", json={"task_id": "target", "train": examples(8), "config": config})
        assert response.status_code == 422 and error_code(response) == "invalid_request", (config, response.text)

    for client in (owner, other):  # nothing queued, nothing made
        assert client.get("/v1/training-jobs").json()["jobs"] == []
    assert registry_state(owner) == before
    assert other.get("/v1/prompts").json()["prompts"] == []


def test_the_trainer_starts_from_the_source_and_a_job_keeps_it_exactly(tiny: FrozenT5) -> None:
    """Step 0 of `PromptTrainer` is the source itself; a job's stored dataset gives it back bit for bit."""
    source = random_prompt(4, tiny.d_model, seed=7)
    train = [TrainingExample("a", "yes"), TrainingExample("b", "no")]
    for length in (2, 4, 6):
        config = TrainingConfig(init="task", init_task="source", prompt_length=length, seed=3)
        trainer = PromptTrainer(tiny, train, config=config, source_prompt=source)
        start = trainer.prompt.detach()
        assert start.shape == (length, tiny.d_model)
        assert torch.equal(start[: min(length, 4)], source[:length])
        again = PromptTrainer(tiny, train, config=config, source_prompt=source).prompt.detach()
        assert torch.equal(start, again)  # the padding rows follow the seed
    with pytest.raises(ValueError, match="source"):
        PromptTrainer(tiny, train, config=TrainingConfig(init="task", init_task="source"))

    stored = Dataset.from_json(Dataset(train, [], source_prompt=source).to_json())
    assert stored.source_prompt is not None and torch.equal(stored.source_prompt, source)
    assert Dataset.from_json(Dataset(train, []).to_json()).source_prompt is None
