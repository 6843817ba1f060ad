"""How a gRPC call ends, and what every interceptor shares.

Why one module: the servicer's decorators, the API-key interceptor's refusal and the request-bytes
guard all turn a :mod:`service.errors` exception into a status the same way (the one table, the
``embed-error-field`` trailer, the request id); the interceptors also share their continuation
type and the list of methods that stay open (health, reflection).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from service.errors import describe

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
Context = Any  # grpc.aio.ServicerContext; grpc ships no type stubs

# Kubernetes' native gRPC probe cannot send metadata and reflection only describes the public
# proto: both work without a key, and are not access-logged while they succeed.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REQUEST_ID_KEY = "x-request-id"  # trailing metadata on every call, as HTTP's X-Request-Id header
FIELD_KEY = "embed-error-field"

# The call's request id, set once by the observing interceptor (the edge) and read by the handlers
# below it; the call's task (and the tasks it starts) see their own value.
call_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("call_request_id", default="")


def is_open_method(method: str) -> bool:
    return method.startswith(OPEN_METHOD_PREFIXES)


def _with(context: Context, key: str, value: str) -> None:
    """Add one trailer, keeping the ones already set (the request id)."""
    kept = tuple((k, v) for k, v in (context.trailing_metadata() or ()) if k != key)
    context.set_trailing_metadata((*kept, (key, value)))


def set_request_id(context: Context, request_id: str) -> None:
    call_request_id.set(request_id)
    _with(context, REQUEST_ID_KEY, request_id)


async def abort(context: Context, exc: BaseException, request_id: str = "") -> None:
    """End a call with the status the table gives ``exc`` (raises, as ``context.abort`` does)."""
    public = describe(exc, request_id or call_request_id.get())
    if public.field:
        _with(context, FIELD_KEY, public.field)
    await context.abort(public.grpc_code, public.message)


def refusing_handler(handler: grpc.RpcMethodHandler, exc: BaseException) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that ends every call with ``exc``."""
    des, ser = handler.request_deserializer, handler.response_serializer

    async def refuse(request: Any, context: Context) -> Any:
        await abort(context, exc)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, des, ser)
    return grpc.unary_unary_rpc_method_handler(refuse, des, ser)


S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def maps_errors(
    handler: Callable[[S, Req, Context], Awaitable[Resp]],
) -> Callable[[S, Req, Context], Awaitable[Resp]]:
    """Wrap a unary gRPC handler: domain errors become their status code; others INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: S, request: Req, context: Context) -> Resp:
        try:
            return await handler(self, request, context)
        except Exception as exc:  # the one place handler errors are turned into statuses
            await abort(context, exc, getattr(exc, "request_id", ""))
            raise  # pragma: no cover - abort raises

    return wrapper


def maps_stream_errors(
    handler: Callable[[S, Req, Context], AsyncIterator[Resp]],
) -> Callable[[S, Req, Context], AsyncIterator[Resp]]:
    """Same for a streaming handler (an async generator): the stream ends with the mapped status."""

    @functools.wraps(handler)
    async def wrapper(self: S, requests: Req, context: Context) -> AsyncIterator[Resp]:
        try:
            async for item in handler(self, requests, context):
                yield item
        except Exception as exc:
            await abort(context, exc, getattr(exc, "request_id", ""))
            raise  # pragma: no cover - abort raises

    return wrapper
