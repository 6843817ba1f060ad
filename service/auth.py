"""API keys: loaded from a file, checked in constant time, for gRPC and HTTP alike.

Why a file and not an environment variable: the Helm chart mounts a Secret there, and a file can
hold several keys at once, so a key can be rotated without downtime (add the new one, roll
clients, remove the old one). Keys are bytes in memory only; nothing here ever formats a key
into a message, and callers get a yes/no, never which key matched.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from service.errors import Unauthenticated
from service.grpc_quota import limited_handler
from service.grpc_status import Continuation, is_open_method, refusing_handler
from service.quotas import UNNAMED, KeyQuota, Limits, QuotaBook

logger = logging.getLogger(__name__)

# One message for both front ends (HTTP header names are case-insensitive; gRPC's are lowercase).
UNAUTHENTICATED_MESSAGE = "missing or invalid API key (send 'authorization: Bearer <key>')"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ApiKeyError(Exception):
    """The keys file cannot be used. Names the file (and line), never its content."""


_LIMIT_NAMES = frozenset({"rpm", "tpm", "concurrency"})


@dataclass(frozen=True)
class KeyEntry:
    secret: bytes
    name: str  # quotas.UNNAMED when the line has no name=
    limits: Limits


def _parse_line(path: Path, number: int, line: str) -> KeyEntry:
    """``KEY [name=NAME] [rpm=N] [tpm=N] [concurrency=N]``; errors name the line, never the key."""
    secret, *fields = line.split()
    name: str | None = None
    limits: dict[str, int] = {}
    for item in fields:
        attr, sep, value = item.partition("=")
        if not sep or not value:
            raise ApiKeyError(f"API keys file {path} line {number}: expected name=value after the key")
        if attr == "name":
            if not _NAME.fullmatch(value):
                raise ApiKeyError(f"API keys file {path} line {number}: name must match {_NAME.pattern}")
            name = value
        elif attr in _LIMIT_NAMES:
            if not value.isdigit() or int(value) < 1:
                raise ApiKeyError(f"API keys file {path} line {number}: {attr} must be a positive integer")
            limits[attr] = int(value)
        else:
            raise ApiKeyError(
                f"API keys file {path} line {number}: unknown attribute {attr!r} "
                "(known: name, rpm, tpm, concurrency)"
            )
    parsed = Limits(**limits)
    if parsed.any and name is None:
        raise ApiKeyError(f"API keys file {path} line {number}: limits need a name= (they are kept per name)")
    return KeyEntry(secret.encode(), name or UNNAMED, parsed)


class ApiKeys:
    """The accepted keys (empty: authentication is off) and their names' quotas.

    One instance lives as long as the server: a reload swaps its entries in place
    (:meth:`replace`), so the gRPC interceptor and the HTTP app, which hold this object, see the
    new keys on their next call while calls already admitted carry on.
    """

    def __init__(self, keys: Iterable[str | KeyEntry] = ()) -> None:
        self.quotas = QuotaBook()
        self._entries: tuple[KeyEntry, ...] = ()
        self._set(
            tuple(
                k if isinstance(k, KeyEntry) else KeyEntry(k.encode(), UNNAMED, Limits()) for k in keys if k
            )
        )

    def _set(self, entries: tuple[KeyEntry, ...]) -> None:
        self.quotas.configure({e.name: e.limits for e in entries if e.name != UNNAMED})
        self._entries = entries  # one assignment: a call sees the old set or the new, never a mix

    def replace(self, other: ApiKeys) -> None:
        """Take ``other``'s keys and limits (a reload); quota levels and in-flight counts stay."""
        self._set(other._entries)

    @classmethod
    def from_file(cls, path: Path | None) -> ApiKeys:
        """One key per line, optionally followed by ``name=`` and limits; ``#`` comments skipped.

        Raises:
            ApiKeyError: the file is unreadable, malformed, or set but holds no key (fail closed:
                an empty Secret must not silently open the service).
        """
        if path is None:
            return cls()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyError(f"cannot read API keys file {path}: {type(exc).__name__}") from None
        entries: list[KeyEntry] = []
        seen: dict[str, Limits] = {}
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            entry = _parse_line(path, number, line)
            if entry.name != UNNAMED and seen.setdefault(entry.name, entry.limits) != entry.limits:
                raise ApiKeyError(
                    f"API keys file {path} line {number}: "
                    f"name {entry.name!r} has other limits on an earlier line"
                )
            entries.append(entry)
        if not entries:
            raise ApiKeyError(f"API keys file {path} holds no key")
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:  # never show the keys, even in a debugger or a traceback
        return f"ApiKeys(<{len(self._entries)} keys>)"

    def secrets(self) -> tuple[str, ...]:
        """The keys as text, for the log redaction filter only."""
        return tuple(e.secret.decode() for e in self._entries)

    def identify(self, presented: str | None) -> KeyEntry | None:
        """The entry whose key equals ``presented``, else ``None``.

        Compares against every key without stopping at a match, so the time taken says
        nothing about which key (or how much of one) matched.
        """
        if presented is None:
            return None
        # surrogatepass: a header aiohttp decoded with surrogateescape (non-UTF-8 bytes) is a
        # wrong key like any other, not an UnicodeEncodeError.
        candidate = presented.encode("utf-8", "surrogatepass")
        found: KeyEntry | None = None
        for entry in self._entries:
            if hmac.compare_digest(candidate, entry.secret):
                found = entry
        return found

    def accepts(self, presented: str | None) -> bool:
        """True when auth is off or ``presented`` equals one of the keys."""
        return not self._entries or self.identify(presented) is not None

    def identify_headers(self, authorization: Sequence[str]) -> KeyEntry | None:
        """The entry for all ``Authorization`` header values of a request: exactly one, valid.

        Two headers are refused even if one holds a valid key: proxies and servers disagree on
        which one counts, and that disagreement is how requests get smuggled past a check.
        """
        if len(authorization) != 1:
            return None
        return self.identify(bearer_token(authorization[0]))

    def accepts_headers(self, authorization: Sequence[str]) -> bool:
        return not self._entries or self.identify_headers(authorization) is not None

    def quota_for(self, entry: KeyEntry | None) -> KeyQuota | None:
        """The live quota of a key's name (keys without name= share ``unnamed``, with no limits);
        ``None`` when authentication is off."""
        return None if entry is None else self.quotas.get(entry.name)

    def warn_if_open(self) -> None:
        if not self._entries:
            logger.warning("no API keys configured (api_keys_file unset): gRPC and HTTP are open to anyone")
        else:
            logger.info("API key authentication on", extra={"api_keys": len(self._entries)})


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value.

    Lenient where RFC 9110 allows it: the scheme is case-insensitive (``bearer`` works) and
    whitespace around the value and between scheme and token is ignored.
    """
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def _metadata_value(metadata: Any, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no stubs
    """Refuses calls without a valid ``authorization: Bearer`` key with UNAUTHENTICATED.

    Health and reflection stay open (``grpc_status.OPEN_METHOD_PREFIXES``). The refusal replaces
    the handler, so the servicer (and the batcher behind it) never sees an unauthenticated request.
    """

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if not self._keys.enabled or is_open_method(method):
            return await continuation(handler_call_details)
        header = _metadata_value(handler_call_details.invocation_metadata, "authorization")
        entry = self._keys.identify(bearer_token(header))
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let grpc answer UNIMPLEMENTED as usual
            return None
        if entry is None:
            return refusing_handler(handler, Unauthenticated(UNAUTHENTICATED_MESSAGE))
        quota = self._keys.quota_for(entry)
        return limited_handler(handler, quota) if quota is not None else handler
