"""The network edge in one object: keys, TLS, metrics, logs and the HTTP front end.

Why a single seam: ``server.py`` and ``__main__`` need only three calls from here (interceptors
for ``grpc.aio.server``, a port that is secure when TLS is configured, and ``start_http`` once
the core exists), so the gRPC core stays free of security and observability code, and tests can
build the same edge around any core.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from service.auth import ApiKeys, GrpcAuthInterceptor
from service.domain import CoreState, EmbedResult, ModelInfo, SelfTestResult
from service.grpc_observe import GrpcObserveInterceptor
from service.http import Core, HttpServer, max_body_bytes
from service.logs import add_redaction
from service.metrics import Metrics
from service.settings import Settings
from service.tls import TlsFiles, grpc_server_credentials, http_ssl_context

log = logging.getLogger(__name__)


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


@dataclass
class Edge:
    settings: Settings
    keys: ApiKeys
    tls: TlsFiles | None
    metrics: Metrics

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Edge:
        """Load keys and check TLS files now, so a bad file stops start-up before the model loads.

        Raises:
            ApiKeyError, TlsConfigError: with a message naming the file.
        """
        keys = ApiKeys.from_file(settings.api_keys_file)
        tls = TlsFiles.from_settings(settings)
        if tls is not None:
            http_ssl_context(tls)  # validates cert/key/CA; the contexts are built again per port
        keys.warn_if_open()
        add_redaction(keys.secrets())
        return cls(settings, keys, tls, metrics or Metrics())

    # --- gRPC ----------------------------------------------------------------------------------
    def grpc_interceptors(self) -> list[Any]:
        """Observe first (so refused calls are counted and logged), then authenticate."""
        return [GrpcObserveInterceptor(self.metrics), GrpcAuthInterceptor(self.keys)]

    def grpc_credentials(self) -> Any:
        """``grpc.ServerCredentials`` for ``add_secure_port`` when TLS is on, else ``None``."""
        return grpc_server_credentials(self.tls) if self.tls is not None else None

    # --- core ----------------------------------------------------------------------------------
    def observe_core(self, core: ObservedCore) -> None:
        """Readiness, self-test, providers, queue depth and per-result stage timings into metrics.

        Call once, any time (before or after start).
        """

        def on_state(state: CoreState) -> None:
            self.metrics.set_ready(state == "ready")
            if state == "ready":
                result = core.self_test_result
                self.metrics.set_self_test(result.passed if result.ran else None)
                self.metrics.set_providers(core.model_info().execution_providers)

        def on_result(result: EmbedResult) -> None:
            # Once per embed result, from the core, for every front end alike.
            t = result.timings
            self.metrics.observe_stages(t.queue_ms / 1e3, t.tokenize_ms / 1e3, t.inference_ms / 1e3)
            self.metrics.observe_truncated(result.usage.truncated_inputs)

        core.add_state_listener(on_state)
        core.add_result_listener(on_result)
        self.metrics.bind_queue(lambda: _queue(core, "queue_depth"), lambda: _queue(core, "queued_tokens"))

    async def start_http(self, core: Core) -> HttpServer | None:
        """Serve HTTP (and the metrics port) on the running loop; ``None`` when no port is set."""
        s = self.settings
        if s.http_port is None and s.metrics_port is None:
            return None
        ssl_context = http_ssl_context(self.tls) if self.tls is not None else None
        server = HttpServer(s.grace_period_s)
        try:
            if s.http_port is not None:
                await server.serve_api(
                    core,
                    self.metrics,
                    self.keys,
                    s.http_host,
                    s.http_port,
                    max_body_bytes(s.max_message_bytes),
                    ssl_context,
                )
            if s.metrics_port is not None:
                await server.serve_metrics(self.metrics, s.http_host, s.metrics_port, ssl_context)
        except BaseException:
            await server.stop()
            raise
        return server


def _queue(core: ObservedCore, attribute: str) -> float:
    """Scrape-time read that never raises (before start-up there is no batcher yet)."""
    try:
        return float(getattr(core.batcher, attribute))
    except Exception:
        return 0.0
