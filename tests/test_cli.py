"""`softserve` as a user runs it: a real `serve` process, the registry CLI, keys, and the Python client."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.client import AsyncSoftserveClient, SoftserveClient, SoftserveError
from tests.serving import free_port, wait_ready

SOFTSERVE = [sys.executable, "-m", "server.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SOFTSERVE, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`softserve serve` in its own process; flags and SOFTSERVE_* variables both configure it."""
    port = free_port()
    env = {**os.environ, "SOFTSERVE_DATA_DIR": str(tmp_path / "data"), "SOFTSERVE_MAX_WAIT_MS": "1"}
    env["SOFTSERVE_ENGINE"] = "thread"  # the CLI is tested, not the engine process
    process = subprocess.Popen([*SOFTSERVE, "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120)
        yield url, tmp_path / "data"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_serve_and_the_registry_cli(served: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served
    prompt = np.random.default_rng(0).normal(size=(6, 64)).astype(np.float32)
    np.save(tmp_path / "p.npy", prompt)

    uploaded = run_cli("prompts", "--url", url, "upload", "sst2", str(tmp_path / "p.npy"), "--labels", "pos,neg")
    assert uploaded.returncode == 0, uploaded.stderr
    assert json.loads(uploaded.stdout)["version"] == 1
    run_cli("prompts", "--url", url, "upload", "sst2", str(tmp_path / "p.npy"), "--no-activate")

    listed = json.loads(run_cli("prompts", "list", "--url", url).stdout)  # the flags go before or after
    assert [(p["task_id"], p["active_version"], p["versions"]) for p in listed] == [("sst2", 1, [1, 2])]

    out = tmp_path / "down.npy"
    assert run_cli("prompts", "--url", url, "download", "sst2", "2", "--format", "npy", "-o", str(out)).returncode == 0
    np.testing.assert_array_equal(np.load(out), prompt)

    assert json.loads(run_cli("prompts", "--url", url, "activate", "sst2", "2").stdout)["active_version"] == 2
    pinned = json.loads(run_cli("prompts", "--url", url, "pin", "sst2").stdout)
    assert (pinned["task_id"], pinned["pinned"], pinned["loaded"]) == ("sst2", True, True)
    assert json.loads(run_cli("prompts", "--url", url, "unpin", "sst2").stdout)["pinned"] is False
    assert run_cli("prompts", "--url", url, "delete", "sst2").returncode == 0
    missing = run_cli("prompts", "--url", url, "show", "sst2")
    assert missing.returncode == 1 and "404 not_found" in missing.stderr


def test_keys_turn_auth_on_without_a_restart(served: tuple[str, Path]) -> None:
    url, data_dir = served
    assert httpx.get(f"{url}/v1/prompts").status_code == 200  # no keys: auth off
    made = run_cli("keys", "--data-dir", str(data_dir), "add", "acme")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key not in (data_dir / "api_keys.json").read_text()  # only the hash is stored

    assert httpx.get(f"{url}/v1/prompts").status_code == 401
    assert httpx.get(f"{url}/v1/prompts", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/v1/prompts", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # never guarded

    listed = json.loads(run_cli("keys", "--data-dir", str(data_dir), "list").stdout)
    assert [entry["tenant"] for entry in listed] == ["acme"]
    revoked = run_cli("keys", "--data-dir", str(data_dir), "revoke", listed[0]["id"])
    assert revoked.returncode == 0
    assert httpx.get(f"{url}/v1/prompts").status_code == 401  # the last key is gone: auth stays on (fails closed)


def test_sync_and_async_clients(base_url: str) -> None:
    prompt = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
    with SoftserveClient(base_url) as client:
        buffer = io.BytesIO()
        np.save(buffer, prompt)
        assert client.upload_prompt("t", buffer.getvalue(), {"labels": ["a", "b"]})["version"] == 1
        sync_out = client.generate("t", ["x", "y"], max_new_tokens=4)
        assert client.classify("t", "x")["outputs"][0]["label"] in {"a", "b"}
        with pytest.raises(SoftserveError) as raised:
            client.generate("missing", "x")
        assert raised.value.status == 404 and raised.value.code == "not_found"

    async def use_async() -> dict:
        async with AsyncSoftserveClient(base_url) as client:
            assert [p["task_id"] for p in await client.list_prompts()] == ["t"]
            return await client.generate("t", ["x", "y"], max_new_tokens=4)

    assert asyncio.run(use_async()) == sync_out


def test_bench_runs_a_benchmark_script_and_names_the_ones_there() -> None:
    missing = run_cli("bench", "no_such_bench")
    assert missing.returncode == 2 and "mixed_vs_single" in missing.stderr.strip().splitlines()[-1]
    done = subprocess.run([*SOFTSERVE, "bench", "hot_load", "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["bench"] == "hot_load"
