"""Shared set-up of the benchmarks: the model, the workload, side-by-side timing and the report.

Every number a benchmark reports is a ratio of two throughputs measured in one run: the samplers of
both sides run in alternating order (A B, B A, A B, ...) so that drift and noise from other processes
hit both, and each side is summarised by its median.

Models are built, loaded and called on one dedicated thread, as the engine process runs its model (the engine
thread), and the main thread stays serial (`server.cpus.serial_thread`): libgomp stops spinning between
parallel regions as soon as two threads of a process have OpenMP teams (server/cpus.py), and a baseline run
that way would be slower than it can be.

torch's OpenMP reads `OMP_WAIT_POLICY` and `GOMP_SPINCOUNT` once, as torch loads, and `import server` sets
the server's (a short spin, `GOMP_SPINCOUNT`) as a default. A bench imports this module before torch
(`import common` sorts first), so its in-process servers and model calls run as `softserve serve` runs them;
`server_vs_raw` loads torch first on purpose, for its raw side. Every result records the policy its process
ran under.

Every result is printed as one JSON line, last, and written to `bench/results/NAME.json`
(`NAME-cuda.json` on a GPU), so a figure in the README can be traced to the run that printed it. A
`--quick` run writes nowhere unless `--results-dir` is given: smoke numbers must not replace real ones.

A `--quick` run is a smoke run: it runs every code path of its bench end to end, and prints the same tables and
JSON fields, but on the built-in `tiny` model's shapes instead of t5-small's (`model_config`), with the fewest
rounds and the shortest phases: what is left of its time is mostly imports and the start of its servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
POLICY_BEFORE_SERVER = {name: os.environ.get(name) for name in OPENMP_VARIABLES}
"""The OpenMP wait settings of the environment the bench was started in, before `import server` set the server's."""
TORCH_LOADED_BEFORE_SERVER = "torch" in sys.modules

import server  # noqa: E402, F401  (sets the OpenMP wait policy the server runs with, for a torch not yet loaded)

# isort: split
import httpx  # noqa: E402
import torch  # noqa: E402
from transformers import ByT5Tokenizer, T5Config  # noqa: E402


def wait_policy(settings: dict[str, str | None]) -> str:
    """How libgomp's idle threads wait under these settings, as a result records it."""
    given = [f"{name}={value}" for name, value in settings.items() if value is not None]
    return " ".join(given) or "unset (libgomp's default: spin a while, then sleep)"


OMP_WAIT_POLICY = wait_policy(
    POLICY_BEFORE_SERVER if TORCH_LOADED_BEFORE_SERVER else {name: os.environ.get(name) for name in OPENMP_VARIABLES}
)
"""The wait policy torch's OpenMP threads in this process run under."""
SERVER_WAIT_POLICY = wait_policy({name: os.environ.get(name) for name in OPENMP_VARIABLES})
"""The policy of a server this process starts (it inherits the environment `import server` completed)."""

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python bench/x.py` puts only bench/ on the path

from prompt_store import PromptFormat, dump_prompt  # noqa: E402
from server.cpus import serial_thread, usable_cores  # noqa: E402
from server.serving.model import Decoding, FrozenT5, Row, resolve_device, resolve_dtype  # noqa: E402
from server.serving.tiny import build_tiny_t5, tiny_config  # noqa: E402
from server.testing.checkpoints import save_checkpoint, t5_small_config  # noqa: E402

MODEL_ID = "t5-small-shapes"
QUICK_MODEL_ID = "tiny"  # the built-in preset, as `FrozenT5.load("tiny")` names it
PROMPT_LENGTH = 20
INPUT_TOKENS = 32  # `</s>` included
MAX_NEW_TOKENS = 4
BATCH_SIZE = 32
GREEDY = Decoding()

T = TypeVar("T")
serial_thread()  # the main thread; the model thread has threads of its own, one per usable core unless set
_MODEL_THREAD = ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="bench-model", initializer=lambda: torch.set_num_threads(usable_cores())
)


def parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The flags every benchmark has; a script adds its own."""
    args = argparse.ArgumentParser(description=description)
    args.add_argument("--quick", action="store_true", help="a smoke run: fewest repetitions, unstable numbers")
    args.add_argument("--repeats", type=int, default=repeats, help="samples of each side (interleaved)")
    args.add_argument("--device", default="cpu", help="`cpu`, `cuda`, `auto`")
    args.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="`auto`: fp32 on CPU, bf16 on CUDA"
    )
    args.add_argument("--seed", type=int, default=0)
    args.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where the JSON result goes (default: bench/results; a --quick run: nowhere)",
    )
    return args


def results_file(options: argparse.Namespace, bench: str, *variant: str) -> Path | None:
    """`NAME.json` for CPU and the default dtype; otherwise the device and dtype are in the name, as is any
    `variant` (`NAME-cuda.json`, `NAME-bfloat16.json`, `NAME-tiny.json`). Under `--results-dir`, which a
    quick run needs to write anything."""
    directory = options.results_dir or (None if options.quick else RESULTS_DIR)
    if directory is None:
        return None
    device = resolve_device(options.device).type
    parts = [bench, *([device] if device != "cpu" else []), *([options.dtype] if options.dtype != "auto" else [])]
    return directory / ("-".join([*parts, *variant]) + ".json")


MEASURED_CODE = ("server", "prompt_store", "bench")  # what a result depends on, for its `revision` and `dirty`


def code_revision() -> dict[str, object]:
    """The commit of the code that produced a result, and whether that code had uncommitted changes (a result of
    a dirty tree cannot be traced to a commit). Empty outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        revision = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--", *MEASURED_CODE, ":(exclude)bench/results").strip())
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"revision": revision, "dirty": dirty}


def publish(result: dict[str, object], destination: Path | None) -> None:
    """Prints `result` as the run's last line, one JSON object, and writes that line to `destination`,
    with how the run was started, so that a figure can be traced to the run that printed it."""
    script = Path(sys.argv[0]).resolve()
    script_name = script.relative_to(REPO_ROOT).as_posix() if script.is_relative_to(REPO_ROOT) else sys.argv[0]
    command = " ".join(["python", script_name, *sys.argv[1:]])
    provenance = {"command": command, "cpus": os.cpu_count(), "machine": platform.machine(), **code_revision()}
    line = json.dumps(result | provenance)
    print(line, flush=True)
    if destination is not None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(line + "\n")


def model_config(quick: bool) -> T5Config:
    """The shapes of a run's random model: t5-small-lm-adapt's, or in a `--quick` run the built-in `tiny`
    preset's. A smoke run only checks that every code path of the bench runs end to end; its numbers are not
    results, so it need not pay for t5-small's 8+8 layers and 32128-row vocabulary."""
    return tiny_config() if quick else t5_small_config()


def model_name(quick: bool) -> str:
    """What a result records as the model of `model_config(quick)`."""
    return QUICK_MODEL_ID if quick else MODEL_ID


def build_model(device: str = "cpu", threads: int | None = None, dtype: str = "auto", quick: bool = False) -> FrozenT5:
    """A random model with t5-small-lm-adapt's shapes (`quick`: the `tiny` preset's, see `model_config`) and the
    byte tokenizer, built in-process on the model thread, which takes `threads` torch threads (default: one per
    usable core)."""

    def build() -> FrozenT5:
        torch.set_num_threads(threads or usable_cores())
        target = resolve_device(device)
        model, tokenizer = build_tiny_t5(model_config(quick))
        return FrozenT5(model, tokenizer, model_name(quick), target, resolve_dtype(dtype, target))

    return on_model_thread(build)


def load_model(name: str, device: str = "cpu", dtype: str = "auto", threads: int | None = None) -> FrozenT5:
    """`FrozenT5.load` on the model thread, which takes `threads` torch threads (default: one per usable core)."""

    def load() -> FrozenT5:
        torch.set_num_threads(threads or usable_cores())
        return FrozenT5.load(name, device, dtype)

    return on_model_thread(load)


class Tokenizes(Protocol):
    """What `input_texts` needs of a model: token ids of each text, `</s>` included."""

    def tokenize(self, texts: list[str]) -> list[list[int]]: ...


class ByteTokens:
    """The tokenizer of every model here (ByT5's bytes: `tiny` and the t5-small-shaped checkpoints), for a bench
    whose model runs in a server process: it counts tokens as `FrozenT5.tokenize` does, without a model."""

    def __init__(self) -> None:
        self._tokenizer = ByT5Tokenizer()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(texts, add_special_tokens=True)["input_ids"]


def random_prompts(count: int, d_model: int, seed: int, length: int = PROMPT_LENGTH) -> list[torch.Tensor]:
    """`count` distinct fp32 soft prompts `[length, d_model]` (as stored; not yet on the device)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(length, d_model, generator=generator) * 3.0 for _ in range(count)]


@contextmanager
def checkpoint_server(workdir: Path, options: argparse.Namespace, *flags: str) -> Iterator[tuple[Path, int, str]]:
    """Saves a random model with t5-small's shapes (a quick run: `tiny`'s, see `model_config`) as a checkpoint
    under `workdir` and serves it with a real `softserve serve` process (its own OpenMP policy and threads, as
    deployed), `max_batch_size` 32. Yields the checkpoint, the server's process id and its URL."""
    from server.testing.processes import server_process  # here: it loads the app, which in-process benches skip

    checkpoint = save_checkpoint(model_config(options.quick), workdir / "model")
    flags = ("--model", str(checkpoint), "--device", options.device, "--dtype", options.dtype, *flags)
    with server_process(workdir / "data", "--max-batch-size", str(BATCH_SIZE), *flags, timeout_s=300) as (process, url):
        yield checkpoint, process.pid, url


def upload_prompts(base_url: str, task_ids: Sequence[str], prompts: Sequence[torch.Tensor]) -> None:
    """`PUT /v1/prompts/{task_id}` of each prompt, as safetensors."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for task_id, prompt in zip(task_ids, prompts, strict=True):
            data = dump_prompt(prompt, PromptFormat.SAFETENSORS)
            http.put(f"/v1/prompts/{task_id}", files={"file": ("prompt.safetensors", data)}).raise_for_status()


def input_texts(model: Tokenizes, count: int, seed: int, tokens: int = INPUT_TOKENS) -> list[str]:
    """`count` different texts of random words, each exactly `tokens` tokens long (`</s>` included)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words: list[str] = []
        while len(" ".join(words)) < tokens:
            words.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))))
        texts.append(" ".join(words)[: tokens - 1].strip().ljust(tokens - 1, "."))
    lengths = {len(ids) for ids in model.tokenize(texts)}
    if lengths != {tokens}:
        raise RuntimeError(f"inputs tokenize to {sorted(lengths)} tokens, not {tokens}")
    return texts


def rows_for(model: FrozenT5, prompts: Sequence[torch.Tensor], texts: Sequence[str]) -> list[Row]:
    """One row per (prompt, text) pair, the prompt moved to the model's device as the registry does."""
    ids = model.tokenize(list(texts))
    return [Row(model.prompt_on_device(p), i) for p, i in zip(prompts, ids, strict=True)]


def on_model_thread(fn: Callable[..., T], *args: Any) -> T:
    """Runs `fn(*args)` on the benchmarks' one model thread and returns its result."""
    return _MODEL_THREAD.submit(fn, *args).result()


def timed(fn: Callable[[], object]) -> float:
    """Seconds that `fn()` takes on the model thread."""

    def run() -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    return on_model_thread(run)


def generate_throughput(model: FrozenT5, rows: list[Row], calls: int = 1) -> float:
    """Rows per second of `calls` greedy `generate` calls over `rows` (each row generates 4 tokens)."""
    limits = [MAX_NEW_TOKENS] * len(rows)
    return len(rows) * calls / timed(lambda: [model.generate(rows, GREEDY, limits) for _ in range(calls)])


def warm_up(model: FrozenT5, rows: list[Row]) -> None:
    """First-call allocations and kernel choices happen here, not in a sample. Also checks that the batch
    really decodes `MAX_NEW_TOKENS` steps (a random model could end every row early with `</s>`)."""
    generations = on_model_thread(model.generate, rows, GREEDY, [MAX_NEW_TOKENS] * len(rows))
    steps = max(len(g.token_ids) for g in generations)
    if steps != MAX_NEW_TOKENS:
        raise RuntimeError(f"the batch decoded {steps} steps, not {MAX_NEW_TOKENS}; pick another --seed")


def interleaved(samplers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Calls each sampler `repeats` times, alternating the order every round (ABBA...)."""
    names = list(samplers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            samples[name].append(samplers[name]())
    return samples


@dataclass(frozen=True)
class Comparison:
    """Throughput samples of two sides, A (the thing measured) and B (its reference), taken in rounds."""

    a: str
    b: str
    samples: dict[str, list[float]]

    @property
    def ratio(self) -> float:
        """Median over rounds of A ÷ B: the two samples of a round ran back to back, so a change of
        load from other processes between rounds cancels out."""
        return statistics.median(x / y for x, y in zip(self.samples[self.a], self.samples[self.b], strict=True))

    @property
    def ratio_of_medians(self) -> float:
        return statistics.median(self.samples[self.a]) / statistics.median(self.samples[self.b])

    def median(self, side: str) -> float:
        return statistics.median(self.samples[side])

    def table(self, unit: str = "rows/s") -> str:
        rows: list[list[object]] = [
            [name, statistics.median(v), min(v), max(v), len(v)] for name, v in self.samples.items()
        ]
        rows.append([f"ratio {self.a} ÷ {self.b} (median of rounds)", self.ratio, "", "", ""])
        rows.append(["ratio of the medians", self.ratio_of_medians, "", "", ""])
        return markdown_table(["side", f"median {unit}", "min", "max", "samples"], rows)

    def summary(self) -> dict[str, object]:
        """The JSON fields every benchmark reports besides its ratio."""
        return {
            "ratio_of_medians": round(self.ratio_of_medians, 4),
            "median_a": round(self.median(self.a), 3),
            "median_b": round(self.median(self.b), 3),
            "a": self.a,
            "b": self.b,
            "rounds": len(self.samples[self.a]),
        }


def compare(a: tuple[str, Callable[[], float]], b: tuple[str, Callable[[], float]], repeats: int) -> Comparison:
    return Comparison(a[0], b[0], interleaved(dict([a, b]), repeats))


def percentile(values: Sequence[float], q: int) -> float:
    """The q-th percentile, inclusive method: it never lies beyond the largest sample (p99 of 50 samples lies
    between the two largest), where the default (exclusive) method extrapolates past it for fewer than 99."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(
    bench: str,
    tables: Sequence[str],
    comparison: Comparison,
    target: float,
    destination: Path | None,
    **extra: object,
) -> None:
    """Prints the markdown tables, then publishes exactly one JSON line (the machine-readable result)."""
    for table in tables:
        print(table, end="\n\n")
    ratio = comparison.ratio
    result = {"bench": bench, "ratio": round(ratio, 4), "target": target, "meets_target": ratio >= target}
    publish(result | comparison.summary() | extra, destination)


def environment(model: FrozenT5, quick: bool) -> dict[str, object]:
    return {
        "model": model_name(quick),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": on_model_thread(torch.get_num_threads),
        "omp_wait_policy": OMP_WAIT_POLICY,
        "quick": quick,
    }


CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


class KeepAliveConnection:
    """The lean client: one HTTP/1.1 keep-alive connection, a request written at once, the response read
    by its Content-Length. Per request it costs a small fraction of httpx's CPU time, which matters
    because the client shares the cores with the server."""

    def __init__(self, base_url: str) -> None:
        url = httpx.URL(base_url)
        self.host, self.port = url.host, url.port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> int:
        """The response's status (its body read and dropped)."""
        status, _ = await self.exchange(path, body)
        return status

    async def exchange(self, path: str, body: bytes) -> tuple[int, bytes]:
        """The response's status and body."""
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        response = await reader.readuntil(b"\r\n\r\n")
        length = CONTENT_LENGTH.search(response)
        answer = await reader.readexactly(int(length.group(1)) if length else 0)
        if CONNECTION_CLOSE.search(response):
            await self.close()
        return int(response[9:12]), answer

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


WRK_SCRIPT = Path(__file__).resolve().with_name("wrk_generate.lua")
WRK_RESULT = re.compile(r"^wrk-result (\{.*\})$", re.MULTILINE)


@dataclass(frozen=True)
class WrkRun:
    """One wrk run of `wrk_generate.lua`: its answers by status, its latencies, and wrk's own CPU time."""

    ok: int
    rejected: int
    other: int
    seconds: float
    socket_errors: int
    timeouts: int
    latency_p50_ms: float
    latency_p99_ms: float
    cpu_s: float

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.seconds

    @property
    def share_503(self) -> float:
        return self.rejected / max(1, self.ok + self.rejected + self.other)


def require_wrk(bench: str) -> None:
    """Exits with a message if the C load generator is missing."""
    if shutil.which("wrk") is None:
        sys.exit(f"{bench}: wrk is not installed; install it with `apt-get install wrk`")


def write_bodies(path: Path, bodies: Sequence[dict[str, object]]) -> Path:
    """The `POST /v1/generate` bodies that `wrk_generate.lua` sends in turn, one JSON object a line."""
    path.write_text("".join(json.dumps(body) + "\n" for body in bodies))
    return path


class Wrk:
    """One wrk run of `seconds` with `connections` keep-alive connections, each posting the next body as soon as
    its previous answer arrives, started in the background. One wrk thread: the client's CPU is taken from the
    same cores as the server's."""

    def __init__(self, url: str, bodies: Path, connections: int, seconds: int) -> None:
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "60s", "-s", str(WRK_SCRIPT)]
        self.seconds = seconds
        self._children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._process = subprocess.Popen(
            [*command, url, "--", str(bodies)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def stop(self) -> None:
        """Ends the run early (wrk stops on SIGINT as at the end of its duration, and reports)."""
        self._process.send_signal(signal.SIGINT)

    def result(self) -> WrkRun:
        """Waits for the run to end; its counts, and wrk's CPU time (the bench's other children must not end
        meanwhile: it is read from the children's usage)."""
        try:
            stdout, stderr = self._process.communicate(timeout=self.seconds + 120)
        except subprocess.TimeoutExpired:
            self._process.kill()
            raise
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        found = WRK_RESULT.search(stdout)
        if self._process.returncode != 0 or found is None:
            raise RuntimeError(f"wrk failed ({self._process.returncode}): {stdout[-2000:]} {stderr[-2000:]}")
        before = self._children_before
        cpu_s = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        return WrkRun(**json.loads(found.group(1)), cpu_s=cpu_s)


def wrk(url: str, bodies: Path, connections: int, seconds: int) -> WrkRun:
    """One wrk run (see `Wrk`), waited for."""
    return Wrk(url, bodies, connections, seconds).result()


def settle(url: str, body: dict[str, object], timeout_s: float = 300) -> None:
    """Returns once a request sent now is answered 200: wrk leaves requests in flight when it stops, and the
    rows queued before this one must be done (or dropped) before the next run starts on an empty server."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=timeout_s) as http:
        while http.post("/v1/generate", json=body).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")
            time.sleep(0.05)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) that process `pid` has used (Linux /proc; 0 elsewhere)."""
    with suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def descendants(pid: int) -> list[int]:
    """`pid` and the processes it started (the continuous server's engine process), from Linux /proc."""
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            found.append(int(child))
            frontier.append(int(child))
    return found
