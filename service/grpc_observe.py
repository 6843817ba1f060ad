"""gRPC metrics and access logs, as a server interceptor around every method handler.

Why an interceptor rather than code in the servicer: the servicer stays about proto ⇄ domain
only, every method (including health and reflection) is counted with the same labels as the HTTP
front end (``api="grpc"``, ``method``, ``code`` = status name), and an RPC refused earlier by the
auth interceptor is still counted. Request fields are read duck-typed (``inputs``,
``token_inputs``, ``request_id``, ``usage``) so non-embedding methods pass through.

It is also the edge for request ids: the call's one id is chosen here (:func:`edge_request_id`),
handed down through ``grpc_status.call_request_id``, sent back as ``x-request-id`` trailing
metadata and written in the access line, so the id a client sees is the one in the log.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from service import trace_hooks
from service.grpc_status import REQUEST_ID_KEY, Context, Continuation, is_open_method, set_request_id
from service.logs import is_safe_request_id, log_request, new_request_id
from service.metrics import Metrics

# A cancelled call counts as DEADLINE_EXCEEDED when this little (or nothing) of its deadline is left:
# grpc core fires the server's deadline timer a few milliseconds early (6-7 ms seen with grpcio
# 1.85), and a client cancelling this close to its own deadline is the same story either way.
_DEADLINE_SLACK_S = 0.1


@dataclass
class _Call:
    """What one RPC did, filled in as its messages pass (stage timings are the core's to record)."""

    request_id: str
    inputs: int = 0
    tokens: int = 0

    def saw_request(self, request: Any) -> None:
        self.inputs += len(getattr(request, "inputs", ())) + len(getattr(request, "token_inputs", ()))

    def saw_response(self, response: Any) -> None:
        # A split stream answer carries usage on its last part only.
        if not getattr(response, "last", True):
            return
        usage = getattr(response, "usage", None)
        if usage is not None:
            self.tokens += int(getattr(usage, "input_tokens", 0))


def edge_request_id(context: Context, request: Any = None) -> str:
    """The call's one request id: the unary message's own, else ``x-request-id`` metadata, else new.

    A client-chosen id counts only when it passes the shared rule (service.logs); an unsafe one
    is refused by the servicer and never reaches a log line.
    """
    rid = getattr(request, "request_id", "") if request is not None else ""
    if isinstance(rid, str) and is_safe_request_id(rid):
        return rid
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and is_safe_request_id(value):
            return value
    return new_request_id()


class GrpcObserveInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no stubs
    """Counts, times and logs every RPC; register it *outside* (before) the auth interceptor."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full: str = handler_call_details.method
        return _wrap(handler, full, self._metrics)


def status_name(context: Context, error: BaseException | None) -> str:
    """The status the client got, as the server can know it.

    A status set by ``abort`` is what was sent. Otherwise grpc ended the call under the handler:
    it cancels the handler's task (``CancelledError``, or ``GeneratorExit`` when a stream's
    generator is closed) both when the client's deadline passes and when the client cancels or
    leaves; the remaining time tells which. Only a real exception is UNKNOWN.
    """
    code = context.code()
    if code is not None:
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    if error is None:
        return "OK"
    if isinstance(error, Exception):
        return "UNKNOWN"
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_SLACK_S:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"


def _finish(
    metrics: Metrics,
    method: str,
    call: _Call,
    context: Context,
    started: float,
    error: BaseException | None,
    traced: trace_hooks.CallTrace | None = None,
) -> None:
    name = status_name(context, error)
    trace_hooks.end_grpc(traced, name)
    short = method.rsplit("/", 1)[-1]
    latency = time.perf_counter() - started
    metrics.observe_request("grpc", short, name, latency, call.tokens)
    if is_open_method(method) and name == "OK":
        return  # probes poll every few seconds: counted, not logged
    log_request(
        api="grpc",
        method=short,
        request_id=call.request_id,
        status=name,
        inputs=call.inputs,
        tokens=call.tokens,
        latency_s=latency,
    )


class _Requests:
    """The request stream, counted as it is read; stays readable after an item raised."""

    def __init__(self, source: AsyncIterator[Any], call: _Call) -> None:
        self._source = source  # iterated lazily: an unread stream must not leave a coroutine behind
        self._iterator: AsyncIterator[Any] | None = None
        self._call = call

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._source.__aiter__()
        request = await self._iterator.__anext__()
        self._call.saw_request(request)
        return request


def _wrap(handler: grpc.RpcMethodHandler, method: str, metrics: Metrics) -> grpc.RpcMethodHandler:
    des, ser = handler.request_deserializer, handler.response_serializer

    if not handler.request_streaming and not handler.response_streaming:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            call, started, error = _Call(edge_request_id(context, request)), time.perf_counter(), None
            set_request_id(context, call.request_id)
            traced = trace_hooks.begin_grpc(method, context, call.request_id)
            call.saw_request(request)
            try:
                response = await inner(request, context)
                call.saw_response(response)
                return response
            except BaseException as exc:
                error = exc
                raise
            finally:
                _finish(metrics, method, call, context, started, error, traced)

        return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)

    if handler.response_streaming and inspect.isasyncgenfunction(
        handler.stream_stream if handler.request_streaming else handler.unary_stream
    ):
        streaming = handler.request_streaming
        gen = handler.stream_stream if streaming else handler.unary_stream

        async def responses(request: Any, context: Context) -> AsyncIterator[Any]:
            call = _Call(edge_request_id(context, None if streaming else request))
            started, error = time.perf_counter(), None
            set_request_id(context, call.request_id)
            traced = trace_hooks.begin_grpc(method, context, call.request_id)
            if streaming:
                request = _Requests(request, call)
            else:
                call.saw_request(request)
            try:
                async for response in gen(request, context):
                    call.saw_response(response)
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                _finish(metrics, method, call, context, started, error, traced)

        factory = grpc.stream_stream_rpc_method_handler if streaming else grpc.unary_stream_rpc_method_handler
        return factory(responses, des, ser)

    # Other shapes (stream-unary, or streaming written through context.write): count only.
    return handler
