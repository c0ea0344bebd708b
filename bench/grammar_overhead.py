"""What structured output costs a decoder step: rows that follow a grammar ÷ the same rows without one.

The engine's loop (`EngineLoop` of `decode_vs_generate`, the continuous engine driven pass by pass) decodes the
same rows (a random model with t5-small's shapes, 20-token prompts, 32-token inputs, greedy) for exactly
`--new-tokens` tokens each: with a grammar that cannot end sooner (the regex `[a-z ]{64,}`: each step computes
each row's allowed tokens with llguidance, removes the others from its scores and feeds the chosen token to its
matcher), and without one (end-of-sequence banned). The grammar is compiled before the first sample (the
engine caches it), so the samples time the per-step work only. Sides alternate (ABBA); the ratio is the median
over rounds of grammar ÷ plain new tokens/s at batch 1 and batch 32 (the reported ratio is batch 32's).
"""

from __future__ import annotations

import sys

import common  # noqa: F401  (before torch: the server's OpenMP wait policy, see common.py)
from common import (
    Comparison,
    build_model,
    compare,
    environment,
    input_texts,
    markdown_table,
    on_model_thread,
    parser,
    publish,
    random_prompts,
    results_file,
    rows_for,
    timed,
)
from decode_vs_generate import EngineLoop

from server.serving.grammar import grammar_text

BATCH_SIZES = (1, 32)
PATTERN = "[a-z ]{64,}"
GRAMMAR, PLAIN = "with a grammar", "without"


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0], repeats=6)
    args.add_argument("--new-tokens", type=int, default=32, help="tokens each row decodes")
    opts = args.parse_args(argv)
    repeats, new_tokens = (1, 8) if opts.quick else (opts.repeats, opts.new_tokens)
    model = build_model(opts.device, opts.threads, opts.dtype, quick=opts.quick)
    grammar = grammar_text("regex", PATTERN)
    model.grammars.compile(grammar)
    largest = max(BATCH_SIZES)
    rows = rows_for(model, random_prompts(largest, model.d_model, opts.seed), input_texts(model, largest, opts.seed))
    loop = EngineLoop(model, largest)

    def tokens_per_s(batch: int, with_grammar: bool) -> float:
        chosen = rows[:batch]
        return batch * new_tokens / timed(lambda: loop.decode(chosen, new_tokens, grammar if with_grammar else None))

    comparisons: dict[int, Comparison] = {}
    for batch in BATCH_SIZES:
        constrained = on_model_thread(loop.decode, rows[:batch], new_tokens, grammar)  # also the warm-up
        if any(len(tokens) != new_tokens for tokens in constrained):
            raise RuntimeError(f"a constrained row did not decode exactly {new_tokens} tokens")
        comparisons[batch] = compare(
            (GRAMMAR, lambda batch=batch: tokens_per_s(batch, True)),
            (PLAIN, lambda batch=batch: tokens_per_s(batch, False)),
            repeats,
        )
    headers = ["batch", "with a grammar, tokens/s", "without, tokens/s", "ratio (median of rounds)"]
    print(markdown_table(headers, [[b, c.median(GRAMMAR), c.median(PLAIN), c.ratio] for b, c in comparisons.items()]))
    print()
    result = {
        "bench": "grammar_overhead",
        "ratio": round(comparisons[largest].ratio, 4),
        "ratios": {str(batch): round(c.ratio, 4) for batch, c in comparisons.items()},
        "grammar_tokens_per_s": {str(batch): round(c.median(GRAMMAR), 1) for batch, c in comparisons.items()},
        "plain_tokens_per_s": {str(batch): round(c.median(PLAIN), 1) for batch, c in comparisons.items()},
        "pattern": PATTERN,
        "new_tokens": new_tokens,
        "rounds": repeats,
        **environment(model, opts.quick),
    }
    publish(result, results_file(opts, "grammar_overhead"))


if __name__ == "__main__":
    sys.exit(main())
