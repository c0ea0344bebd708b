"""`POST /v1/embeddings` (a task is a model) over real HTTP with the real `openai` client: each vector is the mean of
`transformers`' encoder output for the row alone over the input's tokens, normalized unless asked not to."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import torch

from server.client import SoftserveClient
from server.serving.model import FrozenT5, Row
from server.settings import Settings
from server.tenancy.keys import ApiKeys
from server.testing.reference import TOLERANCE, Alone, random_prompt
from tests.serving import running_server
from tests.test_inference_api import upload

TEXTS = ["a gorgeous, witty film", "x", "the plot is thin, and the acting worse"]


def expected(tiny: FrozenT5, prompt: torch.Tensor, text: str) -> np.ndarray:
    """The row alone through `transformers`' encoder, averaged over the input's positions (the prompt's left out)."""
    row = Row(tiny.prompt_on_device(prompt), tiny.tokenize([text])[0])
    return Alone(tiny, row).encoder_output()[prompt.shape[0] :].mean(dim=0).numpy()


def test_embeddings_are_the_mean_encoder_output_of_the_row_alone(settings: Settings, tiny: FrozenT5) -> None:
    key = ApiKeys(settings.keys_file).add("acme")
    prompts = {"a": random_prompt(5, tiny.d_model, seed=0), "b": random_prompt(9, tiny.d_model, seed=1)}
    with running_server(settings, tiny) as url:
        with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
            for task, prompt in prompts.items():
                upload(http, task, prompt)
            raw = http.post("/v1/embeddings", json={"model": "a", "input": TEXTS, "normalize": False}).json()
        assert raw["model"] == "a@1" and [d["index"] for d in raw["data"]] == [0, 1, 2]
        for data, text in zip(raw["data"], TEXTS, strict=True):
            assert np.abs(np.array(data["embedding"]) - expected(tiny, prompts["a"], text)).max() <= TOLERANCE
        tokens = sum(len(ids) for ids in tiny.tokenize(TEXTS))
        assert raw["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "soft_prompt_tokens": 15}
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        unit = client.embeddings.create(model="a", input=TEXTS[0], encoding_format="float").data[0].embedding
        reference = expected(tiny, prompts["a"], TEXTS[0])
        assert np.abs(np.array(unit) - reference / np.linalg.norm(reference)).max() <= TOLERANCE
        other = client.embeddings.create(model="b", input=TEXTS[0], encoding_format="float").data[0].embedding
        assert np.abs(np.array(other) - np.array(unit)).max() > 0.05  # the task's prompt shapes the embedding
        packed = client.embeddings.create(model="a", input=TEXTS[0], encoding_format="base64").data[0].embedding
        assert isinstance(packed, str)
        vector = np.frombuffer(base64.b64decode(packed), dtype="<f4")
        assert np.abs(vector - np.array(unit)).max() <= 1e-6
        with SoftserveClient(url, api_key=key) as softserve:
            (mine,) = softserve.embed("a", TEXTS[0], normalize=False)
            assert np.abs(np.array(mine) - reference).max() <= TOLERANCE
            assert len(softserve.generate("a", TEXTS[0], max_new_tokens=3, n=2, logprobs=1)["outputs"]) == 2


def test_embedding_requests_that_cannot_be_served_are_refused(settings: Settings, tiny: FrozenT5) -> None:
    key = ApiKeys(settings.keys_file).add("acme")
    headers = {"Authorization": f"Bearer {key}"}
    with running_server(settings, tiny) as url, httpx.Client(base_url=url, timeout=30, headers=headers) as http:
        upload(http, "a", random_prompt(5, tiny.d_model, seed=0))
        wrong_width = http.post("/v1/embeddings", json={"model": "a", "input": "x", "dimensions": 8})
        assert wrong_width.status_code == 400 and wrong_width.json()["error"]["param"] == "dimensions"
        assert http.post("/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404
        assert http.post("/v1/embeddings", json={"model": "a", "input": [[1, 2, 3]]}).status_code == 422
        assert http.post("/v1/embeddings", json={"model": "a", "input": []}).status_code == 422
        too_many = http.post("/v1/embeddings", json={"model": "a", "input": ["x"] * 65})
        assert too_many.status_code == 422 and "65 inputs" in too_many.json()["error"]["message"]
