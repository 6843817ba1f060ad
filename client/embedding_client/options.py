"""Channel configuration: target, TLS, retries (gRPC service config), load balancing, keepalive.

Why a service config and not a retry loop: gRPC's own retries back off with jitter, count
against the call's deadline, are throttled per channel and go to another subchannel (replica)
under round_robin, which a loop around the stub gets wrong one way or another.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

SERVICE = "embedding.v1.EmbeddingService"
# Retried by gRPC: the server said "try again later / elsewhere". INVALID_ARGUMENT,
# UNAUTHENTICATED and PERMISSION_DENIED are never retried: the same request fails the same way.
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
# The server keeps grpc's defaults: it tolerates a ping at most every 5 minutes and none without
# an active call, and answers more frequent pings with GOAWAY (ENHANCE_YOUR_CALM). So the client
# pings exactly that often, only during calls: a dead connection is still noticed on long streams.
KEEPALIVE_TIME_MS = 300_000
KEEPALIVE_TIMEOUT_MS = 20_000
# Retried requests are replayed from a buffer; a request bigger than it is silently not retried.
# 256 texts of a few KiB each fit in 16 MiB.
RETRY_BUFFER_BYTES = 16 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
_SCHEME = re.compile(r"^(dns|ipv4|ipv6|unix|unix-abstract|vsock|xds|google-c2p):")


@dataclass(frozen=True)
class TLSConfig:
    """PEM files: ``ca`` to verify the server (system roots when None); ``cert``/``key`` for mTLS.

    ``server_name`` overrides the name checked against the certificate (tests, IP targets).
    """

    ca: Path | str | None = None
    cert: Path | str | None = None
    key: Path | str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | str | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        if (self.cert is None) != (self.key is None):
            raise ValueError("TLSConfig: cert and key go together (mTLS needs both)")
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC ``retryPolicy`` for UNAVAILABLE and RESOURCE_EXHAUSTED (gRPC caps attempts at 5)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError("max_attempts must be within 1..5 (gRPC's own limit)")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")

    def as_config(self) -> dict[str, Any]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s:.3f}s",
            "maxBackoff": f"{self.max_backoff_s:.3f}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(RETRYABLE),
        }


def normalize_target(target: str) -> str:
    """``host:port`` becomes ``dns:///host:port`` so round_robin sees every address DNS returns.

    Targets with a scheme (``dns:``, ``ipv4:``, ``ipv6:``, ``unix:``…) are used as given.
    """
    if not target:
        raise ValueError("target must not be empty (host:port or a gRPC target URI)")
    return target if _SCHEME.match(target) else f"dns:///{target}"


def service_config(retries: RetryPolicy | None, load_balancing: str) -> str:
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if retries is not None and retries.max_attempts > 1:
        config["methodConfig"] = [{"name": [{"service": SERVICE}], "retryPolicy": retries.as_config()}]
    return json.dumps(config)


def channel_options(
    retries: RetryPolicy | None,
    load_balancing: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: TLSConfig | None = None,
) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(retries, load_balancing)),
        ("grpc.enable_retries", 1 if retries is not None else 0),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
        ("grpc.retry_buffer_size", 4 * RETRY_BUFFER_BYTES),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.primary_user_agent", "embedding-client/0.1"),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
