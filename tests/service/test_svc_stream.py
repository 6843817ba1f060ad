"""EmbedStream loses no computed answer (issue 12 item 3) and adapts read-ahead to admission (item 8).

Every kind of bad message (undecodable bytes, invalid field values, requests over a limit) is sent
after ten good ones at three moments: before the good ones are computed (the runtime is held),
while they compute, and after their answers arrived. The client must get all ten answers, then the
bad message's status, and the server must log no error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from svc_harness import Harness, serving, wait_for
from svc_toy import FakeRuntime

from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio
GOOD = 10
METHOD = "/embedding.v1.EmbeddingService/EmbedStream"


def good(i: int) -> bytes:
    return pb.EmbedRequest(inputs=[f"paris {i}"], request_id=f"g{i}").SerializeToString()


def message(**fields: object) -> bytes:
    return pb.EmbedRequest(**fields).SerializeToString()  # type: ignore[arg-type]


BAD: dict[str, tuple[bytes, grpc.StatusCode]] = {
    "corrupt wire bytes": (b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT),
    "invalid UTF-8": (good(0).replace(b"paris", b"pa\xffs"), grpc.StatusCode.INVALID_ARGUMENT),
    "empty input": (message(inputs=[""]), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown enum": (message(inputs=["x"], encoding=42), grpc.StatusCode.INVALID_ARGUMENT),
    "unsafe request_id": (message(inputs=["x"], request_id="a b"), grpc.StatusCode.INVALID_ARGUMENT),
    "too many inputs": (message(inputs=["x"] * 5), grpc.StatusCode.INVALID_ARGUMENT),
    "too long": (
        message(inputs=["one " * 40], truncation=pb.TRUNCATION_NONE),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    # over max_message_bytes (64 KiB here): grpc core used to end the call at once, losing answers
    "over the size limit": (message(inputs=["x" * 100_000]), grpc.StatusCode.RESOURCE_EXHAUSTED),
}
LIMITS = {"max_inputs_per_request": 4, "max_message_bytes": 64 * 1024}


def raw_stream(h: Harness) -> grpc.aio.StreamStreamCall:
    call = h.channel.stream_stream(METHOD, response_deserializer=pb.EmbedResponse.FromString)
    return call()  # type: ignore[no-any-return]


async def collect(call: grpc.aio.StreamStreamCall, into: list[pb.EmbedResponse]) -> grpc.StatusCode:
    try:
        async for response in call:
            into.append(response)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("timing", ["before", "during", "after"])
@pytest.mark.parametrize("kind", list(BAD))
async def test_bad_message_ends_stream_after_every_earlier_answer(
    toy_bundle: Path, toy_table: np.ndarray, caplog: pytest.LogCaptureFixture, kind: str, timing: str
) -> None:
    caplog.set_level(logging.INFO)
    bad, status = BAD[kind]
    runtime = FakeRuntime(toy_table)
    async with serving(toy_bundle, runtime, edge=True, max_batch_wait_ms=0, max_batch_size=4, **LIMITS) as h:
        runtime.gate = threading.Event() if timing != "after" else None
        runtime.started.clear()
        call = raw_stream(h)
        got: list[pb.EmbedResponse] = []
        reading = asyncio.ensure_future(collect(call, got))
        for i in range(GOOD):
            await call.write(good(i))
        if timing == "during":  # the runtime holds the first batch; the rest wait in the queue
            await asyncio.to_thread(runtime.started.wait, 10)
        elif timing == "after":  # every answer already arrived
            await wait_for(lambda: len(got) == GOOD)
        await call.write(bad)
        if runtime.gate is not None:  # "before": nothing computed yet when the bad message is sent
            await asyncio.sleep(0.2)
            runtime.gate.set()
        await call.done_writing()
        code = await asyncio.wait_for(reading, 30)
    assert code == status, (kind, timing, code)
    assert [r.request_id for r in got] == [f"g{i}" for i in range(GOOD)], (kind, timing)
    assert [r.request_index for r in got] == list(range(GOOD))
    no_errors_logged(caplog)


async def test_bad_message_first_gets_its_status_and_no_answer(
    toy_bundle: Path, fake_runtime: FakeRuntime
) -> None:
    async with serving(toy_bundle, fake_runtime, edge=True, **LIMITS) as h:
        for bad, status in BAD.values():
            call = raw_stream(h)
            got: list[pb.EmbedResponse] = []
            await call.write(bad)
            await call.write(good(1))
            await call.done_writing()
            assert await collect(call, got) == status and got == []


async def test_paused_bad_message_logs_no_error(
    toy_bundle: Path, fake_runtime: FakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    """The reported case: answers, a pause, then invalid UTF-8 logged 'Abort already called!'."""
    caplog.set_level(logging.INFO)
    async with serving(toy_bundle, fake_runtime, edge=True) as h:
        call = raw_stream(h)
        got: list[pb.EmbedResponse] = []
        reading = asyncio.ensure_future(collect(call, got))
        for i in range(GOOD):
            await call.write(good(i))
        await wait_for(lambda: len(got) == GOOD)
        await asyncio.sleep(0.3)
        await call.write(BAD["invalid UTF-8"][0])
        code = await asyncio.wait_for(reading, 30)  # no done_writing: the server ends the stream
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(got) == GOOD
    no_errors_logged(caplog)


@pytest.mark.parametrize("delay_s", [0.0, 0.02])
async def test_lone_stream_on_idle_server_completes_under_a_small_queue(
    toy_bundle: Path, toy_table: np.ndarray, delay_s: float
) -> None:
    """Issue 12 item 8: the stream's own read-ahead filled the queue (2 answers, then RESOURCE_EXHAUSTED).

    Each request is 4 inputs of 6 tokens (24 tokens); the queue holds 64, so at most two requests fit
    at once while the stream reads ahead up to 32. Read-ahead must wait for admission, not fail.
    """
    runtime = FakeRuntime(toy_table, delay_s=delay_s)
    requests = [pb.EmbedRequest(inputs=[f"w{i} a b c"] * 4, request_id=f"r{i}") for i in range(40)]
    async with serving(toy_bundle, runtime, edge=True, max_queue_tokens=64, max_batch_size=4) as h:
        answers = [r async for r in h.stub.EmbedStream(iter(requests))]
        assert [r.request_id for r in answers] == [f"r{i}" for i in range(40)]
        assert all(len(r.embeddings) == 4 for r in answers)
        assert h.core.batcher.queued_tokens == 0
