"""Choosing each active row's next token from its logits, row by row settings, in one pass over the batch.

Greedy rows take the argmax. Sampled rows apply `transformers`' warpers in its order (temperature, top-k 50,
top-p) and draw with their own `torch.Generator`, so a seeded row draws the same tokens whatever rows share
its step. Ids past the tokenizer are never chosen; a row whose scores are not finite is reported, not decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.protocol import Sampling

SAMPLING_TOP_K = 50  # transformers' default for sampling


@dataclass
class RowChoice:
    """What the chooser needs of one row: its settings, its generator (sampled rows) and whether EOS is banned."""

    sampling: Sampling
    generator: torch.Generator | None
    ban_eos: bool


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

    def choose(self, logits: torch.Tensor, rows: list[RowChoice]) -> tuple[list[int], list[bool]]:
        """Next token per row, and whether the row's scores were not finite (its token is then meaningless)."""
        scores = logits.float()
        scores[:, self.decodable_vocab :] = float("-inf")
        banned = [i for i, row in enumerate(rows) if row.ban_eos]
        if banned:
            scores[banned, self.eos_token_id] = float("-inf")
        broken = scores.isnan().any(-1) | scores.isposinf().any(-1) | ~scores.isfinite().any(-1)
        tokens = scores.argmax(-1)
        sampled = [i for i, row in enumerate(rows) if row.sampling.do_sample]
        if sampled:
            fine = [i for i in sampled if not broken[i]]
            if fine:
                probs = self._sampling_probs(scores[fine], [rows[i].sampling for i in fine])
                for j, i in enumerate(fine):
                    tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
        return tokens.tolist(), broken.tolist()

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
