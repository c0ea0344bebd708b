"""Rank classification's last step: a row's label scores (summed log-probabilities) to its answer.

Shared by single-prompt and ensemble requests, so that an ensemble member's answer is computed exactly as the
same version's answer alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from server.serving.schemas import ClassifyOutput


def label_scores(
    results: Sequence[list[float]], targets: Sequence[list[int]], length_normalize: bool
) -> list[list[float]]:
    """Each row's scores, divided by each label's token count when `length_normalize` is asked for."""
    if not length_normalize:
        return list(results)
    return [[s / len(t) for s, t in zip(scores, targets, strict=True)] for scores in results]


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def classify_output(labels: list[str], scores: list[float]) -> ClassifyOutput:
    best = max(range(len(labels)), key=scores.__getitem__)
    return ClassifyOutput(
        label=labels[best],
        scores=dict(zip(labels, scores, strict=True)),
        probs=dict(zip(labels, softmax(scores), strict=True)),
    )
