"""Prometheus metrics. Never labelled by task, job or request id (unbounded cardinality), but for the one series
of `softserve_engine_tasks_info`, made at each scrape, that the inference gateway's protocol asks for."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# `*_created` series double the output and no dashboard reads them.
disable_created_metrics()


@dataclass(frozen=True)
class KnownLabels:
    """The values each labelled metric is known to take; their series exist, at 0, from the start.

    A series that was never incremented is not exported at all, and to a dashboard or an alert rule that is
    "no data", not 0: a rejections panel stays blank and a `rate(...) > x` alert cannot even evaluate until
    the first event. The composition root fills this from the code's own constants (the error table,
    `JobState`, the registry's load sources), so the values cannot drift from what is counted.
    """

    rejection_reasons: tuple[str, ...] = ()
    prompt_sources: tuple[str, ...] = ()
    job_states: tuple[str, ...] = ()


# Where a prompt can be found: on the device (the prompt cache), or in a store tier (Redis, the disk).
PROMPT_TIERS = ("device", "redis", "disk")


def zero_series(counter: Counter, label_values: Iterable[str]) -> Counter:
    """Makes the series of each value of the counter's one label now, at 0."""
    for value in label_values:
        counter.labels(value)
    return counter


class ServerMetrics:
    """Every metric of one server instance, on a registry of its own (tests run several apps)."""

    def __init__(self, known: KnownLabels | None = None) -> None:
        known = known or KnownLabels()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "softserve_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "softserve_request_duration_seconds",
            "End-to-end request duration",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "softserve_queue_wait_seconds",
            "Time a row waits in the batcher queue",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "softserve_inference_duration_seconds",
            "Model time per batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("softserve_batch_size", "Rows per batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tasks = Histogram(
            "softserve_batch_tasks", "Distinct tasks per batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth_rows = Gauge("softserve_queue_depth", "Rows waiting in the batcher queue", registry=r)
        self.rejections = zero_series(
            Counter("softserve_rejections_total", "Requests refused, by reason (error code)", ["reason"], registry=r),
            known.rejection_reasons,
        )
        self.shed_delay = Histogram(
            "softserve_shed_delay_seconds",
            "How long each request shed because the queue was full waited for its 503 (`shed_delay_ms`, doubling "
            "for each refusal in a row on one connection up to `shed_delay_max_ms`)",
            buckets=(0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0),
            registry=r,
        )
        self.dropped_rows = Counter(
            "softserve_dropped_rows_total",
            "Queued rows dropped before inference (client gone or deadline)",
            registry=r,
        )
        self.batch_failures = Counter("softserve_batch_failures_total", "Model calls that raised", registry=r)
        self.cache_hits = Counter("softserve_prompt_cache_hits_total", "Device prompt cache hits", registry=r)
        self.cache_misses = Counter("softserve_prompt_cache_misses_total", "Device prompt cache misses", registry=r)
        self.cache_evictions = Counter(
            "softserve_prompt_cache_evictions_total", "Prompts evicted from the device cache", registry=r
        )
        self.cache_bytes = Gauge("softserve_prompt_cache_bytes", "Bytes of prompts on the device", registry=r)
        self.cache_prompts = Gauge("softserve_prompt_cache_prompts", "Prompts on the device", registry=r)
        self.cache_pinned = Gauge(
            "softserve_prompt_cache_pinned_prompts", "Pinned prompts on the device (never evicted)", registry=r
        )
        # Per tier, never per task: which task is where is `GET /v1/prompts` and `/v1/models` (`loaded`, `pinned`).
        self.prompt_lookups = Counter(
            "softserve_prompt_lookups_total",
            "Prompt lookups by tier (device cache, then the store: redis, or disk) and result (hit, miss)",
            ["tier", "result"],
            registry=r,
        )
        for tier in PROMPT_TIERS:
            for result in ("hit", "miss"):
                self.prompt_lookups.labels(tier=tier, result=result)
        self.prompt_loads = zero_series(
            Counter(
                "softserve_prompt_loads_total",
                "Prompts resolved for requests, by where they came from: cache (device), redis, disk",
                ["source"],
                registry=r,
            ),
            known.prompt_sources,
        )
        self.engine = EngineMetrics(r)
        self.training = TrainingMetrics(r, known.job_states)

    def render(self) -> bytes:
        return generate_latest(self.registry)


LEAVE_REASONS = ("eos", "length", "non_finite", "cancelled", "deadline", "shutdown", "failed")
TASK_INFO_LABELS = ("running_lora_adapters", "waiting_lora_adapters", "max_lora")


@dataclass(frozen=True)
class TaskNames:
    """What `softserve_engine_tasks_info` says: the tasks with rows running and waiting, how many tasks can share a
    step, and when the tasks last changed (Unix time)."""

    running: Iterable[str]
    waiting: Iterable[str]
    max_tasks: int
    changed_at: float


class TasksInfo(Collector):
    """`softserve_engine_tasks_info`: one series, made at each scrape from what `source` says then. Rows come and
    go many times a second while a scrape comes every few; naming the tasks at each change cost every request
    a sort and a new labelled child."""

    NAME = "softserve_engine_tasks_info"
    DOCUMENTATION = (
        "One series whose labels name, comma-separated, the tasks (as a request's `model` names them) with rows "
        "running and with rows waiting in this API process's engine rows, and how many tasks can share a step "
        "(`max_lora`: `max_active_rows`); its value is when they last changed (Unix time). The label names are "
        "vLLM's `lora_requests_info`, which an endpoint picker reads"
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self.source: Callable[[], TaskNames] | None = None  # none until an engine client reports its rows
        registry.register(self)

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.NAME, self.DOCUMENTATION, labels=TASK_INFO_LABELS)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.NAME, self.DOCUMENTATION, labels=TASK_INFO_LABELS)
        if self.source is not None:
            names = self.source()
            labels = [",".join(sorted(names.running)), ",".join(sorted(names.waiting)), str(names.max_tasks)]
            family.add_metric(labels, names.changed_at)
        yield family


class EngineMetrics:
    """The continuous engine as this API process sees it (its own rows; an engine shared by several API
    processes is the sum of theirs)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.time_to_first_token = Histogram(
            "softserve_time_to_first_token_seconds",
            "From a generate row's submission to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("softserve_generated_tokens_total", "Tokens generated", registry=r)
        self.active_rows = Gauge("softserve_engine_active_rows", "Rows in the latest decoder step", registry=r)
        self.waiting_rows = Gauge(
            "softserve_engine_waiting_rows", "Generate rows waiting for a place in the decoder step", registry=r
        )
        self.pending_rows = Gauge(
            "softserve_engine_pending_rows", "Classify and beam rows the engine is working through", registry=r
        )
        self.cache_tokens = Gauge(
            "softserve_engine_cache_tokens",
            "Token positions the engine's row cache holds: rows x (encoder + decoder positions), as allocated",
            registry=r,
        )
        # The inference gateway's model server protocol (queued, running, cache use, the adapters running and
        # waiting): queued rows are `waiting_rows` above; an endpoint picker maps these names to its own.
        self.running_rows = Gauge(
            "softserve_engine_running_rows",
            "Rows the engine is serving: generate rows holding a place in the decoder step, and classify and beam "
            "rows in progress",
            registry=r,
        )
        self.cache_usage = Gauge(
            "softserve_engine_cache_usage_ratio",
            "What the engine's row cache holds over what it may hold (`max_cached_tokens`), 0 to 1",
            registry=r,
        )
        self.tasks_info = TasksInfo(r)
        self.pass_budget_spent = Histogram(
            "softserve_engine_pass_budget_spent_tokens",
            "Model work of one engine pass besides its decoder step, in tokens (at most the pass budget, but for a "
            "single item larger than it)",
            buckets=(0, 16, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=r,
        )
        self.step_duration = Histogram(
            "softserve_decoder_step_duration_seconds", "Duration of one decoder step", buckets=STEP_BUCKETS, registry=r
        )
        self.rows_joined = Counter(
            "softserve_engine_rows_joined_total", "Generate rows that joined the decoder step", registry=r
        )
        self.rows_left = zero_series(
            Counter(
                "softserve_engine_rows_left_total",
                "Generate rows that left the decoder step (or the wait for it), by reason",
                ["reason"],
                registry=r,
            ),
            LEAVE_REASONS,
        )
        self.engine_up = Gauge("softserve_engine_up", "1 while the engine answers, 0 while it is down", registry=r)
        self.restarts = Counter(
            "softserve_engine_restarts_total",
            "Times the engine came back as a new engine: this API process's child started again (it exited or "
            "hung), or another engine answering at a shared engine's address",
            registry=r,
        )


class TrainingMetrics:
    """Training jobs, counted where each thing happens: the API (submitted, cancelled) and the process that
    trains (running, succeeded, failed, requeued). With the in-process worker that is one registry (the
    API's `/metrics`); `softserve worker` processes serve their own (`--worker-metrics-port`)."""

    def __init__(self, registry: CollectorRegistry | None = None, job_states: Iterable[str] = ()) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.jobs = zero_series(
            Counter(
                "softserve_training_jobs_total",
                "Training job state changes made by this process, by the state entered",
                ["state"],
                registry=r,
            ),
            job_states,
        )
        self.steps = Counter("softserve_training_steps_total", "Optimizer steps run by this process", registry=r)
        self.step_duration = Histogram(
            "softserve_training_step_duration_seconds",
            "Duration of one training step (steps that also evaluate are not observed)",
            buckets=STEP_BUCKETS,
            registry=r,
        )


class BatcherMetrics:
    """Adapts `ServerMetrics` to the batcher's `BatchObserver` protocol."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def queue_wait(self, seconds: float) -> None:
        self._metrics.queue_wait.observe(seconds)

    def queue_depth(self, rows: int) -> None:
        self._metrics.queue_depth_rows.set(rows)

    def dropped(self, rows: int) -> None:
        self._metrics.dropped_rows.inc(rows)
