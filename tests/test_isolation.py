"""Tenant isolation: every route by every object kind. Cross-tenant access is 404, no key is 401,
nothing changes for the owner, and a task id that two tenants share serves each tenant its own prompt."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from tests.serving import running_server
from tests.training import config, examples, wait_until_ended


def prompt_file(seed: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(seed).normal(size=(4, 64)).astype(np.float32))
    return buffer.getvalue()


@pytest.fixture
def tenants(tmp_path: Path, tiny: FrozenT5) -> Iterator[tuple[httpx.Client, httpx.Client, httpx.Client, httpx.Client]]:
    settings = Settings(data_dir=tmp_path, metrics_require_key=True)
    keys = ApiKeys(settings.keys_file)
    owner_key, other_key, admin_key = keys.add("owner"), keys.add("other"), keys.add("ops", admin=True)
    with running_server(settings, tiny) as url:
        clients = [
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)
            for key in (owner_key, other_key, admin_key, None)
        ]
        owner = clients[0]
        meta = {"metadata": '{"labels": ["a", "b"]}'}
        assert owner.put("/v1/prompts/secret", files={"file": ("p", prompt_file(0))}, data=meta).status_code == 201
        assert owner.put("/v1/prompts/secret", files={"file": ("p", prompt_file(1))}).status_code == 201
        yield clients[0], clients[1], clients[2], clients[3]
        for client in clients:
            client.close()


# Every route that names an object, as (method, path, keyword arguments).
OBJECT_ROUTES = [
    ("GET", "/v1/prompts/secret", {}),
    ("GET", "/v1/prompts/secret/versions/1", {}),
    ("GET", "/v1/prompts/secret/versions/2?format=peft", {}),
    ("POST", "/v1/prompts/secret/activate", {"json": {"version": 1}}),
    ("DELETE", "/v1/prompts/secret", {}),
    ("POST", "/v1/generate", {"json": {"task_id": "secret", "inputs": "x"}}),
    ("POST", "/v1/generate", {"json": {"task_id": "secret", "inputs": "x", "version": 1}}),
    ("POST", "/v1/classify", {"json": {"task_id": "secret", "inputs": "x"}}),
]
JOB = {"task_id": "trained", "train": examples(4), "config": config(steps=1)}
ALL_ROUTES = [
    *OBJECT_ROUTES,
    ("GET", "/v1/prompts", {}),
    ("PUT", "/v1/prompts/secret", {"files": {"file": ("p", prompt_file(9))}}),
    ("GET", "/v1/info", {}),
    ("GET", "/metrics", {}),
    ("GET", "/v1/training-jobs", {}),
    ("POST", "/v1/training-jobs", {"json": JOB}),
]


def snapshot(owner: httpx.Client) -> tuple[object, bytes]:
    return owner.get("/v1/prompts/secret").json(), owner.get("/v1/prompts/secret/versions/2").content


@pytest.mark.parametrize(("method", "path", "kwargs"), OBJECT_ROUTES, ids=[f"{m} {p}" for m, p, _ in OBJECT_ROUTES])
def test_another_tenant_gets_404_and_changes_nothing(tenants, method: str, path: str, kwargs: dict) -> None:
    owner, other, _, _ = tenants
    before = snapshot(owner)
    response = other.request(method, path, **kwargs)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"
    assert "owner" not in response.text  # nothing about the owner leaks
    assert snapshot(owner) == before


@pytest.mark.parametrize(("method", "path", "kwargs"), ALL_ROUTES, ids=[f"{m} {p}" for m, p, _ in ALL_ROUTES])
def test_no_key_or_a_bad_key_is_401(tenants, method: str, path: str, kwargs: dict) -> None:
    owner, _, _, anonymous = tenants
    before = snapshot(owner)
    assert anonymous.request(method, path, **kwargs).status_code == 401
    forged = anonymous.request(method, path, headers={"Authorization": "Bearer ss-forged"}, **kwargs)
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "unauthorized"
    assert snapshot(owner) == before


@pytest.fixture
def owner_job(tenants) -> str:
    """A training job of the owner's, ended (its record no longer changes by itself)."""
    owner = tenants[0]
    response = owner.post("/v1/training-jobs", json=JOB)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert wait_until_ended(owner, job_id)["state"] == "succeeded"
    return job_id


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_training_job_answers_only_to_its_tenant(tenants, owner_job: str, method: str) -> None:
    owner, other, _, anonymous = tenants
    path = f"/v1/training-jobs/{owner_job}"
    before = owner.get(path).json()
    assert anonymous.request(method, path).status_code == 401
    forged = anonymous.request(method, path, headers={"Authorization": "Bearer ss-forged"})
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "unauthorized"
    response = other.request(method, path)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert other.get("/v1/training-jobs").json()["jobs"] == []
    assert owner.get(path).json() == before


INPUTS = ["a gorgeous, witty film", "a dull mess"]
LABELS = ["positive", "negative"]


def outputs(client: httpx.Client) -> tuple[list[str], list[dict[str, float]]]:
    """What task "secret" answers this caller: greedy texts, and label scores."""
    body = {"task_id": "secret", "inputs": INPUTS}
    generated = client.post("/v1/generate", json=body | {"parameters": {"max_new_tokens": 8}})
    classified = client.post("/v1/classify", json=body | {"labels": LABELS})
    assert generated.status_code == classified.status_code == 200, (generated.text, classified.text)
    return [o["text"] for o in generated.json()["outputs"]], [o["scores"] for o in classified.json()["outputs"]]


def test_the_same_task_id_serves_each_tenant_its_own_prompt(
    tenants, tiny: FrozenT5, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each tenant's answers equal those of a fresh server that holds only that tenant's prompt."""
    owner, other, _, _ = tenants
    assert other.put("/v1/prompts/secret", files={"file": ("p", prompt_file(5))}).status_code == 201
    served = {1: outputs(owner), 5: outputs(other)}  # by the seed of the prompt each tenant has active
    for seed, (texts, scores) in served.items():
        with (
            running_server(Settings(data_dir=tmp_path_factory.mktemp("fresh")), tiny) as url,
            httpx.Client(base_url=url, timeout=30) as fresh,
        ):
            assert fresh.put("/v1/prompts/secret", files={"file": ("p", prompt_file(seed))}).status_code == 201
            alone_texts, alone_scores = outputs(fresh)
        assert texts == alone_texts
        assert scores == [pytest.approx(s, abs=1e-4) for s in alone_scores]
    assert served[1][1] != served[5][1]  # the two prompts answer differently, so the equalities above tell


def test_uploads_with_the_same_task_id_stay_separate(tenants) -> None:
    owner, other, _, _ = tenants
    mine = other.put("/v1/prompts/secret", files={"file": ("p", prompt_file(5))})
    assert mine.status_code == 201 and mine.json()["version"] == 1  # its own task, not the owner's v3
    assert [p["versions"] for p in other.get("/v1/prompts").json()["prompts"]] == [[1]]
    assert [p["versions"] for p in owner.get("/v1/prompts").json()["prompts"]] == [[1, 2]]
    assert other.get("/v1/prompts/secret/versions/1").content != owner.get("/v1/prompts/secret/versions/1").content


def test_health_and_ready_need_no_key_and_admin_scopes(tenants) -> None:
    owner, _, admin, anonymous = tenants
    assert anonymous.get("/health").status_code == 200
    assert anonymous.get("/ready").status_code == 200
    assert owner.get("/metrics").status_code == 403  # metrics are admin-only here
    assert admin.get("/metrics").status_code == 200
    acting = {"X-Softserve-Tenant": "owner"}
    assert owner.get("/v1/prompts", headers={"X-Softserve-Tenant": "other"}).status_code == 403
    assert admin.get("/v1/prompts/secret", headers=acting).json()["active_version"] == 2
