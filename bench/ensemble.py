"""Latency of an ensemble-of-5 request ÷ a single-prompt request, one input each, on an idle server.

An ensemble's members are rows of one submission: on an idle server its five rows share the encoder pass and
every decoder step, so an ensemble request should cost far less than five requests. Target: <= 2 (the ratio
reported is generate's; classify's is reported beside it, against the same target).

Server: a real `softserve serve` process (the continuous engine, in its own process, as deployed) serving a
random model with t5-small's shapes saved as a checkpoint. Five random prompts of 20 tokens are versions 1-5 of
one task, and its ensemble. Requests carry one 32-token input and are sent one at a time from one keep-alive
client, so the server is otherwise idle:
- generate: `max_new_tokens` 4 with `ignore_eos` (both sides decode exactly 4 steps), `"ensemble": true`
  against the same request pinned to version 1. A tied vote adds a scoring pass; the share of tied answers is
  reported (with this random model and seed the members agree: the plain vote).
- classify: two labels, `"ensemble": true` against version 1. Scoring labels is compute-bound on a CPU (every
  row's encoder pass, and a decoder pass per label and row), so five rows cost more than a decoder step does.
A sample is the median latency of `--requests` requests of one side; rounds alternate the sides (ABBA), and each
ratio is the median over rounds of ensemble ÷ single. The rows per decoder step of one ensemble generate request
(from the server's metrics) show its members sharing every step.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common  # noqa: F401  (before torch: the server's OpenMP wait policy, see common.py)
import httpx
from common import (
    MAX_NEW_TOKENS,
    ByteTokens,
    Comparison,
    checkpoint_server,
    input_texts,
    interleaved,
    markdown_table,
    model_config,
    model_name,
    parser,
    publish,
    random_prompts,
    results_file,
    upload_prompts,
)
from prometheus_client.parser import text_string_to_metric_families

TARGET = 2.0
MEMBERS = 5
TASK = "ensemble"
LABELS = ["positive", "negative"]


class Requests:
    """The four request bodies and one client; counts the ensemble generate answers that were ties."""

    def __init__(self, http: httpx.Client, text: str) -> None:
        self.http = http
        generate = {
            "task_id": TASK,
            "inputs": text,
            "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True},
        }
        classify = {"task_id": TASK, "inputs": text, "labels": LABELS}
        self.bodies: dict[str, tuple[str, dict[str, Any]]] = {
            "generate, ensemble of 5": ("/v1/generate", generate | {"ensemble": True}),
            "generate, single prompt": ("/v1/generate", generate | {"version": 1}),
            "classify, ensemble of 5": ("/v1/classify", classify | {"ensemble": True}),
            "classify, single prompt": ("/v1/classify", classify | {"version": 1}),
        }
        self.ties = self.ensemble_answers = 0

    def send(self, name: str) -> float:
        """Seconds from sending the request to its whole answer."""
        path, body = self.bodies[name]
        started = time.perf_counter()
        response = self.http.post(path, json=body)
        seconds = time.perf_counter() - started
        response.raise_for_status()
        output = response.json()["outputs"][0]
        if "votes" in output:
            self.ensemble_answers += 1
            self.ties += "tie_scores" in output
        return seconds

    def sampler(self, name: str, requests: int) -> Callable[[], float]:
        return lambda: statistics.median(self.send(name) for _ in range(requests)) * 1000

    def rows_per_step(self) -> float:
        """Rows in each decoder step of one ensemble generate request (5: every member in every step)."""
        before = batch_sizes(self.http)
        self.send("generate, ensemble of 5")
        steps, rows = (after - was for after, was in zip(batch_sizes(self.http), before, strict=True))
        return rows / steps


def batch_sizes(http: httpx.Client) -> tuple[float, float]:
    """(count, sum) of `softserve_batch_size`: decoder steps and the rows they held."""
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(http.get("/metrics").text)
        if family.name == "softserve_batch_size"
        for s in family.samples
    }
    return samples["softserve_batch_size_count"], samples["softserve_batch_size_sum"]


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0], repeats=10)
    args.add_argument("--requests", type=int, default=20, help="requests per sample (their median latency)")
    opts = args.parse_args(argv)
    repeats, requests = (2, 3) if opts.quick else (opts.repeats, opts.requests)
    text = input_texts(ByteTokens(), 1, opts.seed)[0]
    prompts = random_prompts(MEMBERS, model_config(opts.quick).d_model, opts.seed)

    with tempfile.TemporaryDirectory() as tmp, checkpoint_server(Path(tmp), opts) as (_, _, url):
        upload_prompts(url, [TASK] * MEMBERS, prompts)
        with httpx.Client(base_url=url, timeout=120) as http:
            http.put(f"/v1/prompts/{TASK}/ensemble", json={"versions": list(range(1, MEMBERS + 1))}).raise_for_status()
            calls = Requests(http, text)
            for name in calls.bodies:  # warm: connections, the prompt cache, first model calls
                for _ in range(3):
                    calls.send(name)
            rows_per_step = calls.rows_per_step()
            calls.ties = calls.ensemble_answers = 0
            samples = interleaved({name: calls.sampler(name, requests) for name in calls.bodies}, repeats)

    names = list(calls.bodies)
    generate = Comparison(names[0], names[1], {n: samples[n] for n in names[:2]})
    classify = Comparison(names[2], names[3], {n: samples[n] for n in names[2:]})
    for comparison in (generate, classify):
        print(comparison.table(unit="ms"), end="\n\n")
    tie_share = calls.ties / max(1, calls.ensemble_answers)
    print(
        markdown_table(
            ["rows per decoder step (ensemble generate)", "ensemble generate answers that were ties"],
            [[rows_per_step, tie_share]],
        ),
        end="\n\n",
    )
    result = {
        "bench": "ensemble",
        "ratio": round(generate.ratio, 4),
        "target": TARGET,
        "meets_target": generate.ratio <= TARGET,
        "classify_ratio": round(classify.ratio, 4),
        "classify_meets_target": classify.ratio <= TARGET,
        "generate_ms": {"ensemble": round(generate.median(names[0]), 2), "single": round(generate.median(names[1]), 2)},
        "classify_ms": {"ensemble": round(classify.median(names[2]), 2), "single": round(classify.median(names[3]), 2)},
        "rows_per_step": round(rows_per_step, 3),
        "tie_share": round(tie_share, 3),
        "members": MEMBERS,
        "rounds": repeats,
        "requests_per_sample": requests,
        "model": model_name(opts.quick),
        "device": opts.device,
        "dtype": opts.dtype,
        "server": "softserve serve (continuous engine, own process)",
        "quick": opts.quick,
    }
    publish(result, results_file(opts, "ensemble"))


if __name__ == "__main__":
    main(sys.argv[1:])
