"""A gRPC handler that runs under one key's quota (service/quotas.py).

Why wrap the handler rather than check in the interceptor: the interceptor returns before the
call runs, so only a wrapper can hold the key's concurrency slot for the whole call (a stream
holds it while open) and set the quota the core charges tokens to, in the call's own context.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

import grpc

from service.grpc_status import Context, abort
from service.quotas import KeyQuota, QuotaExceeded, current_quota, retry_after_header

RETRY_AFTER_KEY = "retry-after"  # trailer, in whole seconds, as HTTP's Retry-After


async def _refuse(context: Context, exc: QuotaExceeded) -> None:
    kept = tuple((k, v) for k, v in (context.trailing_metadata() or ()) if k != RETRY_AFTER_KEY)
    context.set_trailing_metadata((*kept, (RETRY_AFTER_KEY, retry_after_header(exc.retry_after_s))))
    await abort(context, exc)


async def _enter(quota: KeyQuota, context: Context) -> None:
    """Admit the call (or end it with RESOURCE_EXHAUSTED) and make its quota the core's."""
    try:
        quota.admit()
    except QuotaExceeded as exc:
        await _refuse(context, exc)
    # Not reset: grpc runs each call in a task of its own, whose context ends with it.
    current_quota.set(quota)


def limited_handler(handler: grpc.RpcMethodHandler, quota: KeyQuota) -> grpc.RpcMethodHandler:
    """``handler`` admitted through ``quota`` first; the slot is released when the call ends."""
    des, ser = handler.request_deserializer, handler.response_serializer
    streaming_out = handler.response_streaming
    behaviour: Any = (
        handler.stream_stream or handler.unary_stream or handler.stream_unary or handler.unary_unary
    )

    async def unary(request: Any, context: Context) -> Any:
        await _enter(quota, context)
        try:
            return await behaviour(request, context)
        finally:
            quota.release()

    async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
        await _enter(quota, context)
        try:
            result = behaviour(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:  # a handler that writes through context.write
                await result
        finally:
            quota.release()

    if handler.request_streaming and streaming_out:
        return grpc.stream_stream_rpc_method_handler(streaming, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    if streaming_out:
        return grpc.unary_stream_rpc_method_handler(streaming, des, ser)
    return grpc.unary_unary_rpc_method_handler(unary, des, ser)
