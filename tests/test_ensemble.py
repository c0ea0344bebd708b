"""Ensembles over real HTTP with the tiny model: set and cleared in the task's record, refused when bad, and served
as rows of one submission whose members each equal that version served alone."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch
from prometheus_client.parser import text_string_to_metric_families

from prompt_store import DiskStore, RedisStore, SoftPrompt, TaskNotFound, VersionNotFound
from prompt_store.records import MAX_ENSEMBLE_SIZE
from server.client import AsyncSoftserveClient, SoftserveClient
from server.jobs.store import DiskJobStore
from server.serving.model import Decoding, FrozenT5, Generation, Row
from server.settings import Settings
from server.testing.reference import Alone, random_prompt
from server.training import PromptTrainer, TrainingConfig
from tests.prometheus import metric
from tests.redis_server import RedisServer
from tests.serving import running_server
from tests.test_inference_api import upload
from tests.training import config as training_config
from tests.training import (
    examples,
    one_torch_thread,  # noqa: F401 (an autouse fixture: the tiny model on one thread)
    wait_until_ended,
    wait_until_step,
)

LABELS = ["positive", "negative", "neutral"]
TEXTS = ["a gorgeous, witty film", "the plot is thin"]
# Seeds whose prompts make the tiny model write different texts for TEXTS[0] (checked where it matters).
SEED_A, SEED_B = 11, 12


def upload_versions(client: httpx.Client, task_id: str, prompts: list[torch.Tensor], **metadata: object) -> None:
    for prompt in prompts:
        upload(client, task_id, prompt, **metadata)


def set_ensemble(client: httpx.Client, task_id: str, versions: object) -> httpx.Response:
    return client.put(f"/v1/prompts/{task_id}/ensemble", json={"versions": versions})


def generated(model: FrozenT5, prompt: torch.Tensor, text: str, max_new_tokens: int) -> Generation:
    row = Row(model.prompt_on_device(prompt), model.tokenize([text])[0])
    return model.generate([row], Decoding(), [max_new_tokens])[0]


def batch_sizes(client: httpx.Client) -> tuple[float, float]:
    """(count, sum) of `softserve_batch_size`: model calls (static) or decoder steps (engine), and their rows."""
    (family,) = [
        f for f in text_string_to_metric_families(client.get("/metrics").text) if f.name == "softserve_batch_size"
    ]
    values = {sample.name: sample.value for sample in family.samples}
    return values["softserve_batch_size_count"], values["softserve_batch_size_sum"]


@pytest.fixture
def static_client(settings: Settings, tiny: FrozenT5) -> Iterator[httpx.Client]:
    with (
        running_server(settings.model_copy(update={"scheduler": "static"}), tiny) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        yield http


def test_an_ensemble_is_set_shown_and_cleared(client: httpx.Client, tiny: FrozenT5) -> None:
    upload_versions(client, "t", [random_prompt(4, tiny.d_model, seed=s) for s in range(3)])
    assert client.get("/v1/prompts/t").json()["ensemble"] == []
    response = set_ensemble(client, "t", [3, 1])
    assert response.status_code == 200, response.text
    assert response.json()["ensemble"] == [3, 1]
    assert client.get("/v1/prompts/t").json()["ensemble"] == [3, 1]
    upload(client, "t", random_prompt(4, tiny.d_model, seed=9))  # a new version leaves the ensemble as it is
    assert client.get("/v1/prompts/t").json()["ensemble"] == [3, 1]
    cleared = client.delete("/v1/prompts/t/ensemble")
    assert cleared.status_code == 200 and cleared.json()["ensemble"] == []
    assert client.get("/v1/prompts/t").json()["ensemble"] == []


@pytest.mark.parametrize(
    ("versions", "status", "says"),
    [
        ([1, 9], 404, "no version 9"),
        ([], 422, "versions"),
        (list(range(1, MAX_ENSEMBLE_SIZE + 2)), 422, "versions"),
        ([1, 2, 1], 422, "distinct"),
        ([0, 1], 422, "versions"),
        (["1"], 422, "versions"),
    ],
)
def test_a_bad_ensemble_is_refused_and_changes_nothing(
    client: httpx.Client, tiny: FrozenT5, versions: object, status: int, says: str
) -> None:
    upload_versions(client, "t", [random_prompt(4, tiny.d_model, seed=s) for s in range(2)])
    before = set_ensemble(client, "t", [2]).json()
    response = set_ensemble(client, "t", versions)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    assert client.get("/v1/prompts/t").json() == before


def test_an_ensemble_of_a_missing_task_is_404(client: httpx.Client) -> None:
    assert set_ensemble(client, "nope", [1]).status_code == 404
    assert client.delete("/v1/prompts/nope/ensemble").status_code == 404


def test_a_member_of_another_d_model_is_refused(settings: Settings, tiny: FrozenT5) -> None:
    """A store shared with a server of another model can hold such versions; the ensemble refuses them."""
    store = DiskStore(settings.data_dir / "prompts")
    store.add_version("default", "wide", SoftPrompt(random_prompt(4, tiny.d_model, seed=0)))
    store.add_version("default", "wide", SoftPrompt(random_prompt(4, tiny.d_model * 2, seed=1)))
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        response = set_ensemble(http, "wide", [1, 2])
        assert response.status_code == 422, response.text
        assert "d_model" in response.json()["error"]["message"]
        assert http.get("/v1/prompts/wide").json()["ensemble"] == []


def test_ensemble_classify_averages_the_members_served_alone(client: httpx.Client, tiny: FrozenT5) -> None:
    upload_versions(client, "nli", [random_prompt(3 + 2 * s, tiny.d_model, seed=s) for s in range(3)], labels=LABELS)
    assert set_ensemble(client, "nli", [3, 1, 2]).status_code == 200
    for normalize in (False, True):
        body = {"task_id": "nli", "inputs": TEXTS, "length_normalize": normalize}
        response = client.post("/v1/classify", json=body | {"ensemble": True})
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["ensemble_versions"] == [3, 1, 2] and result["prompt_version"] == 3
        alone = {v: client.post("/v1/classify", json=body | {"version": v}).json()["outputs"] for v in (3, 1, 2)}
        for i, output in enumerate(result["outputs"]):
            for label in LABELS:
                mean = sum(alone[v][i]["probs"][label] for v in alone) / 3
                assert math.isclose(output["probs"][label], mean, abs_tol=1e-5)
                mean_score = sum(alone[v][i]["scores"][label] for v in alone) / 3
                assert math.isclose(output["scores"][label], mean_score, abs_tol=1e-5)
            assert output["label"] == max(output["probs"], key=output["probs"].get)
            members = output["members"]
            assert [m["version"] for m in members] == [3, 1, 2]
            assert [m["label"] for m in members] == [alone[v][i]["label"] for v in (3, 1, 2)]
            for member in members:
                for label in LABELS:
                    expected = alone[member["version"]][i]["probs"][label]
                    assert math.isclose(member["probs"][label], expected, abs_tol=1e-5)
            agreeing = sum(m["label"] == output["label"] for m in members)
            assert math.isclose(output["agreement"], agreeing / 3)


def test_single_prompt_answers_carry_no_ensemble_fields(client: httpx.Client, tiny: FrozenT5) -> None:
    upload(client, "t", random_prompt(4, tiny.d_model, seed=0), labels=LABELS)
    classified = client.post("/v1/classify", json={"task_id": "t", "inputs": "x"}).json()
    assert set(classified) == {"task_id", "prompt_version", "outputs"}
    assert set(classified["outputs"][0]) == {"label", "scores", "probs"}
    generated_ = client.post("/v1/generate", json={"task_id": "t", "inputs": "x"}).json()
    assert set(generated_) == {"task_id", "prompt_version", "outputs"}
    assert set(generated_["outputs"][0]) == {"text", "num_tokens", "finish_reason"}


def test_the_members_classify_rows_share_one_model_call(static_client: httpx.Client, tiny: FrozenT5) -> None:
    upload_versions(static_client, "nli", [random_prompt(4, tiny.d_model, seed=s) for s in range(4)], labels=LABELS)
    assert set_ensemble(static_client, "nli", [1, 2, 3, 4]).status_code == 200
    calls, rows = batch_sizes(static_client)
    response = static_client.post("/v1/classify", json={"task_id": "nli", "inputs": TEXTS, "ensemble": True})
    assert response.status_code == 200, response.text
    assert batch_sizes(static_client) == (calls + 1, rows + 4 * len(TEXTS))  # one batch of every member's rows


def test_the_members_generate_rows_share_every_decoder_step(client: httpx.Client, tiny: FrozenT5) -> None:
    upload_versions(client, "t", [random_prompt(3 + s, tiny.d_model, seed=s) for s in range(3)])
    assert set_ensemble(client, "t", [1, 2, 3]).status_code == 200
    steps, rows = batch_sizes(client)
    parameters = {"max_new_tokens": 4, "ignore_eos": True}
    body = {"task_id": "t", "inputs": "x", "ensemble": True, "parameters": parameters}
    assert client.post("/v1/generate", json=body).status_code == 200
    assert batch_sizes(client) == (steps + 4, rows + 4 * 3)  # four steps, each with the three members' rows


def test_ensemble_generate_takes_the_majority_and_each_member_equals_it_alone(
    client: httpx.Client, tiny: FrozenT5
) -> None:
    a, b = random_prompt(5, tiny.d_model, seed=SEED_A), random_prompt(7, tiny.d_model, seed=SEED_B)
    text_a, text_b = (generated(tiny, p, TEXTS[0], 6).text for p in (a, b))
    assert text_a != text_b  # the seeds are chosen so; a vote needs two texts
    upload_versions(client, "t", [a, b, a.clone()])  # versions 1 and 3 are the same prompt
    assert set_ensemble(client, "t", [2, 1, 3]).status_code == 200
    body = {"task_id": "t", "inputs": TEXTS, "parameters": {"max_new_tokens": 6}}
    result = client.post("/v1/generate", json=body | {"ensemble": True}).json()
    alone = {v: client.post("/v1/generate", json=body | {"version": v}).json()["outputs"] for v in (2, 1, 3)}
    first = result["outputs"][0]
    assert first["text"] == text_a and first["votes"] == {text_a: 2, text_b: 1}
    assert "tie_scores" not in first
    for i, output in enumerate(result["outputs"]):
        members = output["members"]
        assert [m["version"] for m in members] == [2, 1, 3]
        for member in members:
            mine = alone[member["version"]][i]
            assert (member["text"], member["num_tokens"], member["finish_reason"]) == (
                mine["text"],
                mine["num_tokens"],
                mine["finish_reason"],
            )


def test_a_tie_goes_to_the_highest_log_prob_summed_over_the_members(client: httpx.Client, tiny: FrozenT5) -> None:
    a, b = random_prompt(5, tiny.d_model, seed=SEED_A), random_prompt(7, tiny.d_model, seed=SEED_B)
    gen_a, gen_b = (generated(tiny, p, TEXTS[0], 6) for p in (a, b))
    assert gen_a.text != gen_b.text
    upload_versions(client, "t", [a, b])
    ids = tiny.tokenize([TEXTS[0]])[0]
    # The reference is `transformers` on each member's row alone, not the server's own scoring path.
    members = [Alone(tiny, Row(tiny.prompt_on_device(p), ids)) for p in (a, b)]
    candidates = [member.generate(6) for member in members]
    assert candidates == [gen_a.token_ids, gen_b.token_ids]
    expected = [sum(member.score(candidate) for member in members) for candidate in candidates]
    winner = gen_a.text if expected[0] >= expected[1] else gen_b.text
    for order in ([1, 2], [2, 1]):  # the sums decide, not the members' order
        assert set_ensemble(client, "t", order).status_code == 200
        body = {"task_id": "t", "inputs": TEXTS[0], "ensemble": True, "parameters": {"max_new_tokens": 6}}
        output = client.post("/v1/generate", json=body).json()["outputs"][0]
        assert output["votes"] == {gen_a.text: 1, gen_b.text: 1} or output["votes"] == {gen_b.text: 1, gen_a.text: 1}
        assert set(output["tie_scores"]) == {gen_a.text, gen_b.text}
        assert math.isclose(output["tie_scores"][gen_a.text], expected[0], abs_tol=1e-4)
        assert math.isclose(output["tie_scores"][gen_b.text], expected[1], abs_tol=1e-4)
        assert output["text"] == winner


def test_a_tie_break_is_charged_and_its_worst_size_checked_first(settings: Settings, tiny: FrozenT5) -> None:
    """The tie-break's scoring rows are charged to the tenant like a request of their own (the first submission
    alone fits the budget, the two together do not); an ensemble whose tie-break could not fit one model call is
    refused before anything runs."""
    limited = settings.model_copy(update={"rate_limit_tokens_per_s": 100, "max_batch_tokens": 200})
    with running_server(limited, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        a, b = random_prompt(5, tiny.d_model, seed=SEED_A), random_prompt(7, tiny.d_model, seed=SEED_B)
        upload_versions(http, "t", [a, b])
        assert set_ensemble(http, "t", [1, 2]).status_code == 200
        body = {"task_id": "t", "inputs": TEXTS[0], "ensemble": True, "parameters": {"max_new_tokens": 6}}
        # First submission: rows of 5 + 23 and 7 + 23 tokens, and 2 x 6 reserved: 70 of the 100 tokens a second.
        # The tie-break: each member's row again, with the two candidates of up to 6 tokens: at least 58 more.
        response = http.post("/v1/generate", json=body)
        assert response.status_code == 429, response.text
        too_long = body | {"parameters": {"max_new_tokens": 90}}  # 30 + 2 x 91 > 200 tokens in one model call
        response = http.post("/v1/generate", json=too_long)
        assert response.status_code == 422 and "tie-break" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("route", "extra", "says"),
    [
        ("/v1/classify", {"version": 1}, "version"),
        ("/v1/generate", {"version": 1}, "version"),
        ("/v1/generate", {"stream": True}, "stream"),
    ],
)
def test_ensemble_requests_that_cannot_be_served_are_422(
    client: httpx.Client, tiny: FrozenT5, route: str, extra: dict, says: str
) -> None:
    upload(client, "t", random_prompt(4, tiny.d_model, seed=0), labels=LABELS)
    assert set_ensemble(client, "t", [1]).status_code == 200
    response = client.post(route, json={"task_id": "t", "inputs": "x", "ensemble": True} | extra)
    assert response.status_code == 422, response.text
    assert says in response.json()["error"]["message"]


def test_an_ensemble_request_to_a_task_without_one_is_422(client: httpx.Client, tiny: FrozenT5) -> None:
    upload(client, "t", random_prompt(4, tiny.d_model, seed=0), labels=LABELS)
    for route in ("/v1/classify", "/v1/generate"):
        response = client.post(route, json={"task_id": "t", "inputs": "x", "ensemble": True})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_input"
        assert "no ensemble" in response.json()["error"]["message"]


def test_an_ensembles_rows_count_against_the_queue(settings: Settings, tiny: FrozenT5) -> None:
    """Two inputs on an ensemble of three are six rows: more than a queue of five ever holds (a permanent 422)."""
    with (
        running_server(settings.model_copy(update={"max_queue_size": 5}), tiny) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        upload_versions(http, "t", [random_prompt(4, tiny.d_model, seed=s) for s in range(3)])
        assert set_ensemble(http, "t", [1, 2, 3]).status_code == 200
        body = {"task_id": "t", "inputs": TEXTS, "ensemble": True}
        response = http.post("/v1/generate", json=body)
        assert response.status_code == 422, response.text
        assert "6 rows" in response.json()["error"]["message"]
        assert http.post("/v1/generate", json=body | {"inputs": TEXTS[:1]}).status_code == 200


def test_the_disk_store_keeps_the_ensemble_across_a_restart(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    for seed in range(2):
        store.add_version("t1", "task", SoftPrompt(random_prompt(2, 8, seed=seed)))
    store.set_ensemble("t1", "task", [2, 1])
    assert DiskStore(tmp_path).get_task("t1", "task").ensemble == [2, 1]


def test_the_redis_store_sets_an_ensemble_atomically_mirrors_it_and_rebuilds_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    mirror = DiskStore(tmp_path / "mirror")
    store = RedisStore(redis_server.url, mirror, retry_interval_s=0.2)
    store.ensure_populated()
    notices = redis_server.client().pubsub(ignore_subscribe_messages=True)
    notices.subscribe(store.channel)
    assert notices.get_message(timeout=1) is None  # reads the subscription's confirmation (skipped)
    try:
        for seed in range(3):
            store.add_version("t1", "task", SoftPrompt(random_prompt(2, 8, seed=seed)))
        record = store.set_ensemble("t1", "task", [3, 1])
        assert (
            record.ensemble == [3, 1] == store.get_task("t1", "task").ensemble == mirror.get_task("t1", "task").ensemble
        )
        with pytest.raises(VersionNotFound) as missing:
            store.set_ensemble("t1", "task", [1, 7])
        assert missing.value.version == 7
        assert store.get_task("t1", "task") == record  # refused: nothing changed
        with pytest.raises(TaskNotFound):
            store.set_ensemble("t1", "other", [1])
        redis_server.client().flushall()  # Redis lost its data: rebuilt from the mirror, ensemble included
        assert store.ensure_populated() == 1
        assert store.get_task("t1", "task").ensemble == [3, 1]
        assert store.set_ensemble("t1", "task", []).ensemble == []
        assert mirror.get_task("t1", "task").ensemble == []
        events = []
        while (message := notices.get_message(timeout=1)) is not None:
            events.append(json.loads(message["data"])["event"])
        assert events.count("ensemble") == 2
    finally:
        notices.close()
        store.close()


def test_the_cli_and_the_python_client(base_url: str, client: httpx.Client, tiny: FrozenT5) -> None:
    upload_versions(client, "t", [random_prompt(4, tiny.d_model, seed=s) for s in range(3)], labels=LABELS)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "server.cli", "prompts", "--url", base_url, "ensemble", "t", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert json.loads(cli("3", "1").stdout) == {"task_id": "t", "ensemble": [3, 1]}
    assert json.loads(cli().stdout) == {"task_id": "t", "ensemble": [3, 1]}
    refused = cli("1", "9")
    assert refused.returncode == 1 and "404 not_found" in refused.stderr
    both = cli("1", "--clear")
    assert both.returncode == 2 and "not both" in both.stderr

    with SoftserveClient(base_url) as softserve:
        assert softserve.classify("t", TEXTS, ensemble=True)["ensemble_versions"] == [3, 1]
        assert softserve.generate("t", "x", ensemble=True, max_new_tokens=2)["outputs"][0]["votes"]
        assert softserve.set_ensemble("t", [2])["ensemble"] == [2]
        assert softserve.clear_ensemble("t")["ensemble"] == []
    assert json.loads(cli("--clear").stdout) == {"task_id": "t", "ensemble": []}


def test_the_async_client(base_url: str, client: httpx.Client, tiny: FrozenT5) -> None:
    upload_versions(client, "t", [random_prompt(4, tiny.d_model, seed=s) for s in range(2)], labels=LABELS)

    async def calls() -> tuple[dict, dict, dict]:
        async with AsyncSoftserveClient(base_url) as softserve:
            task = await softserve.set_ensemble("t", [1, 2])
            classified = await softserve.classify("t", "x", ensemble=True)
            return task, classified, await softserve.clear_ensemble("t")

    task, classified, cleared = asyncio.run(calls())
    assert task["ensemble"] == [1, 2] and classified["ensemble_versions"] == [1, 2] and cleared["ensemble"] == []


def trained_members(model: FrozenT5, config: dict[str, Any]) -> list[torch.Tensor]:
    """What each member of an ensemble job is: the one-prompt run of its seed, trained here."""
    recipe = TrainingConfig.model_validate(config)
    train, eval_ = examples(), examples(4, 100)
    return [
        PromptTrainer(model, train, eval_, recipe.member(k)).train().prompt.embeddings
        for k in range(recipe.ensemble_size)
    ]


def download(client: httpx.Client, task_id: str, version: int) -> torch.Tensor:
    response = client.get(f"/v1/prompts/{task_id}/versions/{version}")
    assert response.status_code == 200, response.text
    return safetensors.torch.load(response.content)["prompt_embeddings"]


def test_an_ensemble_size_job_trains_each_seed_and_serves_them_as_the_ensemble(
    settings: Settings, tiny: FrozenT5
) -> None:
    recipe = training_config(6, ensemble_size=3, eval_every=3, seed=5)
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        body = {"task_id": "sst2", "train": examples(), "eval": examples(4, 100), "config": recipe}
        accepted = http.post("/v1/training-jobs", json=body)
        assert accepted.status_code == 202, accepted.text
        done = wait_until_ended(http, accepted.json()["job_id"])
        assert done["state"] == "succeeded", done
        assert done["progress"]["step"] == done["progress"]["total_steps"] == 18
        assert [entry["step"] for entry in done["history"]] == [3, 6, 9, 12, 15, 18]
        assert done["prompt_version"] == 1
        task = http.get("/v1/prompts/sst2").json()
        assert [v["version"] for v in task["versions"]] == [1, 2, 3]
        assert task["ensemble"] == [1, 2, 3] and task["active_version"] == 1
        served = [download(http, "sst2", v) for v in (1, 2, 3)]
        classified = http.post("/v1/classify", json={"task_id": "sst2", "inputs": "sentence 3", "ensemble": True})
        assert classified.status_code == 200, classified.text
        assert classified.json()["ensemble_versions"] == [1, 2, 3]
    for member, expected in zip(served, trained_members(tiny, recipe), strict=True):
        torch.testing.assert_close(member, expected, rtol=0, atol=1e-5)
    assert not torch.equal(served[0], served[1]) and not torch.equal(served[1], served[2])  # different seeds


def test_an_ensemble_job_stopped_inside_a_member_resumes_there(settings: Settings, tiny: FrozenT5) -> None:
    recipe = training_config(300, ensemble_size=2, eval_every=100)  # long enough to stop it inside member 2
    body = {"task_id": "t", "train": examples(), "eval": examples(4, 100), "config": recipe}
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        job_id = http.post("/v1/training-jobs", json=body).json()["job_id"]
        wait_until_step(http, job_id, 305)  # inside the second member
    # A graceful stop checkpoints the second member where it is, with the first member's prompt.
    left = DiskJobStore(settings.data_dir / "jobs").get(job_id)
    assert left.state.value == "queued" and 305 <= left.progress.step < 600
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30) as http:
        done = wait_until_ended(http, job_id)
        assert done["state"] == "succeeded", done
        assert metric(http.get("/metrics").text, "softserve_training_steps_total") == 600 - left.progress.step
        served = [download(http, "t", v) for v in (1, 2)]
        assert http.get("/v1/prompts/t").json()["ensemble"] == [1, 2]
    for member, expected in zip(served, trained_members(tiny, recipe), strict=True):
        torch.testing.assert_close(member, expected, rtol=0, atol=1e-5)


def test_an_ensemble_size_out_of_range_is_refused(client: httpx.Client) -> None:
    for size, says in ((0, "ensemble_size"), (MAX_ENSEMBLE_SIZE + 1, "ensemble_size")):
        body = {"task_id": "t", "train": examples(), "config": training_config(2, ensemble_size=size)}
        response = client.post("/v1/training-jobs", json=body)
        assert response.status_code == 422 and says in response.json()["error"]["message"], response.text
    body = {"task_id": "t", "train": examples(), "config": training_config(2, ensemble_size=2, seed=2**63 - 1)}
    response = client.post("/v1/training-jobs", json=body)
    assert response.status_code == 422 and "last seed" in response.json()["error"]["message"], response.text
    assert client.get("/v1/training-jobs").json()["jobs"] == []
