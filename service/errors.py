"""One error taxonomy, mapped once to gRPC status codes and HTTP statuses.

Why one table: the gRPC servicer and the OpenAI-compatible HTTP facade must agree on what a
client sees for the same failure, and a new error class must not silently become INTERNAL on one
front end only. Domain code raises these exceptions and never talks to a transport; each front
end converts with :func:`describe` (gRPC through ``service.grpc_status``). Anything that is not an
``EmbeddingError`` is a bug or a runtime failure: the client gets a generic message naming the
request id, and the traceback goes to the log only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

log = logging.getLogger("service.errors")


class StartupError(Exception):
    """The server cannot start: bad bundle, bad setting, provider missing, failed self-test.

    Not an ``EmbeddingError``: no client ever sees it. The message is what the operator reads on
    stderr before the process exits 2, so it names the file or setting and what to do.
    """


class EmbeddingError(Exception):
    """Base class. ``message`` is safe to show to clients; ``field`` names the bad request field."""

    def __init__(self, message: str, *, field: str | None = None, request_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        # Filled in by the core, so a front end that lost track of the request (a stream) can say it.
        self.request_id = request_id


class InvalidInput(EmbeddingError):
    """The request is malformed: empty inputs, empty string, bad enum, bad token id…"""


class TooManyInputs(InvalidInput):
    """More inputs than max_inputs_per_request (or than one unary response can carry)."""


class InputTooLong(InvalidInput):
    """An input exceeds max_input_tokens and truncation is NONE."""


class UnknownTask(InvalidInput):
    """``task`` names no instruction in the bundle."""


class DimensionsNotAllowed(InvalidInput):
    """``dimensions`` was asked for but the operator did not enable it, or it is out of range."""


class ModelNotFound(EmbeddingError):
    """``model`` names no served model nor alias; the message lists the served ones."""


class MessageTooLarge(EmbeddingError):
    """A request message is larger than max_message_bytes (gRPC's own code for it is kept)."""


class Unauthenticated(EmbeddingError):
    """Missing or wrong credentials (API keys; used by the front ends)."""


class Overloaded(EmbeddingError):
    """Admission refused: the queue holds max_queue_tokens already. Retry with back-off."""


class NotReady(EmbeddingError):
    """Warming up (model loading, self-test) or stopped. Retry, maybe on another replica."""


class Draining(NotReady):
    """Shutting down: accepted work finishes, new work is refused."""


class DeadlineExceeded(EmbeddingError):
    """The request's deadline passed before its inputs were computed; they never will be."""


class RuntimeFailure(EmbeddingError):
    """The inference runtime failed. The public message is generic; details are logged."""


@dataclass(frozen=True)
class ErrorInfo:
    """How one error class looks on the wire."""

    grpc_code: grpc.StatusCode
    http_status: int
    # OpenAI-style error "type" for the HTTP facade.
    kind: str


# THE table. Most specific class first: lookup walks the exception's MRO.
ERROR_TABLE: dict[type[EmbeddingError], ErrorInfo] = {
    TooManyInputs: ErrorInfo(grpc.StatusCode.INVALID_ARGUMENT, 413, "invalid_request_error"),
    InputTooLong: ErrorInfo(grpc.StatusCode.INVALID_ARGUMENT, 413, "invalid_request_error"),
    UnknownTask: ErrorInfo(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    DimensionsNotAllowed: ErrorInfo(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    InvalidInput: ErrorInfo(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    ModelNotFound: ErrorInfo(grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
    MessageTooLarge: ErrorInfo(grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error"),
    Unauthenticated: ErrorInfo(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    Overloaded: ErrorInfo(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    Draining: ErrorInfo(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    NotReady: ErrorInfo(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    DeadlineExceeded: ErrorInfo(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
    RuntimeFailure: ErrorInfo(grpc.StatusCode.INTERNAL, 500, "server_error"),
    EmbeddingError: ErrorInfo(grpc.StatusCode.INTERNAL, 500, "server_error"),
}


@dataclass(frozen=True)
class PublicError:
    """What a front end sends: status codes and a message with no internals."""

    grpc_code: grpc.StatusCode
    http_status: int
    kind: str
    message: str
    field: str | None
    error_class: str


def info_for(error_type: type[EmbeddingError]) -> ErrorInfo:
    for klass in error_type.__mro__:
        if klass in ERROR_TABLE:
            return ERROR_TABLE[klass]
    raise AssertionError("EmbeddingError is in the table")  # pragma: no cover


def describe(exc: BaseException, request_id: str = "") -> PublicError:
    """Map any exception to what the client sees; log unexpected ones with their traceback."""
    request_id = request_id or getattr(exc, "request_id", "")
    if not isinstance(exc, EmbeddingError):
        log.error("unexpected error (request_id=%s)", request_id, exc_info=exc)
        exc = RuntimeFailure("internal error")
    info = info_for(type(exc))
    message = exc.message
    if info.grpc_code == grpc.StatusCode.INTERNAL:
        # RuntimeFailure carries internals in its message when raised; never send them.
        message = f"internal error (request_id={request_id or 'unknown'}); details are in the server log"
    return PublicError(info.grpc_code, info.http_status, info.kind, message, exc.field, type(exc).__name__)
