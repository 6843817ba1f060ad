"""Malformed request bytes → INVALID_ARGUMENT, not UNKNOWN.

grpcio decodes a request before any servicer code runs; when protobuf refuses the bytes (corrupt
wire data, invalid UTF-8 in a ``string`` field) grpcio answers UNKNOWN, which tells a client
nothing and reads like a server bug. This interceptor swaps each method's deserializer for one
that turns a decode failure into a marker, and refuses the marker with INVALID_ARGUMENT before
the inner handlers (metrics, auth, servicer) ever see it. The server stays up either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

MESSAGE = (
    "request is not a valid protobuf message for this method (corrupt bytes or invalid UTF-8 in a string)"
)


class _Malformed:
    """Stands in for a request that could not be decoded."""

    __slots__ = ()


_MALFORMED = _Malformed()


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError):
            return _MALFORMED

    return decode


async def _refuse(context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MESSAGE)


def _checked(source: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async def requests() -> AsyncIterator[Any]:
        async for request in source:
            if request is _MALFORMED:
                await _refuse(context)
            yield request

    return requests()


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming behaviour is an async generator, or a coroutine that writes via the context
    (or only aborts, as the API-key interceptor's refusal does): accept both."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:
        await result


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no stubs
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = _safe(handler.request_deserializer)
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(source: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                async for response in _responses(inner_ss(_checked(source, context), context)):
                    yield response

            return handler._replace(request_deserializer=decode, stream_stream=stream_stream)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(source: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                return await inner_su(_checked(source, context), context)

            return handler._replace(request_deserializer=decode, stream_unary=stream_unary)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if request is _MALFORMED:
                    await _refuse(context)
                return await inner(request, context)

            return handler._replace(request_deserializer=decode, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if request is _MALFORMED:
                    await _refuse(context)
                async for response in _responses(inner_us(request, context)):
                    yield response

            return handler._replace(request_deserializer=decode, unary_stream=unary_stream)
        return handler
