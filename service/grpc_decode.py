"""Request bytes that cannot be used (undecodable, or over the size limit) → a clear status, in order.

grpcio decodes a request before any servicer code runs. When protobuf refuses the bytes (corrupt
wire data, invalid UTF-8 in a ``string`` field) grpcio answers UNKNOWN, which tells a client
nothing and reads like a server bug; when a message is over the transport's receive limit, grpc
core ends the call at once, dropping answers a stream had already computed. This interceptor
swaps each method's deserializer for one that turns either case into a marker:

* a unary call is refused before the inner handlers (metrics, auth, servicer) see it:
  INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for a message over ``max_message_bytes``;
* in a request stream the marker becomes an exception raised by the request iterator at that
  message's place, so a handler can first send what it computed for the earlier messages
  (``EmbedStream`` does); one that lets it escape is aborted here with the same status.

The transport limit is set to :data:`RECEIVE_HEADROOM` times ``max_message_bytes`` (server.py) so
that this check, not grpc core, sees messages up to that size; larger ones are still cut off by
core at once (documented in docs/reliability.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.errors import EmbeddingError, InvalidInput, MessageTooLarge
from service.grpc_status import Context, Continuation, abort

MESSAGE = (
    "request is not a valid protobuf message for this method (corrupt bytes or invalid UTF-8 in a string)"
)
RECEIVE_HEADROOM = 2


class MalformedMessage(InvalidInput):
    """A request message could not be decoded."""


@dataclass(frozen=True)
class _Unusable:
    """Stands in for a request that could not be used."""

    error: EmbeddingError


def _safe(deserializer: Callable[[bytes], Any], limit: int) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        if len(data) > limit:
            return _Unusable(
                MessageTooLarge(f"request message larger than max ({len(data)} vs. {limit} bytes)")
            )
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError):
            return _Unusable(MalformedMessage(MESSAGE))

    return decode


class _Checked:
    """The request stream, raising each unusable message's error at its place.

    A class rather than an async generator: a generator is finished once it raised, but the
    messages after a bad one must stay readable (the handler drains them before its status).
    """

    def __init__(self, source: AsyncIterator[Any]) -> None:
        self._source = source  # iterated lazily: an unread stream must not leave a coroutine behind
        self._iterator: AsyncIterator[Any] | None = None

    def __aiter__(self) -> _Checked:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._source.__aiter__()
        request = await self._iterator.__anext__()
        if isinstance(request, _Unusable):
            raise request.error
        return request


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming behaviour is an async generator, or a coroutine that writes via the context
    (or only aborts, as the API-key interceptor's refusal does): accept both."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:
        await result


class RequestBytesInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no stubs
    """Register it first: it must see requests before anyone decodes them."""

    def __init__(self, max_message_bytes: int) -> None:
        self._limit = max_message_bytes

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = _safe(handler.request_deserializer, self._limit)
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(source: AsyncIterator[Any], context: Context) -> Any:
                try:
                    async for response in _responses(inner_ss(_Checked(source), context)):
                        yield response
                except (MalformedMessage, MessageTooLarge) as exc:
                    await abort(context, exc)

            return handler._replace(request_deserializer=decode, stream_stream=stream_stream)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(source: AsyncIterator[Any], context: Context) -> Any:
                try:
                    return await inner_su(_Checked(source), context)
                except (MalformedMessage, MessageTooLarge) as exc:
                    await abort(context, exc)

            return handler._replace(request_deserializer=decode, stream_unary=stream_unary)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                if isinstance(request, _Unusable):
                    await abort(context, request.error)
                return await inner(request, context)

            return handler._replace(request_deserializer=decode, unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                if isinstance(request, _Unusable):
                    await abort(context, request.error)
                async for response in _responses(inner_us(request, context)):
                    yield response

            return handler._replace(request_deserializer=decode, unary_stream=unary_stream)
        return handler
