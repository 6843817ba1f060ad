"""The network edge in one object: who may call (API keys, TLS), how calls are seen (the gRPC
interceptors, the metrics registry), and the HTTP front end.

Why a single seam: ``server.py`` and ``__main__`` need only a few calls from here (interceptors
for ``grpc.aio.server``, a port that is secure when TLS is configured, the core's metrics, and
``start_http`` once the core exists, ``start_rotation`` to reload keys and certificates while
serving), so the gRPC core stays free of security and observability
code, and tests can build the same edge around any core. What the metrics read from the core
lives in ``service/core_metrics.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from service.auth import ApiKeys, GrpcAuthInterceptor
from service.core import EmbeddingCore
from service.core_metrics import observe_models
from service.credentials import CredentialMetrics, CredentialWatcher
from service.grpc_observe import GrpcObserveInterceptor
from service.http import Core, HttpOptions, HttpServer, max_body_bytes
from service.logs import add_redaction
from service.metrics import Metrics
from service.models import ModelRegistry
from service.quotas import UsageMetrics
from service.settings import Settings
from service.tls import TlsFiles, TlsMaterial

log = logging.getLogger(__name__)


@dataclass
class Edge:
    settings: Settings
    keys: ApiKeys
    tls: TlsMaterial | None
    metrics: Metrics
    watcher: CredentialWatcher

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Edge:
        """Load keys and check TLS files now, so a bad file stops start-up before the model loads.

        Raises:
            ApiKeyError, TlsConfigError: with a message naming the file.
        """
        keys = ApiKeys.from_file(settings.api_keys_file)
        files = TlsFiles.from_settings(settings)
        tls = TlsMaterial(files) if files is not None else None  # validates cert/key/CA/expiry
        keys.warn_if_open()
        add_redaction(keys.secrets())
        metrics = metrics or Metrics()
        keys.quotas.set_usage(UsageMetrics(metrics.registry))
        watcher = CredentialWatcher(
            keys,
            settings.api_keys_file,
            tls,
            CredentialMetrics(metrics.registry),
            settings.credentials_poll_interval_s,
        )
        return cls(settings, keys, tls, metrics, watcher)

    # --- rotation ------------------------------------------------------------------------------
    def start_rotation(self) -> None:
        """Reload keys and TLS files on change and on SIGHUP (service/credentials.py)."""
        self.watcher.start()

    async def stop_rotation(self) -> None:
        await self.watcher.stop()

    # --- gRPC ----------------------------------------------------------------------------------
    def grpc_interceptors(self) -> list[Any]:
        """Observe first (so refused calls are counted and logged), then authenticate."""
        return [GrpcObserveInterceptor(self.metrics), GrpcAuthInterceptor(self.keys)]

    def grpc_credentials(self) -> Any:
        """``grpc.ServerCredentials`` for ``add_secure_port`` when TLS is on, else ``None``."""
        return self.tls.grpc_credentials() if self.tls is not None else None

    # --- core ----------------------------------------------------------------------------------
    def registry(self) -> ModelRegistry:
        """One core per ``--model-dir``, its batches and stalls reported to this edge's metrics."""
        return ModelRegistry.from_settings(
            self.settings,
            on_batch=lambda _: self.metrics.observe_batch,
            on_stall=lambda _: self.metrics.observe_stall,
        )

    def observe_core(self, core: EmbeddingCore | ModelRegistry) -> None:
        """Feed this edge's metrics from the models (service/core_metrics.py); call once, any time."""
        observe_models(self.metrics, ModelRegistry.of(self.settings, core))

    async def start_http(self, core: EmbeddingCore | ModelRegistry | Core) -> HttpServer | None:
        """Serve HTTP (and the metrics port) on the running loop; ``None`` when no port is set."""
        s = self.settings
        if s.http_port is None and s.metrics_port is None:
            return None
        ssl_context = self.tls.http_context() if self.tls is not None else None
        server = HttpServer(s.grace_period_s, HttpOptions.from_settings(s))
        try:
            if s.http_port is not None:
                await server.serve_api(
                    ModelRegistry.of(s, core) if isinstance(core, EmbeddingCore) else core,
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
