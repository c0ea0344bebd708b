"""One hostile tenant against a server with keys on: while it sends a mix of the attacks the hardening
answers (bombs, lying headers, non-finite numbers, lone surrogates, over-limit work, poisoned jobs,
act-as without scope), another tenant's plain requests all succeed, about as fast as when the server is
idle, and the server ends healthy with nothing of the attacker's stored."""

from __future__ import annotations

import io
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from multiprocessing.queues import Queue as QueueType
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.tenancy.keys import ApiKeys
from tests.serving import server_process
from tests.test_hostile_uploads import peft_config, tar_gz_of_empty_members, zip_of, zip_with_lying_directory

Attack = Callable[[httpx.Client], httpx.Response]
VICTIM_REQUESTS = 60  # spans several rounds of the attack mix, so the median does not hang on one attack
SLOWDOWN_BOUND = 3.0  # the bound: the victim's median under attack within 3x its idle median
# A 10 ms pause between attacks on one connection. Sent back to back (the attacker's client then takes one
# of the two cores) the ratio measured 2.5-3.0 here: that is a flood, whose cost in the GIL the HTTP loop
# shares with the model is the engine issue's goodput bench; this test is about what each attack costs.
ATTACK_PAUSE_S = 0.01


def npy_bytes(rows: int, d_model: int = 64, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(seed).normal(size=(rows, d_model)).astype(np.float32))
    return buffer.getvalue()


def npy_declaring(shape: tuple[int, ...]) -> bytes:
    """A 128-byte header that declares a huge array, followed by almost nothing."""
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (117 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(64)


def json_post(path: str, raw: bytes) -> Attack:
    return lambda c: c.post(path, content=raw, headers={"content-type": "application/json"})


def upload(task_id: str, data: bytes, metadata: dict | None = None) -> Attack:
    form = {"metadata": json.dumps(metadata)} if metadata else None
    return lambda c: c.put(f"/v1/prompts/{task_id}", files={"file": ("p", data)}, data=form)


def attacks() -> list[tuple[str, Attack]]:
    generate = {"task_id": "mine", "inputs": "x"}
    bad_jsonl = b"".join(b'{"input": "x", "target": "y"}\n' for _ in range(50_000)) + b"{not json}\n"
    return [
        ("lone surrogate input", json_post("/v1/generate", b'{"task_id": "mine", "inputs": "\\ud800"}')),
        ("NaN literal", json_post("/v1/generate", b'{"task_id": "mine", "inputs": "x", "version": NaN}')),
        (
            "vanishing temperature",
            lambda c: c.post(
                "/v1/generate", json={**generate, "parameters": {"do_sample": True, "temperature": 1e-45}}
            ),
        ),
        ("npy shape bomb", upload("bomb", npy_declaring((2**40, 64)))),
        ("tar bomb", upload("bomb", tar_gz_of_empty_members(100_000))),
        ("zip bomb", upload("bomb", zip_with_lying_directory(50_000_000, 1_000))),
        ("template bomb", upload("bomb", npy_bytes(4), {"input_template": "{input}" * 1000})),
        ("huge inputs", lambda c: c.post("/v1/generate", json={**generate, "inputs": ["y" * 200_000] * 8})),
        (
            "classify flood of labels",
            lambda c: c.post(
                "/v1/classify",
                json={"task_id": "mine", "inputs": ["z" * 500] * 64, "labels": [f"{i}" + "w" * 509 for i in range(64)]},
            ),
        ),
        (
            "beam 16 x 256",
            lambda c: c.post("/v1/generate", json={**generate, "parameters": {"num_beams": 16, "max_new_tokens": 256}}),
        ),
        ("100,000 inputs", lambda c: c.post("/v1/generate", json={**generate, "inputs": ["x"] * 100_000})),
        (
            "infinite learning rate",
            json_post(
                "/v1/training-jobs",
                b'{"task_id": "mine", "train": [{"input": "a", "target": "b"}], "config": {"learning_rate": Infinity}}',
            ),
        ),
        (
            "endless training job",
            lambda c: c.post(
                "/v1/training-jobs",
                json={"task_id": "mine", "train": [{"input": "a", "target": "b"}], "config": {"steps": 10**30}},
            ),
        ),
        (
            "large JSONL with a bad last line",
            lambda c: c.post("/v1/training-jobs", data={"task_id": "mine"}, files={"train": ("t.jsonl", bad_jsonl)}),
        ),
        (
            "peft adapter with a bool size",
            upload("bomb", zip_of({"adapter_config.json": peft_config(num_virtual_tokens=True), "x": b""})),
        ),
        ("act as the victim", lambda c: c.get("/v1/prompts/theirs", headers={"X-Softserve-Tenant": "victim"})),
    ]


def run_attacks(url: str, key: str, stop: EventType, first_round_done: EventType, results: QueueType) -> None:
    """An attacker process (its own GIL, like a real client): cycles through the mix, `ATTACK_PAUSE_S` apart,
    until told to stop, then reports the statuses each attack got. `first_round_done` is set once every
    attack kind has been answered."""
    mix = attacks()  # built once: the attacker's CPU is spent sending, not making bombs
    statuses: dict[str, set[int]] = {}
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        while True:  # whole rounds, so that every attack has run when it stops
            for name, attack in mix:
                statuses.setdefault(name, set()).add(attack(client).status_code)
                time.sleep(ATTACK_PAUSE_S)
            first_round_done.set()
            if stop.is_set():
                break
    results.put(statuses)


def victim_latencies(client: httpx.Client, count: int) -> list[float]:
    latencies = []
    body = {"task_id": "theirs", "inputs": "a gentle request", "parameters": {"max_new_tokens": 4}}
    for _ in range(count):
        started = time.perf_counter()
        response = client.post("/v1/generate", json=body)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        time.sleep(0.02)
    return latencies


@pytest.mark.timing
def test_a_hostile_tenant_pausing_10ms_between_attacks_cannot_break_the_server_or_slow_another_tenant(
    tmp_path: Path,
) -> None:
    """The slowdown bound holds for an attacker that waits `ATTACK_PAUSE_S` (10 ms) after each attack: what
    each attack costs, not a flood (back to back, the attacker's client takes a core of its own; see above)."""
    keys = ApiKeys(tmp_path / "api_keys.json")
    attacker, victim = keys.add("attacker"), keys.add("victim")
    flags = ("--max-wait-ms", "2", "--cpu-threads", "1")
    with server_process(tmp_path, *flags) as (process, url):
        victim_client = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {victim}"})
        with victim_client:
            put = victim_client.put("/v1/prompts/theirs", files={"file": ("p", npy_bytes(8, seed=1))})
            assert put.status_code == 201, put.text
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {attacker}"}) as client:
                assert client.put("/v1/prompts/mine", files={"file": ("p", npy_bytes(8, seed=2))}).status_code == 201

            victim_latencies(victim_client, 5)  # warm the path
            idle = victim_latencies(victim_client, VICTIM_REQUESTS)

            spawn = multiprocessing.get_context("spawn")
            stop, first_round_done, results = spawn.Event(), spawn.Event(), spawn.Queue()
            attackers = [spawn.Process(target=run_attacks, args=(url, attacker, stop, first_round_done, results))]
            for process_ in attackers:
                process_.start()
            # The victim measures once every attack kind has been answered: the attack is in full swing.
            assert first_round_done.wait(timeout=300), "the attacker never finished a round"
            try:
                loaded = victim_latencies(victim_client, VICTIM_REQUESTS)
            finally:
                stop.set()
                reports = [results.get(timeout=300) for _ in attackers]
                for process_ in attackers:
                    process_.join(timeout=60)

            assert process.poll() is None, "the server died"
            assert httpx.get(f"{url}/ready").status_code == 200
            served = victim_client.get("/v1/prompts").json()["prompts"]
            assert [p["task_id"] for p in served] == ["theirs"]

        statuses: dict[str, set[int]] = {}
        for report in reports:
            for name, seen in report.items():
                statuses.setdefault(name, set()).update(seen)
        assert len(statuses) == len(attacks()), "every attack ran at least once"
        for name, seen in statuses.items():  # each refused with a client error; 503 only for shedding
            assert seen and all(400 <= s < 500 or s == 503 for s in seen), (name, seen)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {attacker}"}) as client:
            assert [p["task_id"] for p in client.get("/v1/prompts").json()["prompts"]] == ["mine"]
            assert client.get("/v1/training-jobs").json()["jobs"] == []

    ratio = statistics.median(loaded) / statistics.median(idle)
    print(f"victim median latency under attack / idle: {ratio:.2f}")
    assert ratio <= SLOWDOWN_BOUND, (statistics.median(idle), statistics.median(loaded))
