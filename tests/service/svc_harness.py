"""In-process server harness: core + grpc.aio server on port 0 + a real channel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from server_thread import ServerThread

from bundle.manifest import Manifest
from service.core import EmbeddingCore, ort_runtime
from service.edge import Edge
from service.metrics import Metrics
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.runtime import Runtime
from service.server import build_server
from service.settings import Settings


def settings_for(bundle: Path, **overrides: Any) -> Settings:
    # cache_bytes 0: these tests measure the batcher and runtime and repeat their inputs (the toy
    # vocabulary even reads different words as the same [UNK] ids); cache tests turn it on.
    values: dict[str, Any] = {
        "model_dir": bundle,
        "host": "127.0.0.1",
        "port": 0,
        "intra_op_threads": 1,
        "cache_bytes": 0,
    }
    values.update(overrides)
    return Settings(**values)


def factory_for(runtime: Runtime | None) -> Callable[[Settings, Manifest, Path, int], Runtime]:
    if runtime is None:
        return ort_runtime
    return lambda settings, manifest, directory, max_tokens: runtime


@dataclass
class Harness:
    core: EmbeddingCore
    stub: pb_grpc.EmbeddingServiceStub
    health: health_pb2_grpc.HealthStub
    channel: grpc.aio.Channel
    server: grpc.aio.Server
    port: int
    settings: Settings
    metrics: Metrics | None = None


@asynccontextmanager
async def serving(
    bundle: Path, runtime: Runtime | None = None, *, edge: bool = False, **overrides: Any
) -> AsyncIterator[Harness]:
    """Core + gRPC server on 127.0.0.1:0 and a real grpc.aio channel to it.

    ``edge=True`` wires the interceptors ``serve`` uses (metrics, access log, API keys).
    """
    settings = settings_for(bundle, **overrides)
    wired = Edge.from_settings(settings) if edge else None
    core = EmbeddingCore(
        settings,
        runtime_factory=factory_for(runtime),
        on_batch=wired.metrics.observe_batch if wired is not None else None,
    )
    if wired is not None:
        wired.observe_core(core)
    server, port = build_server(settings, core, interceptors=wired.grpc_interceptors() if wired else ())
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    try:
        await core.start()
        yield Harness(
            core,
            pb_grpc.EmbeddingServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
            channel,
            server,
            port,
            settings,
            wired.metrics if wired is not None else None,
        )
    finally:
        await channel.close()
        await server.stop(0)
        await core.close()


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll (never a fixed sleep): CI machines are slow and shared."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


class ThreadedServing(ServerThread[Harness]):
    """:func:`serving` on a private event loop in a daemon thread, for synchronous callers."""

    def __init__(self, bundle: Path, runtime: Runtime | None = None, **overrides: Any) -> None:
        super().__init__(
            lambda: serving(bundle, runtime, **overrides), name="svc-server", start_timeout_s=120
        )
