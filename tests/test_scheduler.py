"""The engine's policy without a model: `Scheduler` plans passes, and a stand-in runner answers each plan as the
model runner would (a token per row in the step, scores for each piece, beam rows ending after their steps)."""

from __future__ import annotations

import math
from collections import Counter

import torch

from server.engine.limits import EngineLimits
from server.engine.protocol import (
    BeamRow,
    ClassifyRow,
    Event,
    Failed,
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
from server.engine.scheduler import BeamPiece, Outcome, Plan, Scheduler, ScorePiece, cache_side

EOS = 1
TOKEN = 7  # what every row generates here: never end-of-sequence
D_MODEL = 4


def limits(rows: int = 4, budget: int = 100, cached: int = 1 << 20, stream_budget: int | None = None) -> EngineLimits:
    return EngineLimits(
        max_active_rows=rows, max_cached_tokens=cached, max_batch_size=32, max_batch_tokens=16384,
        pass_budget_tokens=budget, stream_pass_budget_tokens=budget if stream_budget is None else stream_budget,
    )  # fmt: skip


def row_input(tokens: int, prompt: int = 2) -> RowInput:
    return RowInput(torch.zeros(prompt, D_MODEL), list(range(10, 10 + tokens - prompt)))


def generate(
    request_id: int, tenant: str, new_tokens: int = 1000, tokens: int = 10, streamed: bool = False
) -> GenerateRow:
    return GenerateRow(
        request_id, tenant, row_input(tokens), Sampling(), new_tokens, ignore_eos=True, streamed=streamed
    )


class Driven:
    """A scheduler whose plans are answered at once, as the model runner would."""

    def __init__(self, engine_limits: EngineLimits) -> None:
        self.scheduler = Scheduler(engine_limits, EOS)
        self.plans: list[Plan] = []
        self.events: list[Event] = []
        self.stats: list[StepStats] = []
        self.beam_steps: Counter[int] = Counter()

    def submit(self, *requests: GenerateRow | ClassifyRow | BeamRow) -> None:
        self.scheduler.add(list(requests))

    def run_pass(self) -> Plan:
        plan = self.scheduler.schedule(now=0.0)
        outcome = Outcome(tokens={request_id: TOKEN for request_id in plan.step})
        for piece in plan.pieces:
            request_id = piece.request.request_id
            if isinstance(piece, ScorePiece):
                outcome.scores[request_id] = [-float(piece.first + i) for i in range(piece.count)]
            else:
                self.beam_steps[request_id] += 1
                if self.beam_steps[request_id] > piece.request.max_new_tokens:  # its steps, and the first's encoding
                    outcome.generated[request_id] = ([TOKEN] * piece.request.max_new_tokens, "length")
        events, stats = self.scheduler.update(plan, outcome)
        self.plans.append(plan)
        self.events += events
        self.stats.append(stats)
        return plan

    def places(self) -> Counter[str]:
        return self.scheduler.places_by_tenant()

    def of(self, request_id: int) -> list[Event]:
        return [e for e in self.events if e.request_id == request_id]


def test_a_tenant_arriving_behind_a_flood_joins_at_the_next_pass() -> None:
    driven = Driven(limits(rows=4))
    driven.submit(*(generate(i, "a") for i in range(40)))
    for _ in range(3):
        driven.run_pass()
    assert driven.places() == {"a": 4}
    driven.submit(generate(100, "b"))
    plan = driven.run_pass()
    assert [row.request_id for row in plan.join] == [100]
    assert plan.park == [3]  # a's newest row gave its place back
    assert driven.places() == {"a": 3, "b": 1}
    assert isinstance(driven.of(100)[0], Joined) and isinstance(driven.of(100)[1], Token)
    for _ in range(10):  # no place changes hands again: a holds only one more than b
        assert not driven.run_pass().park
    assert driven.places() == {"a": 3, "b": 1}


def test_three_flooding_tenants_share_the_places_equally() -> None:
    driven = Driven(limits(rows=4))
    short = 3  # rows end and others take their place, so places change hands all the time
    driven.submit(*(generate(i, "a", short) for i in range(100)))
    driven.run_pass()
    driven.submit(*(generate(1000 + i, "b", short) for i in range(100)))
    driven.submit(*(generate(2000 + i, "c", short) for i in range(100)))
    held: Counter[str] = Counter()
    for _ in range(100):
        driven.run_pass()
        places = driven.places()
        assert max(places.values()) - min(places[t] for t in "abc") <= 1, places
        held.update(places)
    assert max(held.values()) - min(held.values()) <= 100  # within one place on average over 100 passes


def test_a_parked_row_resumes_and_ends_with_all_its_tokens() -> None:
    driven = Driven(limits(rows=2))
    driven.submit(generate(0, "a", new_tokens=6), generate(1, "a", new_tokens=6))
    driven.run_pass()
    driven.run_pass()
    driven.submit(generate(2, "b", new_tokens=2))
    plan = driven.run_pass()
    assert plan.park == [1] and [r.request_id for r in plan.join] == [2]
    while driven.scheduler.has_work:
        driven.run_pass()
    assert len([e for e in driven.of(1) if isinstance(e, Joined)]) == 1  # resuming is not joining again
    assert [e.token_id for e in driven.of(1) if isinstance(e, Token)] == [TOKEN] * 6
    last = driven.of(1)[-1]
    assert isinstance(last, Finished) and last.reason == "length"
    resumed = next(p for p in driven.plans if 1 in p.resume)
    assert [r.request_id for r in resumed.join] == [1]


def test_a_classify_row_takes_ceil_of_its_tokens_over_the_budget_passes_with_steps_between() -> None:
    budget = 100
    driven = Driven(limits(budget=budget))
    driven.submit(generate(0, "victim"))
    driven.run_pass()
    labels = [[5] * 9 for _ in range(40)]  # 40 candidates of 9 tokens: 360 positions, plus the row's 10 encoder tokens
    classify = ClassifyRow(1, "attacker", row_input(10), labels)
    tokens = 10 + 40 * 9
    driven.submit(classify)
    passes = 0
    while not any(isinstance(e, Scores) for e in driven.events):
        plan = driven.run_pass()
        passes += 1
        assert plan.step == [0]  # the victim's row steps in every pass
        assert sum(_cost(piece) for piece in plan.pieces) <= budget
    assert passes == math.ceil(tokens / budget)
    (scores,) = [e for e in driven.events if isinstance(e, Scores)]
    assert scores.scores == [-float(i) for i in range(40)]


def test_while_a_row_in_the_step_streams_each_pass_keeps_to_the_stream_budget() -> None:
    """Each pass's work is a gap between a streamed row's tokens; rows answered whole get the larger budget."""
    budget, stream_budget = 400, 100
    driven = Driven(limits(budget=budget, stream_budget=stream_budget))
    driven.submit(generate(0, "victim", new_tokens=3, streamed=True))
    driven.run_pass()
    labels = [[5] * 9 for _ in range(80)]  # 80 candidates of 9 tokens, plus the row's 10 encoder tokens: 730
    driven.submit(ClassifyRow(1, "attacker", row_input(10), labels))
    spent: list[tuple[bool, int]] = []
    while not any(isinstance(e, Scores) for e in driven.events):
        streaming = bool(driven.scheduler.placed)  # the victim's row, until its 3 tokens are out
        spent.append((streaming, driven.run_pass().budget_spent))
    assert [s for streaming, s in spent if streaming] == [10 + 9 * 10, 9 * 11]  # within 100 each
    assert [s for streaming, s in spent if not streaming] == [9 * 44, 9 * 15]  # the larger budget, once it left
    assert sum(s for _, s in spent) == 10 + 80 * 9


def _cost(piece: ScorePiece | BeamPiece) -> int:
    assert isinstance(piece, ScorePiece)
    encoder = piece.request.row.num_tokens if piece.first == 0 else 0
    return encoder + piece.count * max(map(len, piece.candidates))


def test_a_beam_row_takes_one_step_per_pass_beside_the_decoding_rows() -> None:
    driven = Driven(limits())
    driven.submit(generate(0, "victim"))
    driven.submit(BeamRow(1, "attacker", row_input(10), num_beams=4, max_new_tokens=5))
    passes = 0
    while not any(isinstance(e, Generated) for e in driven.events):
        plan = driven.run_pass()
        passes += 1
        assert [type(p) for p in plan.pieces] == [BeamPiece] and plan.step == [0]
    assert passes == 6  # five steps, the first after the encoder pass


def test_a_pass_takes_one_beam_step_at_most_and_tenants_take_turns() -> None:
    """A beam step is a whole step of transformers' beam search: its fixed cost is not in its token count, so two
    of them in a pass would double every other row's step time whatever budget is left."""
    driven = Driven(limits(budget=10_000))
    driven.submit(generate(0, "victim"))
    driven.submit(*(BeamRow(i, "a", row_input(10), num_beams=4, max_new_tokens=5) for i in (1, 2)))
    driven.submit(BeamRow(3, "b", row_input(10), num_beams=4, max_new_tokens=5))
    stepped: list[int] = []
    while sum(isinstance(e, Generated) for e in driven.events) < 3:
        plan = driven.run_pass()
        assert len(plan.pieces) == 1 and plan.step == [0]
        stepped.append(plan.pieces[0].request.request_id)
    assert stepped[:4] == [1, 3, 1, 3]  # tenants take turns; a tenant's own beam rows run in order
    assert len(stepped) == 3 * 6  # every step of every row ran, one per pass


def test_every_pass_stays_within_the_budget_whatever_the_mix() -> None:
    budget = 64
    driven = Driven(limits(rows=8, budget=budget))
    driven.submit(*(generate(i, "a", 5, tokens=30) for i in range(20)))
    driven.submit(ClassifyRow(100, "b", row_input(20), [[5] * 4] * 30))
    driven.submit(BeamRow(101, "c", row_input(20), num_beams=4, max_new_tokens=8))
    for _ in range(60):
        plan = driven.run_pass()
        assert plan.budget_spent <= budget
    assert any(isinstance(e, Scores) for e in driven.events)
    assert any(isinstance(e, Generated) for e in driven.events)


def test_what_the_cache_holds_is_what_admission_charged_and_it_shrinks() -> None:
    """A long-tailed mix of lengths: the rectangle the cache holds never passes the budget (so fewer rows run
    beside the long one), and when the long row leaves the cache shrinks to what the short rows need."""
    budget = 4000
    driven = Driven(limits(rows=64, cached=budget))
    driven.submit(GenerateRow(0, "a", row_input(500), Sampling(), 20, ignore_eos=True))
    driven.submit(*(generate(i, "a", new_tokens=40, tokens=12) for i in range(1, 11)))
    for _ in range(30):
        driven.run_pass()
        assert driven.scheduler.cache.tokens <= budget
    assert max(s.placed_rows for s in driven.stats[:19]) < 10  # the long row's width is charged to each row
    held_with_long_row = max(s.cache_tokens for s in driven.stats[:19])
    assert held_with_long_row > 0.75 * budget
    assert driven.stats[-1].placed_rows == 10  # it left: every short row runs
    assert driven.stats[-1].cache_tokens <= 1.25 * 1.25 * 10 * (12 + 40) < held_with_long_row / 4


def test_gauges_read_zero_once_the_engine_is_idle() -> None:
    driven = Driven(limits())
    driven.submit(generate(0, "a", new_tokens=2), generate(1, "a", new_tokens=3))
    while driven.scheduler.has_work:
        driven.run_pass()
    last = driven.stats[-1]
    assert (last.placed_rows, last.waiting_rows, last.pending_rows) == (0, 0, 0)


def test_cache_sides_are_at_most_a_quarter_over_what_is_needed() -> None:
    for needed in range(1, 5000):
        side = cache_side(needed)
        assert needed <= side <= 1.25 * needed


def test_rows_larger_than_the_engine_takes_are_refused_on_arrival() -> None:
    """The API never sends them; an engine client that does gets `invalid_input`, and the rest is served."""
    driven = Driven(limits(cached=2000))
    huge_label = ClassifyRow(1, "a", row_input(10), [[5] * 20000])
    long_row = GenerateRow(2, "a", row_input(10), Sampling(), 5000)
    driven.submit(huge_label, long_row, generate(3, "a", new_tokens=2))
    driven.run_pass()
    failed = {e.request_id: e for e in driven.events if isinstance(e, Failed)}
    assert set(failed) == {1, 2} and all(e.code == "invalid_input" for e in failed.values())
    assert [e.token_id for e in driven.of(3) if isinstance(e, Token)] == [TOKEN]
