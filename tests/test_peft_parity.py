"""Parity with Hugging Face PEFT: a real PEFT prompt-tuning adapter served by softserve gives PEFT's outputs.

What PEFT does for T5 (`PeftModelForSeq2SeqLM.forward/generate` with PROMPT_TUNING): the prompt encoder
holds `[2n, d]` (num_transformer_submodules=2); the encoder input is `[rows [:n] ; embed(input)]` with
attention mask ones over the prompt; the decoder is untouched (rows `[n:]` are never read). softserve's row
`[prompt ; embed(input) incl. </s> ; pad]` must therefore give the same logits, scores and greedy text.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import PreTrainedTokenizerBase, T5ForConditionalGeneration

from server.serving.model import FrozenT5, Row
from server.serving.tiny import build_tiny_t5
from server.settings import Settings
from server.testing.reference import random_prompt
from tests.serving import running_server

NUM_VIRTUAL_TOKENS = 6
INPUTS = ["sentence: a gorgeous, witty film", "x", "premise: the cat sat on the mat. hypothesis: a cat sits"]
LABELS = ["positive", "negative", "neutral"]
MAX_NEW_TOKENS = 12
TOLERANCE = 1e-4

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@dataclass
class Adapter:
    """A PEFT prompt-tuning model on a fresh copy of the served weights, and its saved adapter as a zip."""

    served: FrozenT5
    peft: PeftModel
    tokenizer: PreTrainedTokenizerBase
    encoder_rows: torch.Tensor
    decoder_rows: torch.Tensor
    zip_bytes: bytes
    fresh_base: T5ForConditionalGeneration


def fresh_base_model(kind: str, t5_small_dir: Path) -> T5ForConditionalGeneration:
    """A new copy of the served weights: the session's FrozenT5 is shared and must not be touched."""
    if kind == "tiny":
        return build_tiny_t5()[0]
    return T5ForConditionalGeneration.from_pretrained(t5_small_dir).eval()


def zip_directory(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(directory.iterdir()):
            archive.write(path, f"adapter/{path.name}")
    return buffer.getvalue()


@pytest.fixture(scope="module", params=["tiny", "t5_small"])
def adapter(request: pytest.FixtureRequest, t5_small_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Adapter:
    kind = request.param
    served: FrozenT5 = request.getfixturevalue(kind)
    base = fresh_base_model(kind, t5_small_dir)
    served_weights = served.model.state_dict()
    assert all(torch.equal(t, served_weights[k]) for k, t in base.state_dict().items())

    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=NUM_VIRTUAL_TOKENS,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )
    model = get_peft_model(base, config).eval()
    embedding = model.prompt_encoder["default"].embedding
    assert embedding.weight.shape == (2 * NUM_VIRTUAL_TOKENS, served.d_model)
    encoder_rows = random_prompt(NUM_VIRTUAL_TOKENS, served.d_model, seed=21, scale=5.0)
    decoder_rows = random_prompt(NUM_VIRTUAL_TOKENS, served.d_model, seed=22, scale=5.0)
    with torch.no_grad():
        embedding.weight.copy_(torch.cat([encoder_rows, decoder_rows]))

    directory = tmp_path_factory.mktemp(f"peft-{kind}")
    model.save_pretrained(directory)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in directory.iterdir()}
    return Adapter(
        served=served,
        peft=model,
        tokenizer=served.tokenizer,
        encoder_rows=encoder_rows,
        decoder_rows=decoder_rows,
        zip_bytes=zip_directory(directory),
        fresh_base=fresh_base_model(kind, t5_small_dir),
    )


@pytest.fixture(scope="module")
def client(adapter: Adapter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A server on the same weights, with the PEFT zip uploaded as task `peft-task`."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("parity-data"), max_wait_ms=2)
    with running_server(settings, adapter.served) as url, httpx.Client(base_url=url, timeout=60) as http:
        response = http.put("/v1/prompts/peft-task", files={"file": ("adapter.zip", adapter.zip_bytes)})
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["version"], body["length"], body["d_model"]) == (1, NUM_VIRTUAL_TOKENS, adapter.served.d_model)
        yield http


def tokenized(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = adapter.tokenizer(INPUTS, return_tensors="pt", padding=True)
    return encoded.input_ids, encoded.attention_mask


@torch.inference_mode()
def peft_first_step_logits(model: PeftModel, adapter: Adapter) -> torch.Tensor:
    input_ids, mask = tokenized(adapter)
    start = torch.full((len(INPUTS), 1), model.config.decoder_start_token_id)
    return model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0]


def softserve_first_step_logits(adapter: Adapter, prompt: torch.Tensor) -> torch.Tensor:
    served = adapter.served
    rows = [Row(served.prompt_on_device(prompt), ids) for ids in served.tokenize(INPUTS)]
    return served.first_step_logits(rows)


def download(client: httpx.Client, fmt: str) -> bytes:
    response = client.get("/v1/prompts/peft-task/versions/1", params={"format": fmt})
    assert response.status_code == 200, response.text
    return response.content


def stored_prompt(client: httpx.Client) -> torch.Tensor:
    return safetensors.torch.load(download(client, "safetensors"))["prompt_embeddings"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_the_stored_prompt_is_the_encoder_block_of_the_adapter(adapter: Adapter, client: httpx.Client) -> None:
    stored = stored_prompt(client)
    assert torch.equal(stored, adapter.encoder_rows)
    assert not torch.equal(stored, adapter.decoder_rows)


def test_first_step_logits_equal_peft(adapter: Adapter, client: httpx.Client) -> None:
    expected = peft_first_step_logits(adapter.peft, adapter)
    actual = softserve_first_step_logits(adapter, stored_prompt(client))
    assert actual.shape == expected.shape
    assert max_diff(actual, expected) <= TOLERANCE


def test_the_comparison_is_sensitive_to_the_prompt(adapter: Adapter, client: httpx.Client) -> None:
    """Guards the parity tests against passing trivially: the prompt, and which rows of it, matter."""
    expected = peft_first_step_logits(adapter.peft, adapter)
    with_decoder_rows = softserve_first_step_logits(adapter, adapter.decoder_rows)
    with_zero_prompt = softserve_first_step_logits(adapter, torch.zeros_like(adapter.encoder_rows))
    assert max_diff(with_decoder_rows, expected) > 100 * TOLERANCE
    assert max_diff(with_zero_prompt, expected) > 100 * TOLERANCE


@torch.inference_mode()
def peft_label_scores(adapter: Adapter) -> list[list[float]]:
    """PEFT's summed log-probability of each label's tokens (incl. EOS), `[input][label]`."""
    input_ids, mask = tokenized(adapter)
    columns = []
    for ids in adapter.tokenizer(LABELS)["input_ids"]:
        labels = torch.tensor([ids] * len(INPUTS))
        logits = adapter.peft(input_ids=input_ids, attention_mask=mask, labels=labels).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        columns.append(log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(dim=-1).tolist())
    return [list(row) for row in zip(*columns, strict=True)]


def test_classify_scores_equal_peft_label_log_probs(adapter: Adapter, client: httpx.Client) -> None:
    response = client.post("/v1/classify", json={"task_id": "peft-task", "inputs": INPUTS, "labels": LABELS})
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    expected = peft_label_scores(adapter)
    assert len(outputs) == len(INPUTS)
    for output, want in zip(outputs, expected, strict=True):
        got = [output["scores"][label] for label in LABELS]
        assert got == pytest.approx(want, rel=1e-5, abs=TOLERANCE)
        assert output["label"] == LABELS[max(range(len(LABELS)), key=want.__getitem__)]
    assert len({tuple(row) for row in expected}) == len(INPUTS)  # the inputs score differently


@torch.inference_mode()
def peft_greedy(adapter: Adapter) -> list[dict]:
    input_ids, mask = tokenized(adapter)
    tokenizer, config = adapter.tokenizer, adapter.peft.config
    undecodable = list(range(len(tokenizer), config.vocab_size))  # softserve never emits ids it cannot decode
    sequences = adapter.peft.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        suppress_tokens=undecodable or None,
    )
    results = []
    for sequence in sequences.tolist():
        tokens = sequence[1:]  # drop the decoder start token
        if config.eos_token_id in tokens[:MAX_NEW_TOKENS]:
            end = tokens.index(config.eos_token_id)
            text_ids, count, reason = tokens[:end], end + 1, "eos"
        else:
            text_ids, count, reason = tokens[:MAX_NEW_TOKENS], MAX_NEW_TOKENS, "length"
        text = tokenizer.decode(text_ids, skip_special_tokens=True)
        results.append({"text": text, "num_tokens": count, "finish_reason": reason})
    return results


def test_greedy_generate_equals_peft_generate(adapter: Adapter, client: httpx.Client) -> None:
    body = {"task_id": "peft-task", "inputs": INPUTS, "parameters": {"max_new_tokens": MAX_NEW_TOKENS}}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    expected = peft_greedy(adapter)
    assert response.json()["outputs"] == expected
    assert any(e["text"] for e in expected)


def test_peft_download_loads_in_peft_with_the_same_logits(
    adapter: Adapter, client: httpx.Client, tmp_path: Path
) -> None:
    with zipfile.ZipFile(io.BytesIO(download(client, "peft"))) as archive:
        archive.extractall(tmp_path)
    reloaded = PeftModel.from_pretrained(adapter.fresh_base, tmp_path).eval()
    weight = reloaded.prompt_encoder["default"].embedding.weight
    assert torch.equal(weight[:NUM_VIRTUAL_TOKENS], adapter.encoder_rows)
    expected = peft_first_step_logits(adapter.peft, adapter)
    assert max_diff(peft_first_step_logits(reloaded, adapter), expected) <= TOLERANCE
    assert max_diff(softserve_first_step_logits(adapter, stored_prompt(client)), expected) <= TOLERANCE
