"""`Scheduler`: the engine's policy, with no model. It decides what the next pass does and what the pass's
outputs mean; `ModelRunner` (server/engine/runner.py) does the work; `Engine` (server/engine/engine.py) loops.

    schedule(now) -> Plan, carried out by the runner in this order:
        leave    rows that end before the step: cancelled, or past their deadline
        park     rows preempted for a tenant below its share of places (their cache is kept aside, exactly)
        join     waiting rows that take a place: encoded (or restored, when they were parked)
        pieces   classify scoring and beam search steps, cut to fit the pass's budget
        step     one decoder step for every row in place
    update(plan, outcome) -> the pass's events and stats

Budget: besides its decoder step (one token per row in place), a pass does at most `pass_budget_tokens` of
model work: a joining row costs its encoder tokens, a classify piece its row's encoder tokens (first piece) and
the decoder positions it scores, a beam step its beams (and the row's encoder tokens on its first step). Work
larger than a budget is cut into pieces that run in later passes, between decoder steps. A pass takes one beam
step at most, whatever budget is left: a beam step is a whole step of transformers' beam search, whose fixed cost
(about 7 ms on the `tiny` model, where the engine's own decoder step for a few rows takes about 1.5) no token
count shows; beam rows take turns, tenants round-robin, a tenant's own in order. The first item of a
pass always runs, so a row larger than the budget still runs, alone in its pass. Joins and pieces take turns
at going first, so neither kind starves the other.

While a row in the step streams, the budget is `stream_pass_budget_tokens` (smaller): every pass's work is a
gap between that row's tokens. Otherwise the rows in the step are answered whole, and a stall only adds to their
total latency, which a larger budget makes shorter under load: more rows join each pass, so each decoder step
is fuller and a row's share of it cheaper.

Places: the tenants with rows in place or waiting share `max_active_rows`. When no place is free, a waiting
tenant takes the place of the newest row of the tenant holding the most, if that tenant holds at least two
more than the waiting one; the parked row goes back to the head of its tenant's queue and resumes exactly where
it stopped. Among waiting tenants, the one holding fewest places joins first (round-robin among equals).

Memory: the row cache is a rectangle, rows x (encoder positions + decoder positions), each side rounded up by
`cache_side` (at most 25% over). Admission charges the rectangle the cache will hold with the joining row, so
what is charged (`max_cached_tokens`) is what is held; the rectangle shrinks when rows leave.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from server.engine.limits import EngineLimits
from server.engine.protocol import (
    BeamRow,
    ClassifyRow,
    Embedded,
    EmbedRow,
    EngineRequest,
    Event,
    Failed,
    FailureCode,
    Finished,
    FinishReason,
    Generated,
    GenerateRow,
    Joined,
    Scores,
    StepStats,
    Token,
    TokenLogprobs,
)

Q = TypeVar("Q")
SHRINK_SLACK = 1.5  # a cache side larger than this times what its rows need is cut down to size


class TenantQueues(Generic[Q]):
    """Items waiting, one queue per tenant; the tenants in round-robin order (whoever was served goes last)."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Q]] = OrderedDict()
        self.size = 0

    def put(self, tenant: str, item: Q) -> None:
        self._queues.setdefault(tenant, deque()).append(item)
        self.size += 1

    def put_front(self, tenant: str, item: Q) -> None:
        """Back to the head of its tenant's queue (a parked row, a row with pieces left)."""
        self._queues.setdefault(tenant, deque()).appendleft(item)
        self.size += 1

    def tenants(self) -> list[str]:
        return list(self._queues)

    def items(self, tenant: str) -> list[Q]:
        return list(self._queues.get(tenant, ()))

    def rotate(self, tenant: str) -> None:
        """The tenant goes to the back of the round (if it still has items)."""
        if tenant in self._queues:
            self._queues.move_to_end(tenant)

    def head(self, tenant: str) -> Q:
        return self._queues[tenant][0]

    def pop(self, tenant: str) -> Q:
        items = self._queues.pop(tenant)
        item = items.popleft()
        if items:
            self._queues[tenant] = items  # to the back of the round
        self.size -= 1
        return item

    def remove(self, tenant: str, item: Q) -> None:
        """By identity: rows hold tensors, which do not compare as values."""
        items = self._queues[tenant]
        del items[next(i for i, other in enumerate(items) if other is item)]
        self.size -= 1
        if not items:
            del self._queues[tenant]

    def __iter__(self) -> Iterator[tuple[str, Q]]:
        return ((tenant, item) for tenant, items in list(self._queues.items()) for item in list(items))


@dataclass(eq=False)
class Placed:
    """A generate row holding a place in the decoder step."""

    request: GenerateRow
    seq: int  # order of admission: the newest is parked first


@dataclass(eq=False)
class Scoring:
    """A classify row's candidates, scored a piece at a time."""

    request: ClassifyRow
    cut: int = 0  # candidates given to pieces so far
    scores: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scores = [math.nan] * len(self.request.targets)

    @property
    def started(self) -> bool:
        return self.cut > 0


@dataclass(eq=False)
class Beaming:
    request: BeamRow
    started: bool = False


@dataclass(eq=False)
class Embedding:
    request: EmbedRow
    started: bool = False


Pending = Scoring | Beaming | Embedding


@dataclass(frozen=True)
class ScorePiece:
    """Score candidates `[first, first + len(candidates))` of a classify row (`last`: its runner state may go)."""

    request: ClassifyRow
    first: int
    count: int
    last: bool

    @property
    def candidates(self) -> list[list[int]]:
        return self.request.targets[self.first : self.first + self.count]


@dataclass(frozen=True)
class BeamPiece:
    """One step of a beam row's search (its first includes its encoder pass)."""

    request: BeamRow


@dataclass(frozen=True)
class EmbedPiece:
    """An embed row's encoder pass (a row is never larger than a model call: it is not cut)."""

    request: EmbedRow


Piece = ScorePiece | BeamPiece | EmbedPiece


@dataclass(frozen=True)
class CacheShape:
    rows: int = 0
    encoder_positions: int = 0
    decoder_positions: int = 0

    @property
    def tokens(self) -> int:
        return self.rows * (self.encoder_positions + self.decoder_positions)


@dataclass
class Plan:
    leave: dict[int, FinishReason] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)  # rows that ended in the last pass: their places are freed
    park: list[int] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)  # rows whose runner state (parked cache, encoder output) goes
    join: list[GenerateRow] = field(default_factory=list)
    resume: set[int] = field(default_factory=set)  # the joining rows that were parked
    pieces: list[Piece] = field(default_factory=list)
    cache: CacheShape = CacheShape()
    step: list[int] = field(default_factory=list)  # the rows in the decoder step, by request id
    budget_spent: int = 0

    @property
    def empty(self) -> bool:
        return not (self.leave or self.free or self.park or self.drop or self.join or self.pieces or self.step)


@dataclass
class Outcome:
    """What the runner did with a plan."""

    tokens: dict[int, int] = field(default_factory=dict)  # a stepped row's new token
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)  # for the rows that asked
    failed: dict[int, tuple[FailureCode, str]] = field(default_factory=dict)  # rows that could not be served
    scores: dict[int, list[float]] = field(default_factory=dict)  # a score piece's scores
    generated: dict[int, tuple[list[int], FinishReason]] = field(default_factory=dict)  # beam rows that ended
    embeddings: dict[int, list[float]] = field(default_factory=dict)  # embed rows' vectors
    step_seconds: float = 0.0


class Budget:
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.spent = 0
        self.items = 0

    @property
    def left(self) -> int:
        return self.tokens - self.spent

    def allows(self, cost: int) -> bool:
        """The first item of a pass always runs; the others must fit."""
        return self.items == 0 or self.spent + cost <= self.tokens

    def charge(self, cost: int) -> None:
        self.spent += cost
        self.items += 1


class Scheduler:
    def __init__(self, limits: EngineLimits, eos_token_id: int) -> None:
        self.limits = limits
        self.eos_token_id = eos_token_id
        self.waiting: TenantQueues[GenerateRow] = TenantQueues()
        self.pending: TenantQueues[Pending] = TenantQueues()  # classify and beam rows with pieces to cut
        self.items: dict[int, Pending] = {}  # every classify and beam row until its result (or failure)
        self.sampled_beam: int | None = None  # the sampled beam row in progress
        self.placed: dict[int, Placed] = {}  # by request id, in order of admission
        self.generated: dict[int, int] = {}  # tokens each generate row has made (kept while it is parked)
        self.parked: set[int] = set()
        self.cancelled: set[int] = set()
        self.cache = CacheShape()
        self.ended: list[int] = []  # rows whose place the runner still holds (they ended in the last pass)
        self.unsent: list[Event] = []  # events to send with the next pass: rows refused (or ended) before scheduling
        self._seq = 0
        self._passes = 0

    # Requests in.

    def add(self, requests: list[EngineRequest]) -> None:
        for request in requests:
            problem = self._too_large(request)
            if problem is not None:
                self.unsent.append(Failed(request.request_id, "invalid_input", problem))
            elif isinstance(request, GenerateRow):
                self.waiting.put(request.tenant, request)
                self.generated[request.request_id] = 0
            else:
                item = pending_item(request)
                self.items[request.request_id] = item
                self.pending.put(request.tenant, item)

    def _too_large(self, request: EngineRequest) -> str | None:
        """The API refuses such rows before they get here; an engine client that did not is refused too."""
        limit = self.limits.max_batch_tokens
        work = request.row.num_tokens
        if isinstance(request, ClassifyRow):
            work += max(map(len, request.targets), default=0)
        elif isinstance(request, BeamRow):
            work *= request.num_beams
        if work > limit:
            return f"a row of {work} tokens of model work; the engine takes at most {limit}"
        if (
            isinstance(request, GenerateRow)
            and request.row.num_tokens + request.max_new_tokens > self.limits.max_cached_tokens
        ):
            return f"a row that alone needs more than the row cache's {self.limits.max_cached_tokens} token positions"
        return None

    def cancel(self, request_ids: list[int]) -> None:
        """Rows still here end at the next pass; ids of rows already gone are ignored."""
        self.cancelled.update(r for r in request_ids if r in self.generated or r in self.items)

    @property
    def has_work(self) -> bool:
        return bool(self.placed or self.waiting.size or self.items or self.unsent)

    def places_by_tenant(self) -> Counter[str]:
        return Counter(p.request.tenant for p in self.placed.values())

    # The plan.

    def schedule(self, now: float) -> Plan:
        plan = Plan(free=self.ended)
        self.ended = []
        self._leave_ended(plan, now)
        self._drop_ended_waiting(plan, now)
        budget = Budget(self._pass_budget())
        self._passes += 1
        if self._passes % 2:
            self._admit(plan, budget)
            self._cut_pieces(plan, budget)
        else:
            self._cut_pieces(plan, budget)
            self._admit(plan, budget)
        self.cache = self._shape_after(plan)
        plan.cache = self.cache
        plan.step = list(self.placed)
        plan.budget_spent = budget.spent
        return plan

    def _pass_budget(self) -> int:
        """The stream budget while a row in the step streams (a stall is a gap in its tokens), else the larger
        one: a row answered whole sees only its total latency, which fuller steps make shorter under load."""
        if any(placed.request.streamed for placed in self.placed.values()):
            return self.limits.stream_pass_budget_tokens
        return self.limits.pass_budget_tokens

    def _leave_ended(self, plan: Plan, now: float) -> None:
        for request_id, placed in list(self.placed.items()):
            reason = self._ended(placed.request, now)
            if reason is not None:
                plan.leave[request_id] = reason
                del self.placed[request_id]

    def _drop_ended_waiting(self, plan: Plan, now: float) -> None:
        """Waiting rows that ended never reach the model; cancelled classify and beam rows end silently."""
        for tenant, row in self.waiting:
            reason = self._ended(row, now)
            if reason is not None:
                self.waiting.remove(tenant, row)
                plan.leave[row.request_id] = reason
                if row.request_id in self.parked:
                    plan.drop.append(row.request_id)
        for request_id, item in list(self.items.items()):
            if request_id in self.cancelled:
                if item.started:
                    plan.drop.append(request_id)
                self._drop_item(request_id)
                self._forget(request_id)

    def _ended(self, row: GenerateRow, now: float) -> FinishReason | None:
        if row.request_id in self.cancelled:
            return "cancelled"
        if row.deadline is not None and now >= row.deadline:
            return "deadline"
        return None

    # Admission.

    def _admit(self, plan: Plan, budget: Budget) -> None:
        places = self.places_by_tenant()
        joined = 0
        while self.waiting.size and joined < self.limits.max_batch_size:
            tenant = min(self.waiting.tenants(), key=lambda t: places[t])  # ties: round-robin order
            row = self.waiting.head(tenant)
            if len(self.placed) >= self.limits.max_active_rows and not self._park_for(tenant, places, plan):
                return
            resumed = row.request_id in self.parked
            cost = 0 if resumed else row.row.num_tokens
            if not budget.allows(cost) or not self._fits_cache(row):
                return
            budget.charge(cost)
            self.waiting.pop(tenant)
            self._place(row)
            places[tenant] += 1
            joined += 1
            plan.join.append(row)
            if resumed:
                self.parked.discard(row.request_id)
                plan.resume.add(row.request_id)

    def _park_for(self, tenant: str, places: Counter[str], plan: Plan) -> bool:
        """Frees a place for `tenant` from the tenant holding the most, when it holds at least two more."""
        others = [t for t in places if t != tenant and places[t] > 0]
        if not others:
            return False
        holder = max(others, key=lambda t: places[t])
        if places[holder] < places[tenant] + 2:
            return False
        newest = max((p for p in self.placed.values() if p.request.tenant == holder), key=lambda p: p.seq)
        request_id = newest.request.request_id
        del self.placed[request_id]
        places[holder] -= 1
        self.parked.add(request_id)
        plan.park.append(request_id)
        self.waiting.put_front(holder, newest.request)
        return True

    def _place(self, row: GenerateRow) -> None:
        self._seq += 1
        self.placed[row.request_id] = Placed(row, self._seq)

    def _fits_cache(self, row: GenerateRow) -> bool:
        """A row alone may always run; with others, the rectangle the cache would hold must fit the budget."""
        if not self.placed:
            return True
        needed = self._needed([p.request for p in self.placed.values()] + [row])
        return needed.tokens <= self.limits.max_cached_tokens

    @staticmethod
    def _needed(rows: list[GenerateRow]) -> CacheShape:
        """The least the cache must hold for these rows, each side rounded up by `cache_side`."""
        if not rows:
            return CacheShape()
        return CacheShape(
            cache_side(len(rows)),
            cache_side(max(r.row.num_tokens for r in rows)),
            cache_side(max(r.max_new_tokens for r in rows)),
        )

    def _shape_after(self, plan: Plan) -> CacheShape:
        """The cache for the rows in place: as it is where that is large enough and not too large (no copy every
        time a row joins or leaves), else the least it must be."""
        needed = self._needed([p.request for p in self.placed.values()])
        if not needed.rows:
            return CacheShape()
        kept = CacheShape(
            *(
                now if least <= now <= SHRINK_SLACK * least else least
                for now, least in zip(
                    (self.cache.rows, self.cache.encoder_positions, self.cache.decoder_positions),
                    (needed.rows, needed.encoder_positions, needed.decoder_positions),
                    strict=True,
                )
            )
        )
        return kept if kept.tokens <= max(self.limits.max_cached_tokens, needed.tokens) else needed

    # Pieces.

    def _cut_pieces(self, plan: Plan, budget: Budget) -> None:
        """Round-robin over tenants, one piece per item per pass, until the budget is spent or nothing fits."""
        cut: set[int] = set()
        beam_stepped = False  # a pass takes one beam step at most: see the module's docstring
        while True:
            progressed = False
            for tenant in self.pending.tenants():
                for item in self.pending.items(tenant):
                    beam = isinstance(item, Beaming)
                    if item.request.request_id in cut or not self._may_start(item) or (beam and beam_stepped):
                        continue
                    piece, cost = self._piece(item, budget)
                    if piece is not None:
                        budget.charge(cost)
                        plan.pieces.append(piece)
                        cut.add(item.request.request_id)
                        beam_stepped |= beam
                        self.pending.rotate(tenant)
                        progressed = True
                    break  # a tenant's items are cut in order: one per round
            if not progressed:
                return

    def _may_start(self, item: Pending) -> bool:
        """Sampled beam search draws from the process's random state, which two such rows in progress at once
        would share: they run one at a time."""
        if not (isinstance(item, Beaming) and item.request.do_sample):
            return True
        if self.sampled_beam in (None, item.request.request_id):
            self.sampled_beam = item.request.request_id
            return True
        return False

    def _piece(self, item: Pending, budget: Budget) -> tuple[Piece | None, int]:
        request = item.request
        encoder = 0 if item.started else request.row.num_tokens
        if isinstance(item, Embedding):
            if not budget.allows(encoder):
                return None, 0
            item.started = True
            self.pending.remove(request.tenant, item)  # one piece: its vector is on its way
            return EmbedPiece(request), encoder
        if isinstance(item, Beaming):
            cost = encoder + request.num_beams
            if not budget.allows(cost):
                return None, 0
            item.started = True
            return BeamPiece(request), cost
        first = item.cut
        count = longest = 0
        for target in request.targets[first:]:  # as many candidates as the budget left holds, and at least one
            longest_with = max(longest, len(target))
            if count and encoder + (count + 1) * longest_with > budget.left:
                break
            count, longest = count + 1, longest_with
        cost = encoder + count * longest
        if not budget.allows(cost):
            return None, 0
        item.cut += count
        last = item.cut == len(request.targets)
        if last:
            self.pending.remove(request.tenant, item)  # nothing left to cut; its scores are on their way
        return ScorePiece(request, first, count, last), cost

    # The pass's outputs.

    def update(self, plan: Plan, outcome: Outcome) -> tuple[list[Event], StepStats]:
        events, self.unsent = self.unsent, []
        left: Counter[str] = Counter()
        tasks = len({self.placed[r].request.task for r in plan.step})
        for request_id, reason in plan.leave.items():
            self._finish(request_id, reason, events, left)
        events += [Joined(r.request_id) for r in plan.join if r.request_id not in plan.resume | outcome.failed.keys()]
        for piece in plan.pieces:
            if piece.request.request_id not in outcome.failed:
                self._update_piece(piece, outcome, events)
        for request_id in plan.step:
            if request_id in outcome.tokens:
                token = Token(request_id, outcome.tokens[request_id])
                if request_id in outcome.logprobs:
                    given = outcome.logprobs[request_id]
                    token = Token(request_id, token.token_id, given.logprob, given.top_ids, given.top_logprobs)
                self._update_row(token, events, left)
        for request_id, (code, message) in outcome.failed.items():
            if self.placed.pop(request_id, None) is not None:
                self.ended.append(request_id)
                left["failed"] += 1
            self._drop_item(request_id)
            events.append(Failed(request_id, code, message))
            self._forget(request_id)
        stats = StepStats(
            step_seconds=outcome.step_seconds,
            active_rows=len(plan.step),
            waiting_rows=self.waiting.size,
            tasks=tasks,
            left=dict(left),
            placed_rows=len(self.placed),
            pending_rows=len(self.items),
            cache_tokens=self.cache.tokens,
            budget_spent=plan.budget_spent,
        )
        return events, stats

    def _update_row(self, token: Token, events: list[Event], left: Counter[str]) -> None:
        request_id = token.request_id
        placed = self.placed[request_id]
        self.generated[request_id] += 1
        events.append(token)
        reason: FinishReason | None = None
        if token.token_id == self.eos_token_id and not placed.request.ignore_eos:
            reason = "eos"
        elif self.generated[request_id] >= placed.request.max_new_tokens:
            reason = "length"
        if reason is not None:
            del self.placed[request_id]
            self.ended.append(request_id)
            self._finish(request_id, reason, events, left)

    def _update_piece(self, piece: Piece, outcome: Outcome, events: list[Event]) -> None:
        request_id = piece.request.request_id
        item = self.items.get(request_id)
        if isinstance(piece, ScorePiece) and isinstance(item, Scoring):
            item.scores[piece.first : piece.first + piece.count] = outcome.scores[request_id]
            if piece.last:
                events.append(Scores(request_id, item.scores))
                self._drop_item(request_id)
        elif request_id in outcome.generated:
            tokens, reason = outcome.generated[request_id]
            events.append(Generated(request_id, tokens, reason))
            self._drop_item(request_id)
        elif request_id in outcome.embeddings:
            events.append(Embedded(request_id, outcome.embeddings[request_id]))
            self._drop_item(request_id)

    def _drop_item(self, request_id: int) -> None:
        """A classify or beam row is done (or failed): out of the queues."""
        item = self.items.pop(request_id, None)
        if item is not None and any(other is item for other in self.pending.items(item.request.tenant)):
            self.pending.remove(item.request.tenant, item)
        if self.sampled_beam == request_id:
            self.sampled_beam = None

    def _finish(self, request_id: int, reason: FinishReason, events: list[Event], left: Counter[str]) -> None:
        events.append(Finished(request_id, reason))
        left[reason] += 1
        self._forget(request_id)

    def _forget(self, request_id: int) -> None:
        self.generated.pop(request_id, None)
        self.cancelled.discard(request_id)
        self.parked.discard(request_id)

    # The end.

    def shut_down(self) -> tuple[list[Event], StepStats]:
        """Every row still here ends (`shutdown`; classify and beam rows fail), so no caller waits forever."""
        events, self.unsent = self.unsent, []
        left: Counter[str] = Counter()
        for request_id in list(self.placed):
            self._finish(request_id, "shutdown", events, left)
        for _, row in self.waiting:
            self._finish(row.request_id, "shutdown", events, left)
        for request_id in self.items:
            events.append(Failed(request_id, "overloaded", "the engine is shutting down"))
        self.placed.clear()
        self.items.clear()
        self.waiting = TenantQueues()
        self.pending = TenantQueues()
        return events, StepStats(left=dict(left))


def pending_item(request: ClassifyRow | BeamRow | EmbedRow) -> Pending:
    if isinstance(request, ClassifyRow):
        return Scoring(request)
    if isinstance(request, BeamRow):
        return Beaming(request)
    return Embedding(request)


def cache_side(needed: int) -> int:
    """`needed` rounded up to a size with at most three significant bits (at most 25% more): sides change in
    steps, so the cache is not copied every time a row joins or leaves."""
    if needed <= 4:
        return needed
    step = 1 << (needed.bit_length() - 3)
    return -(-needed // step) * step
