"""The continuous engine's exactness: rows that join a running batch at different steps, of different tasks and
prompt lengths, produce what `transformers` produces for each row alone.

The reference is `Alone` (tests/test_mixed_batch.py): `transformers`' own forward and `generate` with the row's
`inputs_embeds`, sharing none of the engine's code. The engine is driven pass by pass (`run_once`), so the
joining steps are exact: B joins while A is at step 10, C while both run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import pytest
import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from server.engine.engine import Engine
from server.engine.limits import EngineLimits
from server.engine.protocol import (
    BeamRow,
    ClassifyRow,
    Event,
    Finished,
    Generated,
    GenerateRow,
    Joined,
    RowInput,
    Sampling,
    Scores,
    StepStats,
    Token,
)
from server.engine.scheduler import Plan
from server.serving.decoder import LeanDecoder
from server.serving.model import FrozenT5, Row
from server.testing.reference import TOLERANCE, Alone, mixed_rows

LIMITS = EngineLimits(max_active_rows=64, max_cached_tokens=1 << 20, max_batch_size=32, max_batch_tokens=16384)


@pytest.fixture(params=["tiny", "t5_small"])
def model(request: pytest.FixtureRequest) -> FrozenT5:
    return request.getfixturevalue(request.param)


class Driven:
    """An engine driven pass by pass, its events gathered per request."""

    def __init__(self, model: FrozenT5, limits: EngineLimits = LIMITS) -> None:
        self.events: dict[int, list[Event]] = defaultdict(list)
        self.stats: list[StepStats] = []
        self.engine = Engine(model, limits, self._emit)

    def _emit(self, events: list[Event], stats: StepStats) -> None:
        for event in events:
            self.events[event.request_id].append(event)
        self.stats.append(stats)

    def passes(self, count: int) -> None:
        for _ in range(count):
            self.engine.run_once()

    def until_done(self, limit: int = 1000) -> None:
        for _ in range(limit):
            if self.engine.idle:
                return
            self.engine.run_once()
        raise AssertionError("the engine did not finish")

    def tokens(self, request_id: int) -> list[int]:
        return [e.token_id for e in self.events[request_id] if isinstance(e, Token)]

    def finish(self, request_id: int) -> str:
        (final,) = [e for e in self.events[request_id] if isinstance(e, Finished)]
        return final.reason


def generate_row(
    request_id: int,
    row: Row,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    ignore_eos: bool = False,
    deadline: float | None = None,
    tenant: str = "t",
) -> GenerateRow:
    return GenerateRow(
        request_id, tenant, RowInput(row.prompt, row.input_ids), sampling, max_new_tokens, ignore_eos, deadline
    )


def test_rows_joining_at_different_steps_equal_generate_alone(model: FrozenT5) -> None:
    rows = mixed_rows(model)
    driven = Driven(model)
    driven.engine.submit([generate_row(0, rows[0], 24)])
    driven.passes(10)  # A joins and takes 10 steps (a row joins and steps in the same pass)
    assert len(driven.tokens(0)) == 10
    driven.engine.submit([generate_row(1, rows[1], 24)])
    driven.passes(4)
    driven.engine.submit([generate_row(i, rows[i], 24) for i in range(2, len(rows))])
    driven.until_done()
    for i, row in enumerate(rows):
        expected = Alone(model, row).generate(24)
        assert driven.tokens(i) == expected, f"row {i}"
        assert driven.finish(i) == ("eos" if expected[-1] == model.eos_token_id else "length")


@torch.inference_mode()
def test_each_step_logits_equal_the_row_alone(model: FrozenT5) -> None:
    """Per-step logits of rows at different steps in one decoder call, against `transformers`' forward of the row
    alone over the same prefix (teacher-forced with the tokens the engine chose)."""
    rows = mixed_rows(model)[:3]
    decoder = LeanDecoder(model.model)
    cache = decoder.new_cache()
    start = model.model.config.decoder_start_token_id
    prefixes: dict[int, list[int]] = {}
    logits_seen: dict[int, list[torch.Tensor]] = defaultdict(list)

    def join(i: int) -> None:
        hidden, mask = model.encode([rows[i]])
        decoder.join(cache, hidden, mask)
        prefixes[i] = [start]

    def step() -> None:
        order = list(prefixes)  # slots in join order (nothing leaves here)
        logits = decoder.step(cache, torch.tensor([prefixes[i][-1] for i in order]))
        for slot, i in enumerate(order):
            logits_seen[i].append(logits[slot].clone())
            prefixes[i].append(int(logits[slot, : model.decodable_vocab].argmax()))

    join(0)
    for _ in range(6):
        step()
    join(1)
    for _ in range(3):
        step()
    join(2)
    for _ in range(5):
        step()
    for i, row in enumerate(rows):
        alone = Alone(model, row)
        decoder_ids = torch.tensor([prefixes[i][:-1]])
        reference = model.model(inputs_embeds=alone.embeds, attention_mask=alone.mask, decoder_input_ids=decoder_ids)
        got = torch.stack(logits_seen[i])
        assert (got - reference.logits[0]).abs().max().item() <= TOLERANCE, f"row {i}"


def test_seeded_sampled_rows_draw_the_same_tokens_in_any_company(tiny: FrozenT5) -> None:
    rows = mixed_rows(tiny)
    seeded = Sampling(do_sample=True, temperature=0.9, top_p=0.9, seed=1234)
    alone = Driven(tiny)
    alone.engine.submit([generate_row(0, rows[0], 30, sampling=seeded, ignore_eos=True)])
    alone.until_done()
    crowd = Driven(tiny)
    crowd.engine.submit([generate_row(1, rows[1], 30, sampling=Sampling(do_sample=True))])
    crowd.passes(3)
    crowd.engine.submit([generate_row(0, rows[0], 30, sampling=seeded, ignore_eos=True)])
    crowd.passes(2)
    crowd.engine.submit([generate_row(2, rows[2], 8), generate_row(3, rows[3], 30, sampling=Sampling(True, 1.5))])
    crowd.until_done()
    assert len(alone.tokens(0)) == 30
    assert crowd.tokens(0) == alone.tokens(0)
    other_seed = Driven(tiny)
    other_seed.engine.submit([generate_row(0, rows[0], 30, sampling=Sampling(True, 0.9, 0.9, 99), ignore_eos=True)])
    other_seed.until_done()
    assert other_seed.tokens(0) != alone.tokens(0)  # the seed is what decides, not chance


def test_ignore_eos_runs_to_max_new_tokens(tiny: FrozenT5) -> None:
    driven = Driven(tiny)
    driven.engine.submit([generate_row(i, row, 40, ignore_eos=True) for i, row in enumerate(mixed_rows(tiny))])
    driven.until_done()
    for i in range(len(mixed_rows(tiny))):
        assert len(driven.tokens(i)) == 40
        assert tiny.eos_token_id not in driven.tokens(i)
        assert driven.finish(i) == "length"


def test_a_row_leaves_the_step_it_finishes_and_a_waiting_row_takes_its_place(tiny: FrozenT5) -> None:
    rows = mixed_rows(tiny)
    limits = EngineLimits(max_active_rows=2, max_cached_tokens=1 << 20, max_batch_size=32, max_batch_tokens=16384)
    driven = Driven(tiny, limits)
    driven.engine.submit([generate_row(0, rows[0], 3, ignore_eos=True), generate_row(1, rows[1], 50, ignore_eos=True)])
    driven.engine.submit([generate_row(2, rows[2], 5, ignore_eos=True)])
    driven.passes(1)  # rows 0 and 1 join and step; row 2 waits for a place
    assert [type(e) for e in driven.events[2]] == []
    driven.passes(3)  # row 0's third token: it leaves; row 2 joins at the next pass
    assert driven.finish(0) == "length"
    assert max(s.active_rows for s in driven.stats) == 2
    driven.passes(1)
    assert isinstance(driven.events[2][0], Joined)
    assert len(driven.tokens(1)) == 5  # row 1 never waited
    driven.until_done()
    assert len(driven.tokens(2)) == 5 and driven.finish(2) == "length"


def test_cancelled_and_expired_rows_leave_at_the_next_step(tiny: FrozenT5) -> None:
    rows = mixed_rows(tiny)
    driven = Driven(tiny)
    driven.engine.submit(
        [generate_row(0, rows[0], 200, ignore_eos=True), generate_row(1, rows[1], 200, ignore_eos=True)]
    )
    driven.engine.submit([generate_row(2, rows[2], 200, ignore_eos=True, deadline=0.0)])
    driven.passes(5)
    driven.engine.cancel([0])
    driven.passes(1)
    assert driven.finish(0) == "cancelled"
    assert driven.finish(2) == "deadline" and driven.tokens(2) == []
    assert len(driven.tokens(0)) == 5
    driven.passes(2)
    assert driven.stats[-1].active_rows == 1
    assert sum(s.left.get("cancelled", 0) for s in driven.stats) == 1


def test_admission_waits_for_cached_token_room(tiny: FrozenT5) -> None:
    """Many long rows and a budget for two at a time: they run two by two, and every one finishes."""
    rows = mixed_rows(tiny)
    budget = 2 * (rows[3].num_tokens + 20)
    limits = EngineLimits(max_active_rows=64, max_cached_tokens=budget, max_batch_size=32, max_batch_tokens=16384)
    driven = Driven(tiny, limits)
    driven.engine.submit([generate_row(i, rows[3], 20, ignore_eos=True) for i in range(12)])
    driven.until_done()
    assert max(s.active_rows for s in driven.stats) <= 2
    assert all(driven.finish(i) == "length" and len(driven.tokens(i)) == 20 for i in range(12))


def test_classify_and_beam_rows_equal_the_row_alone(tiny: FrozenT5) -> None:
    """A classify row is scored in the next pass; a beam row is `transformers`' beam search on the row alone, run
    one step per pass: the long row beside them gets a token in every pass meanwhile."""
    rows = mixed_rows(tiny)
    labels = [tiny.tokenize([text])[0] for text in ("positive", "negative")]
    driven = Driven(tiny)
    driven.engine.submit([generate_row(0, rows[0], 100, ignore_eos=True)])
    driven.passes(3)
    driven.engine.submit([ClassifyRow(1, "t", RowInput(rows[1].prompt, rows[1].input_ids), labels)])
    driven.engine.submit([BeamRow(2, "t", RowInput(rows[2].prompt, rows[2].input_ids), 3, 12)])
    driven.passes(1)
    (scores,) = [e for e in driven.events[1] if isinstance(e, Scores)]
    passes = 4
    while not any(isinstance(e, Generated) for e in driven.events[2]):
        driven.passes(1)
        passes += 1
        assert len(driven.tokens(0)) == passes  # never held up by the beam row
    (beams,) = [e for e in driven.events[2] if isinstance(e, Generated)]
    alone = Alone(tiny, rows[1])
    assert scores.scores == pytest.approx([alone.score(label) for label in labels], abs=TOLERANCE)
    assert beams.token_ids == Alone(tiny, rows[2]).generate(12, num_beams=3)
    assert passes > 4 + 1  # it took several passes: one step each


def test_classify_rows_scored_together_in_pieces_equal_each_row_alone(model: FrozenT5) -> None:
    """Every classify piece of a pass shares one encoder call and one scoring call, rows of different lengths
    padded to the longest; a budget smaller than the rows cuts them into pieces, so passes mix rows starting
    with rows resuming: every score equals the row scored alone."""
    rows = mixed_rows(model)
    labels = [model.tokenize([text])[0] for text in ("positive", "negative", "neutral", "a much longer label")]
    budget = max(row.num_tokens for row in rows) + 2 * max(map(len, labels))
    driven = Driven(model, replace(LIMITS, pass_budget_tokens=budget))
    plans: list[Plan] = []
    run = driven.engine.runner.run
    driven.engine.runner.run = lambda plan: (plans.append(plan), run(plan))[1]  # type: ignore[method-assign]
    driven.engine.submit(
        [ClassifyRow(i, "t", RowInput(row.prompt, row.input_ids), labels) for i, row in enumerate(rows)]
    )
    driven.until_done()
    firsts = [{piece.first == 0 for piece in plan.pieces} for plan in plans if len(plan.pieces) > 1]
    assert {True, False} in firsts  # a pass scored rows starting and rows resuming together
    for i, row in enumerate(rows):
        (scores,) = [e for e in driven.events[i] if isinstance(e, Scores)]
        alone = Alone(model, row)
        for score, label in zip(scores.scores, labels, strict=True):  # a sum of len(label) log-probabilities
            assert score == pytest.approx(alone.score(label), abs=TOLERANCE * len(label))


def test_a_parked_row_resumes_exactly(tiny: FrozenT5) -> None:
    """Tenant a holds both places; b's row takes the place of a's newest, which is parked (its cache kept aside)
    and resumes when b's row ends: a's greedy and seeded sampled rows make the tokens they make never parked."""
    rows = mixed_rows(tiny)
    limits = EngineLimits(max_active_rows=2, max_cached_tokens=1 << 20, max_batch_size=32, max_batch_tokens=16384)
    sampled = Sampling(True, 0.9, 0.9, 7)

    def a_rows() -> list[GenerateRow]:
        return [
            generate_row(0, rows[0], 30, tenant="a"),
            generate_row(1, rows[1], 30, sampling=sampled, ignore_eos=True, tenant="a"),
        ]

    never_parked = Driven(tiny, limits)
    never_parked.engine.submit(a_rows())
    never_parked.until_done()
    driven = Driven(tiny, limits)
    driven.engine.submit(a_rows())
    driven.passes(5)
    driven.engine.submit([generate_row(2, rows[2], 6, ignore_eos=True, tenant="b")])
    driven.passes(1)
    assert len(driven.tokens(1)) == 5 and len(driven.tokens(2)) == 1  # row 1 parked, row 2 in its place
    driven.until_done()
    assert driven.tokens(0) == Alone(tiny, rows[0]).generate(30)
    assert driven.tokens(1) == never_parked.tokens(1)
    assert len(driven.tokens(1)) == 30 and driven.finish(1) == "length"


@torch.inference_mode()
def test_logprobs_equal_transformers_scores_for_the_row_alone(model: FrozenT5) -> None:
    """Each token's log-probability and its top alternatives are `log_softmax` of the scores `transformers`
    computes for the row alone over the same prefix, after the processors the row was chosen with: undecodable
    ids suppressed, and for a sampled row its temperature, top-k 50 and top-p warpers."""
    rows = mixed_rows(model)[:3]
    sampled = Sampling(True, 0.7, 0.9, 5)
    settings = [Sampling(), sampled, Sampling(True, 1.3, 1.0, 6)]
    driven = Driven(model)
    driven.engine.submit(
        [
            GenerateRow(i, "t", RowInput(row.prompt, row.input_ids), settings[i], 10, True, None, "", logprobs=4)
            for i, row in enumerate(rows)
        ]
    )
    driven.until_done()
    for i, row in enumerate(rows):
        tokens = [e for e in driven.events[i] if isinstance(e, Token)]
        alone = Alone(model, row)
        start = model.model.config.decoder_start_token_id
        prefix = torch.tensor([[start] + [t.token_id for t in tokens[:-1]]], device=model.device)
        logits = alone.hf(inputs_embeds=alone.embeds, attention_mask=alone.mask, decoder_input_ids=prefix).logits[0]
        scores = logits.float()
        scores[:, model.decodable_vocab :] = float("-inf")
        warpers = _warpers(settings[i])
        for step, token in enumerate(tokens):
            step_scores = scores[step : step + 1].clone()
            step_scores[0, model.eos_token_id] = float("-inf")  # the rows ignore end-of-sequence
            for warper in warpers:
                step_scores = warper(prefix[:, : step + 1], step_scores)
            expected = torch.log_softmax(step_scores[0], dim=-1)
            assert token.logprob == pytest.approx(expected[token.token_id].item(), abs=TOLERANCE), (i, step)
            top = [v for v in torch.topk(expected, 4).values.tolist() if v > -math.inf]  # ruled-out tokens: none
            assert token.top_logprobs == pytest.approx(top, abs=TOLERANCE)
            assert token.top_ids is not None and len(token.top_ids) == len(top)
            assert all(
                expected[t].item() == pytest.approx(v, abs=TOLERANCE)
                for t, v in zip(token.top_ids, token.top_logprobs, strict=True)
            )


def _warpers(sampling: Sampling) -> list[LogitsProcessor]:
    if not sampling.do_sample:
        return []
    warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(sampling.temperature), TopKLogitsWarper(50)]
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers
