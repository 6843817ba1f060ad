"""The gRPC server: servicer + standard health + reflection, and the process lifecycle.

Health (``grpc.health.v1``) follows the models' state for both the overall ``""`` service and
``embedding.v1.EmbeddingService``: NOT_SERVING while warming up, SERVING when every model is
ready, NOT_SERVING again while draining. Each model also has its own service name,
``embedding.v1.EmbeddingService/<model name>`` (published once its name is known). Kubernetes'
native gRPC probes read it; no probe binary is needed.

Reflection (v1alpha, what grpcio-reflection serves and grpcurl 1.8 speaks) lets
``grpcurl -plaintext HOST:PORT list|describe`` work without the proto file.

Shutdown on SIGTERM/SIGINT: the core drains (health NOT_SERVING at once, new work UNAVAILABLE,
accepted work finishes), bounded by ``grace_period_s``; then the server stops and we exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from service import trace_hooks
from service.auth import ApiKeyError
from service.core import EmbeddingCore
from service.domain import CoreState
from service.edge import Edge
from service.errors import StartupError
from service.grpc_decode import RECEIVE_HEADROOM, RequestBytesInterceptor
from service.grpc_observe import GrpcObserveInterceptor
from service.grpc_rerank import RerankingServicer
from service.models import ModelRegistry
from service.pb.embedding.v1 import embedding_pb2 as pb
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.settings import Settings
from service.tls import TlsConfigError

log = logging.getLogger("service.server")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_health_name(model: str) -> str:
    """The health service name of one model (documented in docs/api.md)."""
    return f"{SERVICE_NAME}/{model}"


class _HealthBridge:
    """Mirrors a state into the (async) health servicer: the registry's for "" and the service,
    one model's for its own name (``name`` is read at each change: known once it loaded)."""

    def __init__(self, health: health_aio.HealthServicer, name: Callable[[], str] | None = None) -> None:
        self._health = health
        self._name = name
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, state: CoreState) -> None:
        status = _SERVING if state == "ready" else _NOT_SERVING
        services: tuple[str, ...] = ("", SERVICE_NAME)
        if self._name is not None:
            model = self._name()
            if not model:
                return  # a model named by its manifest has no name before it loaded
            services = (model_health_name(model),)
        task = asyncio.get_running_loop().create_task(self._set(services, status))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set(
        self, services: tuple[str, ...], status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for service in services:
            await self._health.set(service, status)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _server_options(settings: Settings) -> list[tuple[str, int]]:
    limit = settings.max_message_bytes
    options = [
        ("grpc.max_send_message_length", limit),
        # The request-bytes guard enforces ``limit`` itself, in stream order (grpc_decode.py).
        ("grpc.max_receive_message_length", RECEIVE_HEADROOM * limit),
        ("grpc.so_reuseport", 0),
    ]
    # Idle and half-open connections are bounded: the server pings a silent peer and closes the
    # connection when the ping goes unanswered (a vanished client, a dropped NAT entry), closes
    # connections that carried no call for a while, and sends GOAWAY to clients that ping too often
    # (each ping costs the server a wake-up; 2 strikes is grpc's default enforcement).
    options += [
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_s)),
        # grpcio 1.85 closes on an unanswered ping after this one (default 60 s), not the above.
        ("grpc.http2.ping_timeout_ms", _ms(settings.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(settings.min_client_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if settings.max_connection_idle_s is not None:
        options.append(("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle_s)))
    if settings.max_connection_age_s is not None:
        # HTTP/2 connections live for hours and pin a client to the pods that existed when it
        # connected; a GOAWAY after this age makes clients re-resolve and reach new replicas.
        age_ms = int(settings.max_connection_age_s * 1000)
        options += [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", age_ms)]
    return options


def _name_of(core: EmbeddingCore) -> Callable[[], str]:
    return lambda: core.model_name


def build_server(
    settings: Settings,
    core: EmbeddingCore | ModelRegistry,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A configured, not yet started ``grpc.aio`` server bound to settings.host:settings.port.

    Returns the server and the bound port (useful with port 0). Must be called with a running
    event loop. ``interceptors`` / ``credentials`` are the hooks for API keys and TLS.
    """
    limit = settings.max_message_bytes
    chain = list(interceptors)
    # The request-bytes guard sees requests before anyone decodes them; only the observer (which
    # counts and logs every call, refused ones included) sits outside it.
    at = 1 if chain and isinstance(chain[0], GrpcObserveInterceptor) else 0
    chain.insert(at, RequestBytesInterceptor(limit))
    server = grpc.aio.server(interceptors=chain, options=_server_options(settings))
    models = ModelRegistry.of(settings, core)
    pb_grpc.add_EmbeddingServiceServicer_to_server(RerankingServicer(models, limit), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    models.add_state_listener(_HealthBridge(health))
    for one in models.cores:
        one.add_state_listener(_HealthBridge(health, _name_of(one)))
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    try:
        port = (
            server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        )
    except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
        raise StartupError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise StartupError(f"cannot listen on {address}")
    return server, port


async def serve(settings: Settings, core: EmbeddingCore | ModelRegistry | None = None) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean shutdown, 2 when start-up failed."""
    try:  # keys, TLS, metrics and the HTTP front end (service/edge.py)
        edge = Edge.from_settings(settings)
        tracer = trace_hooks.from_settings(settings)  # OpenTelemetry is imported only when configured
    except (ApiKeyError, TlsConfigError, StartupError) as exc:
        print(f"embed-serve: error: {exc}", file=sys.stderr)
        return 2
    trace_hooks.install(tracer)
    core = ModelRegistry.of(settings, core) if core is not None else edge.registry()
    edge.observe_core(core)
    try:
        server, port = build_server(
            settings, core, interceptors=edge.grpc_interceptors(), credentials=edge.grpc_credentials()
        )
    except StartupError as exc:
        print(f"embed-serve: error: {exc}", file=sys.stderr)
        return 2
    await server.start()
    log.info("gRPC listening on %s:%d (health NOT_SERVING until the models are ready)", settings.host, port)
    try:  # before the model loads, so /health answers 503 while warming up
        http = await edge.start_http(core)
    except OSError as exc:
        print(f"embed-serve: error: cannot start HTTP: {exc}", file=sys.stderr)
        await server.stop(0)
        return 2
    edge.start_rotation()  # keys / TLS files reloaded on change and on SIGHUP
    try:
        return await _run(settings, core, server, port)
    finally:
        await edge.stop_rotation()
        if http is not None:
            await http.stop()
        await asyncio.to_thread(trace_hooks.shutdown)  # flush the last spans


async def _run(settings: Settings, core: ModelRegistry, server: grpc.aio.Server, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(core.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        print(f"embed-serve: error: {starting.exception()}", file=sys.stderr)
        stopping.cancel()
        await server.stop(0)
        await core.close()
        return 2
    if not starting.done():  # stopped while still loading
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StartupError):
            await starting
    else:
        log.info("ready: %s on port %d", core.model_name, port)
        await stopping
    await shutdown(server, core, settings.grace_period_s)
    return 0


async def shutdown(
    server: grpc.aio.Server, core: EmbeddingCore | ModelRegistry, grace_period_s: float
) -> None:
    """Drain the core within the grace period, then stop the server (cancelling what is left)."""
    began = time.monotonic()
    log.info("shutting down: draining for up to %.1fs", grace_period_s)
    try:
        await asyncio.wait_for(core.drain(), grace_period_s)
    except TimeoutError:
        log.warning("grace period over with work still in flight; cancelling it")
    await server.stop(max(0.0, grace_period_s - (time.monotonic() - began)))
    await core.close()
    log.info("stopped")
