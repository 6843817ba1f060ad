"""Request traces over OpenTelemetry, built after the fact from timings the server keeps anyway.

Imported only when ``--otlp-endpoint`` is set (:func:`service.trace_hooks.from_settings`), so the
``otel`` extra is optional. Per request, one SERVER span (child of the caller's span when the
request carried W3C ``traceparent``) with children ``tokenize``, ``queue`` and ``inference`` per
embed it made; the runtime calls that computed it are ``batch`` spans of their own (a batch serves
many requests from many traces), linked from the request span and from its ``inference`` span.
Every span gets explicit start and end times from ``Timings`` and ``BatchRecord``: nothing is
measured twice and nothing wraps the hot path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from service.batch_items import BatchRecord
from service.trace_hooks import CallTrace, EmbedTrace

SERVICE_NAME = "embedding-service"
# Batch spans already made, by batch id: the requests of one batch finish close together.
_KEEP_BATCHES = 4096
Clock = Callable[[float], int]  # seconds on a process clock -> epoch nanoseconds


def _epoch(clock_ns: Callable[[], int]) -> Clock:
    """Converts ``clock_ns``'s seconds to epoch ns; the tightest of a few bracketed readings,
    so a thread switch between the two clock reads cannot skew it."""
    readings = []
    for _ in range(3):
        before, reading, after = time.time_ns(), clock_ns(), time.time_ns()
        readings.append((after - before, (before + after) // 2 - reading))
    offset = min(readings)[1]
    return lambda seconds: int(seconds * 1e9) + offset


class OtelTracer:
    """Turns finished requests into spans of ``provider`` (tests give one with an in-memory exporter)."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("service.tracing")
        self._batches: OrderedDict[int, SpanContext] = OrderedDict()

    def export(self, call: CallTrace, end_ns: int, status: str, failed: bool) -> None:
        ns, perf = _epoch(time.monotonic_ns), _epoch(time.perf_counter_ns)  # batches, core timings
        served = {b.batch_id: b for embed in call.embeds for b in embed.batches}
        span = self._tracer.start_span(
            call.name,
            context=extract(call.carrier),
            kind=SpanKind.SERVER,
            attributes={**call.attributes, "embedding.batches": len(served)},
            links=[Link(self._batch(b, ns)) for b in served.values()],
            start_time=call.start_ns,
        )
        parent = trace.set_span_in_context(span)
        for embed in call.embeds:
            self._stages(embed, parent, ns, perf)
        if failed:
            span.set_status(Status(StatusCode.ERROR, status))
        span.end(end_time=end_ns)

    def _stages(self, embed: EmbedTrace, parent: otel_context.Context, ns: Clock, perf: Clock) -> None:
        t = embed.timings
        stages: list[tuple[str, int, int, tuple[Link, ...]]] = [
            ("tokenize", perf(embed.started), perf(embed.started + t.tokenize_ms / 1000.0), ())
        ]
        if embed.batches:
            first = min(b.start for b in embed.batches)
            links = tuple(Link(self._batch(b, ns)) for b in embed.batches)
            stages += [
                ("queue", ns(first - t.queue_ms / 1000.0), ns(first), ()),
                ("inference", ns(first), ns(first + t.inference_ms / 1000.0), links),
            ]
        for name, start, end, links in stages:
            child = self._tracer.start_span(
                name,
                context=parent,
                attributes={"embedding.request_id": embed.request_id},
                links=links,
                start_time=start,
            )
            child.end(end_time=end)

    def _batch(self, batch: BatchRecord, ns: Clock) -> SpanContext:
        """The batch's span (made the first time a request it served is exported)."""
        known = self._batches.get(batch.batch_id)
        if known is not None:
            return known
        span = self._tracer.start_span(
            "batch",
            context=otel_context.Context(),  # a root: the batch belongs to no one request's trace
            attributes={
                "embedding.batch.id": batch.batch_id,
                "embedding.batch.inputs": batch.inputs,
                "embedding.batch.tokens": batch.tokens,
                "embedding.batch.padded_tokens": batch.padded_tokens,
            },
            start_time=ns(batch.start),
        )
        span.end(end_time=ns(batch.end))
        self._batches[batch.batch_id] = span.get_span_context()
        if len(self._batches) > _KEEP_BATCHES:
            self._batches.popitem(last=False)
        return span.get_span_context()

    def shutdown(self) -> None:
        self._provider.shutdown()


def otlp_tracer(endpoint: str) -> OtelTracer:
    """Spans batched and sent to an OTLP/gRPC collector at ``endpoint``."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    resource = Resource.create()  # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, when set, win
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return OtelTracer(provider)
