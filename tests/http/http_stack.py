"""In-process servers for the HTTP/auth/TLS tests: gRPC + HTTP on port 0, one core, one loop.

(A helper module with a unique name rather than ``conftest``: several test folders have a
``conftest.py`` and none is a package, so ``from conftest import …`` would be ambiguous.)

``start_stack`` wires the pieces the way ``service.server.serve`` does (edge → core → gRPC server
→ HTTP), minus signal handling, so tests can hold the core and metrics objects. The core is
started separately (``warm=False``) when a test needs the warming-up state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service.core import EmbeddingCore
from service.edge import Edge
from service.http import HttpServer
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.server import build_server
from service.settings import Settings

KEY = "sk-embed-Test-7f3a9c"
OLD_KEY = "sk-embed-Old-11e2"


@dataclass
class Stack:
    settings: Settings
    edge: Edge
    core: EmbeddingCore
    grpc_server: Any
    grpc_port: int
    http: HttpServer

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls_cert_file else "http"
        return f"{scheme}://127.0.0.1:{self.http.port}"

    def channel(self, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
        target = f"127.0.0.1:{self.grpc_port}"
        if credentials is None:
            return grpc.aio.insecure_channel(target)
        # The test server certificate names "localhost".
        return grpc.aio.secure_channel(
            target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        )

    def stub(self, channel: grpc.aio.Channel) -> pb_grpc.EmbeddingServiceStub:
        return pb_grpc.EmbeddingServiceStub(channel)

    async def stop(self) -> None:
        await self.http.stop()
        await self.grpc_server.stop(0)
        await self.core.close()


async def start_stack(settings: Settings, *, warm: bool = True) -> Stack:
    edge = Edge.from_settings(settings)
    core = EmbeddingCore(settings, on_batch=edge.metrics.observe_batch)
    edge.observe_core(core)
    server, port = build_server(
        settings, core, interceptors=edge.grpc_interceptors(), credentials=edge.grpc_credentials()
    )
    await server.start()
    http = await edge.start_http(core)
    assert http is not None
    if warm:
        await core.start()
    return Stack(settings, edge, core, server, port, http)


def stack_settings(bundle: Path, keys_file: Path | None = None, **overrides: Any) -> Settings:
    """Result cache off unless asked for: these tests count batches and overload the queue with
    repeated inputs, which cache hits would answer without the model."""
    values: dict[str, Any] = {"cache_bytes": 0, **overrides}
    return Settings(
        model_dir=bundle,
        port=0,
        http_port=0,
        api_keys_file=keys_file,
        grace_period_s=1.0,
        max_batch_wait_ms=1.0,
        **values,
    )
