"""API keys: loaded from a file, checked in constant time, for gRPC and HTTP alike.

Why a file and not an environment variable: the Helm chart mounts a Secret there, and a file can
hold several keys at once, so a key can be rotated without downtime (add the new one, roll
clients, remove the old one). Keys are bytes in memory only; nothing here ever formats a key
into a message, and callers get a yes/no, never which key matched.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from service.errors import Unauthenticated
from service.grpc_status import Continuation, is_open_method, refusing_handler

logger = logging.getLogger(__name__)

# One message for both front ends (HTTP header names are case-insensitive; gRPC's are lowercase).
UNAUTHENTICATED_MESSAGE = "missing or invalid API key (send 'authorization: Bearer <key>')"


class ApiKeyError(Exception):
    """The keys file cannot be used. Names the file, never its content."""


class ApiKeys:
    """A set of accepted keys; empty means authentication is off."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(k.encode() for k in keys if k)

    @classmethod
    def from_file(cls, path: Path | None) -> ApiKeys:
        """One key per line; blank lines and ``#`` comments are skipped; whitespace trimmed.

        Raises:
            ApiKeyError: the file is unreadable, or it is set but holds no key (fail closed:
                an empty Secret must not silently open the service).
        """
        if path is None:
            return cls()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyError(f"cannot read API keys file {path}: {type(exc).__name__}") from None
        keys = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
        if not keys:
            raise ApiKeyError(f"API keys file {path} holds no key")
        if any(any(c.isspace() for c in k) for k in keys):
            raise ApiKeyError(f"API keys file {path}: a key contains whitespace")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:  # never show the keys, even in a debugger or a traceback
        return f"ApiKeys(<{len(self._keys)} keys>)"

    def secrets(self) -> tuple[str, ...]:
        """The keys as text, for the log redaction filter only."""
        return tuple(k.decode() for k in self._keys)

    def accepts(self, presented: str | None) -> bool:
        """True when auth is off or ``presented`` equals one of the keys.

        Compares against every key without stopping at a match, so the time taken says
        nothing about which key (or how much of one) matched.
        """
        if not self._keys:
            return True
        if presented is None:
            return False
        # surrogatepass: a header aiohttp decoded with surrogateescape (non-UTF-8 bytes) is a
        # wrong key like any other, not an UnicodeEncodeError.
        candidate = presented.encode("utf-8", "surrogatepass")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def accepts_headers(self, authorization: Sequence[str]) -> bool:
        """All ``Authorization`` header values of a request: exactly one, holding a valid key.

        Two headers are refused even if one holds a valid key: proxies and servers disagree on
        which one counts, and that disagreement is how requests get smuggled past a check.
        """
        if not self._keys:
            return True
        return len(authorization) == 1 and self.accepts(bearer_token(authorization[0]))

    def warn_if_open(self) -> None:
        if not self._keys:
            logger.warning("no API keys configured (api_keys_file unset): gRPC and HTTP are open to anyone")
        else:
            logger.info("API key authentication on", extra={"api_keys": len(self._keys)})


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
        if self._keys.accepts(bearer_token(header)):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let grpc answer UNIMPLEMENTED as usual
            return None
        return refusing_handler(handler, Unauthenticated(UNAUTHENTICATED_MESSAGE))
