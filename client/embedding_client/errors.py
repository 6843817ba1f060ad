"""One exception hierarchy for every failure a call can end with.

Callers branch on the class (``except Overloaded``), never on gRPC status codes, and every
exception carries what an operator needs to find the call in the server log: the status, the
server's message and the request id (which the client generates, so it is known even when the
server never answered).
"""

from __future__ import annotations

from typing import Any

import grpc

FIELD_METADATA = "embed-error-field"


class EmbeddingError(Exception):
    """Base class: ``status`` (``grpc.StatusCode`` or None), ``message``, ``request_id``, ``field``."""

    def __init__(
        self,
        message: str,
        *,
        status: grpc.StatusCode | None = None,
        request_id: str = "",
        field: str | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.request_id = request_id
        self.field = field
        code = status.name if status is not None else "CLIENT"
        where = f" [{field}]" if field else ""
        rid = f" (request_id={request_id})" if request_id else ""
        super().__init__(f"{code}: {message}{where}{rid}")


class InvalidInput(EmbeddingError):
    """INVALID_ARGUMENT: the request itself is wrong (empty text, too long, unknown task…); never retried."""


class ModelNotFound(InvalidInput):
    """NOT_FOUND: the client's ``model`` is not served there (the message lists what is)."""


class Unauthenticated(EmbeddingError):
    """UNAUTHENTICATED: missing or wrong API key; never retried."""


class PermissionDenied(EmbeddingError):
    """PERMISSION_DENIED; never retried."""


class Overloaded(EmbeddingError):
    """RESOURCE_EXHAUSTED: the server's queue stayed full through every retry attempt."""


class Unavailable(EmbeddingError):
    """UNAVAILABLE: no replica could serve (warming up, draining, down) through every retry attempt."""


class DeadlineExceeded(EmbeddingError):
    """DEADLINE_EXCEEDED: the call's timeout passed (retries included)."""


class Cancelled(EmbeddingError):
    """CANCELLED: the call was cancelled (by this process or the connection)."""


class ServerError(EmbeddingError):
    """INTERNAL, UNIMPLEMENTED and any other status: a server-side failure (see its log)."""


_BY_STATUS: dict[grpc.StatusCode, type[EmbeddingError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def _field(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == FIELD_METADATA:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def from_rpc_error(exc: grpc.RpcError, request_id: str = "") -> EmbeddingError:
    """The hierarchy's exception for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    cls = _BY_STATUS.get(status, ServerError)
    return cls(details or status.name, status=status, request_id=request_id, field=_field(trailing))
