"""Per-key limits for the hosted API: requests per minute, tokens per minute, concurrent requests.

Why token buckets keyed by the key's *name*: a tenant's old and new key (both valid while it
rotates) share one budget, and the budget survives a reload of the keys file. Each bucket holds
one minute's allowance and refills continuously, so a tenant can burst up to its limit and then
proceeds at the limit's rate.

Where each limit is checked (all before the model does any work for the request):

- concurrency and requests per minute: at the edge, once the key is known (HTTP middleware,
  gRPC interceptor); a refused request is never parsed.
- tokens per minute: the edge refuses while the tenant's token bucket is empty; the exact count
  is charged by :func:`charge_tokens`, which the core calls after tokenisation and *before* the
  inputs enter the batcher (tokenising is the only work a request does before this check).
  A request is admitted while the bucket is above zero and then charged in full, so one large
  request can take the bucket below zero; the tenant then waits until it refills.

A key that is at its limit is refused at once and holds no batcher capacity, so it cannot starve
the keys that are within theirs. Usage is counted per name (never the secret).
"""

from __future__ import annotations

import contextvars
import math
import time
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, Counter

from service.errors import Overloaded

UNNAMED = "unnamed"  # the metrics label of keys without name=
LimitKind = Literal["requests", "tokens", "concurrency"]


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.concurrency is not None


class QuotaExceeded(Overloaded):
    """A key is over one of its limits: RESOURCE_EXHAUSTED / 429 with the wait in seconds."""

    def __init__(
        self, message: str, *, limit: LimitKind, retry_after_s: float, headers: dict[str, str]
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.headers = headers  # x-ratelimit-* (HTTP) as of the refusal


class UsageMetrics:
    """Per-key-name counters; registered on the server's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "embed_key_requests", "Requests admitted, by key name.", ["key"], registry=registry
        )
        self.tokens = Counter(
            "embed_key_input_tokens", "Input tokens charged, by key name.", ["key"], registry=registry
        )
        self.refusals = Counter(
            "embed_key_refusals",
            "Requests refused for a per-key limit, by key name and limit (requests, tokens, concurrency).",
            ["key", "limit"],
            registry=registry,
        )


@dataclass
class _Bucket:
    """``per_minute`` units, refilled continuously; ``level`` may go below zero (tokens)."""

    per_minute: int
    level: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = float(self.per_minute)

    def refill(self, now: float) -> None:
        self.level = min(float(self.per_minute), self.level + (now - self.updated) * self.per_minute / 60.0)
        self.updated = now

    def wait_s(self, need: float) -> float:
        """Seconds until the level reaches ``need``."""
        return max(0.0, (need - self.level) * 60.0 / self.per_minute)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        return self.wait_s(float(self.per_minute))


def _seconds(value: float) -> str:
    return f"{max(value, 0.0):.3f}s"


class KeyQuota:
    """The live state of one key name: its buckets and how many of its requests are in flight."""

    def __init__(self, name: str, limits: Limits, usage: UsageMetrics | None) -> None:
        self.name = name
        self.in_flight = 0
        self._usage = usage
        self.limits = Limits()
        self._requests: _Bucket | None = None
        self._tokens: _Bucket | None = None
        self.configure(limits)

    def configure(self, limits: Limits) -> None:
        """New limits (a reloaded keys file); a bucket whose limit is unchanged keeps its level."""
        if limits.rpm != self.limits.rpm:
            self._requests = _Bucket(limits.rpm) if limits.rpm is not None else None
        if limits.tpm != self.limits.tpm:
            self._tokens = _Bucket(limits.tpm) if limits.tpm is not None else None
        self.limits = limits

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the limits this key has."""
        out: dict[str, str] = {}
        for kind, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(bucket.per_minute)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
                out[f"x-ratelimit-reset-{kind}"] = _seconds(bucket.reset_s())
        return out

    def _refuse(self, limit: LimitKind, message: str, wait_s: float) -> QuotaExceeded:
        if self._usage is not None:
            self._usage.refusals.labels(self.name, limit).inc()
        return QuotaExceeded(
            f"API key '{self.name}' is over its {message}; retry after {wait_s:.1f} s",
            limit=limit,
            retry_after_s=wait_s,
            headers=self.headers(),
        )

    def admit(self) -> None:
        """Take one request and one concurrency slot, or raise :class:`QuotaExceeded` taking none."""
        now = time.monotonic()
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
        if self.limits.concurrency is not None and self.in_flight >= self.limits.concurrency:
            # No rate to wait for: a slot frees when one of the key's requests ends.
            raise self._refuse("concurrency", f"limit of {self.limits.concurrency} concurrent requests", 1.0)
        if self._requests is not None and self._requests.level < 1.0:
            raise self._refuse(
                "requests", f"limit of {self.limits.rpm} requests per minute", self._requests.wait_s(1.0)
            )
        if self._tokens is not None and self._tokens.level <= 0.0:
            wait = self._tokens.wait_s(0.0) + 60.0 / self._tokens.per_minute
            raise self._refuse("tokens", f"limit of {self.limits.tpm} tokens per minute", wait)
        if self._requests is not None:
            self._requests.level -= 1.0
        self.in_flight += 1
        if self._usage is not None:
            self._usage.requests.labels(self.name).inc()

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def charge(self, tokens: int) -> None:
        """Charge a tokenised request; raise if the token bucket ran dry since admission."""
        if self._tokens is not None:
            self._tokens.refill(time.monotonic())
            if self._tokens.level <= 0.0:
                wait = self._tokens.wait_s(0.0) + 60.0 / self._tokens.per_minute
                raise self._refuse("tokens", f"limit of {self.limits.tpm} tokens per minute", wait)
            self._tokens.level -= tokens
        if self._usage is not None:
            self._usage.tokens.labels(self.name).inc(tokens)


class QuotaBook:
    """Every key name's :class:`KeyQuota`, kept across reloads of the keys file."""

    def __init__(self, usage: UsageMetrics | None = None) -> None:
        self._usage = usage
        self._quotas: dict[str, KeyQuota] = {}

    def set_usage(self, usage: UsageMetrics) -> None:
        self._usage = usage
        for quota in self._quotas.values():
            quota._usage = usage

    def configure(self, limits: dict[str, Limits]) -> None:
        """The names and limits of a (re)loaded keys file; in-flight counts carry over."""
        for name, lim in limits.items():
            if name in self._quotas:
                self._quotas[name].configure(lim)
            else:
                self._quotas[name] = KeyQuota(name, lim, self._usage)
        for gone in set(self._quotas) - set(limits):
            self._quotas[gone].configure(Limits())

    def get(self, name: str) -> KeyQuota:
        if name not in self._quotas:
            self._quotas[name] = KeyQuota(name, Limits(), self._usage)
        return self._quotas[name]


# The quota of the key the current call came with, set by the edge around the handler; the core
# charges tokens to it (through charge_tokens) without knowing about keys.
current_quota: contextvars.ContextVar[KeyQuota | None] = contextvars.ContextVar("current_quota", default=None)


def charge_tokens(tokens: int) -> None:
    """Called by the core after tokenisation, before batching; a no-op outside a keyed call."""
    quota = current_quota.get()
    if quota is not None:
        quota.charge(tokens)


def retry_after_header(seconds: float) -> str:
    """HTTP Retry-After takes whole seconds; never 0, so a client does not spin."""
    return str(max(1, math.ceil(seconds)))
