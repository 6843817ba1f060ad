"""Servers for the reliability tests: in-process (gRPC + HTTP on port 0) and ``embed-serve``.

In-process servers are wired exactly as ``service.server.serve`` wires them (the same ``Edge``
for HTTP, keys and metrics, the same ``build_server``) but take a runtime factory, so a test can
inject a slow, failing or counting runtime. :class:`ThreadedServer` runs one on its own event
loop in a thread so that synchronous code (hypothesis properties) can call it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_thread import ServerThread

from service.core import EmbeddingCore
from service.edge import Edge
from service.errors import StartupError
from service.http import HttpServer
from service.loader import RuntimeFactory, ort_runtime
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.runtime import Runtime
from service.server import build_server
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BIG = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def settings_for(bundle: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_dir": bundle,
        "host": "127.0.0.1",
        "port": 0,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "intra_op_threads": 1,
        "inter_op_threads": 1,
        # These tests measure the model path (limits, overload, watchdog, determinism) and repeat
        # their inputs: a result-cache hit would answer without it. Cache tests turn it on.
        "cache_bytes": 0,
    }
    values.update(overrides)
    return Settings(**values)


def fixed(runtime: Runtime | None) -> RuntimeFactory:
    if runtime is None:
        return ort_runtime
    return lambda settings, manifest, directory, max_tokens: runtime


@dataclass
class Live:
    core: EmbeddingCore
    settings: Settings
    grpc_port: int
    http_port: int
    server: grpc.aio.Server
    http: HttpServer | None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@asynccontextmanager
async def live_server(bundle: Path, runtime: Runtime | None = None, **overrides: Any) -> AsyncIterator[Live]:
    """Core + gRPC + HTTP on 127.0.0.1 port 0, started and ready; torn down on exit."""
    settings = settings_for(bundle, **overrides)
    edge = Edge.from_settings(settings)
    core = EmbeddingCore(
        settings,
        runtime_factory=fixed(runtime),
        on_batch=edge.metrics.observe_batch,
        on_stall=edge.metrics.observe_stall,
    )
    edge.observe_core(core)
    server, port = build_server(
        settings, core, interceptors=edge.grpc_interceptors(), credentials=edge.grpc_credentials()
    )
    await server.start()
    http = await edge.start_http(core)
    try:
        await core.start()
        yield Live(core, settings, port, http.port if http and http.port else 0, server, http)
    finally:
        if http is not None:
            await http.stop()
        await server.stop(0)
        await core.close()


async def refused_start(
    settings: Settings, fragments: Sequence[str], runtime_factory: RuntimeFactory = ort_runtime
) -> str:
    """Start a core that must fail: the StartupError names every fragment; state ``failed``."""
    core = EmbeddingCore(settings, runtime_factory=runtime_factory)
    try:
        await core.start()
    except StartupError as exc:
        message = str(exc)
    else:
        raise AssertionError("start-up succeeded")
    finally:
        await core.close()
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert core.state == "failed"
    return message


@asynccontextmanager
async def grpc_channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(target, options=BIG)
    try:
        yield channel
    finally:
        await channel.close()


def stubs(channel: grpc.aio.Channel | grpc.Channel) -> tuple[pb_grpc.EmbeddingServiceStub, Any]:
    return pb_grpc.EmbeddingServiceStub(channel), health_pb2_grpc.HealthStub(channel)


class ThreadedServer(ServerThread[Live]):
    """A :func:`live_server` on a private event loop in a daemon thread (for sync tests)."""

    def __init__(self, bundle: Path, runtime: Runtime | None = None, **overrides: Any) -> None:
        super().__init__(
            lambda: live_server(bundle, runtime, **overrides), name="rel-server", start_timeout_s=60
        )


# --- embed-serve as a subprocess ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def embed_serve_cmd() -> list[str]:
    script = Path(sys.executable).parent / "embed-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBED_")}
    env.update(extra)
    return env


def run_embed_serve(args: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run embed-serve expecting it to exit on its own (start-up failure)."""
    return subprocess.run(
        [*embed_serve_cmd(), *args], capture_output=True, text=True, timeout=timeout_s, env=clean_env()
    )


@contextlib.contextmanager
def embed_serve(args: list[str], stderr_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start embed-serve (stderr to a file: a pipe could fill and block the server's logging)."""
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            [*embed_serve_cmd(), *args], stdout=subprocess.DEVNULL, stderr=err, env=clean_env()
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)


def wait_serving(
    port: int, proc: subprocess.Popen[bytes], stderr_path: Path, timeout_s: float = 90.0
) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"embed-serve exited early: {stderr_path.read_text()[-3000:]}")
            with contextlib.suppress(grpc.RpcError):
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                    return
            time.sleep(0.1)
    raise AssertionError(f"embed-serve did not become SERVING: {stderr_path.read_text()[-3000:]}")
