"""Reading the server's Prometheus text in tests: one sample's value, and waiting (on the clock) for one.

A metric that is renamed or never exported is an error here, never a silent 0: a check like `== 0` or a wait
for a value must be able to fail. Only a labelled series the server makes on first use (a route's status
code, say) may be given an explicit `default` for the time before it is seen.
"""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

# What a family's samples are called besides its own name: counters, histograms and summaries.
SAMPLE_SUFFIXES = ("", "_total", "_created", "_count", "_sum", "_bucket")


def metric(source: str | httpx.Client, name: str, /, default: float | None = None, **labels: str) -> float:
    """One sample's value, from Prometheus text or from a client's `/metrics` (any label name may be given,
    `source` included: the first two parameters are positional).

    Raises `LookupError` when no family exports `name`, and when none of its samples has `labels` unless
    `default` is given (for a labelled series not made yet)."""
    text = source if isinstance(source, str) else source.get("/metrics").text
    known = False
    for family in text_string_to_metric_families(text):
        if name not in {family.name + suffix for suffix in SAMPLE_SUFFIXES}:
            continue
        known = True
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    if not known:
        raise LookupError(f"no metric {name} is exported")
    if default is not None and labels:
        return default
    raise LookupError(f"{name} has no series {labels}")


def wait_for_metric(
    client: httpx.Client, name: str, value: float, /, timeout_s: float = 60, default: float | None = None, **labels: str
) -> None:
    """Polls `/metrics` until the sample equals `value`; fails after `timeout_s` seconds however slow each poll."""
    deadline = time.monotonic() + timeout_s
    while (current := metric(client, name, default, **labels)) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels or ''} was {current}, not {value}, after {timeout_s} s")
        time.sleep(0.02)
