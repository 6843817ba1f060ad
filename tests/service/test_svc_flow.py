"""Over a real channel with fake runtimes: every error row, deadlines, cancellation, overload."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from svc_harness import serving, settings_for, wait_for
from svc_toy import CLS, SEP, FakeRuntime, content_ids, toy_tokenizer

from service.core import EmbeddingCore
from service.pb.embedding.v1 import embedding_pb2 as pb
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.server import build_server, shutdown

pytestmark = pytest.mark.asyncio
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def model_ids(text: str) -> list[int]:
    return [CLS, *content_ids(toy_tokenizer(), text), SEP]


async def code_of(call: object) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    trailing = {k: v for k, v in (err.value.trailing_metadata() or ()) if isinstance(v, str)}
    return err.value.code(), err.value.details() or "", trailing


async def test_invalid_argument_rows(toy_bundle: Path, fake_runtime: FakeRuntime) -> None:
    long_text = "one " * 40
    cases = [
        (pb.EmbedRequest(), "empty"),
        (pb.EmbedRequest(inputs=["paris", ""]), "input 1 is an empty string"),
        (pb.EmbedRequest(inputs=["paris"] * 5), "more than the limit of 4"),
        (pb.EmbedRequest(inputs=[long_text], truncation=pb.TRUNCATION_NONE), "limit of 32"),
        (pb.EmbedRequest(inputs=["paris"], task="nope"), "unknown task"),
        (pb.EmbedRequest(inputs=["paris"], dimensions=4), "not enabled"),
        (pb.EmbedRequest(inputs=["paris"], dimensions=0), "at least 1"),
        (pb.EmbedRequest(inputs=["paris"], input_type=7), "input_type=7"),  # type: ignore[arg-type]
        (pb.EmbedRequest(inputs=["paris"], truncation=9), "truncation=9"),  # type: ignore[arg-type]
        (pb.EmbedRequest(inputs=["paris"], encoding=42), "encoding=42"),  # type: ignore[arg-type]
        (pb.EmbedRequest(inputs=["paris"], encoding=pb.ENCODING_INT8, normalize=False), "int8"),
        (pb.EmbedRequest(inputs=["paris"], task="search", instruction="x"), "not both"),
        (pb.EmbedRequest(inputs=["paris"], token_inputs=[pb.TokenIds(ids=[5])]), "not both"),
        (pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=[5, 99999])]), "outside the vocabulary"),
    ]
    async with serving(toy_bundle, fake_runtime, max_inputs_per_request=4) as h:
        calls_before = len(fake_runtime.calls)
        for request, fragment in cases:
            code, details, trailing = await code_of(h.stub.Embed(request))
            assert code == INVALID, (request, code)
            assert fragment in details, (fragment, details)
        code, _, trailing = await code_of(h.stub.Embed(pb.EmbedRequest(inputs=["paris", ""])))
        assert trailing.get("embed-error-field") == "inputs[1]"
        code, details, _ = await code_of(h.stub.Tokenize(pb.TokenizeRequest(inputs=[long_text])))
        assert code == INVALID and "limit of 32" in details
        assert len(fake_runtime.calls) == calls_before  # nothing invalid reached the runtime


async def test_token_inputs_are_embedded(toy_bundle: Path, fake_runtime: FakeRuntime) -> None:
    async with serving(toy_bundle, fake_runtime) as h:
        by_ids = await h.stub.Embed(pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=[38, 39])]))
        by_text = await h.stub.Embed(pb.EmbedRequest(inputs=["hello world"]))
    assert by_ids.embeddings[0].token_count == 4
    np.testing.assert_allclose(by_ids.embeddings[0].values, by_text.embeddings[0].values, atol=1e-6)


async def test_runtime_failure_is_internal_without_details(toy_bundle: Path, toy_table: np.ndarray) -> None:
    eos_word = toy_tokenizer().token_to_id("eos")
    runtime = FakeRuntime(toy_table, fail=lambda ids: bool((ids == eos_word).any()))
    async with serving(toy_bundle, runtime) as h:
        code, details, _ = await code_of(h.stub.Embed(pb.EmbedRequest(inputs=["eos"], request_id="rq-5")))
        ok = await h.stub.Embed(pb.EmbedRequest(inputs=["paris"]))
        stream = h.stub.EmbedStream(iter([pb.EmbedRequest(inputs=["eos"], request_id="rq-6")]))
        stream_code, stream_details, _ = await code_of(stream.read())
    assert stream_code == grpc.StatusCode.INTERNAL and "rq-6" in stream_details
    assert code == grpc.StatusCode.INTERNAL
    assert "rq-5" in details and "secret" not in details and "exploded" not in details
    assert len(ok.embeddings) == 1


async def test_deadline_exceeded_work_is_never_computed(toy_bundle: Path, toy_table: np.ndarray) -> None:
    runtime = FakeRuntime(toy_table)
    async with serving(toy_bundle, runtime, max_batch_wait_ms=0, max_batch_size=1) as h:
        runtime.gate = threading.Event()
        runtime.started.clear()
        first = asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(inputs=["paris"])))
        await asyncio.to_thread(runtime.started.wait, 5)
        code, _, _ = await code_of(h.stub.Embed(pb.EmbedRequest(inputs=["tokyo city"]), timeout=0.2))
        runtime.gate.set()
        await first
        await h.stub.Embed(pb.EmbedRequest(inputs=["london"]))  # the queue moved on past it
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert model_ids("tokyo city") not in runtime.rows_seen
    assert model_ids("london") in runtime.rows_seen


async def test_cancelled_work_is_never_computed(toy_bundle: Path, toy_table: np.ndarray) -> None:
    runtime = FakeRuntime(toy_table)
    async with serving(toy_bundle, runtime, max_batch_wait_ms=0, max_batch_size=1) as h:
        runtime.gate = threading.Event()
        runtime.started.clear()
        first = asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(inputs=["paris"])))
        await asyncio.to_thread(runtime.started.wait, 5)
        doomed = h.stub.Embed(pb.EmbedRequest(inputs=["river mountain"]))
        await asyncio.sleep(0.1)
        doomed.cancel()
        await asyncio.sleep(0.1)
        runtime.gate.set()
        await first
        await h.stub.Embed(pb.EmbedRequest(inputs=["london"]))
    assert model_ids("river mountain") not in runtime.rows_seen
    assert model_ids("london") in runtime.rows_seen


async def test_overload_is_resource_exhausted(toy_bundle: Path, fake_runtime: FakeRuntime) -> None:
    # A busy runtime and a long batch wait keep admitted work queued, so the queue's token count is
    # deterministic (an idle runtime would take it at once).
    async with serving(toy_bundle, fake_runtime, max_batch_wait_ms=600_000, max_queue_tokens=12) as h:
        fake_runtime.gate = threading.Event()  # after start-up's warm-up and self-test calls
        fake_runtime.started.clear()
        running = asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(inputs=["busy"])))
        await asyncio.to_thread(fake_runtime.started.wait, 5)
        queued = asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(inputs=["a b c d e f g h"])))  # 10 tokens
        await wait_for(lambda: h.core.batcher.queued_tokens == 10)
        code, details, _ = await code_of(h.stub.Embed(pb.EmbedRequest(inputs=["one two three"])))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in details
        fake_runtime.gate.set()
        assert len((await running).embeddings) == 1
        assert len((await queued).embeddings) == 1
        ok = await h.stub.Embed(pb.EmbedRequest(inputs=["one two three"]))  # room again
    assert len(ok.embeddings) == 1


async def test_unavailable_while_warming_up(toy_bundle: Path, fake_runtime: FakeRuntime) -> None:
    settings = settings_for(toy_bundle)
    core = EmbeddingCore(settings, runtime_factory=lambda *args: fake_runtime)
    server, port = build_server(settings, core)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            for call in (
                stub.Embed(pb.EmbedRequest(inputs=["x"])),
                stub.GetModelInfo(pb.GetModelInfoRequest()),
            ):
                code, details, _ = await code_of(call)
                assert code == grpc.StatusCode.UNAVAILABLE and "warming up" in details
            from grpc_health.v1 import health_pb2_grpc

            health = health_pb2_grpc.HealthStub(channel)
            r = await health.Check(health_pb2.HealthCheckRequest(service="embedding.v1.EmbeddingService"))
            assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await core.start()
            r = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)
        await core.close()


async def test_stream_error_ends_stream_after_earlier_answers(
    toy_bundle: Path, fake_runtime: FakeRuntime
) -> None:
    requests = [
        pb.EmbedRequest(inputs=["paris"]),
        pb.EmbedRequest(inputs=[""]),
        pb.EmbedRequest(inputs=["london"]),
    ]
    async with serving(toy_bundle, fake_runtime) as h:
        call = h.stub.EmbedStream(iter(requests))
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for response in call:
                got.append(response)
    assert [r.request_index for r in got] == [0]
    assert err.value.code() == INVALID


async def test_stream_is_pipelined(toy_bundle: Path, toy_table: np.ndarray) -> None:
    """Requests 2 and 3 reach the batcher while request 1 is still computing."""
    runtime = FakeRuntime(toy_table)
    async with serving(toy_bundle, runtime, max_batch_wait_ms=0, max_batch_size=1) as h:
        runtime.gate = threading.Event()
        runtime.started.clear()
        call = h.stub.EmbedStream()
        await call.write(pb.EmbedRequest(inputs=["paris"], request_id="1"))
        await asyncio.to_thread(runtime.started.wait, 5)
        await call.write(pb.EmbedRequest(inputs=["london"], request_id="2"))
        await call.write(pb.EmbedRequest(inputs=["tokyo"], request_id="3"))
        batcher = h.core.batcher
        # "london" is formed into the worker's queue, "tokyo" waits in the batcher's: both admitted
        # while request 1 is still computing.
        await wait_for(lambda: batcher.queue_depth == 1 and batcher.queued_tokens == 3)
        runtime.gate.set()
        await call.done_writing()
        answers = [r.request_id async for r in call]
    assert answers == ["1", "2", "3"]


async def test_graceful_shutdown_finishes_accepted_work(toy_bundle: Path, toy_table: np.ndarray) -> None:
    runtime = FakeRuntime(toy_table, delay_s=0.3)
    async with serving(toy_bundle, runtime) as h:
        runtime.started.clear()
        accepted = asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(inputs=["paris"])))
        await asyncio.to_thread(runtime.started.wait, 5)
        stopping = asyncio.ensure_future(shutdown(h.server, h.core, grace_period_s=5))
        await asyncio.sleep(0.05)
        r = await h.health.Check(health_pb2.HealthCheckRequest(service=""))
        assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
        code, details, _ = await code_of(h.stub.Embed(pb.EmbedRequest(inputs=["london"])))
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        assert len((await accepted).embeddings) == 1  # accepted work finished
        await stopping
        assert h.core.state == "stopped"
