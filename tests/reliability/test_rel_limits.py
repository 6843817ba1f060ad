"""Limits are enforced: message size, inputs per request, tokens per input, tokens and inputs per
batch. The values are the settings documented in the README table and docs/reliability.md."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import grpc
import pytest
from rel_harness import grpc_channel, live_server, stubs
from rel_toy import CountingRuntime

from service.http import BODY_LIMIT_FACTOR
from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio
MSG = 64 * 1024  # the smallest max_message_bytes the settings allow


async def grpc_code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await call
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def test_limits_grpc_and_http(rel_toy_bundle: Path) -> None:
    runtime = CountingRuntime()
    async with live_server(
        rel_toy_bundle,
        runtime,
        max_message_bytes=MSG,
        max_inputs_per_request=8,
        max_input_tokens=16,
        http_allow_token_ids=True,  # token-id limits on HTTP too (ids are opt-in there)
    ) as live:
        runtime.reset()
        async with grpc_channel(live.grpc_target) as channel, aiohttp.ClientSession() as http:
            stub, _ = stubs(channel)
            url = f"{live.http_url}/v1/embeddings"

            async def post(body: object) -> int:
                async with http.post(url, data=json.dumps(body)) as response:
                    return response.status

            at_limit, past = " ".join(["w1"] * 14), " ".join(["w1"] * 15)  # 14 + [CLS] + [SEP] = 16 tokens
            none = pb.TRUNCATION_NONE
            # tokens per input: exactly the limit passes, one more is refused (or truncated on request)
            assert (
                await grpc_code(stub.Embed(pb.EmbedRequest(inputs=[at_limit], truncation=none)))
                == grpc.StatusCode.OK
            )
            assert (
                await grpc_code(stub.Embed(pb.EmbedRequest(inputs=[past], truncation=none)))
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            reply = await stub.Embed(pb.EmbedRequest(inputs=[past], truncation=pb.TRUNCATION_END))
            assert reply.embeddings[0].token_count == 16 and reply.embeddings[0].dropped_tokens == 1
            assert await post({"input": at_limit, "truncation": "none"}) == 200
            assert await post({"input": past, "truncation": "none"}) == 413
            assert await post({"input": [[5] * 14]}) == 200 and await post({"input": [[5] * 15]}) == 413
            # inputs per request
            assert await grpc_code(stub.Embed(pb.EmbedRequest(inputs=["w1"] * 8))) == grpc.StatusCode.OK
            assert (
                await grpc_code(stub.Embed(pb.EmbedRequest(inputs=["w1"] * 9)))
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            assert await post({"input": ["w1"] * 8}) == 200 and await post({"input": ["w1"] * 9}) == 413
            # message size: gRPC refuses a request over max_message_bytes before any handler runs
            huge = "w1 " * (MSG // 3 + 100)
            assert (
                await grpc_code(stub.Embed(pb.EmbedRequest(inputs=[huge])))
                == grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            # HTTP bodies are limited to BODY_LIMIT_FACTOR × max_message_bytes (JSON is bulkier)
            assert await post({"input": "w1 " * (BODY_LIMIT_FACTOR * MSG // 3 + 100)}) == 413
            assert (
                await post({"input": "w1 " * (BODY_LIMIT_FACTOR * MSG // 3 - 1000), "truncation": "end"})
                == 200
            )
    calls = len(runtime.batches)
    assert calls == 7  # exactly the accepted requests reached the runtime


async def test_batches_respect_token_and_size_budgets(rel_toy_bundle: Path) -> None:
    runtime = CountingRuntime(delay_s=0.005)
    budget, size = 40, 6
    async with live_server(
        rel_toy_bundle, runtime, max_batch_tokens=budget, max_batch_size=size, max_batch_wait_ms=5
    ) as live:
        runtime.reset()
        async with grpc_channel(live.grpc_target) as channel:
            stub, _ = stubs(channel)
            requests = [
                pb.EmbedRequest(inputs=[" ".join(["w2"] * (1 + (i * 7) % 29))] * (1 + i % 3))
                for i in range(60)
            ]
            replies = await asyncio.gather(*(stub.Embed(r, timeout=30) for r in requests))
    assert [len(r.embeddings) for r in replies] == [len(r.inputs) for r in requests]
    assert len(runtime.batches) > 10
    for rows, _ in runtime.batches:
        padded = len(rows) * max(len(r) for r in rows)
        assert len(rows) <= size
        assert padded <= budget or len(rows) == 1, (len(rows), padded)  # an oversize input runs alone
