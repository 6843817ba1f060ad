"""Faults in-process: a runtime failing mid-batch, deadlines, a client leaving mid-stream, ORT init.

Every test counts what the runtime computed (``CountingRuntime.batches``) instead of trusting
timings: "never computed" means the runtime never saw the request's token ids.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2
from rel_harness import grpc_channel, live_server, settings_for, stubs
from rel_toy import CountingRuntime, word_id

from service.core import EmbeddingCore
from service.errors import StartupError
from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio
HANG_GUARD_S = 30.0  # generous: only here so that a hang fails instead of stalling CI


def tag(i: int) -> str:
    """A text whose only content token is unique to request ``i`` (w0 … w499)."""
    return f"w{i}"


def requests_seen(runtime: CountingRuntime) -> set[int]:
    """Which tagged requests reached the runtime (failed calls included)."""
    seen = set()
    for row in runtime.rows():
        seen.update(t - word_id("w0") for t in row[1:-1] if word_id("w0") <= t <= word_id("w499"))
    return seen


async def wait_for(predicate, what: str, timeout_s: float = HANG_GUARD_S) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_runtime_failure_fails_only_its_batch(rel_toy_bundle: Path) -> None:
    poison = word_id("w13")
    runtime = CountingRuntime(delay_s=0.01, fail=lambda rows: any(poison in r for r in rows))
    async with live_server(rel_toy_bundle, runtime, max_batch_size=4, max_batch_wait_ms=5) as live:
        runtime.reset()
        async with grpc_channel(live.grpc_target) as channel:
            stub, health = stubs(channel)

            async def one(i: int) -> grpc.StatusCode:
                try:
                    await stub.Embed(
                        pb.EmbedRequest(inputs=[tag(i)], request_id=f"r{i}"), timeout=HANG_GUARD_S
                    )
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    assert "secret-internal-detail" not in (exc.details() or "")
                    return exc.code()

            codes = await asyncio.gather(*(one(i) for i in range(40)))
            # The batches the runtime actually ran decide the expected outcome of every request.
            failed_requests: set[int] = set()
            for rows, failed in runtime.batches:
                if failed:
                    failed_requests.update(row[1] - word_id("w0") for row in rows)
            assert 13 in failed_requests
            assert len(failed_requests) >= 1
            for i, code in enumerate(codes):
                expected = grpc.StatusCode.INTERNAL if i in failed_requests else grpc.StatusCode.OK
                assert code == expected, (i, code, failed_requests)
            # The server keeps serving: the next requests succeed and health stays SERVING.
            after = await asyncio.gather(*(one(i) for i in range(100, 110)))
            assert set(after) == {grpc.StatusCode.OK}
            status = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_expired_while_queued_is_never_computed(rel_toy_bundle: Path) -> None:
    runtime = CountingRuntime()
    async with live_server(rel_toy_bundle, runtime, max_batch_size=2, max_batch_wait_ms=0) as live:
        runtime.hold()
        async with grpc_channel(live.grpc_target) as channel:
            stub, _ = stubs(channel)
            blocker = asyncio.ensure_future(
                stub.Embed(pb.EmbedRequest(inputs=[tag(0)]), timeout=HANG_GUARD_S)
            )
            await wait_for(runtime.entered.is_set, "the runtime to start the first batch")
            late = [
                asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=[tag(i)]), timeout=0.3))
                for i in range(1, 21)
            ]
            done = await asyncio.gather(*late, return_exceptions=True)
            # All twenty ran out of time while the runtime was busy with the first batch.
            assert all(
                isinstance(d, grpc.aio.AioRpcError) and d.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                for d in done
            ), done
            await asyncio.sleep(0.05)  # their deadline has passed on the server side too
            runtime.gate.set()
            first = await blocker
            assert len(first.embeddings) == 1
            ok = await stub.Embed(pb.EmbedRequest(inputs=[tag(99)]), timeout=HANG_GUARD_S)
            assert len(ok.embeddings) == 1
    # Proof by counting: the runtime saw requests 0 and 99 only, never the expired ones.
    assert requests_seen(runtime) == {0, 99}
    assert runtime.calls == 2


async def test_stream_cancel_drops_queued_work(rel_toy_bundle: Path) -> None:
    runtime = CountingRuntime()
    async with live_server(rel_toy_bundle, runtime, max_batch_size=2, max_batch_wait_ms=0) as live:
        runtime.hold()
        async with grpc_channel(live.grpc_target) as channel:
            stub, _ = stubs(channel)
            blocker = asyncio.ensure_future(
                stub.Embed(pb.EmbedRequest(inputs=[tag(0)]), timeout=HANG_GUARD_S)
            )
            await wait_for(runtime.entered.is_set, "the runtime to start the first batch")
            stream = stub.EmbedStream()
            for i in range(1, 21):
                await stream.write(pb.EmbedRequest(inputs=[tag(i)]))
            # Every stream request is admitted (queued behind the blocked batch) before we leave.
            await wait_for(lambda: live.core._active == 21, "the stream's requests to be queued")
            stream.cancel()
            await wait_for(lambda: live.core._active == 1, "the server to see the cancellation")
            runtime.gate.set()
            assert len((await blocker).embeddings) == 1
            ok = await stub.Embed(pb.EmbedRequest(inputs=[tag(99)]), timeout=HANG_GUARD_S)
            assert len(ok.embeddings) == 1
            await asyncio.wait_for(live.core.batcher.drain(), HANG_GUARD_S)
    assert requests_seen(runtime) == {0, 99}, "cancelled stream requests reached the runtime"


async def test_http_client_disconnect_drops_queued_work(rel_toy_bundle: Path) -> None:
    runtime = CountingRuntime()
    async with live_server(rel_toy_bundle, runtime, max_batch_size=2, max_batch_wait_ms=0) as live:
        runtime.hold()
        async with grpc_channel(live.grpc_target) as channel:
            stub, _ = stubs(channel)
            blocker = asyncio.ensure_future(
                stub.Embed(pb.EmbedRequest(inputs=[tag(0)]), timeout=HANG_GUARD_S)
            )
            await wait_for(runtime.entered.is_set, "the runtime to start the first batch")
            async with aiohttp.ClientSession() as http:
                posts = [
                    asyncio.ensure_future(http.post(f"{live.http_url}/v1/embeddings", json={"input": tag(i)}))
                    for i in range(1, 11)
                ]
                await wait_for(lambda: live.core._active == 11, "the HTTP requests to be queued")
                for post in posts:
                    post.cancel()
                await asyncio.gather(*posts, return_exceptions=True)
            # Closing the session closed the connections; aiohttp cancels the handlers.
            await wait_for(lambda: live.core._active == 1, "the server to see the disconnects")
            runtime.gate.set()
            assert len((await blocker).embeddings) == 1
    assert requests_seen(runtime) == {0}, "work of disconnected HTTP clients reached the runtime"


async def test_runtime_factory_failure_is_a_startup_error(rel_toy_bundle: Path) -> None:
    def broken(*_: object) -> CountingRuntime:
        raise RuntimeError("onnxruntime: Failed to create session (injected)")

    core = EmbeddingCore(settings_for(rel_toy_bundle), runtime_factory=broken)
    with pytest.raises(StartupError, match="injected"):
        await core.start()
    assert core.state == "failed"
    await core.close()
