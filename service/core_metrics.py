"""What the metrics read from the core: readiness, self-test, providers, queue depth, stage timings.

Why its own module: the edge (keys, TLS, interceptors, HTTP) and the metrics registry both need
it, and it is the one place a front end-independent signal (a state change, an embed result) is
turned into metrics, so the gRPC and HTTP front ends never record the same thing twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from service.cache import CacheStats
from service.domain import CoreState, EmbedResult, ModelInfo, SelfTestResult
from service.http import Core
from service.metrics import Metrics


class _Queue(Protocol):
    @property
    def queue_depth(self) -> int: ...

    @property
    def queued_tokens(self) -> int: ...


class ObservedCore(Core, Protocol):
    """What the edge reads from ``EmbeddingCore`` beyond what HTTP needs."""

    @property
    def batcher(self) -> _Queue: ...

    @property
    def self_test_result(self) -> SelfTestResult: ...

    def add_state_listener(self, listener: Callable[[CoreState], None]) -> None: ...

    def add_result_listener(self, listener: Callable[[EmbedResult], None]) -> None: ...

    def model_info(self) -> ModelInfo: ...

    def cache_stats(self) -> CacheStats: ...


def observe_core(metrics: Metrics, core: ObservedCore) -> None:
    """Readiness, self-test, providers, queue depth and per-result stage timings into metrics.

    Call once, any time (before or after start).
    """

    def on_state(state: CoreState) -> None:
        metrics.set_ready(state == "ready")
        if state == "ready":
            result = core.self_test_result
            metrics.set_self_test(result.passed if result.ran else None)
            metrics.set_providers(core.model_info().execution_providers)

    def on_result(result: EmbedResult) -> None:
        # Once per embed result, from the core, for every front end alike.
        t = result.timings
        metrics.observe_stages(t.queue_ms / 1e3, t.tokenize_ms / 1e3, t.inference_ms / 1e3)
        metrics.observe_truncated(result.usage.truncated_inputs)

    core.add_state_listener(on_state)
    core.add_result_listener(on_result)
    metrics.bind_queue(lambda: _queue(core, "queue_depth"), lambda: _queue(core, "queued_tokens"))
    metrics.bind_cache(core.cache_stats)


def _queue(core: ObservedCore, attribute: str) -> float:
    """Scrape-time read that never raises (before start-up there is no batcher yet)."""
    try:
        return float(getattr(core.batcher, attribute))
    except Exception:
        return 0.0
