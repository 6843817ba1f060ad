"""What the metrics read from the core: readiness, self-test, providers, queue depth, stage timings.

Why its own module: the edge (keys, TLS, interceptors, HTTP) and the metrics registry both need
it, and it is the one place a front end-independent signal (a state change, an embed result) is
turned into metrics, so the gRPC and HTTP front ends never record the same thing twice.
"""

from __future__ import annotations

from collections.abc import Callable

from service.cache import CacheStats
from service.core import EmbeddingCore
from service.domain import CoreState, EmbedResult
from service.metrics import Metrics
from service.models import ModelRegistry


def observe_models(metrics: Metrics, models: ModelRegistry) -> None:
    """Readiness, self-test, providers, queue depth and per-result stage timings into metrics.

    Ready means every model is; the self-test passed when every model's that ran passed; queue
    depth is the sum over the models' batchers. Call once, any time (before or after start).
    """

    def on_state(state: CoreState) -> None:
        metrics.set_ready(state == "ready")
        if state == "ready":
            results = [core.self_test_result for core in models.cores if core.self_test_result.ran]
            metrics.set_self_test(all(r.passed for r in results) if results else None)
            providers = (p for info in models.model_infos() for p in info.execution_providers)
            metrics.set_providers(dict.fromkeys(providers))

    def on_result(result: EmbedResult) -> None:
        # Once per embed result, from the core, for every front end alike.
        t = result.timings
        metrics.observe_stages(t.queue_ms / 1e3, t.tokenize_ms / 1e3, t.inference_ms / 1e3)
        metrics.observe_truncated(result.usage.truncated_inputs)
        metrics.observe_model_result(result.model, result.usage.input_tokens)

    for core in models.cores:
        core.add_state_listener(_model_state(metrics, core))
    models.add_state_listener(on_state)
    models.add_result_listener(on_result)
    metrics.bind_queue(lambda: _queue(models, "queue_depth"), lambda: _queue(models, "queued_tokens"))
    metrics.bind_cache(lambda: _cache_stats(models))


def _model_state(metrics: Metrics, core: EmbeddingCore) -> Callable[[CoreState], None]:
    """``embed_model_ready{model}`` and the model's queue, once its name is known (loaded or named)."""

    def queued() -> float:
        try:
            return float(core.batcher.queued_tokens)
        except Exception:
            return 0.0

    def on_state(state: CoreState) -> None:
        if core.model_name:
            metrics.set_model_ready(core.model_name, state == "ready", queued)

    return on_state


def _queue(models: ModelRegistry, attribute: str) -> float:
    """Scrape-time read that never raises (before start-up there is no batcher yet)."""
    total = 0.0
    for core in models.cores:
        try:
            total += float(getattr(core.batcher, attribute))
        except Exception:
            continue
    return total


def _cache_stats(models: ModelRegistry) -> CacheStats:
    """The result caches of all models, summed (each model has its own, keyed by its bundle)."""
    stats = [core.cache_stats() for core in models.cores]
    return CacheStats(
        hits=sum(s.hits for s in stats),
        misses=sum(s.misses for s in stats),
        evictions=sum(s.evictions for s in stats),
        bytes=sum(s.bytes for s in stats),
        entries=sum(s.entries for s in stats),
        capacity_bytes=sum(s.capacity_bytes for s in stats),
    )
