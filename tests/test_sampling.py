"""The engine's sampled decoding against `transformers`' own warpers, not against itself.

On random logits, the distribution a sampled row draws from equals, bit for bit, what `transformers` makes
with its temperature, top-k (50) and top-p warpers in the order `generate` applies them; the tokens drawn
follow that distribution (a chi-square test on seeded draws, so the result is the same on every run).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from server.engine.protocol import Sampling
from server.engine.sampling import SAMPLING_TOP_K, RowChoice, TokenChooser, row_generator

VOCAB = 120  # more than top-k's 50, so top-k removes tokens
SETTINGS = [
    Sampling(do_sample=True, temperature=temperature, top_p=top_p)
    for temperature in (0.6, 1.0, 1.7)
    for top_p in (1.0, 0.9, 0.5)
]


def transformers_probs(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """What `generate(do_sample=True, top_k=50, ...)` samples from for one row: its warpers, in its order
    (each left out where it would change nothing, as `generate` does)."""
    warpers = LogitsProcessorList()
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    warpers.append(TopKLogitsWarper(SAMPLING_TOP_K))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    no_ids = torch.zeros((1, 0), dtype=torch.long)
    return warpers(no_ids, scores[None])[0].softmax(-1)


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("seed", range(5))
def test_the_warped_distribution_is_exactly_transformers(seed: int) -> None:
    logits = random_logits(len(SETTINGS), seed)
    ours = TokenChooser._sampling_probs(logits.clone(), SETTINGS)
    for row, sampling in enumerate(SETTINGS):
        theirs = transformers_probs(logits[row], sampling)
        assert torch.equal(ours[row], theirs), sampling
    assert (ours > 0).sum(-1).min() < SAMPLING_TOP_K  # top-p cut inside top-k somewhere: all three warpers acted


def chi_square_bound(degrees_of_freedom: int, z: float = 3.72) -> float:
    """The chi-square value exceeded with probability about 1e-4 (z of the normal's upper 1e-4 tail), by the
    Wilson-Hilferty approximation: no scipy needed."""
    k = degrees_of_freedom
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """The statistic and its degrees of freedom, tokens expected fewer than 5 times pooled into one bin."""
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    wanted = torch.cat([expected[~small], expected[small].sum()[None]])
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    return float(((observed - wanted) ** 2 / wanted).sum()), len(wanted) - 1


def test_draws_follow_the_warped_distribution() -> None:
    """6,000 draws through `choose`, 100 rows of one seeded generator each; a wrong distribution (or a
    token outside it) is far past the bound, a right one exceeds it with probability 1e-4, and the seeds fix
    the outcome."""
    sampling = Sampling(do_sample=True, temperature=1.7, top_p=0.9)
    logits = random_logits(1, seed=11)[0]
    expected_probs = transformers_probs(logits, sampling)
    chooser = TokenChooser(decodable_vocab=VOCAB, eos_token_id=1)
    seeded = [Sampling(True, sampling.temperature, sampling.top_p, seed=seed) for seed in range(100)]
    rows = [RowChoice(s, row_generator(s, torch.device("cpu")), ban_eos=False) for s in seeded]
    counts = torch.zeros(VOCAB)
    for _ in range(60):
        tokens, broken, _ = chooser.choose(logits.expand(len(rows), VOCAB).clone(), rows)
        assert not any(broken)
        counts += torch.bincount(torch.tensor(tokens), minlength=VOCAB)
    assert counts[expected_probs == 0].sum() == 0  # nothing drawn outside the warped support
    statistic, degrees_of_freedom = chi_square(counts, expected_probs * counts.sum())
    assert statistic < chi_square_bound(degrees_of_freedom), (statistic, degrees_of_freedom)
