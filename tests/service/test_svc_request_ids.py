"""One request id per gRPC call, chosen at the edge (issue 15 item 4).

The servicer generated one id and the access log a different, freshly generated one when the client
sent none, so the id in a client's error was not the one in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
from svc_harness import serving
from svc_toy import FakeRuntime

from service.logs import ACCESS_LOGGER
from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio


def access_ids(caplog: pytest.LogCaptureFixture, method: str) -> list[str]:
    return [
        r.__dict__["request_id"]
        for r in caplog.records
        if r.name == ACCESS_LOGGER and r.__dict__["method"] == method
    ]


def trailer(metadata: object) -> str:
    values = [v for k, v in (metadata or ()) if k == "x-request-id"]  # type: ignore[attr-defined]
    assert len(values) == 1, metadata
    return str(values[0])


async def test_error_and_access_log_carry_the_same_generated_id(
    toy_bundle: Path, fake_runtime: FakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(toy_bundle, fake_runtime, edge=True) as h:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Embed(pb.EmbedRequest(inputs=[""]))  # invalid, no request_id sent
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        failed = trailer(err.value.trailing_metadata())
        call = h.stub.Embed(pb.EmbedRequest(inputs=["paris"]))
        reply = await call
        ok = trailer(await call.trailing_metadata())
    assert reply.request_id == ok
    assert access_ids(caplog, "Embed") == [failed, ok]
    assert failed != ok


async def test_client_ids_from_the_message_or_metadata_are_kept(
    toy_bundle: Path, fake_runtime: FakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving(toy_bundle, fake_runtime, edge=True) as h:
        call = h.stub.Embed(pb.EmbedRequest(inputs=["paris"], request_id="from-message"))
        assert (await call).request_id == "from-message"
        assert trailer(await call.trailing_metadata()) == "from-message"
        call = h.stub.Embed(pb.EmbedRequest(inputs=["paris"]), metadata=(("x-request-id", "from-meta"),))
        assert (await call).request_id == "from-meta"
        bad = h.stub.Embed(pb.EmbedRequest(inputs=["paris"]), metadata=(("x-request-id", "not safe!"),))
        generated = (await bad).request_id
        assert generated != "not safe!" and trailer(await bad.trailing_metadata()) == generated
        tokenize = h.stub.Tokenize(pb.TokenizeRequest(inputs=["paris"]))
        assert (await tokenize).request_id == trailer(await tokenize.trailing_metadata())
    assert access_ids(caplog, "Embed") == ["from-message", "from-meta", generated]


async def test_internal_error_names_the_logged_id(
    toy_bundle: Path, toy_table: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    runtime = FakeRuntime(toy_table)
    async with serving(toy_bundle, runtime, edge=True) as h:
        runtime.fail = lambda ids: True
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Embed(pb.EmbedRequest(inputs=["paris"]))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    rid = trailer(err.value.trailing_metadata())
    assert f"request_id={rid}" in (err.value.details() or "")
    assert access_ids(caplog, "Embed") == [rid]
    assert any(rid in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


async def test_stream_id_in_trailer_log_and_messages(
    toy_bundle: Path, fake_runtime: FakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    requests = [pb.EmbedRequest(inputs=["paris"]), pb.EmbedRequest(inputs=["rome"], request_id="mine")]
    async with serving(toy_bundle, fake_runtime, edge=True) as h:
        call = h.stub.EmbedStream(iter(requests))
        answers = [r.request_id async for r in call]
        stream_id = trailer(await call.trailing_metadata())
        failing = h.stub.EmbedStream(iter([pb.EmbedRequest(inputs=["paris"]), pb.EmbedRequest(inputs=[""])]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in failing:
                pass
        failed_id = trailer(err.value.trailing_metadata())
    assert answers == [f"{stream_id}.0", "mine"]
    assert access_ids(caplog, "EmbedStream") == [stream_id, failed_id]
