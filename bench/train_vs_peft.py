"""Training step time: softserve's `PromptTrainer` vs PEFT prompt tuning, side by side in one process.

Both train a prompt over the same random model with t5-small's shapes (two identical copies built from one
seed), with the same batches (random token ids, ragged input and target lengths, right-padded) and the
same Adafactor settings. A step is zero_grad + forward + loss + backward + optimizer step. The two are
interleaved (alternating which goes first each round) so machine noise hits both alike; the ratio is the
median over rounds of softserve's step time ÷ PEFT's (target <= 1.0). Prints a markdown table and then one
JSON line, last: {"bench": "train_vs_peft", "ratio": ..., ...}. Both sides share this process and so one
OpenMP wait policy, the server's (a short spin, as a training worker runs; recorded in the result).

    python bench/train_vs_peft.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats N]
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import common  # noqa: F401  (before torch: see common.py)
import torch
from common import OMP_WAIT_POLICY, model_config, model_name, parser, publish, results_file

from server.cpus import usable_cores
from server.serving.model import FrozenT5, resolve_device, resolve_dtype
from server.serving.tiny import build_tiny_t5
from server.training import ADAFACTOR_SETTINGS, PromptTrainer, TrainingConfig

CpuBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


TARGET = 1.0  # softserve's step time ÷ PEFT's: not slower


def make_batches(count: int, batch_size: int, input_len: int, target_len: int, vocab: int, seed: int) -> list[CpuBatch]:
    """CPU (input_ids, input_mask, labels): ragged rows (half to full length), right-padded, `</s>` (id 1) last."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.zeros(batch_size, input_len, dtype=torch.long)
        input_mask = torch.zeros(batch_size, input_len, dtype=torch.long)
        labels = torch.full((batch_size, target_len), -100, dtype=torch.long)
        for row in range(batch_size):
            n_in = (
                input_len if row == 0 else int(torch.randint(input_len // 2, input_len + 1, (1,), generator=generator))
            )
            n_out = target_len if row == 0 else int(torch.randint(2, target_len + 1, (1,), generator=generator))
            input_ids[row, : n_in - 1] = torch.randint(3, vocab, (n_in - 1,), generator=generator)
            input_ids[row, n_in - 1] = 1
            input_mask[row, :n_in] = 1
            labels[row, : n_out - 1] = torch.randint(3, vocab, (n_out - 1,), generator=generator)
            labels[row, n_out - 1] = 1
        batches.append((input_ids, input_mask, labels))
    return batches


def timed(step: Callable[[], float], device: torch.device) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, the step's loss). CPU time is less disturbed by other tenants."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, loss


def main() -> None:
    options = parser(__doc__.splitlines()[0], repeats=20)
    options.add_argument("--batch-size", type=int, default=8)
    options.add_argument("--prompt-length", type=int, default=100)
    options.add_argument("--input-len", type=int, default=None, help="longest input, tokens (default 128, quick 64)")
    options.add_argument("--target-len", type=int, default=8)
    args = options.parse_args()
    rounds = 2 if args.quick else args.repeats  # quick: one round in each order
    input_len = args.input_len or (64 if args.quick else 128)
    warmup = 1 if args.quick else 3
    torch.set_num_threads(args.threads or usable_cores())  # the model runs on this thread (common.py keeps it serial)

    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers.optimization import Adafactor

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = model_config(args.quick)
    model, tokenizer = build_tiny_t5(config)
    frozen = FrozenT5(model, tokenizer, model_name(args.quick), device, dtype)
    recipe = TrainingConfig(prompt_length=args.prompt_length, init="vocab", batch_size=args.batch_size)
    trainer = PromptTrainer(frozen, [("x", "y")], config=recipe)

    # A fresh config: build_tiny_t5 writes to the config it is given, and a reused one builds other weights.
    peft_base, _ = build_tiny_t5(model_config(args.quick))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            peft_base.to(device=device, dtype=dtype),
            PromptTuningConfig(
                task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=args.prompt_length, num_transformer_submodules=1
            ),
        ).eval()
    table = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(trainer.prompt.detach().to(table.dtype))
    peft_optimizer = Adafactor([table], lr=recipe.learning_rate, weight_decay=recipe.weight_decay, **ADAFACTOR_SETTINGS)

    batches = make_batches(warmup + rounds, args.batch_size, input_len, args.target_len, config.vocab_size, args.seed)

    # Each step starts from the collated CPU tensors, as in a training loop: both sides pay their own
    # host-to-device copies and input preparation inside the timed step.
    def softserve_step(batch: CpuBatch) -> float:
        return trainer.train_step(trainer.make_batch(*batch))

    def peft_step(batch: CpuBatch) -> float:
        input_ids, input_mask, labels = (t.to(device, non_blocking=True) for t in batch)
        peft_optimizer.zero_grad(set_to_none=True)
        loss = peft_model(input_ids=input_ids, attention_mask=input_mask, labels=labels).loss
        loss.backward()
        peft_optimizer.step()
        return float(loss.detach())

    names = ("softserve", "peft")
    steps = {"softserve": softserve_step, "peft": peft_step}
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, list[float]] = {name: [] for name in names}
    for i, batch in enumerate(batches):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds, cpu_seconds, loss = timed(lambda name=name, batch=batch: steps[name](batch), device)
            losses[name].append(loss)
            if i >= warmup:
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)

    # Each round's two steps ran back to back: the median of per-round ratios cancels load drift between rounds.
    ratio = statistics.median(a / b for a, b in zip(wall["softserve"], wall["peft"], strict=True))
    median = {name: statistics.median(wall[name]) for name in names}
    cpu_median = {name: statistics.median(cpu[name]) for name in names}
    gaps = [abs(a - b) for a, b in zip(losses["softserve"], losses["peft"], strict=True)]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype_name = str(dtype).removeprefix("torch.")
    print(
        f"{model_name(args.quick)} (random), {device_name}, {dtype_name}, {torch.get_num_threads()} CPU threads, "
        f"batch {args.batch_size}, prompt {args.prompt_length}, inputs <= {input_len}, targets <= {args.target_len} "
        f"tokens; {rounds} interleaved steps of each after {warmup} warm-up\n"
    )
    print("| trainer | median step (ms) | min (ms) | max (ms) | median process CPU (ms) |")
    print("|---|---|---|---|---|")
    for name in names:
        values = wall[name]
        print(
            f"| {name} | {median[name] * 1e3:.1f} | {min(values) * 1e3:.1f} | {max(values) * 1e3:.1f} "
            f"| {cpu_median[name] * 1e3:.1f} |"
        )
    print(f"| ratio softserve ÷ peft (median of rounds) | {ratio:.3f} | | | |")
    print(f"| ratio of the medians | {median['softserve'] / median['peft']:.3f} | | | |")
    print(
        f"\nloss difference softserve vs peft: step 1 {gaps[0]:.2e}, max over {len(gaps)} steps {max(gaps):.2e} "
        "(in bf16 the trajectories drift apart: softserve takes the cross-entropy in fp32, HF T5 in bf16)\n"
    )
    result = {
        "bench": "train_vs_peft",
        "ratio": round(ratio, 4),
        "target": TARGET,
        "meets_target": ratio <= TARGET,
        "ratio_of_medians": round(median["softserve"] / median["peft"], 4),
        "softserve_ms": round(median["softserve"] * 1e3, 2),
        "peft_ms": round(median["peft"] * 1e3, 2),
        "cpu_time_ratio": round(cpu_median["softserve"] / cpu_median["peft"], 4),
        "rounds": rounds,
        "batch_size": args.batch_size,
        "prompt_length": args.prompt_length,
        "first_loss_diff": gaps[0],
        "max_loss_diff": max(gaps),
        "model": model_name(args.quick),
        "device": device_name,
        "dtype": dtype_name,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": OMP_WAIT_POLICY,
        "quick": args.quick,
    }
    publish(result, results_file(args, "train_vs_peft", *([f"batch{args.batch_size}"] if args.batch_size != 8 else [])))


if __name__ == "__main__":
    main()
