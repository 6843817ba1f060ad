"""Prometheus metrics for the service, in one registry of its own.

Why an own ``CollectorRegistry`` rather than the global default: tests build several servers in
one process, and the default registry refuses a second metric with the same name. Every name
starts with ``embed_`` (house style) so dashboards can select the service with one prefix.

The gRPC and HTTP front ends count requests (``api`` label) and observe the stage timings each
result carries; the batcher reports batch shapes through :meth:`Metrics.observe_batch`; queue
depth is read at scrape time from a callable, so the hot path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from service.cache import CacheStats
from service.watchdog import Stall

Api = Literal["grpc", "http"]

# Latency buckets from 1 ms to 30 s: CPU MiniLM answers in milliseconds, a 7B model on a long
# batch takes seconds; the default prometheus buckets stop at 10 s and start too coarse.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

SELF_TEST_PASSED = 1.0
SELF_TEST_FAILED = 0.0
SELF_TEST_NOT_RUN = -1.0


class Metrics:
    """All metrics of one server process; pass the one instance to every component."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "embed_requests",
            "Requests answered, by API (grpc/http), method and status code.",
            ["api", "method", "code"],
            registry=r,
        )
        self.request_latency = Histogram(
            "embed_request_duration_seconds",
            "Total request latency as the server saw it.",
            ["api", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "embed_queue_duration_seconds",
            "Time a request waited for a batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_time = Histogram(
            "embed_tokenize_duration_seconds",
            "Tokenisation time per request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "embed_inference_duration_seconds",
            "Model run time of the batch(es) that carried a request.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "embed_batch_size", "Inputs per model batch.", buckets=_BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "embed_batch_tokens",
            "Tokens per model batch as the runtime pays them (batch × longest).",
            buckets=_BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.padded_ratio = Histogram(
            "embed_padded_token_ratio",
            "Share of a batch's paid tokens that are padding: 1 - real / (batch × longest).",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.input_tokens = Counter(
            "embed_input_tokens", "Tokens embedded (as billed in usage), by API.", ["api"], registry=r
        )
        self.inputs_truncated = Counter(
            "embed_inputs_truncated",
            "Inputs cut to the model's max length by the truncation policy.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "embed_queue_depth", "Requests waiting in the batcher queue (read at scrape time).", registry=r
        )
        self.queue_tokens = Gauge("embed_queue_tokens", "Tokens waiting in the batcher queue.", registry=r)
        self.self_test = Gauge(
            "embed_self_test_status", "Start-up self-test: 1 passed, 0 failed, -1 not run.", registry=r
        )
        self.self_test.set(SELF_TEST_NOT_RUN)
        self.provider = Gauge(
            "embed_execution_provider",
            "ONNX Runtime execution providers actually in use (1 per provider, in priority order).",
            ["provider"],
            registry=r,
        )
        self.stalled = Gauge(
            "embed_runtime_stalled",
            "1 while the watchdog sees no runtime progress (health NOT_SERVING, liveness fails).",
            registry=r,
        )
        self.stalls = Counter(
            "embed_runtime_stalls",
            "Watchdog stalls by kind: slow_call, no_progress, scheduler_died.",
            ["kind"],
            registry=r,
        )
        self.ready = Gauge(
            "embed_ready", "1 while the server is SERVING, 0 while warming up or draining.", registry=r
        )
        # Per served model (``model`` label: the name clients use); the series above are server totals.
        self.model_ready = Gauge(
            "embed_model_ready", "1 while this model is ready, 0 otherwise.", ["model"], registry=r
        )
        self.model_requests = Counter(
            "embed_model_requests", "Embed requests computed, by model.", ["model"], registry=r
        )
        self.model_input_tokens = Counter(
            "embed_model_input_tokens",
            "Tokens embedded (as billed in usage), by model.",
            ["model"],
            registry=r,
        )
        self.model_queue_tokens = Gauge(
            "embed_model_queue_tokens", "Tokens waiting in this model's batcher.", ["model"], registry=r
        )

    # --- request level (front ends) -------------------------------------------------------
    def observe_request(self, api: Api, method: str, code: str, latency_s: float, tokens: int = 0) -> None:
        """Count one answered request; ``code`` is the HTTP status or the gRPC status name."""
        self.requests.labels(api=api, method=method, code=code).inc()
        self.request_latency.labels(api=api, method=method).observe(max(latency_s, 0.0))
        if tokens:
            self.input_tokens.labels(api=api).inc(tokens)

    def observe_stages(self, queue_s: float, tokenize_s: float, inference_s: float) -> None:
        """Stage timings of one successful embed request (from its result)."""
        self.queue_time.observe(max(queue_s, 0.0))
        self.tokenize_time.observe(max(tokenize_s, 0.0))
        self.inference_time.observe(max(inference_s, 0.0))

    def observe_truncated(self, count: int) -> None:
        if count > 0:
            self.inputs_truncated.inc(count)

    # --- batch level (batcher hook) -------------------------------------------------------
    def observe_batch(self, size: int, real_tokens: int, padded_tokens: int) -> None:
        """One model batch: how many inputs, tokens paid, and how much of it was padding."""
        self.batch_size.observe(size)
        self.batch_tokens.observe(padded_tokens)
        if padded_tokens > 0:
            self.padded_ratio.observe(1.0 - min(real_tokens, padded_tokens) / padded_tokens)

    # --- state ----------------------------------------------------------------------------
    def bind_queue(self, depth: Callable[[], float], tokens: Callable[[], float] | None = None) -> None:
        """Read queue depth (and queued tokens) from the batcher whenever Prometheus scrapes."""
        self.queue_depth.set_function(depth)
        if tokens is not None:
            self.queue_tokens.set_function(tokens)

    def set_self_test(self, passed: bool | None) -> None:
        self.self_test.set(SELF_TEST_NOT_RUN if passed is None else float(passed))

    def set_providers(self, providers: Iterable[str]) -> None:
        self.provider.clear()
        for name in providers:
            self.provider.labels(provider=name).set(1)

    def observe_stall(self, stall: Stall | None) -> None:
        """The watchdog's verdict changed: a stall (counted by kind) or recovery."""
        self.stalled.set(0.0 if stall is None else 1.0)
        if stall is not None:
            self.stalls.labels(kind=stall.kind).inc()

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1.0 if ready else 0.0)

    def set_model_ready(self, model: str, ready: bool, queued_tokens: Callable[[], float]) -> None:
        self.model_ready.labels(model=model).set(1.0 if ready else 0.0)
        self.model_queue_tokens.labels(model=model).set_function(queued_tokens)

    def observe_model_result(self, model: str, tokens: int) -> None:
        self.model_requests.labels(model=model).inc()
        self.model_input_tokens.labels(model=model).inc(tokens)

    def bind_cache(self, stats: Callable[[], CacheStats]) -> None:
        """Result cache hits, misses, evictions and size, read from the cache at scrape time."""
        self.registry.register(_CacheCollector(stats))

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type, for any HTTP front end."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _CacheCollector(Collector):
    """Reads the cache's own counters when scraped, so a hit costs no metrics call."""

    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        return []  # names are known only at collect time; nothing to check against

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, value, text in (
            ("embed_cache_hits", s.hits, "Inputs answered from the result cache."),
            ("embed_cache_misses", s.misses, "Inputs the result cache did not hold (sent to the batcher)."),
            (
                "embed_cache_evictions",
                s.evictions,
                "Result cache entries evicted to stay within cache_bytes.",
            ),
        ):
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], value)
            yield counter
        for name, value, text in (
            ("embed_cache_bytes", s.bytes, "Bytes held by the result cache (vectors, keys, overhead)."),
            ("embed_cache_entries", s.entries, "Vectors held by the result cache."),
            ("embed_cache_capacity_bytes", s.capacity_bytes, "The result cache's bound (cache_bytes)."),
        ):
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], value)
            yield gauge
