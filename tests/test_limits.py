"""Per-tenant rate limits and quotas: 429 with Retry-After, other tenants unaffected."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.backend import RedisBackend
from server.errors import RateLimited
from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.tenancy.rate_limits import TenantRateLimits
from tests.redis_server import RedisServer
from tests.serving import running_server


def prompt_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(seed).normal(size=(4, 64)).astype(np.float32))
    return buffer.getvalue()


def test_request_rate_limit_is_per_tenant(tmp_path: Path, tiny: FrozenT5) -> None:
    settings = Settings(data_dir=tmp_path, rate_limit_requests_per_s=3)
    keys = ApiKeys(settings.keys_file)
    heavy, light = keys.add("heavy"), keys.add("light")
    with running_server(settings, tiny) as url:
        for key in (heavy, light):
            auth = {"Authorization": f"Bearer {key}"}
            assert httpx.put(f"{url}/v1/prompts/t", files={"file": ("p", prompt_bytes(0))}, headers=auth).is_success

        def call(key: str) -> httpx.Response:
            body = {"task_id": "t", "inputs": "x", "parameters": {"max_new_tokens": 1}}
            return httpx.post(f"{url}/v1/generate", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)

        with ThreadPoolExecutor(10) as pool:  # ten at once: well over 3/s however slow the machine
            statuses = list(pool.map(call, [heavy] * 10))
        limited = [r for r in statuses if r.status_code == 429]
        assert limited, [r.status_code for r in statuses]
        assert {r.status_code for r in statuses} <= {200, 429}
        assert all(int(r.headers["Retry-After"]) >= 1 for r in limited)
        assert limited[0].json()["error"]["code"] == "rate_limited"
        assert call(light).status_code == 200  # another tenant's budget is its own
        counted = f'softserve_rejections_total{{reason="rate_limited"}} {float(len(limited))}'
        assert counted in httpx.get(f"{url}/metrics").text  # the series exists from the start: its value counts


def test_token_rate_limit_counts_input_and_generated_tokens(tmp_path: Path, tiny: FrozenT5) -> None:
    with running_server(Settings(data_dir=tmp_path, rate_limit_tokens_per_s=60), tiny) as url:
        httpx.put(f"{url}/v1/prompts/t", files={"file": ("p", prompt_bytes(0))})
        # 2 rows of a 4-row prompt and 21 input tokens, and 1 new token each: 52 tokens
        body = {"task_id": "t", "inputs": ["y" * 20] * 2, "parameters": {"max_new_tokens": 1}}
        assert httpx.post(f"{url}/v1/generate", json=body, timeout=30).status_code == 200
        assert httpx.post(f"{url}/v1/generate", json=body, timeout=30).status_code == 429
        longer = {**body, "parameters": {"max_new_tokens": 6}}  # 62 tokens: more than a whole second's
        refused = httpx.post(f"{url}/v1/generate", json=longer, timeout=30)
        assert refused.status_code == 422 and "generate" in refused.json()["error"]["message"]


def test_tokens_a_row_did_not_generate_are_refunded() -> None:
    async def scenario() -> None:
        limits = TenantRateLimits(0, 100)
        await limits.admit("a", 90)  # say 10 input tokens and 80 reserved for generation
        with pytest.raises(RateLimited):
            await limits.admit("a", 30)
        await limits.refund("a", 70)  # the row ended after 10 of its 80
        await limits.admit("a", 30)
        with pytest.raises(RateLimited):
            await limits.admit("a", 60)

    asyncio.run(scenario())


def test_task_quota(tmp_path: Path, tiny: FrozenT5) -> None:
    with running_server(Settings(data_dir=tmp_path, max_tasks_per_tenant=2), tiny) as url:

        def put(task_id: str) -> httpx.Response:
            return httpx.put(f"{url}/v1/prompts/{task_id}", files={"file": ("p", prompt_bytes(1))})

        assert put("a").status_code == 201 and put("b").status_code == 201
        refused = put("c")
        assert refused.status_code == 429 and "quota" in refused.json()["error"]["message"]
        assert "Retry-After" in refused.headers
        assert put("a").status_code == 201  # a new version of a stored task is not a new task
        assert [p["task_id"] for p in httpx.get(f"{url}/v1/prompts").json()["prompts"]] == ["a", "b"]


def test_replicas_share_rate_limits_through_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    """Two limiters (two API replicas) on one Redis draw from one per-tenant budget."""

    async def scenario() -> list[str]:
        replica_a = TenantRateLimits(2, 0, RedisBackend(redis_server.url, "ns", 1.0, tmp_path, 60).rate_limit_storage())
        replica_b = TenantRateLimits(2, 0, RedisBackend(redis_server.url, "ns", 1.0, tmp_path, 60).rate_limit_storage())
        outcomes = []
        for limiter in (replica_a, replica_b, replica_a):
            try:
                await limiter.admit("acme", 1)
                outcomes.append("admitted")
            except RateLimited as limited:
                assert limited.retry_after_s >= 1
                outcomes.append("limited")
        return outcomes

    assert asyncio.run(scenario()) == ["admitted", "admitted", "limited"]


def test_a_request_past_its_deadline_gets_504_and_the_server_carries_on(tmp_path: Path, tiny: FrozenT5) -> None:
    with running_server(Settings(data_dir=tmp_path, request_timeout_s=0.05), tiny) as url:
        httpx.put(f"{url}/v1/prompts/t", files={"file": ("p", prompt_bytes(0))})
        slow = {"task_id": "t", "inputs": ["x"] * 8, "parameters": {"max_new_tokens": 256}}
        response = httpx.post(f"{url}/v1/generate", json=slow, timeout=30)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert httpx.get(f"{url}/ready").status_code == 200
        assert 'softserve_rejections_total{reason="deadline_exceeded"} 1.0' in httpx.get(f"{url}/metrics").text
