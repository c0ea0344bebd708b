"""The one settings object: `SOFTSERVE_*` env vars and `softserve serve` flags are the same fields.

The CLI also reads a `.env` file in the working directory (`Settings(_env_file=".env")`); library and test
code build `Settings()` from the environment only, so a developer's `.env` never changes a test."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from server.engine.limits import PASS_BUDGET_TOKENS, STREAM_PASS_BUDGET_TOKENS
from server.serving.schemas import MAX_INPUTS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTSERVE_", protected_namespaces=())

    model: str = Field("tiny", description="hub id, local checkpoint dir, or `tiny`")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda[:N]`")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="`auto` is bfloat16 on CUDA, float32 on CPU"
    )
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port (0: any free port)")
    store: Literal["disk", "redis"] = Field("disk", description="prompt registry backend")
    data_dir: Path = Field(Path("./data"), description="disk store and job records")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for `store=redis`")
    redis_namespace: str = Field("softserve", description="prefix of every Redis key and of the change channel")
    redis_timeout_s: float = Field(1.0, gt=0, description="Redis connect/read timeout; reads then use the disk mirror")
    registry_reconcile_s: float = Field(
        5.0, gt=0, description="how often a replica checks its cached tasks against Redis (pub/sub can lose notices)"
    )
    max_batch_size: int = Field(32, ge=1, description="rows per model call")
    max_batch_tokens: int = Field(
        16384,
        ge=1,
        description="prompt + input tokens per model call (a beam row counts `num_beams` times; a classify row "
        "adds labels * its longest label); a request with one row above it is refused (422)",
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill")
    scheduler: Literal["continuous", "static"] = Field(
        "continuous",
        description="`continuous`: rows join and leave the running batch at every decoder step (streaming needs "
        "it); `static`: one `generate` call per batch, kept for comparison",
    )
    engine: Literal["process", "thread"] = Field(
        "process",
        description="where the continuous engine runs: its own process (`softserve serve` starts it), or a thread "
        "of the API process (what an app built around a model object in Python always uses)",
    )
    engine_address: str = Field(
        "",
        description="ZeroMQ address of an engine started with `softserve engine` (several API processes may "
        "share it); empty: the API process starts its own",
    )
    engine_keys_dir: Path | None = Field(
        None,
        description="CURVE keys of a tcp:// engine (`softserve engine-keys DIR`): the engine serves only the clients "
        "whose public key is in `DIR/authorized_clients/`, API processes check the engine's key; both ends need it",
    )
    engine_insecure_tcp: bool = Field(
        False,
        description="DANGER: let a tcp:// engine and its API processes talk without keys; anyone who reaches the "
        "port can then submit rows and read every tenant's tokens (a network you fully trust only)",
    )
    max_active_rows: int = Field(64, ge=1, description="rows in one decoder step; more wait for a place")
    max_cached_tokens: int = Field(
        131072,
        ge=1,
        description="what the engine's row cache may hold, in token positions: its rows times (the longest "
        "prompt + input + the largest `max_new_tokens` among them), as allocated; admission waits beyond it, so "
        "what is charged is what is held",
    )
    pass_budget_tokens: int = Field(
        PASS_BUDGET_TOKENS,
        ge=1,
        description="model work one engine pass may do besides its decoder step, in tokens: encoder passes of "
        "joining rows, classify label scoring and beam search steps are cut into pieces of at most this and run "
        "between decoder steps, so no request stalls other rows' tokens for longer (larger: more throughput for "
        "joining and classify work; smaller: steadier token gaps for the rows decoding)",
    )
    stream_pass_budget_tokens: int = Field(
        STREAM_PASS_BUDGET_TOKENS,
        ge=1,
        description="`pass_budget_tokens` while a row in the decoder step streams its tokens (each pass's other "
        "work is a gap between them); without one, a stall only adds to the rows' total latency, which the larger "
        "budget shortens under load (fuller decoder steps)",
    )
    max_queue_size: int = Field(
        1024,
        ge=1,
        description="rows in flight before 503: waiting for or in the decoder step (continuous), waiting for a "
        "batch (static)",
    )
    shed_delay_ms: float = Field(
        250.0,
        ge=0,
        le=10_000,
        description="a request shed because the queue is full gets its 503 after this delay, so that clients "
        "retrying at once cannot take the server's time from the requests it is serving",
    )
    shed_delay_max_ms: float = Field(
        4000.0,
        ge=0,
        le=60_000,
        description="each refusal in a row on one connection waits twice as long as the one before, from "
        "`shed_delay_ms` up to this (a request taken on it starts again from `shed_delay_ms`): a client that "
        "retries a 503 at once, ignoring Retry-After, costs the server fewer refusals a second (at most "
        "`shed_delay_ms` to disable)",
    )
    prompt_cache_mb: float = Field(512.0, gt=0, description="device prompt cache budget")
    preload_tasks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated `tenant/task` (or `task` of tenant `default`): loaded at start, never evicted",
    )
    max_pinned_per_tenant: int = Field(
        8,
        ge=0,
        description="tasks a tenant may pin (`PUT /v1/prompts/{task}/pin`); one more is 429 (0: no limit but "
        "the prompt cache's budget)",
    )
    warmup_prompts: int = Field(
        32,
        ge=0,
        description="the most used prompts (by the store's use counts) loaded before `/ready` turns 200 (0: none)",
    )
    api_keys_file: Path | None = Field(None, description="hashed API keys (default `<data dir>/api_keys.json`)")
    auth: Literal["auto", "keys", "open"] = Field(
        "auto",
        description="`auto`: the keys file decides (no file: open; once a key was added: keys, even with none "
        "left); `keys`: a key is always needed; `open`: anonymous callers are tenant `default` (never admin)",
    )
    max_prompt_length: int = Field(512, ge=1, description="longest accepted prompt (rows)")
    max_input_tokens: int = Field(512, ge=1, description="longest accepted input, in tokens")
    max_input_chars: int = Field(
        0,
        ge=0,
        description="longest accepted input or label in characters, after the task's template, checked before "
        "tokenizing (0: 64 * `max_input_tokens`)",
    )
    max_new_tokens: int = Field(256, ge=1, description="cap on `parameters.max_new_tokens`")
    max_top_logprobs: int = Field(
        20,
        ge=0,
        le=20,
        description="most alternatives a generated token may report with its log-probability "
        "(`parameters.logprobs`; 422 above)",
    )
    max_grammar_bytes: int = Field(
        65536,
        ge=1024,
        le=1 << 22,
        description="largest structured-output grammar (`parameters.grammar`, `response_format`), in bytes of its "
        "compiled text; 422 above. Compiling one the server has not compiled yet is charged to the tenant's "
        "tokens/s as a token per 4 bytes",
    )
    max_beam_tokens: int = Field(
        1024, ge=1, description="cap on `parameters.num_beams` * `parameters.max_new_tokens` (422 above)"
    )
    max_template_chars: int = Field(
        2000, ge=1, description="longest `input_template` a task may store, in characters (it must hold one `{input}`)"
    )
    max_inputs_per_request: int = Field(64, ge=1, le=MAX_INPUTS, description="rows one request may carry")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body limit")
    max_json_body_bytes: int = Field(
        0,
        ge=0,
        description="JSON body limit, far below `max_body_bytes` (which is for uploads), checked from "
        "`Content-Length` before a byte is read (0: 4 * `max_inputs_per_request` * the input character limit + "
        "1 MiB, room for every input at its limit in 4-byte UTF-8); larger training sets go as multipart JSONL",
    )
    max_json_values: int = Field(
        100_000,
        ge=1000,
        description="values a JSON body may hold (each `[`, `{` and `,` outside strings counts one), counted at C "
        "speed before the body is parsed, so no shape of body stalls the server while it is parsed",
    )
    request_timeout_s: float = Field(60.0, gt=0, description="per-request deadline (504 after it)")
    max_connections: int = Field(
        1024,
        ge=1,
        description="open HTTP connections; beyond it the longest-idle one is closed, or the request gets 503",
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection that has not sent a whole request head within this is closed"
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request body that stops arriving, or a response the client stops reading, for this long "
        "closes its connection",
    )
    body_deadline_s: float = Field(
        120.0, gt=0, description="a request body must arrive whole within this of its head, however it trickles"
    )
    min_body_bytes_per_s: int = Field(
        1024,
        ge=0,
        description="a request body arriving slower than this on average, once `body_rate_grace_s` has passed, "
        "closes its connection (0: no minimum)",
    )
    body_rate_grace_s: float = Field(
        5.0, gt=0, description="how long a body may arrive at any rate (its first bytes need some time)"
    )
    max_connections_per_client: int = Field(
        512,
        ge=0,
        description="open HTTP connections from one client address, loopback included; beyond it that address's "
        "longest-idle or slowest one is closed, or the request gets 503 (0: no limit, e.g. behind a proxy)",
    )
    metrics_require_key: bool = Field(False, description="`/metrics` answers only to admin keys")
    rate_limit_requests_per_s: int = Field(0, ge=0, description="per-tenant requests/s (0: no limit)")
    rate_limit_tokens_per_s: int = Field(
        0,
        ge=0,
        description="per-tenant tokens/s put into model calls, counted as `max_batch_tokens` counts them (prompt + "
        "input per row, and so on); a request above it is refused (422) (0: no limit)",
    )
    rate_limit_management_cost_per_s: int = Field(
        2000,
        ge=0,
        description="per-tenant budget/s of every authenticated route but inference (prompts, listings, training "
        "jobs, `/v1/info`): a request costs 1, plus 1 per task a listing page returns or `similar` compares; once "
        "spent, 429 answered after `shed_delay_ms` (0: no limit)",
    )
    max_tasks_per_tenant: int = Field(
        10_000, ge=0, description="tasks a tenant may store; an upload or training job of one more is 429 (0: no limit)"
    )
    similar_embeddings_per_tenant: int = Field(
        4096,
        ge=0,
        description="task embeddings (one `d_model` vector each) `/similar` keeps per tenant; a tenant with more "
        "tasks has the rest read again at each call, and never evicts another tenant's",
    )
    drain_delay_s: float = Field(1.0, ge=0, description="after SIGTERM, /ready answers 503 this long before closing")
    drain_timeout_s: float = Field(60.0, ge=0, description="after that, how long in-flight requests may take")
    cpu_threads: int = Field(
        0,
        ge=0,
        description="torch threads on CPU (0: one per usable core, honouring the process's CPU affinity and its "
        "cgroup CPU quota; fewer leaves room for the event loop)",
    )
    warmup: bool = Field(True, description="run a warm-up batch before `/ready` turns 200")
    training_max_active_jobs: int = Field(
        4, ge=0, description="queued + running training jobs a tenant may have (0: no limit); 429 beyond"
    )
    training_checkpoint_every: int = Field(
        100, ge=0, description="steps between checkpoints of a training job (0: none; a lost job then restarts)"
    )
    training_max_steps: int = Field(
        100_000, ge=1, description="most `config.steps` a training job may ask for; 422 beyond"
    )
    training_time_slice_s: float = Field(
        60.0,
        ge=0,
        description="a training job that has run this long yields to another tenant's queued job: it is "
        "checkpointed, queued again and resumes later where it stopped (0: never yields)",
    )
    training_lease_s: float = Field(
        30.0, gt=0, description="`store=redis`: a running job's lease, renewed by its worker every third of it"
    )
    training_reaper_interval_s: float = Field(
        10.0,
        gt=0,
        description="`store=redis`: how often workers look for jobs whose worker died; such a job is requeued "
        "within `training_lease_s` + this",
    )
    training_max_attempts: int = Field(
        3, ge=1, description="times a job may lose its worker (or server) before it fails with the reason"
    )
    training_job_timeout_s: float = Field(
        86400.0, gt=0, description="`store=redis`: longest run of one delivery of a job (RQ job timeout)"
    )
    worker_metrics_port: int = Field(0, ge=0, description="`softserve worker` serves `/metrics` on this port (0: off)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[Any, ...]:
        """A `.env` is shared with other tools (docker compose, the CLI's `SOFTSERVE_URL`): only this object's
        fields are taken from it, as from the environment, instead of refusing every other name."""

        def dotenv_fields() -> dict[str, Any]:
            return {name: value for name, value in dotenv_settings().items() if name in cls.model_fields}

        return init_settings, env_settings, dotenv_fields, file_secret_settings

    @field_validator("preload_tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def keys_file(self) -> Path:
        return self.api_keys_file or self.data_dir / "api_keys.json"


def _default_text(field: FieldInfo) -> str:
    """A field's default as the README and `.env.example` write it ("" when there is none)."""
    default = field.get_default(call_default_factory=True)
    if default is None or default == []:
        return ""
    return default.as_posix() if isinstance(default, Path) else str(default)


def settings_table() -> str:
    """The README's configuration table, generated from the fields (a test keeps the README current)."""
    lines = ["| env var | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        lines.append(f"| `SOFTSERVE_{name.upper()}` | `{flag}` | `{_default_text(field)}` | {field.description} |")
    return "\n".join(lines)


def env_example() -> str:
    """`.env.example`: every setting with its default and meaning (a test keeps it current)."""
    lines = [
        "# softserve settings: copy this file to `.env` (read by `softserve serve`, `worker` and `keys` in the working",
        "# directory; variables of the environment and flags win over it). Every variable is also a flag.",
    ]
    for name, field in Settings.model_fields.items():
        default = _default_text(field)
        unset = "# " if default == "" else ""  # an empty value would not mean "unset"
        lines += [f"# {field.description}", f"{unset}SOFTSERVE_{name.upper()}={default}"]
    return "\n".join(lines) + "\n"


def write_readme_table(readme: Path = Path("README.md")) -> None:
    start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
    text = readme.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{settings_table()}\n{end}{tail}")


if __name__ == "__main__":
    write_readme_table()
    Path(".env.example").write_text(env_example())
