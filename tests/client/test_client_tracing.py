"""The caller's trace continues into the server: embedding_client sends ``traceparent`` from the
caller's active span, and the server's request span (with its stage children) is that span's child.

A real server on a real port (the reliability harness's, in its own thread) with the tracer that
``--otlp-endpoint`` installs, exporting to the OpenTelemetry SDK's in-memory exporter; the caller
has its own tracer provider, as a calling service would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from rel_harness import Live
from rel_spans import server_spans as tracing_to_memory

from embedding_client import EmbeddingClient

EMBED = "embedding.v1.EmbeddingService/Embed"


@pytest.fixture
def server_spans() -> Iterator[InMemorySpanExporter]:
    with tracing_to_memory() as exporter:
        yield exporter


def test_server_span_is_a_child_of_the_callers_span(live: Live, server_spans: InMemorySpanExporter) -> None:
    caller = TracerProvider()
    with EmbeddingClient(live.grpc_target, timeout=60) as client:
        client.embed(["w1 w2"])  # untraced call first: limits are read, no caller span
        server_spans.clear()
        with caller.get_tracer("calling-service").start_as_current_span("index-documents") as span:
            vectors = client.embed(["w3 w4", "w5"])
        client.embed(["w6"])  # after the span: a trace of its own again
    assert vectors.shape[0] == 2
    mine = span.get_span_context()

    give_up = time.monotonic() + 60
    while len([s for s in server_spans.get_finished_spans() if s.name == EMBED]) < 2:
        assert time.monotonic() < give_up, "the server did not record both calls"
        time.sleep(0.01)
    traced, untraced = sorted(
        (s for s in server_spans.get_finished_spans() if s.name == EMBED),
        key=lambda s: s.parent is None,
    )
    assert traced.kind == SpanKind.SERVER
    assert traced.context.trace_id == mine.trace_id
    assert traced.parent is not None and traced.parent.span_id == mine.span_id
    assert untraced.parent is None and untraced.context.trace_id != mine.trace_id
    stages = {
        s.name
        for s in server_spans.get_finished_spans()
        if s.parent is not None and s.parent.span_id == traced.context.span_id
    }
    assert stages == {"tokenize", "queue", "inference"}
    assert traced.links and all(link.context.trace_id != mine.trace_id for link in traced.links)
