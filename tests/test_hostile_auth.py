"""Auth fails closed, over real HTTP: revoking keys never reopens the server, the anonymous caller of an open
server is never an admin, and an unusable keys file stops start-up or refuses requests (never a 500)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.keys import ApiKeys, KeyNotFound
from tests.serving import free_port, running_server

ACT_AS = "X-Softserve-Tenant"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120)


def prompt_file() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32))
    return buffer.getvalue()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Served:
    url: str
    settings: Settings
    owner_key: str
    admin_key: str

    def owner_sees_secret(self) -> bool:
        return httpx.get(f"{self.url}/v1/prompts/secret", headers=bearer(self.owner_key)).status_code == 200


@contextmanager
def serve_with_keys(tmp_path: Path, tiny: FrozenT5, **settings: object) -> Iterator[Served]:
    """A server whose keys file has an `owner` key and an admin key; `owner` has a task `secret`."""
    config = Settings(data_dir=tmp_path, **settings)
    keys = ApiKeys(config.keys_file)
    owner_key, admin_key = keys.add("owner"), keys.add("ops", admin=True)
    with running_server(config, tiny) as url:
        upload = httpx.put(f"{url}/v1/prompts/secret", files={"file": ("p", prompt_file())}, headers=bearer(owner_key))
        assert upload.status_code == 201, upload.text
        yield Served(url, config, owner_key, admin_key)


@pytest.fixture
def served(tmp_path: Path, tiny: FrozenT5) -> Iterator[Served]:
    with serve_with_keys(tmp_path, tiny) as server:
        yield server


def keys_cli(served: Served, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("keys", "--data-dir", str(served.settings.data_dir), *args)


def assert_anonymous_cannot_act_as_owner(url: str, status: int) -> None:
    """Reading and deleting the owner's task as an anonymous caller with the act-as header."""
    for method in ("GET", "DELETE"):
        response = httpx.request(method, f"{url}/v1/prompts/secret", headers={ACT_AS: "owner"})
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"code", "message", "type", "param"}


def test_revoking_every_key_leaves_the_server_closed(served: Served) -> None:
    keys = ApiKeys(served.settings.keys_file)
    ids = [entry["id"] for entry in keys.list()]
    answer = keys_cli(served, "revoke", "")  # once revoked every key (a prefix of all of them)
    assert answer.returncode == 1 and "exact id" in answer.stderr
    for refused in (ids[0][:3], ids[0] + "0", "x"):  # a prefix, a longer id, an unknown one
        with pytest.raises(KeyNotFound, match="exact id"):
            keys.revoke(refused)
    assert [entry["id"] for entry in keys.list()] == ids

    keys.revoke(ids[0])
    answer = keys_cli(served, "revoke", ids[1])  # the last key
    assert answer.returncode == 0 and "every request is refused" in answer.stdout
    assert keys.list() == []

    assert httpx.get(f"{served.url}/v1/prompts").status_code == 401
    assert httpx.get(f"{served.url}/v1/prompts", headers=bearer(served.admin_key)).status_code == 401
    assert_anonymous_cannot_act_as_owner(served.url, 401)
    assert httpx.get(f"{served.url}/health").status_code == 200

    # Only an explicit `keys open` reopens it, and then the anonymous caller is tenant `default`, not admin.
    assert keys_cli(served, "open").returncode == 0
    assert httpx.get(f"{served.url}/v1/prompts").json()["prompts"] == []
    assert_anonymous_cannot_act_as_owner(served.url, 403)
    keys.add("owner")  # a key closes it again
    assert httpx.get(f"{served.url}/v1/prompts").status_code == 401


def test_keys_open_is_refused_while_keys_exist(served: Served) -> None:
    with pytest.raises(ValueError, match="revoke them first"):
        ApiKeys(served.settings.keys_file).open()
    assert httpx.get(f"{served.url}/v1/prompts").status_code == 401


def test_a_keys_file_with_no_keys_is_closed(tmp_path: Path, tiny: FrozenT5) -> None:
    """A file written before modes existed (`{"keys": []}` once every key was revoked) stays closed."""
    settings = Settings(data_dir=tmp_path)
    settings.keys_file.write_text('{"keys": []}')
    with running_server(settings, tiny) as url:
        assert httpx.get(f"{url}/v1/prompts").status_code == 401
        assert httpx.get(f"{url}/v1/prompts", headers={ACT_AS: "owner"}).status_code == 401


def test_open_mode_anonymous_callers_are_never_admin(tmp_path: Path, tiny: FrozenT5) -> None:
    with serve_with_keys(tmp_path, tiny, auth="open", metrics_require_key=True) as served:
        assert httpx.get(f"{served.url}/v1/prompts").json()["prompts"] == []  # tenant `default`
        assert_anonymous_cannot_act_as_owner(served.url, 403)
        assert httpx.get(f"{served.url}/metrics").status_code == 403
        assert httpx.get(f"{served.url}/v1/prompts", headers=bearer("ss-forged")).status_code == 401
        as_owner = {**bearer(served.admin_key), ACT_AS: "owner"}  # a real admin key may act for a tenant
        assert httpx.get(f"{served.url}/v1/prompts/secret", headers=as_owner).status_code == 200
        assert served.owner_sees_secret()


def test_auth_keys_setting_needs_a_key_even_with_no_keys_file(tmp_path: Path, tiny: FrozenT5) -> None:
    with running_server(Settings(data_dir=tmp_path, auth="keys"), tiny) as url:
        assert httpx.get(f"{url}/v1/prompts").status_code == 401
        assert httpx.get(f"{url}/v1/prompts", headers={ACT_AS: "owner"}).status_code == 401


def assert_refused_with_503(url: str, keys_file: Path) -> None:
    for headers in ({}, bearer("ss-anything"), {ACT_AS: "owner"}):
        response = httpx.get(f"{url}/v1/prompts/secret", headers=headers)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "auth_unavailable" and str(keys_file) not in error["message"]
    assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("content", ["{not json", "", '{"keys": [{"hash": 5}]}', "[]", '{"mode": "none"}'])
def test_a_keys_file_that_breaks_while_serving_answers_503_until_fixed(served: Served, content: str) -> None:
    good = served.settings.keys_file.read_bytes()
    served.settings.keys_file.write_text(content)
    assert_refused_with_503(served.url, served.settings.keys_file)
    served.settings.keys_file.write_bytes(good)
    assert served.owner_sees_secret()


def test_a_keys_file_that_cannot_be_read_answers_503(served: Served) -> None:
    good = served.settings.keys_file.read_bytes()
    served.settings.keys_file.unlink()
    served.settings.keys_file.mkdir()  # reading it fails with an OSError
    assert_refused_with_503(served.url, served.settings.keys_file)
    served.settings.keys_file.rmdir()
    served.settings.keys_file.write_bytes(good)
    assert served.owner_sees_secret()


def test_a_keys_file_removed_while_keys_are_in_use_does_not_reopen(served: Served) -> None:
    good = served.settings.keys_file.read_bytes()
    assert served.owner_sees_secret()
    served.settings.keys_file.unlink()
    assert httpx.get(f"{served.url}/v1/prompts").status_code == 503
    assert_anonymous_cannot_act_as_owner(served.url, 503)
    served.settings.keys_file.write_bytes(good)
    assert served.owner_sees_secret()


def test_softserve_serve_refuses_to_start_with_a_corrupt_keys_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "api_keys.json"
    keys_file.write_text('{"mode": "keys", "keys": [')
    env = {**os.environ, "SOFTSERVE_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()), "--warmup", "false"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode != 0
    last_line = finished.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and str(keys_file) in last_line
    assert "Traceback" not in finished.stderr
