"""CUDA checks, for a machine with a GPU: the resident model in bf16, mixed-batch exactness on the GPU, and
the whole server on CUDA. Prints one JSON line per check and exits non-zero if a check fails.

fp32 on CUDA must meet the exactness rule (max abs diff <= 1e-4 between a row in a mixed batch and the row
alone). bf16 cannot be bit-exact across batch shapes (kernels differ per shape), so it reports the diff
relative to the logits' scale and how often greedy tokens agree.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
import safetensors.torch
import torch
from common import build_model  # puts the repository root on sys.path

from server.serving.model import Decoding, FrozenT5, Row
from server.settings import Settings
from server.testing.processes import running_server
from server.testing.reference import INPUTS, PROMPT_LENGTHS, Alone, mixed_rows, random_prompt

failures: list[str] = []


def report(check: str, ok: bool, **fields: object) -> None:
    print(json.dumps({"check": check, "ok": ok, **fields}), flush=True)
    if not ok:
        failures.append(check)


def row_diffs(model: FrozenT5) -> dict[str, float]:
    """Each row of a mixed batch against the row alone through `transformers` directly (`Alone`, the
    reference of tests/test_mixed_batch.py)."""
    rows = mixed_rows(model)
    hidden, _ = model.encode(rows)
    logits = model.first_step_logits(rows)
    encoder = logit = scale = 0.0
    for i, row in enumerate(rows):
        alone = Alone(model, row)
        encoder = max(encoder, (hidden[i, : row.num_tokens] - alone.encoder_output()).abs().max().item())
        single = alone.first_step_logits()
        logit = max(logit, (logits[i] - single).abs().max().item())
        scale = max(scale, single.abs().max().item())
    batched = model.generate(rows, Decoding(), [8] * len(rows))
    agree = sum(batched[i].token_ids == Alone(model, row).generate(8) for i, row in enumerate(rows))
    return {"encoder_max_abs": encoder, "logits_max_abs": logit, "logits_scale": scale, "greedy_agree": agree}


def main() -> None:
    report(
        "environment",
        torch.cuda.is_available(),
        torch=torch.__version__,
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )
    tiny = FrozenT5.load("tiny", device="auto")
    report("auto_dtype_is_bf16_on_cuda", tiny.dtype == torch.bfloat16, dtype=str(tiny.dtype))

    fp32 = FrozenT5(*_t5_small(), torch.device("cuda"), torch.float32)
    diffs = row_diffs(fp32)
    report(
        "fp32_mixed_batch_exact",
        diffs["encoder_max_abs"] <= 1e-4 and diffs["logits_max_abs"] <= 1e-4 and diffs["greedy_agree"] == len(INPUTS),
        tasks=len(PROMPT_LENGTHS),
        prompt_lengths=sorted(set(PROMPT_LENGTHS)),
        **diffs,
    )
    del fp32

    bf16 = build_model("cuda")
    diffs = row_diffs(bf16)
    relative = diffs["logits_max_abs"] / max(diffs["logits_scale"], 1e-6)
    report("bf16_mixed_batch_close", relative <= 0.05, relative_logits_diff=relative, **diffs)
    _server_on_cuda(bf16)
    if failures:
        sys.exit(f"failed: {failures}")


def _t5_small() -> tuple:
    from server.serving.tiny import build_tiny_t5
    from server.testing.checkpoints import t5_small_config

    model, tokenizer = build_tiny_t5(t5_small_config())
    return model, tokenizer, "t5-small-shapes"


def _server_on_cuda(model: FrozenT5) -> None:
    prompts = {f"task{i}": random_prompt(4 + 3 * i, model.d_model, seed=i) for i in range(8)}
    with TemporaryDirectory() as data, running_server(Settings(data_dir=Path(data)), model) as url:
        for task_id, prompt in prompts.items():
            data_bytes = safetensors.torch.save({"prompt_embeddings": prompt})
            meta = {"metadata": json.dumps({"labels": ["positive", "negative"]})}
            httpx.put(f"{url}/v1/prompts/{task_id}", files={"file": ("p", data_bytes)}, data=meta).raise_for_status()

        def call(i: int) -> tuple[int, int, str]:
            task_id = f"task{i % 8}"
            body = {"task_id": task_id, "inputs": INPUTS[i % len(INPUTS)], "parameters": {"max_new_tokens": 6}}
            generated = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
            classified = httpx.post(f"{url}/v1/classify", json={"task_id": task_id, "inputs": "x"}, timeout=120)
            return generated.status_code, classified.status_code, generated.json()["outputs"][0]["text"]

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, range(64)))
        info = httpx.get(f"{url}/v1/info").json()
    statuses = {(g, c) for g, c, _ in results}
    alone = [
        model.generate(
            [Row(model.prompt_on_device(prompts[f"task{i % 8}"]), model.tokenize([INPUTS[i % len(INPUTS)]])[0])],
            Decoding(),
            [6],
        )[0].text
        for i in range(64)
    ]
    agree = sum(text == single for (_, _, text), single in zip(results, alone, strict=True))
    report(
        "server_on_cuda",
        statuses == {(200, 200)} and info["device"].startswith("cuda") and info["dtype"] == "bfloat16",
        statuses=sorted(statuses),
        device=info["device"],
        dtype=info["dtype"],
        http_vs_alone_greedy_agree=f"{agree}/64",
    )


if __name__ == "__main__":
    main()
