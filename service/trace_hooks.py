"""The tracing seam the front ends and the core call; OpenTelemetry itself stays out of it.

Why a seam and not spans in the hot path: with ``--otlp-endpoint`` unset no tracer is installed
and every hook is one ``None`` check, and OpenTelemetry (the optional ``otel`` extra) is never
imported. With it set, nothing is traced *while* a request runs either: each front end notes when
a request arrived and its incoming ``traceparent``, the core notes each embed's stage timings and
the batches that served it (``Timings`` and ``BatchRecord``, which exist anyway), and when the
request ends :mod:`service.tracing` turns those into spans with explicit start and end times.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from service.batch_items import BatchRecord
from service.domain import Timings
from service.errors import StartupError
from service.grpc_status import OPEN_METHOD_PREFIXES
from service.settings import Settings

log = logging.getLogger("service.tracing")


@dataclass(frozen=True)
class EmbedTrace:
    """One core embed (a unary call has one; each ``EmbedStream`` message adds one)."""

    request_id: str
    timings: Timings
    batches: tuple[BatchRecord, ...]
    started: float  # time.perf_counter() when the core took the request (Timings count from here)


@dataclass
class CallTrace:
    """One traced request (a gRPC call or an HTTP request), filled in as it passes."""

    name: str
    carrier: Mapping[str, str]  # incoming metadata / headers: traceparent, tracestate, baggage
    attributes: dict[str, str | int]
    start_ns: int = field(default_factory=time.time_ns)
    embeds: list[EmbedTrace] = field(default_factory=list)


class Tracer(Protocol):
    def export(self, call: CallTrace, end_ns: int, status: str, failed: bool) -> None:
        """Record ``call``'s spans; ``status`` is the gRPC status name or the HTTP status code."""

    def shutdown(self) -> None:
        """Flush what is buffered (called once, at exit)."""


_tracer: Tracer | None = None
_current: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar("trace_call", default=None)


def install(tracer: Tracer | None) -> None:
    """Make ``tracer`` the one every front end reports to (``None``: tracing off)."""
    global _tracer
    _tracer = tracer


def tracing() -> bool:
    return _tracer is not None


def shutdown() -> None:
    """Flush and uninstall the tracer (blocking: call it in a thread from the loop)."""
    global _tracer
    tracer, _tracer = _tracer, None
    if tracer is not None:
        tracer.shutdown()


def from_settings(settings: Settings) -> Tracer | None:
    """The OTLP tracer when ``otlp_endpoint`` is set; imports OpenTelemetry only then.

    Raises:
        StartupError: the endpoint is set but the ``otel`` extra is not installed.
    """
    if not settings.otlp_endpoint:
        return None
    try:
        tracer: Tracer = importlib.import_module("service.tracing").otlp_tracer(settings.otlp_endpoint)
    except ImportError as exc:
        raise StartupError(
            f"--otlp-endpoint is set but OpenTelemetry is not installed (missing {exc.name}); "
            "install the server's `otel` extra (pip install 'embedding-service[otel]') or unset it"
        ) from exc
    return tracer


def begin(name: str, carrier: Mapping[str, str], attributes: dict[str, str | int]) -> CallTrace | None:
    """Start noting a request (in its own task); ``None`` and no cost when tracing is off."""
    if _tracer is None:
        return None
    call = CallTrace(name, carrier, attributes)
    _current.set(call)
    return call


# Span names stay low-cardinality: the route's template, never the raw path.
_HTTP_ROUTES = {"/v1/embeddings": "/v1/embeddings", "/v1/models": "/v1/models"}
# Server errors by OpenTelemetry's conventions for gRPC; the rest are the caller's to mark.
GRPC_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_GRPC_CODES = {code.name: code.value[0] for code in grpc.StatusCode}


def begin_grpc(method: str, context: Any, request_id: str) -> CallTrace | None:
    """A gRPC call, child of its ``traceparent`` metadata; health and reflection are not traced."""
    if _tracer is None or method.startswith(OPEN_METHOD_PREFIXES):
        return None
    carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    name = method.lstrip("/")
    service, _, short = name.rpartition("/")
    attributes: dict[str, str | int] = {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": short,
        "embedding.request_id": request_id,
    }
    return begin(name, carrier, attributes)


def end_grpc(call: CallTrace | None, status: str) -> None:
    if call is not None:
        call.attributes["rpc.grpc.status_code"] = _GRPC_CODES.get(status, _GRPC_CODES["UNKNOWN"])
        end(call, status, status in GRPC_SERVER_ERRORS)


def begin_http(method: str, path: str, request_id: str, headers: Mapping[str, str]) -> CallTrace | None:
    """An HTTP request, child of its ``traceparent`` header."""
    template = _HTTP_ROUTES.get(path) or ("/v1/models/{model}" if path.startswith("/v1/models/") else None)
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.path": path,
        "embedding.request_id": request_id,
    }
    if template is not None:
        attributes["http.route"] = template
    return begin(f"{method} {template}" if template else method, headers, attributes)


def end_http(call: CallTrace | None, status: int) -> None:
    if call is not None:
        call.attributes["http.response.status_code"] = status
        end(call, str(status), status >= 500)


def record_embed(request_id: str, timings: Timings, batches: tuple[BatchRecord, ...], started: float) -> None:
    """The core's note of one embed, kept on the request it belongs to (if it is traced)."""
    call = _current.get()
    if call is not None:
        call.embeds.append(EmbedTrace(request_id, timings, batches, started))


def end(call: CallTrace | None, status: str, failed: bool) -> None:
    """Hand a finished request to the tracer; never lets tracing fail the request."""
    tracer = _tracer
    if call is None or tracer is None:
        return
    _current.set(None)
    try:
        tracer.export(call, time.time_ns(), status, failed)
    except Exception as exc:  # a tracing bug costs a trace, never an answer
        log.warning("could not record the trace of a request", exc_info=exc)
