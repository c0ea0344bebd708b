"""The core claim: a row's outputs in a mixed batch (many tasks, many prompt lengths) equal the row alone."""

from __future__ import annotations

import pytest
import torch

from server.model import Decoding, FrozenT5, Row
from tests.conftest import random_prompt

INPUTS = [
    "sentence: a gorgeous, witty film",
    "premise: the cat sat on the mat. hypothesis: a cat is sitting",
    "x",
    "question: which of these rows came first, and does it matter at all?",
    "sentence: dull",
    "translate: the quick brown fox jumps over the lazy dog",
]
PROMPT_LENGTHS = [1, 5, 20, 7, 20, 13]  # 6 tasks, 5 different lengths


def mixed_rows(model: FrozenT5) -> list[Row]:
    ids = model.tokenize(INPUTS)
    prompts = [random_prompt(n, model.d_model, seed=task) for task, n in enumerate(PROMPT_LENGTHS)]
    return [Row(model.prompt_on_device(p), i) for p, i in zip(prompts, ids, strict=True)]


@pytest.fixture(params=["tiny", "t5_small"])
def model(request: pytest.FixtureRequest) -> FrozenT5:
    return request.getfixturevalue(request.param)


def test_layout_puts_prompt_then_input_then_padding(tiny: FrozenT5) -> None:
    rows = mixed_rows(tiny)
    embeds, mask = tiny.layout(rows)
    assert mask.shape == (len(rows), max(r.num_tokens for r in rows))
    for i, row in enumerate(rows):
        p, n = row.prompt.shape[0], row.num_tokens
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert torch.equal(embeds[i, :p], row.prompt)
        expected = tiny.model.get_input_embeddings()(torch.tensor(row.input_ids))
        assert torch.equal(embeds[i, p:n], expected)


def test_encoder_output_of_each_row_equals_the_row_alone(model: FrozenT5) -> None:
    rows = mixed_rows(model)
    hidden, _ = model.encode(rows)
    for i, row in enumerate(rows):
        alone, _ = model.encode([row])
        diff = (hidden[i, : row.num_tokens] - alone[0]).abs().max().item()
        assert diff <= 1e-4, f"row {i}: encoder differs by {diff}"


def test_first_step_logits_of_each_row_equal_the_row_alone(model: FrozenT5) -> None:
    rows = mixed_rows(model)
    batched = model.first_step_logits(rows)
    for i, row in enumerate(rows):
        diff = (batched[i] - model.first_step_logits([row])[0]).abs().max().item()
        assert diff <= 1e-4, f"row {i}: logits differ by {diff}"


def test_greedy_generations_equal_the_row_alone(model: FrozenT5) -> None:
    rows = mixed_rows(model)
    limits = [6, 3, 6, 1, 5, 6]  # per-row max_new_tokens in one call
    batched = model.generate(rows, Decoding(), limits)
    for i, row in enumerate(rows):
        alone = model.generate([row], Decoding(), [limits[i]])[0]
        assert batched[i] == alone, f"row {i}"
        assert len(batched[i].token_ids) <= limits[i]


def test_rank_scores_equal_the_row_alone(model: FrozenT5) -> None:
    rows = mixed_rows(model)
    targets = [model.tokenize(["positive", "negative", "neutral"]) for _ in rows]
    targets[2] = model.tokenize(["yes", "no"])  # label sets may differ per row
    batched = model.score(rows, targets)
    for i, row in enumerate(rows):
        alone = model.score([row], [targets[i]])[0]
        assert batched[i] == pytest.approx(alone, abs=1e-4)


def test_generation_varies_with_input_and_prompt(tiny: FrozenT5) -> None:
    """The tiny preset is not degenerate: a prompt steers the output, and so does the input."""
    ids = tiny.tokenize(["hello world", "a completely different input"])
    prompts = [random_prompt(8, tiny.d_model, seed=s) for s in range(4)]
    by_prompt = {tuple(tiny.generate([Row(p, ids[0])], Decoding(), [8])[0].token_ids) for p in prompts}
    by_input = {tuple(tiny.generate([Row(prompts[0], i)], Decoding(), [8])[0].token_ids) for i in ids}
    assert len(by_prompt) > 1
    assert len(by_input) > 1
    start = tiny.model.config.decoder_start_token_id
    assert any(set(tokens) != {start} for tokens in by_prompt)


def test_generation_never_emits_ids_past_the_tokenizer(t5_small: FrozenT5) -> None:
    """The checkpoint has 32128 rows but its byte tokenizer decodes only the first few hundred."""
    assert t5_small.decodable_vocab < t5_small.model.config.vocab_size
    rows = mixed_rows(t5_small)
    for sampled in (Decoding(), Decoding(do_sample=True, temperature=5.0, seed=1)):
        for generation in t5_small.generate(rows, sampled, [8] * len(rows)):
            assert all(t < t5_small.decodable_vocab for t in generation.token_ids)
