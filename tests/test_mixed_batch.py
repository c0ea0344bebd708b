"""The core claim: a row's outputs in a mixed batch (many tasks, many prompt lengths) equal the row alone.

"The row alone" is `transformers` called directly, not `FrozenT5`: `inputs_embeds` is the prompt followed by
the embedded input (`</s>` included), with a mask of ones, in a batch of one. So the references share none
of `FrozenT5`'s layout, encoding, decoding or scoring code, and a mistake there cannot hide on both sides.
Exactness is an fp32 property (max abs diff <= 1e-4); bf16 is held to less (see `bench/gpu_check.py`).
"""

from __future__ import annotations

import pytest
import torch

from server.serving.batch_runner import BatchRunner, GenerateWork
from server.serving.model import Decoding, FrozenT5, Row
from server.testing.reference import TOLERANCE, Alone, mixed_rows, random_prompt


@pytest.fixture(params=["tiny", "t5_small"])
def model(request: pytest.FixtureRequest) -> FrozenT5:
    return request.getfixturevalue(request.param)


def test_layout_puts_prompt_then_input_then_padding(tiny: FrozenT5) -> None:
    rows = mixed_rows(tiny)
    embeds, mask = tiny.layout(rows)
    assert mask.shape == (len(rows), max(r.num_tokens for r in rows))
    for i, row in enumerate(rows):
        n = row.num_tokens
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert torch.equal(embeds[i, :n], Alone(tiny, row).embeds[0])  # prompt, then the embedded input


def test_encoder_output_of_each_row_equals_the_row_alone(model: FrozenT5) -> None:
    rows = mixed_rows(model)
    hidden, _ = model.encode(rows)
    for i, row in enumerate(rows):
        diff = (hidden[i, : row.num_tokens] - Alone(model, row).encoder_output()).abs().max().item()
        assert diff <= TOLERANCE, f"row {i}: encoder differs by {diff}"


def test_first_step_logits_of_each_row_equal_the_row_alone(model: FrozenT5) -> None:
    rows = mixed_rows(model)
    batched = model.first_step_logits(rows)
    for i, row in enumerate(rows):
        diff = (batched[i] - Alone(model, row).first_step_logits()).abs().max().item()
        assert diff <= TOLERANCE, f"row {i}: logits differ by {diff}"


def test_greedy_generations_equal_the_row_alone(model: FrozenT5) -> None:
    rows = mixed_rows(model)
    limits = [6, 3, 6, 1, 5, 6]  # per-row max_new_tokens in one call
    batched = model.generate(rows, Decoding(), limits)
    for i, row in enumerate(rows):
        assert batched[i].token_ids == Alone(model, row).generate(limits[i]), f"row {i}"
        assert len(batched[i].token_ids) <= limits[i]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # the rows' prompts and inputs steer them apart


def test_beam_rows_in_a_mixed_batch_equal_beam_search_on_the_row_alone(model: FrozenT5) -> None:
    rows = mixed_rows(model)
    batched = model.generate(rows, Decoding(num_beams=3), [6] * len(rows))
    for i, row in enumerate(rows):
        assert batched[i].token_ids == Alone(model, row).generate(6, num_beams=3), f"row {i}"


def test_rank_scores_equal_the_row_alone(model: FrozenT5) -> None:
    rows = mixed_rows(model)
    targets = [model.tokenize(["positive", "negative", "neutral"]) for _ in rows]
    targets[2] = model.tokenize(["yes", "no"])  # label sets may differ per row
    batched = model.score(rows, targets)
    for i, row in enumerate(rows):
        for label, score in zip(targets[i], batched[i], strict=True):  # a sum of len(label) log-probabilities
            assert score == pytest.approx(Alone(model, row).score(label), abs=TOLERANCE * len(label)), f"row {i}"


def test_a_seeded_sampled_row_draws_the_same_tokens_whatever_shares_its_batch(model: FrozenT5) -> None:
    """Through the batch runner, as the server runs batches: a seeded row's draws depend on its seed alone."""
    rows = mixed_rows(model)
    seeded = Decoding(do_sample=True, temperature=2.0, seed=7)
    alone = model.generate([rows[0]], seeded, [8])[0]
    assert alone != model.generate([rows[0]], Decoding(do_sample=True, temperature=2.0, seed=8), [8])[0]

    def work(i: int, decoding: Decoding) -> GenerateWork:
        return GenerateWork(rows[i], ("tenant", f"task-{i}"), decoding, 8)

    unseeded = Decoding(do_sample=True, temperature=2.0)
    batches = [  # the seeded row's place in the batch, and the batch
        (0, [work(0, seeded)]),
        (
            0,
            [
                work(0, seeded),
                work(1, Decoding()),
                work(2, unseeded),
                work(3, unseeded),
                work(4, Decoding(num_beams=2)),
            ],
        ),
        (2, [work(5, seeded), work(2, Decoding()), work(0, seeded), work(1, unseeded), work(3, seeded)]),
    ]
    runner = BatchRunner(model)
    assert [runner(batch)[place] for place, batch in batches] == [alone] * len(batches)


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
