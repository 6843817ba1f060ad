"""Per-call metadata (API key, W3C trace context) and the standard health check.

Health is two one-field messages; encoding them by hand keeps ``grpcio-health-checking`` (and
its protobuf pin) out of the client's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

HEALTH_METHOD = "/grpc.health.v1.Health/Check"
HealthStatus = Literal["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]
_STATUSES: tuple[HealthStatus, ...] = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")

_propagate: Any
try:  # the `otel` extra; never a hard dependency
    _propagate = importlib.import_module("opentelemetry.propagate")
except ImportError:  # pragma: no cover - depends on the environment
    _propagate = None


def trace_metadata() -> list[tuple[str, str]]:
    """``traceparent`` (and ``tracestate``/baggage) of the caller's current span, when OTel is installed.

    Uses the globally configured propagator (W3C trace context by default); returns nothing when
    there is no active, valid span, so untraced callers send no extra metadata.
    """
    if _propagate is None:
        return []
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return [(key.lower(), value) for key, value in carrier.items()]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_health_request(service: str) -> bytes:
    """``HealthCheckRequest{service}``: field 1, length-delimited."""
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def decode_health_response(data: bytes) -> HealthStatus:
    """``HealthCheckResponse.status`` (field 1, varint); unknown fields are skipped."""
    i, status = 0, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        kind = key & 7
        if kind == 0:
            value, i = _read_varint(data, i)
            if key >> 3 == 1:
                status = value
        elif kind == 2:
            length, i = _read_varint(data, i)
            i += length
        else:
            i += 8 if kind == 1 else 4
    return _STATUSES[status] if status < len(_STATUSES) else "UNKNOWN"


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def identity(data: Any) -> Any:
    return data
