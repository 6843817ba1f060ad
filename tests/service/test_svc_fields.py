"""Free-text fields are capped before any work (issue 12 item 4): refused, never computed, never logged."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from svc_harness import serving
from svc_toy import FakeRuntime

from service.logs import ACCESS_LOGGER
from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio
INVALID = grpc.StatusCode.INVALID_ARGUMENT
HUGE = 4_000_000  # fits the default 4 MiB receive limit with 40 inputs beside it


async def refused(call: object) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    trailing = {k: v for k, v in (err.value.trailing_metadata() or ()) if isinstance(v, str)}
    return err.value.code(), err.value.details() or "", trailing


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS_LOGGER]


async def test_huge_request_id_is_refused_before_any_work(
    toy_bundle: Path, fake_runtime: FakeRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    """The reported case: 40 inputs and a 4 MB request_id used to be computed, then fail to send."""
    caplog.set_level(logging.INFO)
    async with serving(toy_bundle, fake_runtime, edge=True, max_inputs_per_request=64) as h:
        computed = len(fake_runtime.rows_seen)
        request = pb.EmbedRequest(inputs=["paris"] * 40, request_id="x" * HUGE)
        code, details, trailing = await refused(h.stub.Embed(request))
        assert code == INVALID, details
        assert trailing.get("embed-error-field") == "request_id"
        assert "xxxx" not in details and len(details) < 300
        assert len(fake_runtime.rows_seen) == computed  # nothing was computed
    lines = access_lines(caplog)
    assert lines and lines[-1].__dict__["status"] == "INVALID_ARGUMENT"
    assert max(len(r.getMessage()) + len(str(r.__dict__)) for r in caplog.records) < 10_000


@pytest.mark.parametrize(
    "request_id",
    ["x" * 65, "has space", "new\nline", "trailing\n", "ünïcode", 'quote"d', "a/b", "{json}"],
)
async def test_unsafe_request_ids_are_refused_on_every_method(
    toy_bundle: Path, fake_runtime: FakeRuntime, request_id: str
) -> None:
    async with serving(toy_bundle, fake_runtime, edge=True) as h:
        for call in (
            h.stub.Embed(pb.EmbedRequest(inputs=["paris"], request_id=request_id)),
            h.stub.Tokenize(pb.TokenizeRequest(inputs=["paris"], request_id=request_id)),
        ):
            code, details, trailing = await refused(call)
            assert code == INVALID and trailing.get("embed-error-field") == "request_id", details
            assert request_id not in details
        stream = h.stub.EmbedStream(iter([pb.EmbedRequest(inputs=["paris"], request_id=request_id)]))
        code, _, trailing = await refused(stream.read())
        assert code == INVALID and trailing.get("embed-error-field") == "request_id"


async def test_safe_request_ids_are_echoed(toy_bundle: Path, fake_runtime: FakeRuntime) -> None:
    async with serving(toy_bundle, fake_runtime, edge=True) as h:
        for rid in ("a", "x" * 64, "Run-7.batch_3:part-2"):
            assert (await h.stub.Embed(pb.EmbedRequest(inputs=["paris"], request_id=rid))).request_id == rid


async def test_oversized_task_and_instruction_are_refused_before_tokenising(
    toy_bundle: Path, fake_runtime: FakeRuntime
) -> None:
    async with serving(toy_bundle, fake_runtime, edge=True) as h:
        computed = len(fake_runtime.rows_seen)
        cases = [
            (pb.EmbedRequest(inputs=["paris"], task="t" * HUGE), "task"),
            (pb.EmbedRequest(inputs=["paris"], instruction="i" * HUGE), "instruction"),
            (pb.EmbedRequest(inputs=["paris"], task="t" * 129), "task"),
            (pb.EmbedRequest(inputs=["paris"], instruction="i" * 8193), "instruction"),
        ]
        for request, field in cases:
            code, details, trailing = await refused(h.stub.Embed(request))
            assert code == INVALID and trailing.get("embed-error-field") == field, details
            assert len(details) < 300
            tokenize = pb.TokenizeRequest(
                inputs=["paris"], task=request.task, instruction=request.instruction
            )
            code, _, trailing = await refused(h.stub.Tokenize(tokenize))
            assert code == INVALID and trailing.get("embed-error-field") == field
        assert len(fake_runtime.rows_seen) == computed
