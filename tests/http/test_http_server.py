"""The running server (tiny gte-Qwen2, keys on): the real ``openai`` client, raw HTTP for every
error code, gRPC and HTTP auth, metrics scraped and parsed, and what the logs contain.

One gRPC + HTTP stack serves the whole module (loading even the tiny model costs ~1 s); the
warming-up / draining / ``dimensions``-allowed states get a second, short-lived stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import openai
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from http_stack import KEY, OLD_KEY, Stack, stack_settings, start_stack
from prometheus_client.parser import text_string_to_metric_families

from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny-gte-qwen2"
TEXTS = ["the quick brown fox", "jumps over the lazy dog", "a", "embeddings are vectors of floats"]
GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)
HTTP_AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_INPUTS = 16
MAX_TOKENS = 64


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_qwen2_bundle: Path, keys_file: Path) -> AsyncIterator[Stack]:
    settings = stack_settings(
        tiny_qwen2_bundle,
        keys_file,
        max_inputs_per_request=MAX_INPUTS,
        max_input_tokens=MAX_TOKENS,
        max_message_bytes=64 * 1024,  # HTTP body limit: 4 × this
        max_queue_tokens=512,
        max_batch_tokens=1024,
        max_batch_size=8,
        http_allow_token_ids=True,  # off by default (test_http_edges); on here to compare with gRPC
    )
    s = await start_stack(settings)
    yield s
    await s.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def client(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=stack.url) as session:
        yield session


async def grpc_vectors(stack: Stack, **fields: object) -> np.ndarray:
    async with stack.channel() as channel:
        response = await stack.stub(channel).Embed(
            pb.EmbedRequest(encoding=pb.ENCODING_VALUES, **fields), metadata=GRPC_AUTH
        )
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def vectors(response: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


# --- the real openai client ------------------------------------------------------------------


async def test_openai_client_float_and_base64_equal_grpc(stack: Stack, client: openai.AsyncOpenAI) -> None:
    as_float = await client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    as_base64 = await client.embeddings.create(model=MODEL, input=TEXTS)  # the client's default: base64
    expected = await grpc_vectors(stack, inputs=TEXTS)
    assert expected.shape == (len(TEXTS), 64)
    np.testing.assert_array_equal(vectors(as_float), expected)
    np.testing.assert_array_equal(vectors(as_base64), expected)
    assert as_float.model == MODEL and as_float.object == "list"
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens > len(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, rtol=1e-5)


async def test_single_string_and_query_instruction_match_grpc(
    stack: Stack, client: openai.AsyncOpenAI
) -> None:
    one = await client.embeddings.create(model=MODEL, input="the quick brown fox")
    np.testing.assert_array_equal(vectors(one), await grpc_vectors(stack, inputs=[TEXTS[0]]))
    query = await client.embeddings.create(
        model=MODEL, input=["what is a fox?"], extra_body={"input_type": "query", "task": "web_search"}
    )
    grpc_query = await grpc_vectors(
        stack, inputs=["what is a fox?"], input_type=pb.INPUT_TYPE_QUERY, task="web_search"
    )
    document = await grpc_vectors(stack, inputs=["what is a fox?"])
    np.testing.assert_array_equal(vectors(query), grpc_query)
    assert not np.array_equal(grpc_query, document)  # the instruction was applied
    free = await client.embeddings.create(
        model=MODEL,
        input=["what is a fox?"],
        extra_body={"input_type": "query", "instruction": "Find animals"},
    )
    assert not np.array_equal(vectors(free), grpc_query)


async def test_token_id_input_matches_grpc(stack: Stack, client: openai.AsyncOpenAI) -> None:
    ids = [[785, 3974, 13876, 38835], [64, 65]]
    many = await client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    one = await client.embeddings.create(model=MODEL, input=ids[0])
    expected = await grpc_vectors(stack, token_inputs=[pb.TokenIds(ids=x) for x in ids])
    np.testing.assert_array_equal(vectors(many), expected)
    np.testing.assert_array_equal(vectors(one), expected[:1])
    # Token-id input is the content ids: the model's suffix (EOS) is still added, as for text.
    assert many.usage.prompt_tokens == sum(len(x) + 1 for x in ids)


async def test_dimensions_refused_when_not_enabled(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model=MODEL, input=["a"], dimensions=16)
    assert info.value.status_code == 400
    assert info.value.body["code"] == "dimensions_not_allowed" and info.value.body["param"] == "dimensions"


async def test_models_endpoint(client: openai.AsyncOpenAI) -> None:
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [MODEL]
    assert (await client.models.retrieve(MODEL)).id == MODEL


# --- raw HTTP: every error code ------------------------------------------------------------------


async def _post(
    http: aiohttp.ClientSession, body: object, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post("/v1/embeddings", data=data, headers=HTTP_AUTH if headers is None else headers) as r:
        payload = await r.json()
        assert r.headers["X-Request-ID"]
        if r.status >= 400:
            assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
        return r.status, payload


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_input", None),
        ({"model": MODEL}, 400, "invalid_input", "input"),
        ({"input": []}, 400, "invalid_input", "input"),
        ({"input": ["ok", ""]}, 400, "invalid_input", "input[1]"),
        ({"input": [[1, 2], []]}, 400, "invalid_input", "input[1]"),
        ({"input": [[10**9]]}, 400, "invalid_input", "input[0]"),
        ({"input": "a", "encoding_format": "int8"}, 400, "invalid_input", "encoding_format"),
        ({"input": "a", "instructions": "typo"}, 400, "invalid_input", "instructions"),
        ({"input": "a", "input_type": "query", "task": "nope"}, 400, "unknown_task", "task"),
        ({"input": "a", "dimensions": 8}, 400, "dimensions_not_allowed", "dimensions"),
        ({"input": "a", "model": "text-embedding-3-small"}, 404, "model_not_found", "model"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, 413, "too_many_inputs", "input"),
        ({"input": "word " * (4 * MAX_TOKENS), "truncation": "none"}, 413, "input_too_long", "input[0]"),
        ({"input": "x" * (256 * 1024 + 1)}, 413, "request_too_large", None),
    ],
)
async def test_error_codes(
    http: aiohttp.ClientSession, body: object, status: int, code: str, param: str | None
) -> None:
    got, payload = await _post(http, body)
    assert (got, payload["error"]["code"], payload["error"]["param"]) == (status, code, param), payload


async def test_input_too_long_names_the_http_truncation_values(http: aiohttp.ClientSession) -> None:
    status, payload = await _post(http, {"input": "word " * (4 * MAX_TOKENS), "truncation": "none"})
    message = payload["error"]["message"]
    assert status == 413 and '"truncation": "end" or "start"' in message, message
    assert "END" not in message and "START" not in message


async def test_request_timeout_header_becomes_the_deadline(http: aiohttp.ClientSession) -> None:
    """An expired deadline is a 504 and nothing is computed; a bad header value is a 400."""
    expired = {**HTTP_AUTH, "X-Request-Timeout": "0.000001"}
    status, payload = await _post(http, {"input": ["a", "b"]}, expired)
    assert (status, payload["error"]["code"], payload["error"]["type"]) == (
        504,
        "deadline_exceeded",
        "timeout",
    )
    status, _ = await _post(http, {"input": ["a"]}, {**HTTP_AUTH, "X-Request-Timeout": "30"})
    assert status == 200
    for bad in ("0", "-1", "soon", "nan", "inf", "1e9"):
        status, payload = await _post(http, {"input": ["a"]}, {**HTTP_AUTH, "X-Request-Timeout": bad})
        assert (status, payload["error"]["code"]) == (400, "invalid_input"), bad


async def test_truncation_end_and_start_accept_long_inputs(http: aiohttp.ClientSession) -> None:
    long = "word " * (4 * MAX_TOKENS)
    for mode in ("end", "start"):
        status, payload = await _post(http, {"input": [long], "truncation": mode})
        assert status == 200 and payload["usage"]["prompt_tokens"] == MAX_TOKENS


async def test_overload_gives_429_with_retry_after(http: aiohttp.ClientSession) -> None:
    body = {"input": ["lorem ipsum dolor sit amet " * 10] * 4, "truncation": "end"}  # 4 × 64 tokens

    async def one() -> tuple[int, str | None, dict]:
        async with http.post("/v1/embeddings", json=body, headers=HTTP_AUTH) as r:
            return r.status, r.headers.get("Retry-After"), await r.json()

    seen: list[tuple[int, str | None, dict]] = []
    for _ in range(5):  # queue limit 512 tokens: a burst of 48 × 256 tokens must overflow it
        seen += await asyncio.gather(*(one() for _ in range(48)))
        if any(s == 429 for s, _, _ in seen):
            break
    refused = [(h, p) for s, h, p in seen if s == 429]
    assert refused, "no request was refused"
    assert {s for s, _, _ in seen} <= {200, 429}
    assert all(h == "1" and p["error"]["code"] == "overloaded" for h, p in refused)


# --- API keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer sk-wrong"}, 401),
        ({"Authorization": KEY}, 401),
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"Authorization": f"Bearer {KEY}"}, 200),
        ({"Authorization": f"bearer {OLD_KEY}"}, 200),
    ],
)
async def test_http_keys(http: aiohttp.ClientSession, headers: dict[str, str], status: int) -> None:
    got, payload = await _post(http, {"input": "a"}, headers)
    assert got == status
    if status == 401:
        assert payload["error"]["code"] == "invalid_api_key" and KEY not in json.dumps(payload)
    async with http.get("/v1/models", headers=headers) as r:
        assert r.status == status


async def test_health_and_metrics_need_no_key(http: aiohttp.ClientSession) -> None:
    async with http.get("/health") as r:
        assert (r.status, await r.json()) == (200, {"status": "SERVING"})
    async with http.get("/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("metadata", "ok"),
    [
        ((), False),
        ((("authorization", "Bearer nope"),), False),
        ((("authorization", KEY),), False),
        (GRPC_AUTH, True),
        ((("authorization", f"Bearer {OLD_KEY}"),), True),
    ],
)
async def test_grpc_keys(stack: Stack, metadata: tuple[tuple[str, str], ...], ok: bool) -> None:
    async with stack.channel() as channel:
        stub = stack.stub(channel)
        calls = [
            stub.Embed(pb.EmbedRequest(inputs=["a"]), metadata=metadata),
            stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata),
            stub.Tokenize(pb.TokenizeRequest(inputs=["a"]), metadata=metadata),
        ]
        for call in calls:
            if ok:
                await call
            else:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert KEY not in (info.value.details() or "")

        async def stream_outcome() -> tuple[grpc.StatusCode, list[int]]:
            stream = stub.EmbedStream(metadata=metadata)
            counts: list[int] = []
            # The server may refuse before it reads anything, so the client's own write can fail
            # first (a local error); the call's status is what the server said.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stream.write(pb.EmbedRequest(inputs=["a"]))
                await stream.done_writing()
                counts = [r.count async for r in stream]
            return await stream.code(), counts

        code, counts = await stream_outcome()
        if ok:
            assert (code, counts) == (grpc.StatusCode.OK, [1])
        else:
            assert code == grpc.StatusCode.UNAUTHENTICATED and counts == []


async def test_grpc_health_and_reflection_stay_open(stack: Stack) -> None:
    async with stack.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "embedding.v1.EmbeddingService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in replies for s in r.list_services_response.service]
        assert "embedding.v1.EmbeddingService" in names


# --- metrics and logs ----------------------------------------------------------------------------


async def _scrape(http: aiohttp.ClientSession) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get("/metrics") as r:
        text = await r.text()
    assert KEY not in text and OLD_KEY not in text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_requests(stack: Stack, http: aiohttp.ClientSession) -> None:
    before = await _scrape(http)
    for _ in range(3):
        assert (await _post(http, {"input": ["a", "bb"]}))[0] == 200
    assert (await _post(http, {"input": "a"}, {}))[0] == 401
    await grpc_vectors(stack, inputs=["x"])
    async with stack.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await stack.stub(channel).Embed(pb.EmbedRequest(inputs=["a"]))
    # The server records a refused call after the client already has its status: poll briefly.
    for _ in range(50):
        after = await _scrape(http)
        key = {"api": "grpc", "method": "Embed", "code": "UNAUTHENTICATED"}
        if _get(after, "embed_requests_total", **key) > _get(before, "embed_requests_total", **key):
            break
        await asyncio.sleep(0.05)

    def moved(name: str, **labels: str) -> float:
        return _get(after, name, **labels) - _get(before, name, **labels)

    assert moved("embed_requests_total", api="http", method="embeddings", code="200") == 3
    assert moved("embed_requests_total", api="http", method="embeddings", code="401") == 1
    assert moved("embed_requests_total", api="grpc", method="Embed", code="OK") == 1
    assert moved("embed_requests_total", api="grpc", method="Embed", code="UNAUTHENTICATED") == 1
    assert moved("embed_request_duration_seconds_count", api="http", method="embeddings") == 4
    assert (
        moved("embed_input_tokens_total", api="http") > 0
        and moved("embed_input_tokens_total", api="grpc") > 0
    )
    for stage in ("queue", "tokenize", "inference"):
        assert moved(f"embed_{stage}_duration_seconds_count") == 4
    assert moved("embed_batch_size_count") >= 4 and moved("embed_batch_size_sum") >= 7
    assert moved("embed_batch_tokens_count") >= 4 and moved("embed_padded_token_ratio_count") >= 4
    assert _get(after, "embed_self_test_status") == 1
    assert _get(after, "embed_execution_provider", provider="CPUExecutionProvider") == 1
    assert _get(after, "embed_ready") == 1
    assert ("embed_queue_depth", ()) in after and ("embed_inputs_truncated_total", ()) in after


async def test_truncated_inputs_are_counted(http: aiohttp.ClientSession) -> None:
    before = _get(await _scrape(http), "embed_inputs_truncated_total")
    assert (await _post(http, {"input": ["word " * 200, "short"], "truncation": "end"}))[0] == 200
    assert _get(await _scrape(http), "embed_inputs_truncated_total") - before == 1


async def test_access_logs_have_fields_and_never_a_key(
    stack: Stack, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with http.post(
        "/v1/embeddings", json={"input": ["a", "b"]}, headers={**HTTP_AUTH, "X-Request-ID": "req-42"}
    ):
        pass
    await _post(http, {"input": "a"}, {"Authorization": f"Bearer {KEY}x"})  # wrong key: contains the real one
    await _post(http, {"input": "a"}, {"Authorization": f"Bearer {OLD_KEY}"})
    await grpc_vectors(stack, inputs=["x", "y", "z"], request_id="grpc-7")
    async with stack.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await stack.stub(channel).Embed(
                pb.EmbedRequest(inputs=["a"]), metadata=(("authorization", f"Bearer {KEY}!"),)
            )
    # gRPC writes its access line as the call ends, which may be just after the client has its
    # reply: wait for the lines (under load that gap is visible) instead of racing them.
    access: dict[str, logging.LogRecord] = {}
    for _ in range(300):
        access = {r.request_id: r for r in caplog.records if r.name == "service.access"}  # type: ignore[attr-defined]
        statuses = {r.status for r in access.values()}  # type: ignore[attr-defined]
        if {"req-42", "grpc-7"} <= set(access) and {"401", "UNAUTHENTICATED"} <= statuses:
            break
        await asyncio.sleep(0.1)
    http_line, grpc_line = access["req-42"], access["grpc-7"]
    assert (http_line.api, http_line.method, http_line.status, http_line.inputs) == (
        "http",
        "embeddings",
        "200",
        2,
    )  # type: ignore[attr-defined]
    assert (grpc_line.api, grpc_line.method, grpc_line.status, grpc_line.inputs) == ("grpc", "Embed", "OK", 3)  # type: ignore[attr-defined]
    assert http_line.tokens > 0 and grpc_line.latency_ms > 0  # type: ignore[attr-defined]
    assert {r.status for r in access.values()} >= {"401", "UNAUTHENTICATED"}  # type: ignore[attr-defined]
    everything = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert KEY not in everything and OLD_KEY not in everything


# --- warming up, draining, dimensions allowed (own stack) ---------------------------------------


async def test_warming_up_then_serving_then_draining(tiny_qwen2_bundle: Path, keys_file: Path) -> None:
    s = await start_stack(stack_settings(tiny_qwen2_bundle, keys_file, allow_dimensions=True), warm=False)
    try:
        async with aiohttp.ClientSession(base_url=s.url) as http, s.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def states() -> tuple[int, int, int]:
                async with http.get("/health") as r:
                    h = r.status
                status, _ = await _post(http, {"input": "a"})
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
                return h, status, reply.status

            h, e, g = await states()
            assert (h, e, g) == (503, 503, health_pb2.HealthCheckResponse.NOT_SERVING)
            async with http.post("/v1/embeddings", json={"input": "a"}, headers=HTTP_AUTH) as r:
                assert r.headers["Retry-After"] == "5" and (await r.json())["error"]["code"] == "not_ready"

            await s.core.start()
            await asyncio.sleep(0.05)  # the health bridge updates in a task
            assert await states() == (200, 200, health_pb2.HealthCheckResponse.SERVING)

            # dimensions allowed here: truncated then renormalised, the same over HTTP and gRPC
            async with openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key=OLD_KEY, max_retries=0) as client:
                got = vectors(await client.embeddings.create(model=MODEL, input=TEXTS[:2], dimensions=16))
            expected = await grpc_vectors(s, inputs=TEXTS[:2], dimensions=16)
            assert got.shape == (2, 16)
            np.testing.assert_array_equal(got, expected)
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)

            await s.core.drain()
            await asyncio.sleep(0.05)
            h, e, g = await states()
            assert (h, e, g) == (503, 503, health_pb2.HealthCheckResponse.NOT_SERVING)
            async with http.post("/v1/embeddings", json={"input": "a"}, headers=HTTP_AUTH) as r:
                assert (await r.json())["error"]["code"] == "draining"
    finally:
        await s.stop()
