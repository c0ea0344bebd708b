"""Mixed-task batch ÷ single-task batch: what serving 32 tasks in one batch costs on the model.

Both sides call `FrozenT5.generate` (greedy, 4 new tokens) on a batch of 32 rows with the same 32
inputs (32 tokens each) and 20-token prompts; in the mixed batch every row has a different prompt,
in the single batch every row has the same one. Shapes are identical, so the only work that differs
is the per-row prompt copy of `FrozenT5.layout`. One sample is `--calls` generate calls; the two
sides alternate (ABBA), and the ratio is the median over rounds of mixed ÷ single. Target: >= 0.97.
"""

from __future__ import annotations

import sys

from common import (
    BATCH_SIZE,
    build_model,
    compare,
    environment,
    generate_throughput,
    input_texts,
    parser,
    random_prompts,
    report,
    results_file,
    rows_for,
    warm_up,
)

TARGET = 0.97


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0], repeats=16)
    args.add_argument("--calls", type=int, default=2, help="generate calls per sample")
    opts = args.parse_args(argv)
    repeats, calls = (1, 1) if opts.quick else (opts.repeats, opts.calls)

    model = build_model(opts.device, opts.threads, opts.dtype, quick=opts.quick)
    prompts = random_prompts(BATCH_SIZE, model.d_model, opts.seed)
    texts = input_texts(model, BATCH_SIZE, opts.seed)
    mixed = rows_for(model, prompts, texts)
    single = rows_for(model, prompts[:1] * BATCH_SIZE, texts)
    warm_up(model, mixed)
    warm_up(model, single)

    comparison = compare(
        ("mixed (32 tasks)", lambda: generate_throughput(model, mixed, calls)),
        ("single (1 task)", lambda: generate_throughput(model, single, calls)),
        repeats,
    )
    report(
        "mixed_vs_single",
        [comparison.table()],
        comparison,
        TARGET,
        results_file(opts, "mixed_vs_single"),
        batch_size=BATCH_SIZE,
        calls_per_sample=calls,
        **environment(model, opts.quick),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
