"""Mixed-task batches ÷ one-task batches, scheduled for 64 tasks of uniform traffic and run through the batch runner.

What it is: a scheduled simulation. Both policies pick batches from the same simulated closed-loop queue,
and the batches they picked run through softserve's own model side (`BatchRunner` over `FrozenT5`); there
is no HTTP, no asyncio batcher and no PEFT. The per-task policy stands for what a server that can run only
one adapter per batch (PEFT-style) could at best schedule; PEFT itself is not run (`train_vs_peft.py`
compares with PEFT, for training).

What the traffic means for batch sizes: 64 clients in a closed loop (each sends its next request as
soon as the previous one is answered) keep at most 64 rows in the server; with the task of every
request drawn uniformly from 64 tasks, the rows waiting at any moment spread over ~40 distinct tasks,
and even the most popular task has only ~3 of them. The mixed batcher takes the 32 oldest rows
whatever their tasks; a batcher that may only batch one task at a time gets ~3 rows a batch.

Method: a closed-loop simulation, identical for both policies except for the batch choice.
  * One seeded stream of task ids is the arrival stream: request k asks for the same task under both
    policies. Clients have zero think time and no network, so when a batch is chosen every one of
    the 64 clients has a request queued (this favours the baseline: it always sees all 64 rows).
  * mixed: the oldest `max_batch_size` (32) rows, any tasks (what `TenantFairBatcher` takes from one tenant).
    per-task: the task with the most queued rows (ties: the one whose oldest row is oldest), up to
    32 of its rows, oldest first. This is the strongest one-task-per-batch scheduler for this load.
  * The batch choices are decided first (they do not depend on timing); the queue is run for
    `--settle` batches before the counted ones so it is in its steady state. Then the counted
    batches of each policy (`--rows` rows in all) run through the server's own model side,
    `server.serving.batch_runner.BatchRunner` over `FrozenT5` (greedy, 4 new tokens, 20-token prompts,
    32-token inputs), and throughput is rows ÷ the time of those calls.
HTTP, validation and the asyncio batcher cost the same per row under both policies and are measured
by `server_vs_raw.py`; leaving them out here keeps the ratio about the batching policy alone.
Rounds alternate (ABBA); the ratio is the median over rounds of mixed ÷ per-task. Target: >= 2.5.
Also reported: a line fitted through every timed call (fixed cost + cost per row) and the gain it allows
at most, the per-row cost at the per-task policy's mean batch ÷ that at the mixed policy's.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from common import (
    BATCH_SIZE,
    GREEDY,
    MAX_NEW_TOKENS,
    build_model,
    compare,
    environment,
    input_texts,
    markdown_table,
    on_model_thread,
    parser,
    random_prompts,
    report,
    results_file,
    warm_up,
)

from server.serving.batch_runner import BatchRunner, GenerateWork
from server.serving.model import FrozenT5, Row

TARGET = 2.5
TASKS = 64
CLIENTS = 64

Request = tuple[int, int]  # (arrival number, task)
Policy = Callable[[list[Request], int], list[Request]]


def mixed_policy(queue: list[Request], limit: int) -> list[Request]:
    return queue[:limit]


def per_task_policy(queue: list[Request], limit: int) -> list[Request]:
    counts = Counter(task for _, task in queue)
    most = max(counts.values())
    task = next(task for _, task in queue if counts[task] == most)  # the queue is oldest first
    return [request for request in queue if request[1] == task][:limit]


def schedule(policy: Policy, rows: int, settle: int, seed: int) -> list[list[Request]]:
    """The batches `policy` takes from a closed loop of `CLIENTS` clients, after `settle` batches."""
    stream = random.Random(seed)
    arrivals = iter(range(1 << 62))
    queue = [(next(arrivals), stream.randrange(TASKS)) for _ in range(CLIENTS)]
    batches: list[list[Request]] = []
    taken_rows = 0
    while taken_rows < rows:
        batch = policy(queue, BATCH_SIZE)
        chosen = set(batch)
        queue = [r for r in queue if r not in chosen] + [(next(arrivals), stream.randrange(TASKS)) for _ in batch]
        if settle > 0:
            settle -= 1
            continue
        batches.append(batch)
        taken_rows += len(batch)
    return batches


def work_items(model: FrozenT5, batches: list[list[Request]], seed: int) -> list[list[GenerateWork]]:
    """The rows of each batch: the task's prompt and one of 64 inputs, as the server would queue them."""
    prompts = [model.prompt_on_device(p) for p in random_prompts(TASKS, model.d_model, seed)]
    inputs = model.tokenize(input_texts(model, CLIENTS, seed))

    def work(arrival: int, task: int) -> GenerateWork:
        row = Row(prompts[task], inputs[arrival % len(inputs)])
        return GenerateWork(row, ("bench", f"task-{task}"), GREEDY, MAX_NEW_TOKENS)

    return [[work(*request) for request in batch] for batch in batches]


def runner_throughput(runner: BatchRunner, batches: list[list[GenerateWork]], calls: list[tuple[int, float]]) -> float:
    """Rows per second of running `batches`; each call's (rows, seconds) is added to `calls`."""

    def run() -> float:
        started = time.perf_counter()
        for batch in batches:
            call_started = time.perf_counter()
            runner(batch)
            calls.append((len(batch), time.perf_counter() - call_started))
        return time.perf_counter() - started

    return sum(map(len, batches)) / on_model_thread(run)


@dataclass(frozen=True)
class CallCost:
    """A least-squares line through every timed call: seconds = fixed + per_row * rows. It says how much any
    batching can gain on this machine: one-task batches of `m` rows cost (fixed + per_row * m) / m per row."""

    fixed_s: float
    per_row_s: float

    @classmethod
    def fit(cls, calls: list[tuple[int, float]]) -> CallCost:
        per_row, fixed = statistics.linear_regression([rows for rows, _ in calls], [s for _, s in calls])
        return cls(fixed, per_row)

    def gain_ceiling(self, small: float, large: float) -> float:
        """Per-row cost of batches of `small` rows ÷ that of batches of `large` rows."""
        return (self.fixed_s / small + self.per_row_s) / (self.fixed_s / large + self.per_row_s)


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0], repeats=6)
    args.add_argument("--rows", type=int, default=8 * BATCH_SIZE, help="rows per sample and policy")
    args.add_argument("--settle", type=int, default=200, help="uncounted batches before the counted ones")
    opts = args.parse_args(argv)
    repeats, rows = (1, BATCH_SIZE) if opts.quick else (opts.repeats, opts.rows)

    model = build_model(opts.device, opts.threads, opts.dtype, quick=opts.quick)
    runner = BatchRunner(model)
    policies = {"mixed": mixed_policy, "per-task": per_task_policy}
    batches = {name: schedule(policy, rows, opts.settle, opts.seed) for name, policy in policies.items()}
    work = {name: work_items(model, chosen, opts.seed) for name, chosen in batches.items()}
    warm_up(model, [w.row for w in work["mixed"][0]])
    on_model_thread(runner, work["per-task"][0])

    calls: list[tuple[int, float]] = []
    comparison = compare(
        ("mixed", lambda: runner_throughput(runner, work["mixed"], calls)),
        ("per-task", lambda: runner_throughput(runner, work["per-task"], calls)),
        repeats,
    )
    shape = {name: _shape(chosen) for name, chosen in batches.items()}
    cost = CallCost.fit(calls)
    ceiling = cost.gain_ceiling(shape["per-task"][2], shape["mixed"][2])
    table = markdown_table(
        ["policy", "batches", "rows", "mean rows/batch", "batch sizes (size x count)", "mean tasks/batch", "ms/batch"],
        [[name, *values, 1000 * values[2] / comparison.median(name)] for name, values in shape.items()],
    )
    fit = markdown_table(
        ["model call cost (least squares over every call)", "fixed ms", "ms per row", "gain ceiling"],
        [["seconds = fixed + per row x rows", 1000 * cost.fixed_s, 1000 * cost.per_row_s, ceiling]],
    )
    report(
        "mixed_vs_per_task",
        [table, fit, comparison.table("rows/s")],
        comparison,
        TARGET,
        results_file(opts, "mixed_vs_per_task"),
        tasks=TASKS,
        clients=CLIENTS,
        max_batch_size=BATCH_SIZE,
        mean_batch_mixed=shape["mixed"][2],
        mean_batch_per_task=shape["per-task"][2],
        call_fixed_ms=round(1000 * cost.fixed_s, 1),
        call_ms_per_row=round(1000 * cost.per_row_s, 2),
        gain_ceiling=round(ceiling, 2),
        **environment(model, opts.quick),
    )


def _shape(batches: list[list[Request]]) -> tuple[int, int, float, str, float]:
    sizes = [len(batch) for batch in batches]
    histogram = " ".join(f"{size}x{count}" for size, count in sorted(Counter(sizes).items()))
    tasks = statistics.mean(len({task for _, task in batch}) for batch in batches)
    return len(batches), sum(sizes), round(statistics.mean(sizes), 2), histogram, round(tasks, 2)


if __name__ == "__main__":
    main(sys.argv[1:])
