"""Prometheus metrics. Never labelled by task, job or request id (unbounded cardinality)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

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
