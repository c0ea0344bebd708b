"""Choosing each active row's next token from its logits, row by row settings, in one pass over the batch.

Greedy rows take the argmax. Sampled rows apply `transformers`' warpers in its order (temperature, top-k 50,
top-p) and draw with their own `torch.Generator`, so a seeded row draws the same tokens whatever rows share
its step. Ids past the tokenizer are never chosen; a row whose scores are not finite is reported, not decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from server.engine.protocol import Sampling, TokenLogprobs

SAMPLING_TOP_K = 50  # transformers' default for sampling


@dataclass
class RowChoice:
    """What the chooser needs of one row: its settings, its generator (sampled rows), whether EOS is banned, and
    how many alternatives' log-probabilities it reports (-1: none, not even its own token's)."""

    sampling: Sampling
    generator: torch.Generator | None
    ban_eos: bool
    logprobs: int = -1


def row_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """A sampled row's own generator: seeded as asked, or from fresh entropy."""
    if not sampling.do_sample:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    return generator


class TokenChooser:
    def __init__(self, decodable_vocab: int, eos_token_id: int) -> None:
        self.decodable_vocab = decodable_vocab
        self.eos_token_id = eos_token_id

    def choose(
        self, logits: torch.Tensor, rows: list[RowChoice], allowed: dict[int, torch.Tensor] | None = None
    ) -> tuple[list[int], list[bool], dict[int, TokenLogprobs]]:
        """Next token per row, whether the row's scores were not finite (its token is then meaningless), and the
        log-probabilities of the rows (by index) that ask for them. `allowed` (row index -> a boolean mask of the
        vocabulary) restricts a row to the tokens its grammar allows."""
        scores = logits.float()
        scores[:, self.decodable_vocab :] = float("-inf")
        for i, mask in (allowed or {}).items():
            scores[i, : mask.shape[0]].masked_fill_(~mask.to(scores.device), float("-inf"))
        banned = [i for i, row in enumerate(rows) if row.ban_eos]
        if banned:
            scores[banned, self.eos_token_id] = float("-inf")
        # One pass over the scores: the largest is NaN if any is (max propagates NaN), +inf if any is, and -inf if
        # none is finite: a row whose largest score is not finite can be neither ranked nor sampled.
        largest, tokens = scores.max(dim=-1)
        broken = ~largest.isfinite()
        sampled = [i for i, row in enumerate(rows) if row.sampling.do_sample and not broken[i]]
        if sampled:
            probs = self._sampling_probs(scores[sampled], [rows[i].sampling for i in sampled])
            for j, i in enumerate(sampled):
                tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
            scores[sampled] = probs.log()  # what those rows were drawn from
        chosen = tokens.tolist()
        asked = [i for i, row in enumerate(rows) if row.logprobs >= 0 and not broken[i]]
        return chosen, broken.tolist(), self._logprobs(scores, asked, chosen, rows) if asked else {}

    @staticmethod
    def _logprobs(
        scores: torch.Tensor, asked: list[int], chosen: list[int], rows: list[RowChoice]
    ) -> dict[int, TokenLogprobs]:
        logprobs = torch.log_softmax(scores[asked], dim=-1)
        k = max(rows[i].logprobs for i in asked)
        top = torch.topk(logprobs, k, dim=-1) if k else None
        answers = {}
        for j, i in enumerate(asked):
            wanted = rows[i].logprobs
            ids = top.indices[j, :wanted].tolist() if top is not None else []
            values = top.values[j, :wanted].tolist() if top is not None else []
            possible = sum(v > -math.inf for v in values)  # tokens the warpers ruled out are no alternatives
            answers[i] = TokenLogprobs(float(logprobs[j, chosen[i]]), ids[:possible], values[:possible])
        return answers

    @staticmethod
    def _sampling_probs(scores: torch.Tensor, settings: list[Sampling]) -> torch.Tensor:
        temperature = torch.tensor([s.temperature for s in settings], device=scores.device)[:, None]
        scores = scores / temperature
        k = min(SAMPLING_TOP_K, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
        top_p = torch.tensor([s.top_p for s in settings], device=scores.device)[:, None]
        if bool((top_p < 1.0).any()):
            ascending, order = torch.sort(scores, descending=False, dim=-1)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - top_p)
            remove[:, -1] = False  # keep at least the most likely token
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        return scores.softmax(dim=-1)
