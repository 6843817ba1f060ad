"""EmbeddingClient / AsyncEmbeddingClient against a real server on a real port (toy bundle)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from client_support import request_counts, toy_truth, wait_count, words
from rel_harness import Live, ThreadedServer

from embedding_client import AsyncEmbeddingClient, EmbeddingClient, InvalidInput, ModelNotFound, RetryPolicy
from service.pb.embedding.v1 import embedding_pb2 as pb
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc

MIXED = [words(1 + (i * 7) % 30, start=i) for i in range(97)]  # 1..30 tokens, all distinct


def test_embed_returns_float32_rows_in_order(live: Live) -> None:
    with EmbeddingClient(live.grpc_target) as client:
        assert client.health() == "SERVING"
        vectors = client.embed(MIXED)
        info = client.model_info()
    assert vectors.shape == (len(MIXED), info.dimensions) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, toy_truth(MIXED), atol=1e-5)
    vectors[0, 0] = 0.0  # writable: callers may post-process in place


def test_queries_get_the_instruction_and_tokenize_shows_it(live: Live) -> None:
    with EmbeddingClient(live.grpc_target) as client:
        query = client.embed_queries(["w1 w2"], task="search")
        document = client.embed_documents(["w1 w2"])
        [tokens] = client.tokenize(["w1 w2"], input_type="query", task="search", return_tokens=True)
    assert not np.allclose(query, document)
    assert tokens.tokens[-3:] == ["w1", "w2", "[SEP]"] and "instruct" in tokens.tokens
    np.testing.assert_allclose(
        query[0], toy_truth(["instruct : find documents about the query query : w1 w2"])[0], atol=1e-5
    )


def test_long_lists_are_split_under_max_inputs_per_request(client_bundle: Path) -> None:
    texts = MIXED[:50]
    with ThreadedServer(client_bundle, max_inputs_per_request=8) as live:
        # The server really refuses 50 inputs in one request.
        with grpc.insecure_channel(live.grpc_target) as channel, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.EmbeddingServiceStub(channel).Embed(pb.EmbedRequest(inputs=texts))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with EmbeddingClient(live.grpc_target, max_in_flight=3) as client:
            vectors = client.embed(texts)
        assert wait_count(live.http_url, "OK", 7) >= 7  # ceil(50 / 8) requests
    np.testing.assert_allclose(vectors, toy_truth(texts), atol=1e-5)


def test_invalid_input_is_not_retried_and_names_field_and_request_id(live: Live) -> None:
    before = request_counts(live.http_url).get("INVALID_ARGUMENT", 0)
    with EmbeddingClient(live.grpc_target) as client, pytest.raises(InvalidInput) as refused:
        client.embed(["w1", ""])
    err = refused.value
    assert err.status == grpc.StatusCode.INVALID_ARGUMENT and err.field == "inputs[1]"
    assert len(err.request_id) == 32 and err.request_id in str(err)
    assert wait_count(live.http_url, "INVALID_ARGUMENT", before + 1) == before + 1
    with EmbeddingClient(live.grpc_target) as client:  # a later call still succeeds: nothing left over
        client.embed(["w3"])
    assert request_counts(live.http_url).get("INVALID_ARGUMENT", 0) == before + 1


def test_embed_stream_keeps_order_with_mixed_lengths_and_bounded_reads(live: Live) -> None:
    consumed = 0

    def source() -> Iterator[str]:
        nonlocal consumed
        for i in range(2000):
            consumed += 1
            yield MIXED[i % len(MIXED)]

    with EmbeddingClient(live.grpc_target) as client:
        stream = client.embed_stream(source(), batch_size=5, max_in_flight=2)
        first = next(stream)
        # Backpressure: two batches in flight plus the one read after the first answer.
        assert consumed <= 5 * 3, consumed
        rows = [first, *stream]
    vectors = np.concatenate(rows)
    assert [len(r) for r in rows] == [5] * 400
    truth = toy_truth(MIXED)
    np.testing.assert_allclose(vectors, truth[np.arange(2000) % len(MIXED)], atol=1e-5)


def test_embed_stream_surfaces_a_refused_batch(live: Live) -> None:
    with EmbeddingClient(live.grpc_target) as client, pytest.raises(InvalidInput):
        list(client.embed_stream(["w1", "w2", "", "w4"], batch_size=2))


def test_async_client_same_results(live: Live) -> None:
    async def main() -> tuple[np.ndarray, np.ndarray, str]:
        async with AsyncEmbeddingClient(live.grpc_target, max_in_flight=2) as client:
            unary = await client.embed(MIXED)
            streamed = [v async for v in client.embed_stream(iter(MIXED), batch_size=9)]
            return unary, np.concatenate(streamed), await client.health()

    unary, streamed, health = asyncio.run(main())
    assert health == "SERVING"
    np.testing.assert_allclose(unary, toy_truth(MIXED), atol=1e-5)
    np.testing.assert_allclose(streamed, unary, atol=1e-5)


def test_round_robin_spreads_calls_over_two_servers(client_bundle: Path) -> None:
    with ThreadedServer(client_bundle) as one, ThreadedServer(client_bundle) as two:
        servers = (one, two)

        def counts(total: int) -> list[int]:  # polled: a call is counted just after its reply
            deadline = time.monotonic() + 60
            while True:
                now = [request_counts(s.http_url).get("OK", 0) for s in servers]
                if sum(now) >= total or time.monotonic() > deadline:
                    return now
                time.sleep(0.02)

        target = f"ipv4:127.0.0.1:{one.grpc_port},127.0.0.1:{two.grpc_port}"
        with EmbeddingClient(target) as client:
            for i in range(10):  # warm-up: both connections up before counting
                client.embed([words(3, start=i)])
            before = counts(10)
            for i in range(40):
                client.embed([words(3, start=i)])
            after = counts(50)
    spread = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(spread) == 40 and all(12 <= n <= 28 for n in spread), spread


def test_retry_policy_is_bounded() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=6)
    with pytest.raises(TypeError):
        EmbeddingClient("127.0.0.1:1").embed("one string, not a list")


def test_one_client_shared_by_threads(live: Live) -> None:
    with EmbeddingClient(live.grpc_target) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: client.embed(MIXED[i : i + 5]), range(40)))
    truth = toy_truth(MIXED)
    for i, vectors in enumerate(results):
        np.testing.assert_allclose(vectors, truth[i : i + 5], atol=1e-5)


def test_stopping_a_stream_early_cancels_it_and_the_client_stays_usable(live: Live) -> None:
    def endless() -> Iterator[str]:
        i = 0
        while True:
            yield MIXED[i % len(MIXED)]
            i += 1

    with EmbeddingClient(live.grpc_target) as client:
        stream = client.embed_stream(endless(), batch_size=4, max_in_flight=2)
        first = next(stream)
        stream.close()
        np.testing.assert_allclose(first, toy_truth(MIXED[:4]), atol=1e-5)
        np.testing.assert_allclose(client.embed(MIXED[:3]), toy_truth(MIXED[:3]), atol=1e-5)


def test_async_stream_reads_an_async_iterable(live: Live) -> None:
    async def source() -> AsyncIterator[str]:
        for text in MIXED:
            await asyncio.sleep(0)
            yield text

    async def main() -> np.ndarray:
        async with AsyncEmbeddingClient(live.grpc_target) as client:
            return np.concatenate([v async for v in client.embed_stream(source(), batch_size=10)])

    np.testing.assert_allclose(asyncio.run(main()), toy_truth(MIXED), atol=1e-5)


def test_model_parameter_names_the_served_model_on_every_call(live: Live) -> None:
    with EmbeddingClient(live.grpc_target) as default:
        name = default.model_info().model
        expected = default.embed(["w1 w2"])
    with EmbeddingClient(live.grpc_target, model=name) as named:
        np.testing.assert_array_equal(named.embed(["w1 w2"]), expected)
        assert named.model_info().model == name and named.tokenize(["w1"])
        assert sum(len(r) for r in named.embed_stream(["w1", "w2", "w3"], batch_size=2)) == 3
    with EmbeddingClient(live.grpc_target, model="text-embedding-ada-002") as unknown:
        for call in (lambda: unknown.embed(["w1"]), unknown.model_info, lambda: unknown.tokenize(["w1"])):
            with pytest.raises(ModelNotFound, match=f"served: {name}") as refused:
                call()
            assert refused.value.status == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ModelNotFound):
            list(unknown.embed_stream(["w1"]))
