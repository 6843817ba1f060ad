"""The server's tracer (the one ``--otlp-endpoint`` installs) exporting to memory, for tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import trace_hooks
from service.tracing import OtelTracer


@contextmanager
def server_spans() -> Iterator[InMemorySpanExporter]:
    """Every in-process server traces into the yielded exporter until the block ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_hooks.install(OtelTracer(provider))
    try:
        yield exporter
    finally:
        trace_hooks.install(None)
        provider.shutdown()
