"""Request traces (issue 13 part 3): span per request, stage children, batch links, traceparent.

Spans go to the OpenTelemetry SDK's in-memory exporter through the same ``OtelTracer`` that
``--otlp-endpoint`` installs; the servers are the reliability suite's in-process ones on real
ports, with a counting runtime whose gate decides which requests share a batch.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from rel_harness import ROOT, embed_serve, free_port, grpc_channel, live_server, stubs, wait_serving
from rel_spans import server_spans
from rel_toy import CountingRuntime, word_id

from service.domain import EmbedResult
from service.pb.embedding.v1 import embedding_pb2 as pb

HANG_GUARD_S = 30.0
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
EMBED = "embedding.v1.EmbeddingService/Embed"
# Span times are epoch nanoseconds converted from the monotonic clock: allow rounding.
SLACK_NS = 50_000


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with server_spans() as exporter:
        yield exporter


async def until(condition: Callable[[], bool], what: str) -> None:
    give_up = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> dict[str, ReadableSpan]:
    out = {}
    for span in exporter.get_finished_spans():
        if span.parent is not None and span.parent.span_id == parent.context.span_id:
            assert span.name not in out, f"two {span.name} children"
            out[span.name] = span
    return out


def start(span: ReadableSpan) -> int:
    assert span.start_time is not None
    return span.start_time


def end(span: ReadableSpan) -> int:
    assert span.end_time is not None
    return span.end_time


def linked(span: ReadableSpan) -> set[int]:
    return {link.context.span_id for link in span.links}


@pytest.mark.asyncio
async def test_grpc_request_span_is_a_child_of_traceparent_with_stage_children(
    rel_toy_bundle: Path, spans: InMemorySpanExporter
) -> None:
    runtime = CountingRuntime(delay_s=0.05)  # inference takes ≥ 50 ms: a timing worth checking
    results: list[EmbedResult] = []
    async with live_server(rel_toy_bundle, runtime) as live:
        live.core.add_result_listener(results.append)
        spans.clear()  # start-up made no request spans, but be sure
        async with grpc_channel(live.grpc_target) as channel:
            stub, health = stubs(channel)
            await stub.Embed(
                pb.EmbedRequest(inputs=["w1 w2", "w3"], request_id="traced-1"),
                metadata=(("traceparent", TRACEPARENT),),
                timeout=HANG_GUARD_S,
            )
            await health.Check(health_pb2.HealthCheckRequest())  # probes are not traced
        await until(lambda: bool(named(spans, EMBED)), "the request span")

    (server,) = named(spans, EMBED)
    assert server.kind == SpanKind.SERVER
    assert server.context.trace_id == TRACE_ID
    assert server.parent is not None and server.parent.span_id == PARENT_ID and server.parent.is_remote
    assert server.attributes is not None
    assert server.attributes["embedding.request_id"] == "traced-1"
    assert server.attributes["rpc.method"] == "Embed"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.status.status_code == StatusCode.UNSET
    assert not [s for s in spans.get_finished_spans() if "Health" in s.name]

    stages = children(spans, server)
    assert set(stages) == {"tokenize", "queue", "inference"}
    for span in stages.values():
        assert span.context.trace_id == TRACE_ID
        assert start(server) - SLACK_NS <= start(span) <= end(span) <= end(server) + SLACK_NS
    tokenize, queue, inference = stages["tokenize"], stages["queue"], stages["inference"]
    assert end(tokenize) <= start(queue) + SLACK_NS  # tokenised, then queued, then computed
    assert abs(end(queue) - start(inference)) <= SLACK_NS
    # The spans' lengths are the core's own stage timings (what the response reports).
    (result,) = results
    for span, ms in [
        (tokenize, result.timings.tokenize_ms),
        (queue, result.timings.queue_ms),
        (inference, result.timings.inference_ms),
    ]:
        assert abs((end(span) - start(span)) - ms * 1e6) <= SLACK_NS, (span.name, ms)
    assert end(inference) - start(inference) >= 50e6

    # The batch that computed it: a root span of its own, linked from the request and inference.
    (batch,) = named(spans, "batch")
    assert batch.parent is None and batch.context.trace_id != TRACE_ID
    assert batch.attributes is not None and batch.attributes["embedding.batch.inputs"] == 2
    assert linked(server) == linked(inference) == {batch.context.span_id}
    assert abs(start(batch) - start(inference)) <= SLACK_NS
    assert abs(end(batch) - end(inference)) <= SLACK_NS


@pytest.mark.asyncio
async def test_a_batch_span_is_linked_from_every_request_it_served(
    rel_toy_bundle: Path, spans: InMemorySpanExporter
) -> None:
    runtime = CountingRuntime()
    async with live_server(rel_toy_bundle, runtime, max_batch_wait_ms=50) as live:
        async with grpc_channel(live.grpc_target) as channel:
            stub, _ = stubs(channel)
            runtime.hold()  # the first request occupies the runtime; the next ones queue together
            first = asyncio.ensure_future(
                stub.Embed(pb.EmbedRequest(inputs=["w1"], request_id="first"), timeout=HANG_GUARD_S)
            )
            await asyncio.to_thread(runtime.entered.wait, HANG_GUARD_S)
            rest = [
                asyncio.ensure_future(
                    stub.Embed(pb.EmbedRequest(inputs=[f"w{i}"], request_id=f"r{i}"), timeout=HANG_GUARD_S)
                )
                for i in range(2, 5)
            ]
            await until(lambda: live.core.batcher.queue_depth == 3, "three requests queued")
            assert runtime.gate is not None
            runtime.gate.set()
            await asyncio.gather(first, *rest)
        await until(lambda: len(named(spans, EMBED)) == 4, "four request spans")

    by_id = {}
    for span in named(spans, EMBED):
        assert span.attributes is not None
        by_id[span.attributes["embedding.request_id"]] = span
        assert span.parent is None  # no traceparent: each request is a trace of its own
    batches = {b.context.span_id: b for b in named(spans, "batch")}
    assert len(batches) == 2
    (alone,) = linked(by_id["first"])
    assert batches[alone].attributes is not None and batches[alone].attributes["embedding.batch.inputs"] == 1
    shared = {frozenset(linked(by_id[f"r{i}"])) for i in range(2, 5)}
    assert len(shared) == 1
    (together,) = next(iter(shared))
    assert together != alone
    assert batches[together].attributes is not None
    assert batches[together].attributes["embedding.batch.inputs"] == 3
    assert len({by_id[f"r{i}"].context.trace_id for i in range(2, 5)}) == 3


@pytest.mark.asyncio
async def test_http_request_honours_the_traceparent_header(
    rel_toy_bundle: Path, spans: InMemorySpanExporter
) -> None:
    async with live_server(rel_toy_bundle, CountingRuntime()) as live, aiohttp.ClientSession() as http:
        url = f"{live.http_url}/v1/embeddings"
        async with http.post(url, json={"input": ["w1"]}, headers={"traceparent": TRACEPARENT}) as reply:
            assert reply.status == 200
        async with http.post(url, json={"input": ""}, headers={"traceparent": TRACEPARENT}) as reply:
            assert reply.status == 400
        async with http.get(f"{live.http_url}/health") as reply:
            assert reply.status == 200
        await until(lambda: len(named(spans, "POST /v1/embeddings")) == 2, "two HTTP spans")

    ok, refused = sorted(
        named(spans, "POST /v1/embeddings"),
        key=lambda s: (s.attributes or {}).get("http.response.status_code", 0),
    )
    for span in (ok, refused):
        assert span.kind == SpanKind.SERVER
        assert span.context.trace_id == TRACE_ID
        assert span.parent is not None and span.parent.span_id == PARENT_ID
        assert span.attributes is not None and span.attributes["http.route"] == "/v1/embeddings"
        assert span.status.status_code == StatusCode.UNSET  # a 4xx is the client's error, not ours
    assert ok.attributes is not None and ok.attributes["http.response.status_code"] == 200
    assert refused.attributes is not None and refused.attributes["http.response.status_code"] == 400
    assert set(children(spans, ok)) == {"tokenize", "queue", "inference"}
    assert children(spans, refused) == {}  # refused before any work
    assert not [s for s in spans.get_finished_spans() if "health" in s.name]


@pytest.mark.asyncio
async def test_stream_span_has_stages_per_message(rel_toy_bundle: Path, spans: InMemorySpanExporter) -> None:
    async with live_server(rel_toy_bundle, CountingRuntime()) as live:
        async with grpc_channel(live.grpc_target) as channel:
            stub, _ = stubs(channel)
            requests = [pb.EmbedRequest(inputs=[f"w{i}"]) for i in range(3)]
            call = stub.EmbedStream(iter(requests), metadata=(("traceparent", TRACEPARENT),))
            answers = [answer async for answer in call]
            assert len(answers) == 3
        name = "embedding.v1.EmbeddingService/EmbedStream"
        await until(lambda: bool(named(spans, name)), "the stream span")
    (server,) = named(spans, name)
    assert server.parent is not None and server.parent.span_id == PARENT_ID
    stages = [
        s for s in spans.get_finished_spans() if s.parent and s.parent.span_id == server.context.span_id
    ]
    assert sorted(s.name for s in stages) == ["inference"] * 3 + ["queue"] * 3 + ["tokenize"] * 3
    ids = {(s.attributes or {})["embedding.request_id"] for s in stages}
    assert len(ids) == 3
    assert linked(server) == set().union(*(linked(s) for s in stages if s.name == "inference"))


# --- OpenTelemetry is optional ------------------------------------------------------------------
BLOCK_OTEL = """
import sys
class _NoOtel:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoOtel())
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBED_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "reliability")])
    return subprocess.run(
        [sys.executable, "-c", BLOCK_OTEL + code], capture_output=True, text=True, env=env, timeout=120
    )


def test_untraced_server_works_without_opentelemetry(rel_toy_bundle: Path) -> None:
    """Tracing off: a full server serves a request, and nothing imported OpenTelemetry."""
    code = f"""
import asyncio
from pathlib import Path
import grpc
from rel_harness import grpc_channel, live_server, stubs
from service.pb.embedding.v1 import embedding_pb2 as pb
import service.__main__, service.server

async def main():
    async with live_server(Path({str(rel_toy_bundle)!r})) as live:
        async with grpc_channel(live.grpc_target) as channel:
            stub, _ = stubs(channel)
            reply = await stub.Embed(pb.EmbedRequest(inputs=["w1"]), timeout=60)
            assert len(reply.embeddings) == 1

asyncio.run(main())
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry") or m == "service.tracing")
print("LOADED", loaded)
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout


def test_otlp_endpoint_without_opentelemetry_is_a_clear_startup_error(rel_toy_bundle: Path) -> None:
    code = f"""
from service.__main__ import main
code = main(["--model-dir", {str(rel_toy_bundle)!r}, "--port", "0",
             "--otlp-endpoint", "http://127.0.0.1:4317", "--log-format", "text"])
print("EXIT", code)
"""
    done = run_python(code)
    assert "EXIT 2" in done.stdout, done.stdout + done.stderr
    assert "--otlp-endpoint is set but OpenTelemetry is not installed" in done.stderr
    assert "embedding-service[otel]" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.asyncio
async def test_server_errors_mark_the_span_and_client_errors_do_not(
    rel_toy_bundle: Path, spans: InMemorySpanExporter
) -> None:
    runtime = CountingRuntime(fail=lambda rows: any(row[1:2] == [word_id("w9")] for row in rows))
    async with live_server(rel_toy_bundle, runtime) as live:
        async with grpc_channel(live.grpc_target) as channel:
            stub, _ = stubs(channel)
            for inputs, code in [
                (["w9"], grpc.StatusCode.INTERNAL),
                ([""], grpc.StatusCode.INVALID_ARGUMENT),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.Embed(pb.EmbedRequest(inputs=inputs), timeout=HANG_GUARD_S)
                assert failed.value.code() == code
        await until(lambda: len(named(spans, EMBED)) == 2, "two request spans")
    by_code = {(s.attributes or {})["rpc.grpc.status_code"]: s for s in named(spans, EMBED)}
    internal = by_code[grpc.StatusCode.INTERNAL.value[0]]
    invalid = by_code[grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert internal.status.status_code == StatusCode.ERROR
    assert internal.status.description == "INTERNAL"
    assert invalid.status.status_code == StatusCode.UNSET
    assert children(spans, internal) == children(spans, invalid) == {}  # no embed result to show


# --- embed-serve --otlp-endpoint, end to end -----------------------------------------------------
class Collector(otlp_grpc.TraceServiceServicer):  # type: ignore[misc]
    """A stand-in OTLP/gRPC collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.requests: list[otlp.ExportTraceServiceRequest] = []

    def Export(self, request: otlp.ExportTraceServiceRequest, context: Any) -> Any:
        self.requests.append(request)
        return otlp.ExportTraceServiceResponse()


def test_embed_serve_sends_spans_to_the_otlp_endpoint(rel_toy_bundle: Path, tmp_path: Path) -> None:
    """The real setting, the real exporter: spans reach a collector, flushed on SIGTERM."""
    collector = Collector()
    receiver = grpc.server(ThreadPoolExecutor(2))
    otlp_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    otlp_port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    port, stderr = free_port(), tmp_path / "stderr.log"
    args = ["--model-dir", str(rel_toy_bundle), "--port", str(port), "--log-format", "text"]
    try:
        with embed_serve([*args, "--otlp-endpoint", f"http://127.0.0.1:{otlp_port}"], stderr) as proc:
            wait_serving(port, proc, stderr)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub, _ = stubs(channel)
                request = pb.EmbedRequest(inputs=["w1 w2"], request_id="otlp-1")
                stub.Embed(request, metadata=(("traceparent", TRACEPARENT),), timeout=60)
            proc.send_signal(signal.SIGTERM)  # the last spans are flushed on the way out
            assert proc.wait(60) == 0, stderr.read_text()[-3000:]
    finally:
        receiver.stop(0)

    sent = [
        (resource.resource, span)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    by_name = {span.name: (resource, span) for resource, span in sent}
    assert set(by_name) == {EMBED, "tokenize", "queue", "inference", "batch"}, sorted(by_name)
    resource, server = by_name[EMBED]
    service = {a.key: a.value.string_value for a in resource.attributes}["service.name"]
    assert service == "embedding-service"
    assert server.trace_id == TRACE_ID.to_bytes(16, "big")
    assert server.parent_span_id == PARENT_ID.to_bytes(8, "big")
    for stage in ("tokenize", "queue", "inference"):
        assert by_name[stage][1].parent_span_id == server.span_id
    assert [link.span_id for link in server.links] == [by_name["batch"][1].span_id]
