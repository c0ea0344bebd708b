"""Hot-load latency: from an upload's 201 on replica A to the first response with that version on replica B.

Two replicas of the server run in this process on one `FrozenT5` (`--model tiny`, the default, or
t5-small's shapes) and share a real redis-server (AOF on) and one data dir (the disk mirror), as replicas
share them in docker-compose. Each trial uploads a new `[20, d_model]` prompt (safetensors) of task "hot"
to A; as soon as the 201 arrives, a client asks B back to back (`/v1/generate`, one input,
`max_new_tokens=1`) until a response names the new version. Latency = that response's arrival - the
201's arrival: the notice (Redis pub/sub), B dropping its cached copy, loading the new prompt from Redis,
and at least one model call (so the model's own latency is a floor: it is reported too).

In the same rounds, for reference: "record visible", the same but asking B `GET /v1/prompts/hot` (no
model call: when B's registry has the new version); and "same replica", asking A itself (no notice).
The ratio reported is cross-replica p50 ÷ same-replica p50. Targets: cross-replica p50 <= 100 ms, p99 <= 1 s.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import common  # noqa: F401  (before torch: the server's OpenMP wait policy, see common.py)
import httpx
import torch
from common import (
    build_model,
    environment,
    input_texts,
    load_model,
    markdown_table,
    parser,
    percentile,
    publish,
    random_prompts,
    results_file,
)

from prompt_store import PromptFormat, dump_prompt
from server.settings import Settings
from server.testing.processes import running_server
from server.testing.redis_server import RedisServer

TARGET_P50_MS = 100.0
TARGET_P99_MS = 1000.0
TASK = "hot"


class Trial:
    def __init__(self, upload_to: httpx.Client, text: str) -> None:
        self.upload_to = upload_to
        self.body = {"task_id": TASK, "inputs": text, "parameters": {"max_new_tokens": 1}}

    def run(self, prompt: torch.Tensor, ask: httpx.Client, generate: bool = True) -> tuple[float, int]:
        """Seconds from the 201 to the first answer of `ask` with the new version, and requests it took."""
        files = {"file": ("prompt.safetensors", dump_prompt(prompt, PromptFormat.SAFETENSORS))}
        response = self.upload_to.put(f"/v1/prompts/{TASK}", files=files)
        uploaded = time.perf_counter()
        response.raise_for_status()
        version = response.json()["version"]
        for asked in range(1, 10_000):
            if generate:
                answer = ask.post("/v1/generate", json=self.body)
                seen = answer.raise_for_status().json()["prompt_version"]
            else:
                seen = ask.get(f"/v1/prompts/{TASK}").raise_for_status().json()["active_version"]
            if seen == version:
                return time.perf_counter() - uploaded, asked
        raise RuntimeError(f"version {version} never reached {ask.base_url}")

    def request_ms(self, ask: httpx.Client, count: int = 20) -> float:
        """Median time of one request with the prompt cached: the resolution of the polling."""
        times = []
        for _ in range(count):
            started = time.perf_counter()
            ask.post("/v1/generate", json=self.body).raise_for_status()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0], repeats=50)
    args.add_argument("--model", choices=["tiny", "t5-small"], default="tiny", help="`tiny`, or t5-small shapes")
    opts = args.parse_args(argv)
    uploads = 3 if opts.quick else max(opts.repeats, 50)  # quick: a few (a percentile needs two)

    model = build_model(opts.device, quick=opts.quick) if opts.model == "t5-small" else load_model("tiny", opts.device)
    text = input_texts(model, 1, opts.seed)[0]
    series = {  # name -> (replica index asked, whether it asks with a model call)
        "A → B: first generate with it": (1, True),
        "A → B: record visible": (1, False),
        "A → A: first generate with it": (0, True),
    }
    prompts = random_prompts(len(series) * uploads + 1, model.d_model, opts.seed)
    latencies: dict[str, list[float]] = {name: [] for name in series}
    asked: list[int] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        stack.callback(redis.stop)
        settings = Settings(store="redis", redis_url=redis.url, data_dir=Path(tmp) / "data", max_wait_ms=2)
        a, b = (httpx.Client(base_url=stack.enter_context(running_server(settings, model))) for _ in range(2))
        stack.callback(a.close)
        stack.callback(b.close)
        trial = Trial(a, text)
        for client in (a, b):
            trial.run(prompts[-1], client)  # warm: connections, first model calls
        request_ms = trial.request_ms(b)
        replicas = (a, b)
        for i in range(uploads):
            for j, (name, (index, generate)) in enumerate(series.items()):
                seconds, polls = trial.run(prompts[len(series) * i + j], replicas[index], generate)
                latencies[name].append(seconds)
                if j == 0:
                    asked.append(polls)

    rows = [
        [name, len(v), *(percentile(v, q) * 1000 for q in (50, 90, 99)), max(v) * 1000] for name, v in latencies.items()
    ]
    cross, visible, same = (latencies[name] for name in series)
    p50, p99 = percentile(cross, 50) * 1000, percentile(cross, 99) * 1000
    print(markdown_table(["path", "uploads", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows), end="\n\n")
    print(
        markdown_table(
            ["cached request ms (polling resolution)", "median requests to B until the new version"],
            [[request_ms, statistics.median(asked)]],
        ),
        end="\n\n",
    )
    result = {
        "bench": "hot_load",
        "ratio": round(p50 / (percentile(same, 50) * 1000), 4),
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
        "same_replica_p50_ms": round(percentile(same, 50) * 1000, 1),
        "record_visible_p50_ms": round(percentile(visible, 50) * 1000, 1),
        "request_ms": round(request_ms, 1),
        "target_p50_ms": TARGET_P50_MS,
        "target_p99_ms": TARGET_P99_MS,
        "meets_target": p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS,
        "uploads": uploads,
        **(environment(model, opts.quick) | {"model": model.model_id}),
    }
    publish(result, results_file(opts, "hot_load", *([opts.model] if opts.model != "tiny" else [])))


if __name__ == "__main__":
    main(sys.argv[1:])
