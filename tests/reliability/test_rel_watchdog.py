"""Health reflects a live runtime (issue 12 item 14): a wedged runtime turns health NOT_SERVING.

A runtime call that never returns (``CountingRuntime.hold``: every call waits on a gate), and a
runtime worker that stopped taking work (its only thread blocked outside the runtime), must turn
gRPC health (``""`` and the service) and HTTP ``/health`` NOT_SERVING, refuse new work with
UNAVAILABLE, say why in the log and in ``embed_runtime_stalled`` / ``embed_runtime_stalls_total``,
and return to SERVING when the runtime makes progress again. Nothing here depends on speed: the
stall floor is 2 s and every wait polls with a generous timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2
from rel_harness import NOT_SERVING, SERVING, Live, grpc_channel, live_server, stubs
from rel_toy import CountingRuntime

from service.pb.embedding.v1 import embedding_pb2 as pb
from service.server import SERVICE_NAME
from service.watchdog import Progress, diagnose

GUARD_S = 30.0
STALL_S = 2.0  # well above a toy call even on a loaded 2-core runner


async def poll(predicate: Callable[[], object], what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + GUARD_S
    while not await predicate():  # type: ignore[misc]
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def health_is(health, status: int) -> bool:  # type: ignore[no-untyped-def]
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        if reply.status != status:
            return False
    return True


async def http_text(live: Live, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(live.http_url + path) as resp:
        return resp.status, await resp.text()


async def assert_stalled(live: Live, stub, kind: str, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    status, body = await http_text(live, "/health")
    assert status == 503 and "NOT_SERVING" in body, body
    _, metrics = await http_text(live, "/metrics")
    assert "embed_runtime_stalled 1.0" in metrics
    counted = re.search(rf'embed_runtime_stalls_total{{kind="{kind}"}} ([0-9.]+)', metrics)
    assert counted is not None and float(counted.group(1)) >= 1, metrics
    assert any(f"health NOT_SERVING (watchdog, {kind})" in r.getMessage() for r in caplog.records)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(pb.EmbedRequest(inputs=["w2"]), timeout=GUARD_S)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()


@pytest.mark.asyncio
async def test_hung_runtime_call_turns_health_not_serving(
    rel_toy_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    runtime = CountingRuntime()
    async with (
        live_server(rel_toy_bundle, runtime, watchdog_stall_s=STALL_S) as live,
        grpc_channel(live.grpc_target) as channel,
    ):
        stub, health = stubs(channel)
        await stub.Embed(pb.EmbedRequest(inputs=["w1"]), timeout=GUARD_S)  # a normal call first
        assert await health_is(health, SERVING)
        runtime.hold()
        call = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=["w1"]), timeout=GUARD_S * 2))
        await poll(lambda: health_is(health, NOT_SERVING), "health NOT_SERVING")
        await assert_stalled(live, stub, "slow_call", caplog)
        assert runtime.gate is not None
        runtime.gate.set()
        assert len((await call).embeddings) == 1
        await poll(lambda: health_is(health, SERVING), "health SERVING again")
        _, metrics = await http_text(live, "/metrics")
        assert "embed_runtime_stalled 0.0" in metrics


@pytest.mark.asyncio
async def test_worker_that_stopped_taking_work_turns_health_not_serving(
    rel_toy_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    async with live_server(rel_toy_bundle, CountingRuntime(), watchdog_stall_s=STALL_S) as live:
        blocker = threading.Event()
        # The batcher's one worker thread is stuck outside any runtime call (a deadlock elsewhere).
        live.core.batcher._executor.submit(blocker.wait, GUARD_S * 2)
        async with grpc_channel(live.grpc_target) as channel:
            stub, health = stubs(channel)
            call = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=["w1"]), timeout=GUARD_S * 2))
            await poll(lambda: health_is(health, NOT_SERVING), "health NOT_SERVING")
            await assert_stalled(live, stub, "no_progress", caplog)
            blocker.set()
            assert len((await call).embeddings) == 1
            await poll(lambda: health_is(health, SERVING), "health SERVING again")


@pytest.mark.asyncio
async def test_dead_scheduler_turns_health_not_serving(
    rel_toy_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    async with live_server(rel_toy_bundle, CountingRuntime(), watchdog_stall_s=STALL_S) as live:
        task = live.core.batcher._task
        assert task is not None
        task.cancel()
        async with grpc_channel(live.grpc_target) as channel:
            stub, health = stubs(channel)
            await poll(lambda: health_is(health, NOT_SERVING), "health NOT_SERVING")
            await assert_stalled(live, stub, "scheduler_died", caplog)


def test_prediction_scales_the_limit() -> None:
    """A call may run ``factor ×`` its prediction; the floor covers calls with no prediction yet."""
    slow = Progress(scheduler_alive=True, running_for=5.0, predicted_s=0.1, stuck_for=0.0)
    assert diagnose(slow, floor_s=1.0, factor=20).kind == "slow_call"  # type: ignore[union-attr]
    assert diagnose(slow, floor_s=1.0, factor=60) is None
    long_predicted = Progress(scheduler_alive=True, running_for=90.0, predicted_s=10.0, stuck_for=0.0)
    assert diagnose(long_predicted, floor_s=60.0, factor=20) is None
    unknown = Progress(scheduler_alive=True, running_for=61.0, predicted_s=None, stuck_for=0.0)
    assert diagnose(unknown, floor_s=60.0, factor=20) is not None
    idle = Progress(scheduler_alive=True, running_for=None, predicted_s=None, stuck_for=0.0)
    assert diagnose(idle, floor_s=0.1, factor=20) is None
