"""Rerank on a running stack (tiny gte-Qwen2, keys on): Cohere's own SDK (v1 and v2 clients) and
the exact JSON Jina-style clients send on HTTP, the ``Rerank`` RPC on gRPC, and the error table.

The scores are checked against an independent computation: the cosine of the vectors ``Embed``
returns for the query (as a query, with its instruction) and for each document (as a document).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import cohere
import grpc
import numpy as np
import pytest
import pytest_asyncio
from http_stack import KEY, Stack, stack_settings, start_stack

from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny-gte-qwen2"
QUERY = "where do foxes live"
DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "embeddings are vectors of floats",
    "foxes live in dens in the forest",
    "a",
    "paris is a city on a river",
]
GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)
HTTP_AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_INPUTS = 8
MAX_TOKENS = 64


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_qwen2_bundle: Path, keys_file: Path) -> AsyncIterator[Stack]:
    settings = stack_settings(
        tiny_qwen2_bundle,
        keys_file,
        max_inputs_per_request=MAX_INPUTS,
        max_input_tokens=MAX_TOKENS,
        max_batch_size=8,
        cache_bytes=1 << 20,  # on, as by default: rerank shares it (test_rerank_shares_the_result_cache)
    )
    s = await start_stack(settings)
    yield s
    await s.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=stack.url) as session:
        yield session


async def embed(stack: Stack, texts: list[str], **fields: Any) -> tuple[np.ndarray, int]:
    async with stack.channel() as channel:
        response = await stack.stub(channel).Embed(
            pb.EmbedRequest(inputs=texts, encoding=pb.ENCODING_FLOAT32, **fields),
            metadata=GRPC_AUTH,
            timeout=60,
        )
    vectors = np.stack([np.frombuffer(e.packed, dtype="<f4") for e in response.embeddings])
    return vectors, response.usage.total_tokens


async def expected(
    stack: Stack, query: str = QUERY, docs: list[str] = DOCS, **query_fields: Any
) -> np.ndarray:
    """Cosine of each document to the query, from Embed's own vectors (unit length, float32)."""
    q, _ = await embed(stack, [query], input_type=pb.INPUT_TYPE_QUERY, **query_fields)
    d, _ = await embed(stack, docs, input_type=pb.INPUT_TYPE_DOCUMENT)
    return d @ q[0]


def ranking(scores: np.ndarray) -> list[int]:
    return [int(i) for i in np.argsort(-scores, kind="stable")]


async def test_cohere_v1_client(stack: Stack) -> None:
    scores = await expected(stack)
    client = cohere.AsyncClient(api_key=KEY, base_url=stack.url, timeout=60)
    answer = await client.rerank(model=MODEL, query=QUERY, documents=DOCS, top_n=3, return_documents=True)
    assert [r.index for r in answer.results] == ranking(scores)[:3]
    for r in answer.results:
        assert r.relevance_score == pytest.approx(float(scores[r.index]), abs=1e-6)
        assert r.document is not None and r.document.text == DOCS[r.index]


async def test_cohere_v2_client(stack: Stack) -> None:
    scores = await expected(stack)
    client = cohere.AsyncClientV2(api_key=KEY, base_url=stack.url, timeout=60)
    answer = await client.rerank(model=MODEL, query=QUERY, documents=DOCS)
    assert [r.index for r in answer.results] == ranking(scores)
    assert [r.relevance_score for r in answer.results] == pytest.approx(
        sorted(scores, reverse=True), abs=1e-6
    )


async def test_jina_style_json_and_cohere_v1_document_objects(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    scores = await expected(stack)
    _, query_tokens = await embed(stack, [QUERY], input_type=pb.INPUT_TYPE_QUERY)
    _, doc_tokens = await embed(stack, DOCS)
    bodies = [
        {"model": MODEL, "query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": True},
        {"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2, "return_documents": True},
    ]
    for body in bodies:
        async with http.post("/v1/rerank", json=body, headers=HTTP_AUTH) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
        assert answer["model"] == MODEL
        assert answer["id"] == response.headers["X-Request-Id"]
        assert answer["usage"] == {
            "prompt_tokens": query_tokens + doc_tokens,
            "total_tokens": query_tokens + doc_tokens,
        }
        assert [r["index"] for r in answer["results"]] == ranking(scores)[:2]
        for r in answer["results"]:
            assert set(r) == {"index", "relevance_score", "document"}
            assert r["document"] == {"text": DOCS[r["index"]]}
            assert r["relevance_score"] == pytest.approx(float(scores[r["index"]]), abs=1e-6)
    async with http.post(
        "/v1/rerank", json={"query": QUERY, "documents": DOCS}, headers=HTTP_AUTH
    ) as response:
        plain = await response.json()
    assert len(plain["results"]) == len(DOCS)
    assert all(set(r) == {"index", "relevance_score"} for r in plain["results"])


async def test_the_query_takes_task_and_instruction(stack: Stack, http: aiohttp.ClientSession) -> None:
    instruction = "find passages about animals"
    scores = await expected(stack, instruction=instruction)
    untouched = await expected(stack)
    assert not np.allclose(scores, untouched)  # the instruction changes the query vector
    body = {"query": QUERY, "documents": DOCS, "instruction": instruction}
    async with http.post("/v1/rerank", json=body, headers=HTTP_AUTH) as response:
        answer = await response.json()
    assert [r["relevance_score"] for r in answer["results"]] == pytest.approx(
        sorted(scores, reverse=True), abs=1e-6
    )
    task_scores = await expected(stack, task="web_search")
    async with stack.channel() as channel:
        result = await stack.stub(channel).Rerank(
            pb.RerankRequest(query=QUERY, documents=DOCS, task="web_search"), metadata=GRPC_AUTH, timeout=60
        )
    assert [r.index for r in result.results] == ranking(task_scores)


async def test_grpc_rerank_matches_http(stack: Stack, http: aiohttp.ClientSession) -> None:
    body = {"query": QUERY, "documents": DOCS, "top_n": 4, "return_documents": True}
    async with http.post("/v1/rerank", json=body, headers=HTTP_AUTH) as response:
        over_http = await response.json()
    async with stack.channel() as channel:
        over_grpc = await stack.stub(channel).Rerank(
            pb.RerankRequest(query=QUERY, documents=DOCS, top_n=4, return_documents=True, request_id="rr-1"),
            metadata=GRPC_AUTH,
            timeout=60,
        )
    assert over_grpc.request_id == "rr-1"
    assert over_grpc.model == MODEL
    assert [(r.index, r.document) for r in over_grpc.results] == [
        (r["index"], r["document"]["text"]) for r in over_http["results"]
    ]
    # float on the wire (proto) vs the float32 value as a JSON number: the same float32.
    assert [r.relevance_score for r in over_grpc.results] == [
        float(np.float32(r["relevance_score"])) for r in over_http["results"]
    ]
    assert over_grpc.usage.total_tokens == over_http["usage"]["total_tokens"]
    scores = [r.relevance_score for r in over_grpc.results]
    assert scores == sorted(scores, reverse=True)


async def test_rerank_shares_the_result_cache(stack: Stack, http: aiohttp.ClientSession) -> None:
    docs = ["river mountain city", "snow rain sun"]
    before = stack.core.cache_stats()
    async with http.post("/v1/rerank", json={"query": "weather", "documents": docs}, headers=HTTP_AUTH) as r:
        assert r.status == 200
    middle = stack.core.cache_stats()
    assert middle.misses - before.misses == 3 and middle.hits == before.hits
    await embed(stack, docs)  # gRPC Embed of the same documents: answered from the cache
    after = stack.core.cache_stats()
    assert after.hits - middle.hits == 2 and after.misses == middle.misses


HTTP_REFUSALS: list[tuple[dict[str, Any], int, str | None, str]] = [
    ({"query": QUERY, "documents": []}, 400, "documents", "invalid_input"),
    ({"documents": DOCS}, 400, "query", "invalid_input"),
    ({"query": "", "documents": DOCS}, 400, "query", "invalid_input"),
    ({"query": QUERY, "documents": ["a", ""]}, 400, "documents[1]", "invalid_input"),
    ({"query": QUERY, "documents": ["a", 3]}, 400, "documents[1]", "invalid_input"),
    ({"query": QUERY, "documents": ["a"] * (MAX_INPUTS + 1)}, 413, "documents", "too_many_inputs"),
    ({"query": QUERY, "documents": ["fox " * 200]}, 413, "documents[0]", "input_too_long"),
    ({"query": "fox " * 200, "documents": DOCS}, 413, "query", "input_too_long"),
    ({"query": QUERY, "documents": DOCS, "top_n": 0}, 400, "top_n", "invalid_input"),
    ({"query": QUERY, "documents": DOCS, "rank_fields": ["text"]}, 400, "rank_fields", "invalid_input"),
    ({"query": QUERY, "documents": DOCS, "task": "nope"}, 400, "task", "unknown_task"),
    ({"query": QUERY, "documents": DOCS, "model": "rerank-english-v3.0"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), HTTP_REFUSALS)
async def test_http_refusals(
    http: aiohttp.ClientSession, body: dict[str, Any], status: int, param: str | None, code: str
) -> None:
    async with http.post("/v1/rerank", json=body, headers=HTTP_AUTH) as response:
        assert response.status == status, await response.text()
        error = (await response.json())["error"]
    assert (error["param"], error["code"]) == (param, code)


async def test_http_needs_a_key(http: aiohttp.ClientSession) -> None:
    for path in ("/v1/rerank", "/v2/rerank"):
        async with http.post(path, json={"query": QUERY, "documents": DOCS}) as response:
            assert response.status == 401


GRPC_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"query": QUERY}, "documents"),
    ({"documents": DOCS}, "query"),
    ({"query": QUERY, "documents": ["a", ""]}, "input 1 is an empty string"),
    ({"query": QUERY, "documents": ["a"] * (MAX_INPUTS + 1)}, "more than the limit"),
    ({"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
    ({"query": QUERY, "documents": DOCS, "task": "nope"}, "nope"),
    ({"query": QUERY, "documents": DOCS, "truncation": 9}, "truncation"),
]


@pytest.mark.parametrize(("fields", "says"), GRPC_REFUSALS)
async def test_grpc_refusals(stack: Stack, fields: dict[str, Any], says: str) -> None:
    async with stack.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub(channel).Rerank(pb.RerankRequest(**fields), metadata=GRPC_AUTH, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (caught.value.details() or "")


async def test_scores_stay_cosines_when_rounding_passes_one() -> None:
    """float32 unit vectors can dot to a few ulps past ±1 (all-MiniLM: 1.0000004 for a text against
    itself); a relevance score is a cosine and stays in [-1, 1]."""
    from service.domain import EmbedJob, EmbedResult, Timings, Usage
    from service.rerank import RerankJob, rerank

    unit = np.full((1, 4), 0.5000001, dtype=np.float32)  # norm 1.0000002: dot with itself > 1

    class Echo:
        async def embed(self, job: EmbedJob) -> EmbedResult:
            vectors = np.repeat(unit, len(job.texts), axis=0) * (
                1 if job.input_type == "query" else [[1], [-1]]
            )
            return EmbedResult(
                vectors.astype(np.float32),
                (),
                Usage(input_tokens=1, truncated_inputs=0),
                Timings(0, 0, 0, 0),
                "m",
                "r",
            )

    assert float(unit[0] @ unit[0]) > 1.0
    result = await rerank(Echo(), RerankJob(query="q", documents=("same", "opposite")))
    assert [r.score for r in result.ranked] == [1.0, -1.0]


async def test_grpc_rerank_unknown_model_is_not_found(stack: Stack) -> None:
    """The same model lookup as Embed: NOT_FOUND, naming the models this server does serve."""
    async with stack.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub(channel).Rerank(
                pb.RerankRequest(query=QUERY, documents=DOCS, model="other"), metadata=GRPC_AUTH, timeout=60
            )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not served here" in (caught.value.details() or "")
    assert MODEL in (caught.value.details() or "")


async def test_grpc_refuses_an_answer_that_could_not_be_sent(stack: Stack) -> None:
    """Echoed documents plus per-result fields outgrow a request just under max_message_bytes."""
    limit = stack.settings.max_message_bytes
    docs = ["w" * ((limit - 200) // MAX_INPUTS)] * MAX_INPUTS
    request = pb.RerankRequest(query=QUERY, documents=docs, return_documents=True)
    assert request.ByteSize() <= limit
    async with stack.channel() as channel:
        stub = stack.stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Rerank(request, metadata=GRPC_AUTH, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "return_documents=false" in (caught.value.details() or "")
        assert dict(caught.value.trailing_metadata() or ())["embed-error-field"] == "return_documents"
        request.return_documents = False  # passes this check; refused next for the length instead
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Rerank(request, metadata=GRPC_AUTH, timeout=60)
        assert dict(caught.value.trailing_metadata() or ())["embed-error-field"] == "documents[0]"
