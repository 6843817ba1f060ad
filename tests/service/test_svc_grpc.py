"""In-process gRPC: the toy bundle on the real OrtRuntime, a real server on port 0, a real channel."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from svc_harness import serving
from svc_toy import CLS, SEP, TASKS, TEMPLATE, content_ids, reference, toy_tokenizer

from service.encoding import decode
from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "red fish", "paris"]


def expected(table: np.ndarray, texts: list[str], *, task: str | None = None) -> np.ndarray:
    tok = toy_tokenizer()
    seqs = []
    for text in texts:
        rendered = TEMPLATE.format(task=TASKS[task], text=text) if task else text
        seqs.append([CLS, *content_ids(tok, rendered), SEP])
    return reference(table, seqs)[0]


def values(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


async def test_embed_matches_reference_in_order(toy_bundle: Path, toy_table: np.ndarray) -> None:
    async with serving(toy_bundle) as h:
        response = await h.stub.Embed(pb.EmbedRequest(inputs=TEXTS, request_id="r-1"))
    assert [e.index for e in response.embeddings] == [0, 1, 2, 3]
    np.testing.assert_allclose(values(response), expected(toy_table, TEXTS), atol=1e-5)
    assert response.request_id == "r-1" and response.model == "toy-mean" and response.dimensions == 16
    assert response.embeddings[1].token_count == 11  # 9 words + [CLS] + [SEP]
    assert response.usage.input_tokens == sum(e.token_count for e in response.embeddings)
    assert response.usage.total_tokens == response.usage.input_tokens
    assert response.last and response.count == 4 and response.offset == 0
    t = response.timings
    assert t.total_ms >= t.inference_ms >= 0 and t.tokenize_ms >= 0 and t.queue_ms >= 0 and t.total_ms > 0


async def test_instruction_applies_to_queries_only(toy_bundle: Path, toy_table: np.ndarray) -> None:
    async with serving(toy_bundle) as h:
        query = await h.stub.Embed(
            pb.EmbedRequest(inputs=["red fish"], input_type=pb.INPUT_TYPE_QUERY, task="search")
        )
        free = await h.stub.Embed(
            pb.EmbedRequest(inputs=["red fish"], input_type=pb.INPUT_TYPE_QUERY, instruction=TASKS["search"])
        )
        doc = await h.stub.Embed(
            pb.EmbedRequest(inputs=["red fish"], input_type=pb.INPUT_TYPE_DOCUMENT, task="search")
        )
        unspecified = await h.stub.Embed(pb.EmbedRequest(inputs=["red fish"], task="search"))
        tokens = await h.stub.Tokenize(
            pb.TokenizeRequest(
                inputs=["red fish"], input_type=pb.INPUT_TYPE_QUERY, task="search", return_tokens=True
            )
        )
    np.testing.assert_allclose(values(query), expected(toy_table, ["red fish"], task="search"), atol=1e-5)
    np.testing.assert_allclose(values(free), values(query), atol=1e-6)
    np.testing.assert_allclose(values(doc), expected(toy_table, ["red fish"]), atol=1e-5)
    np.testing.assert_allclose(values(unspecified), values(doc), atol=1e-6)
    assert not np.allclose(values(query), values(doc))
    assert tokens.inputs[0].tokens[:3] == ["[CLS]", "instruct", ":"]
    assert tokens.inputs[0].token_count == query.embeddings[0].token_count


async def test_normalize_dimensions_and_encodings(toy_bundle: Path, toy_table: np.ndarray) -> None:
    ref = expected(toy_table, TEXTS)
    tok = toy_tokenizer()
    _, norms = reference(toy_table, [[CLS, *content_ids(tok, t), SEP] for t in TEXTS])
    async with serving(toy_bundle, allow_dimensions=True) as h:
        raw = await h.stub.Embed(pb.EmbedRequest(inputs=TEXTS, normalize=False))
        np.testing.assert_allclose(values(raw), ref * norms[:, None], rtol=1e-5)
        cut = await h.stub.Embed(pb.EmbedRequest(inputs=TEXTS, dimensions=5))
        want = ref[:, :5] / np.linalg.norm(ref[:, :5], axis=1, keepdims=True)
        np.testing.assert_allclose(values(cut), want, atol=1e-5)
        assert cut.dimensions == 5
        for enc, name, atol in [
            (pb.ENCODING_FLOAT32, "float32", 1e-6),
            (pb.ENCODING_FLOAT16, "float16", 1e-3),
            (pb.ENCODING_INT8, "int8", 0.5 / 127 + 1e-6),
        ]:
            r = await h.stub.Embed(pb.EmbedRequest(inputs=TEXTS, encoding=enc))
            assert r.encoding == enc and not r.embeddings[0].values
            got = np.stack([decode(e.packed, name, 16) for e in r.embeddings])  # type: ignore[arg-type]
            np.testing.assert_allclose(got, ref, atol=atol)
        r = await h.stub.Embed(pb.EmbedRequest(inputs=TEXTS, encoding=pb.ENCODING_BINARY))
        assert all(len(e.packed) == 2 for e in r.embeddings)
        bits = np.stack([decode(e.packed, "binary", 16) for e in r.embeddings])
        np.testing.assert_array_equal(bits, (ref > 0).astype(np.float32))
        first = r.embeddings[0].packed[0]
        assert (first >> 7) & 1 == int(ref[0, 0] > 0)  # dimension 0 is the most significant bit


async def test_truncation_modes_count_dropped_tokens(toy_bundle: Path) -> None:
    long_text = " ".join(["one two three four five six seven eight nine ten"] * 4)  # 40 words
    async with serving(toy_bundle) as h:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Embed(pb.EmbedRequest(inputs=[long_text]))  # server default: none
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "42 tokens" in (err.value.details() or "")
        end = await h.stub.Tokenize(pb.TokenizeRequest(inputs=[long_text], truncation=pb.TRUNCATION_END))
        start = await h.stub.Tokenize(pb.TokenizeRequest(inputs=[long_text], truncation=pb.TRUNCATION_START))
        q = await h.stub.Tokenize(
            pb.TokenizeRequest(
                inputs=[long_text],
                truncation=pb.TRUNCATION_START,
                input_type=pb.INPUT_TYPE_QUERY,
                task="animals",
                return_tokens=True,
            )
        )
        emb = await h.stub.Embed(pb.EmbedRequest(inputs=[long_text, "paris"], truncation=pb.TRUNCATION_END))
    tok = toy_tokenizer()
    ids = content_ids(tok, long_text)
    e, s = end.inputs[0], start.inputs[0]
    assert e.token_count == s.token_count == 32
    assert e.dropped_tokens == s.dropped_tokens == 40 - 30 and e.truncated
    assert list(e.ids) == [CLS, *ids[:30], SEP]
    assert list(s.ids) == [CLS, *ids[10:], SEP]
    # query: the instruction ("instruct : find the cat query :" = 7 tokens) is kept, text cut from its start
    assert q.inputs[0].tokens[:8] == ["[CLS]", "instruct", ":", "find", "the", "cat", "query", ":"]
    assert q.inputs[0].dropped_tokens == 40 + 7 - 30 and q.inputs[0].token_count == 32
    assert q.inputs[0].tokens[8:-1] == [tok.id_to_token(i) for i in ids[17:]]
    assert emb.embeddings[0].truncated and emb.embeddings[0].dropped_tokens == 10
    assert not emb.embeddings[1].truncated and emb.usage.truncated_inputs == 1


async def test_special_tokens_in_text_are_not_parsed(toy_bundle: Path) -> None:
    async with serving(toy_bundle) as h:
        r = await h.stub.Tokenize(pb.TokenizeRequest(inputs=["hello [SEP] <eos> world"]))
    ids = list(r.inputs[0].ids)
    assert ids[0] == CLS and ids[-1] == SEP
    assert SEP not in ids[1:-1] and 4 not in ids  # typed specials stay text


async def test_stream_in_order_and_split(toy_bundle: Path, toy_table: np.ndarray) -> None:
    # 64 KiB messages; one toy vector in values is ~90 bytes, so 1000 inputs need several parts.
    texts = [
        f"{w} {v}" for w in ("red", "green", "blue", "one", "two") for v in ("cat", "dog", "fish", "bird")
    ]
    many = (texts * 50)[:1000]
    requests = [
        pb.EmbedRequest(inputs=texts[:3], request_id="a"),
        pb.EmbedRequest(inputs=many, request_id="big"),
        pb.EmbedRequest(inputs=texts[3:9], request_id="c", encoding=pb.ENCODING_FLOAT16),
    ]
    async with serving(toy_bundle, max_message_bytes=64 * 1024, max_inputs_per_request=1000) as h:
        responses = [r async for r in h.stub.EmbedStream(iter(requests))]
    assert next(r.request_id for r in responses) == "a" and responses[-1].request_id == "c"
    big = [r for r in responses if r.request_id == "big"]
    assert len(big) >= 2
    assert [r.part for r in big] == list(range(len(big)))
    assert [r.last for r in big] == [False] * (len(big) - 1) + [True]
    assert all(r.request_index == 1 and r.ByteSize() <= 64 * 1024 for r in big)
    offsets = [r.offset for r in big]
    assert offsets[0] == 0 and all(b.offset == a.offset + a.count for a, b in itertools.pairwise(big))
    assert sum(r.count for r in big) == 1000
    indices = [e.index for r in big for e in r.embeddings]
    assert indices == list(range(1000))
    got = np.array([list(e.values) for r in big for e in r.embeddings], dtype=np.float32)
    np.testing.assert_allclose(got, expected(toy_table, many), atol=1e-5)
    assert not big[0].HasField("usage") and big[-1].usage.input_tokens > 0
    assert [r.request_index for r in responses if r.request_id != "big"] == [0, 2]


async def test_unary_too_large_for_one_message_is_refused_before_compute(toy_bundle: Path) -> None:
    async with serving(toy_bundle, max_message_bytes=64 * 1024, max_inputs_per_request=1000) as h:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Embed(pb.EmbedRequest(inputs=["paris"] * 1000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "EmbedStream" in (err.value.details() or "")


async def test_model_info(toy_bundle: Path) -> None:
    async with serving(toy_bundle) as h:
        info = await h.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_id == "toy-mean" and info.dimensions == 16 and info.max_input_tokens == 32
    assert info.pooling == "mean" and info.precision == "fp32" and info.family == "bert"
    assert list(info.execution_providers) == ["CPUExecutionProvider"]
    assert len(info.bundle_sha256) == 64
    assert {t.name for t in info.tasks} == set(TASKS)
    assert info.self_test.ran and info.self_test.passed and info.self_test.vectors == 2
    assert info.self_test.min_cosine >= info.self_test.threshold
    assert info.limits.max_inputs_per_request == 256 and info.limits.default_truncation == pb.TRUNCATION_NONE
    assert info.validation["passed"] is True


def reflect(port: int) -> tuple[set[str], Any]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("embedding.v1.EmbeddingService").methods_by_name["EmbedStream"]
        return services, method


async def test_health_and_reflection(toy_bundle: Path) -> None:
    async with serving(toy_bundle) as h:
        for service in ("", "embedding.v1.EmbeddingService"):
            r = await h.health.Check(health_pb2.HealthCheckRequest(service=service))
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        # Reflection as grpcurl uses it; the reflection client is sync, so off the server's loop.
        services, method = await asyncio.to_thread(reflect, h.port)
        assert {"embedding.v1.EmbeddingService", "grpc.health.v1.Health"} <= services
        assert method.input_type.full_name == "embedding.v1.EmbedRequest"
        await h.core.drain()
        r = await h.health.Check(health_pb2.HealthCheckRequest(service="embedding.v1.EmbeddingService"))
        assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Embed(pb.EmbedRequest(inputs=["paris"]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
