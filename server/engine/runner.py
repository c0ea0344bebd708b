"""`ModelRunner`: carries out a `Plan` of the scheduler on the model, and says what came of it (`Outcome`).

It owns everything that holds tensors: the decoder's row cache (a slot per row in place, packed), each row's
token chooser state, parked rows' cache contents, classify rows' encoder outputs between their pieces, and the
beam rows' stepped `generate` calls. It decides nothing: which rows, how many and in which order is the plan's.
A failure fails only the rows it touched; a failed decoder step fails every row in it and starts a new cache.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from llguidance import LLMatcher

from server.engine.beam import SteppedGeneration
from server.engine.protocol import BeamRow, FailureCode, GenerateRow, RowInput
from server.engine.sampling import RowChoice, TokenChooser, row_generator
from server.engine.scheduler import BeamPiece, CacheShape, EmbedPiece, Outcome, Plan, ScorePiece
from server.errors import NonFiniteScores, Overloaded
from server.serving.decoder import RowState
from server.serving.grammar import allowed_tokens
from server.serving.model import NON_FINITE, Decoding, FrozenT5, Row

log = logging.getLogger(__name__)


@dataclass
class RowDecoding:
    """What the runner keeps of a generate row besides its cache slot."""

    choice: RowChoice
    last_token: int
    parked: RowState | None = None
    matcher: LLMatcher | None = None  # the row's grammar state (structured output)


def padded(encoded: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' encoder outputs `[1, T_i, d]` and masks `[1, T_i]` as one batch, zero-padded to the longest."""
    width = max(hidden.shape[1] for hidden, _ in encoded)
    hidden = torch.cat([torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[1])) for h, _ in encoded])
    mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, m in encoded])
    return hidden, mask


class ModelRunner:
    def __init__(self, model: FrozenT5) -> None:
        self.model = model
        self.decoder = model.decoder
        self.cache = self.decoder.new_cache()
        self.chooser = TokenChooser(model.decodable_vocab, model.eos_token_id)
        self.start_token = model.model.config.decoder_start_token_id
        self.slots: list[int] = []  # the request id in each cache slot
        self.rows: dict[int, RowDecoding] = {}
        self.encoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # classify rows between pieces
        self.beams: dict[int, SteppedGeneration] = {}

    @torch.inference_mode()
    def run(self, plan: Plan) -> Outcome:
        outcome = Outcome()
        self._release([*plan.leave, *plan.free, *plan.park], parking=set(plan.park))
        for request_id in plan.drop:
            self._drop(request_id)
        self._resize(plan.cache)
        self._join(plan, outcome)
        embeds = [piece for piece in plan.pieces if isinstance(piece, EmbedPiece)]
        if embeds:
            self._embed(embeds, outcome)
        scoring = [piece for piece in plan.pieces if isinstance(piece, ScorePiece)]
        if scoring:
            self._score(scoring, outcome)
        for piece in plan.pieces:
            if isinstance(piece, BeamPiece):
                self._beam_piece(piece, outcome)
        stepped = [r for r in plan.step if r not in outcome.failed]
        if stepped:
            self._step(stepped, outcome)
        return outcome

    def close(self) -> None:
        """Ends every beam row's call (its thread)."""
        for generation in self.beams.values():
            generation.cancel()
        self.beams.clear()

    # Places.

    def _release(self, request_ids: list[int], parking: set[int]) -> None:
        gone = [self.slots.index(r) for r in request_ids if r in self.slots]
        for slot in gone:
            request_id = self.slots[slot]
            if request_id in parking:
                self.rows[request_id].parked = self.cache.export_row(slot)
            else:
                del self.rows[request_id]
        for request_id in request_ids:
            if request_id not in self.slots:
                self._drop(request_id)
        if gone:
            order = self.cache.release(gone)
            self.slots = [self.slots[old] for old in order]

    def _drop(self, request_id: int) -> None:
        self.rows.pop(request_id, None)
        self.encoded.pop(request_id, None)
        beam = self.beams.pop(request_id, None)
        if beam is not None:
            beam.cancel()

    def _resize(self, shape: CacheShape) -> None:
        if shape.rows == 0:
            self.cache = self.decoder.new_cache()  # nothing in place: nothing held
            return
        self.cache.resize(shape.rows, shape.encoder_positions, shape.decoder_positions)

    def _join(self, plan: Plan, outcome: Outcome) -> None:
        fresh = [row for row in plan.join if row.request_id not in plan.resume]
        for row in plan.join:
            if row.request_id in plan.resume:
                decoding = self.rows[row.request_id]
                assert decoding.parked is not None
                self.cache.import_row(decoding.parked)
                decoding.parked = None
                self.slots.append(row.request_id)
        if not fresh:
            return
        try:
            hidden, mask = self.model.encode([self._model_row(r.row) for r in fresh])
            self.decoder.join(self.cache, hidden, mask)
        except Exception as error:  # out of memory, or a fault: these rows fail, the engine goes on
            log.exception("encoder pass of %d rows failed", len(fresh))
            for row in fresh:
                outcome.failed[row.request_id] = failure(error)
            return
        for row in fresh:
            self.slots.append(row.request_id)
            matcher = None if row.grammar is None else self.model.grammars.matcher(row.grammar)  # compiled already
            self.rows[row.request_id] = RowDecoding(self._choice(row), self.start_token, matcher=matcher)

    def _choice(self, row: GenerateRow) -> RowChoice:
        return RowChoice(row.sampling, row_generator(row.sampling, self.model.device), row.ignore_eos, row.logprobs)

    def _model_row(self, row: RowInput) -> Row:
        return Row(self.model.prompt_on_device(row.prompt), row.input_ids)

    # The decoder step.

    def _step(self, stepping: list[int], outcome: Outcome) -> None:
        assert sorted(stepping) == sorted(self.slots), "the step runs every row in place"
        request_ids = self.slots  # in their slots' order
        started = time.perf_counter()
        rows = [self.rows[r] for r in request_ids]
        try:
            tokens = torch.tensor([row.last_token for row in rows], device=self.model.device)
            logits = self.decoder.step(self.cache, tokens)
            chosen, broken, logprobs = self.chooser.choose(logits, [row.choice for row in rows], self._allowed(rows))
        except Exception as error:
            log.exception("decoder step of %d rows failed", len(request_ids))
            for request_id in request_ids:
                outcome.failed[request_id] = failure(error)
            self._reset()
            return
        outcome.step_seconds = time.perf_counter() - started
        for slot, (request_id, row, token, bad) in enumerate(zip(request_ids, rows, chosen, broken, strict=True)):
            if bad:
                outcome.failed[request_id] = failure(NonFiniteScores("the row's scores are not finite"))
            elif row.matcher is not None and not row.matcher.consume_token(token):
                outcome.failed[request_id] = (
                    "inference_failed",
                    f"the grammar refused a token: {row.matcher.get_error()}",
                )
            else:
                row.last_token = token
                outcome.tokens[request_id] = token
                if slot in logprobs:
                    outcome.logprobs[request_id] = logprobs[slot]

    def _allowed(self, rows: list[RowDecoding]) -> dict[int, torch.Tensor] | None:
        """The tokens each row with a grammar may take next, by its place in the step (None: no such row)."""
        constrained = [(slot, row.matcher) for slot, row in enumerate(rows) if row.matcher is not None]
        if not constrained:
            return None
        masks = allowed_tokens([matcher for _, matcher in constrained], self.model.model.config.vocab_size)
        return {slot: mask for (slot, _), mask in zip(constrained, masks, strict=True)}

    def _reset(self) -> None:
        """After a failed step: its rows have failed; start from an empty cache."""
        for request_id in self.slots:
            self.rows.pop(request_id, None)
        self.slots = []
        self.cache = self.decoder.new_cache()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # Pieces: embeddings, classify scoring and beam steps.

    def _beam_piece(self, piece: BeamPiece, outcome: Outcome) -> None:
        request_id = piece.request.request_id
        try:
            self._beam_step(piece.request, outcome)
        except Exception as error:
            log.exception("a beam step failed")
            outcome.failed[request_id] = failure(error)
            self._drop(request_id)

    def _embed(self, pieces: list[EmbedPiece], outcome: Outcome) -> None:
        """Every embed row of the pass in one encoder call."""
        try:
            vectors = self.model.embed([self._model_row(piece.request.row) for piece in pieces])
        except Exception as error:
            log.exception("an encoder pass of %d embed rows failed", len(pieces))
            for piece in pieces:
                outcome.failed[piece.request.request_id] = failure(error)
            return
        for piece, vector in zip(pieces, vectors, strict=True):
            if bool(vector.isfinite().all()):
                outcome.embeddings[piece.request.request_id] = vector.tolist()
            else:
                outcome.failed[piece.request.request_id] = failure(NonFiniteScores("the row's encoding is not finite"))

    def _score(self, pieces: list[ScorePiece], outcome: Outcome) -> None:
        """Every classify piece of the pass together, as the static path scores a batch: one encoder call for the
        rows whose first piece this is, one teacher-forced decoder call for every piece's candidates (each row's
        encoder output padded to the longest, masked: the exactness rule)."""
        try:
            self._encode_for_scoring([piece for piece in pieces if piece.request.request_id not in self.encoded])
            encoded = [self.encoded[piece.request.request_id] for piece in pieces]
            hidden, mask = padded(encoded)
            owners = [i for i, piece in enumerate(pieces) for _ in range(piece.count)]
            scores = self.model.log_likelihoods(hidden, mask, owners, [c for p in pieces for c in p.candidates])
        except Exception as error:
            log.exception("a scoring call of %d classify pieces failed", len(pieces))
            for piece in pieces:
                outcome.failed[piece.request.request_id] = failure(error)
                self._drop(piece.request.request_id)
            return
        for piece in pieces:
            request_id = piece.request.request_id
            own, scores = scores[: piece.count], scores[piece.count :]
            if piece.last:
                del self.encoded[request_id]
            if all(map(math.isfinite, own)):
                outcome.scores[request_id] = own
            else:
                outcome.failed[request_id] = failure(
                    NonFiniteScores("the model's scores for this input are not finite")
                )
                self._drop(request_id)

    def _encode_for_scoring(self, starting: list[ScorePiece]) -> None:
        """One encoder call for the rows that start scoring; each row's output is kept at its own length."""
        if not starting:
            return
        hidden, mask = self.model.encode([self._model_row(piece.request.row) for piece in starting])
        for i, piece in enumerate(starting):
            length = piece.request.row.num_tokens
            self.encoded[piece.request.request_id] = (hidden[i : i + 1, :length], mask[i : i + 1, :length])

    def _beam_step(self, request: BeamRow, outcome: Outcome) -> None:
        generation = self.beams.get(request.request_id)
        if generation is None:
            decoding = Decoding(
                do_sample=request.do_sample,
                num_beams=request.num_beams,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                ignore_eos=request.ignore_eos,
            )
            row = self._model_row(request.row)
            generation = self.beams[request.request_id] = SteppedGeneration(
                self.model, row, decoding, request.max_new_tokens
            )
        if not generation.advance():
            return
        del self.beams[request.request_id]
        if generation.error is not None:
            raise generation.error
        result = generation.result
        assert result is not None
        if result.finish_reason == NON_FINITE:
            raise NonFiniteScores("the row's scores are not finite")
        outcome.generated[request.request_id] = (result.token_ids, "eos" if result.finish_reason == "eos" else "length")


def failure(error: BaseException) -> tuple[FailureCode, str]:
    if isinstance(error, NonFiniteScores):
        return "non_finite", str(error)
    if isinstance(error, (Overloaded, torch.cuda.OutOfMemoryError)):
        return "overloaded", "the model ran out of device memory for this request; retry with fewer or shorter inputs"
    return "inference_failed", f"inference failed: {type(error).__name__}"
