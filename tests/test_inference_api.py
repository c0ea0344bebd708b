"""/v1/generate and /v1/classify over real HTTP, checked against the model called directly."""

from __future__ import annotations

import json
import math
import re

import httpx
import safetensors.torch
import torch

from server.serving.model import Decoding, FrozenT5, Row
from server.testing.reference import random_prompt


def upload(client: httpx.Client, task_id: str, prompt: torch.Tensor, **metadata: object) -> dict:
    data = safetensors.torch.save({"prompt_embeddings": prompt})
    form = {"metadata": json.dumps(metadata)} if metadata else None
    response = client.put(f"/v1/prompts/{task_id}", files={"file": ("prompt", data)}, data=form)
    assert response.status_code == 201, response.text
    return response.json()


def direct_generate(model: FrozenT5, prompt: torch.Tensor, text: str, max_new_tokens: int) -> str:
    row = Row(model.prompt_on_device(prompt), model.tokenize([text])[0])
    return model.generate([row], Decoding(), [max_new_tokens])[0].text


def test_generate_matches_the_model_called_directly(client: httpx.Client, tiny: FrozenT5) -> None:
    prompts = {f"task{i}": random_prompt(3 + 4 * i, tiny.d_model, seed=i) for i in range(3)}
    for task_id, prompt in prompts.items():
        upload(client, task_id, prompt)
    texts = ["a gorgeous, witty film", "the plot is thin", "x"]
    for task_id, prompt in prompts.items():
        body = {"task_id": task_id, "inputs": texts, "parameters": {"max_new_tokens": 5}}
        response = client.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["task_id"] == task_id and result["prompt_version"] == 1
        assert [o["text"] for o in result["outputs"]] == [direct_generate(tiny, prompt, t, 5) for t in texts]
        for output in result["outputs"]:
            assert output["finish_reason"] in {"eos", "length"}
            assert 1 <= output["num_tokens"] <= 5


def test_template_and_default_parameters_come_from_the_task(client: httpx.Client, tiny: FrozenT5) -> None:
    prompt = random_prompt(6, tiny.d_model, seed=7)
    upload(client, "sst2", prompt, input_template="sentence: {input}", parameters={"max_new_tokens": 3})
    response = client.post("/v1/generate", json={"task_id": "sst2", "inputs": "fine {not a field}"})
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["text"] == direct_generate(tiny, prompt, "sentence: fine {not a field}", 3)
    assert output["num_tokens"] <= 3


def test_version_pinning_and_new_versions_without_restart(client: httpx.Client, tiny: FrozenT5) -> None:
    first, second = random_prompt(4, tiny.d_model, seed=1), random_prompt(9, tiny.d_model, seed=2)
    upload(client, "t", first)
    upload(client, "t", second)
    latest = client.post("/v1/generate", json={"task_id": "t", "inputs": "hello"}).json()
    pinned = client.post("/v1/generate", json={"task_id": "t", "inputs": "hello", "version": 1}).json()
    assert latest["prompt_version"] == 2 and pinned["prompt_version"] == 1
    assert latest["outputs"][0]["text"] == direct_generate(tiny, second, "hello", 20)
    assert pinned["outputs"][0]["text"] == direct_generate(tiny, first, "hello", 20)
    assert client.post("/v1/prompts/t/activate", json={"version": 1}).status_code == 200
    rolled_back = client.post("/v1/generate", json={"task_id": "t", "inputs": "hello"}).json()
    assert rolled_back["prompt_version"] == 1


def test_classify_scores_probs_and_labels(client: httpx.Client, tiny: FrozenT5) -> None:
    prompt = random_prompt(5, tiny.d_model, seed=3)
    upload(client, "nli", prompt, labels=["entailment", "contradiction", "neutral"])
    texts = ["premise: a. hypothesis: b.", "premise: c. hypothesis: d."]
    response = client.post("/v1/classify", json={"task_id": "nli", "inputs": texts})
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    labels = ["entailment", "contradiction", "neutral"]
    targets = tiny.tokenize(labels)
    rows = [Row(prompt, ids) for ids in tiny.tokenize(texts)]
    expected = tiny.score(rows, [targets, targets])
    for output, scores in zip(outputs, expected, strict=True):
        assert list(output["scores"]) == labels
        for label, score in zip(labels, scores, strict=True):
            assert math.isclose(output["scores"][label], score, abs_tol=1e-4)
        assert math.isclose(sum(output["probs"].values()), 1.0, abs_tol=1e-6)
        assert output["label"] == max(output["scores"], key=output["scores"].get)

    normalized = client.post(
        "/v1/classify", json={"task_id": "nli", "inputs": texts[0], "labels": ["yes", "no"], "length_normalize": True}
    ).json()["outputs"][0]
    raw = tiny.score(rows[:1], [tiny.tokenize(["yes", "no"])])[0]
    yes_tokens = len(tiny.tokenize(["yes"])[0])
    assert math.isclose(normalized["scores"]["yes"], raw[0] / yes_tokens, abs_tol=1e-4)
    assert set(normalized["scores"]) == {"yes", "no"}


def test_classify_without_labels_is_a_clear_422(client: httpx.Client, tiny: FrozenT5) -> None:
    upload(client, "nolabels", random_prompt(2, tiny.d_model, seed=0))
    response = client.post("/v1/classify", json={"task_id": "nolabels", "inputs": "x"})
    assert response.status_code == 422
    assert "labels" in response.json()["error"]["message"]


def test_max_new_tokens_over_the_cap_is_422(client: httpx.Client, tiny: FrozenT5) -> None:
    upload(client, "t", random_prompt(2, tiny.d_model, seed=0))
    body = {"task_id": "t", "inputs": "x", "parameters": {"max_new_tokens": 100_000}}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"


def test_operations_endpoints(client: httpx.Client, tiny: FrozenT5) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    info = client.get("/v1/info").json()
    assert info["d_model"] == tiny.d_model and info["dtype"] == "float32" and info["store"] == "disk"
    assert info["limits"]["max_batch_size"] >= 1
    assert client.get("/openapi.json").json()["info"]["title"] == "softserve"
    assert client.get("/docs").status_code == 200

    upload(client, "m", random_prompt(3, tiny.d_model, seed=0))
    client.post("/v1/generate", json={"task_id": "m", "inputs": ["a", "b"]})
    client.post("/v1/generate", json={"task_id": "missing", "inputs": "a"})
    text = client.get("/metrics").text
    assert 'softserve_requests_total{route="/v1/generate",status="200"} 1.0' in text
    assert 'softserve_requests_total{route="/v1/generate",status="404"} 1.0' in text
    for name in (
        "softserve_request_duration_seconds_bucket",
        "softserve_queue_wait_seconds_count",
        "softserve_inference_duration_seconds_count",
        "softserve_batch_size_count",
        "softserve_batch_tasks_count",
        "softserve_queue_depth",
        "softserve_prompt_cache_misses_total 1.0",
        "softserve_prompt_cache_bytes",
    ):
        assert name in text, name
    label_names = set(re.findall(r'[{,]([a-z_]+)="', text))
    # Never a task, job or request id as a label: bounded series only. The inference gateway's info gauge names the
    # tasks running and waiting in its protocol's labels, in one series that is replaced (never one per task).
    protocol = {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert label_names <= {"route", "status", "le", "reason", "source", "state", "tier", "result", *protocol}
    assert text.count("softserve_engine_tasks_info{") <= 1
