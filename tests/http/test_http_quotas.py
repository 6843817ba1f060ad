"""Per-key quotas on a real server: refusals with OpenAI's headers, usage by key name, fairness.

Each test uses keys of its own (buckets are per name and refill slowly by design), so the order of
the tests does not matter. No test depends on speed: limits are counts, and the one rate used
(requests per minute) refills far slower than any test runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from http_stack import Stack, stack_settings, start_stack

from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT_S = 60.0
KEYS = {
    "rpm": "sk-quota-rpm-5b1e",
    "tok": "sk-quota-tok-77aa",
    "grpc": "sk-quota-grpc-c3d0",
    "greedy": "sk-quota-greedy-9f41",
    "fair": "sk-quota-fair-0d2c",
}
KEYS_FILE = f"""# name and limits after the key; a bare key (the old format) is still valid
{KEYS["rpm"]} name=team-rpm rpm=3
{KEYS["tok"]}   name=team-tok tpm=10
{KEYS["grpc"]} name=team-grpc rpm=1
{KEYS["greedy"]} name=greedy concurrency=1
{KEYS["fair"]} name=fair
sk-quota-bare-key
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_qwen2_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    keys = tmp_path_factory.mktemp("quotas") / "api-keys"
    keys.write_text(KEYS_FILE)
    s = await start_stack(stack_settings(tiny_qwen2_bundle, keys))
    yield s
    await s.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(stack.url, timeout=timeout) as session:
        yield session


def sample(stack: Stack, name: str, **labels: str) -> float:
    return stack.edge.metrics.registry.get_sample_value(name, labels) or 0.0


async def post(
    http: aiohttp.ClientSession, key: str, text: str = "hello"
) -> tuple[int, dict[str, str], dict]:
    async with http.post(
        "/v1/embeddings", json={"input": text}, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        return r.status, dict(r.headers), await r.json()


async def test_requests_per_minute_refused_with_openai_headers(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    seen = [await post(http, KEYS["rpm"]) for _ in range(4)]
    assert [s for s, _, _ in seen] == [200, 200, 200, 429]
    ok_headers = seen[0][1]
    assert ok_headers["x-ratelimit-limit-requests"] == "3"
    assert ok_headers["x-ratelimit-remaining-requests"] == "2"
    assert ok_headers["x-ratelimit-reset-requests"].endswith("s")
    _, headers, body = seen[3]
    assert int(headers["Retry-After"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert float(headers["x-ratelimit-reset-requests"].rstrip("s")) > 0
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "team-rpm" in body["error"]["message"] and KEYS["rpm"] not in body["error"]["message"]
    assert sample(stack, "embed_key_requests_total", key="team-rpm") == 3
    assert sample(stack, "embed_key_refusals_total", key="team-rpm", limit="requests") == 1


async def test_tokens_per_minute_charged_after_tokenisation(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    status, headers, body = await post(http, KEYS["tok"], "lorem ipsum dolor sit amet " * 4)
    assert status == 200  # admitted while the bucket is above zero, then charged in full
    used = body["usage"]["prompt_tokens"]
    assert used > 10
    assert sample(stack, "embed_key_input_tokens_total", key="team-tok") == used
    assert headers["x-ratelimit-limit-tokens"] == "10"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    status, headers, body = await post(http, KEYS["tok"])
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert sample(stack, "embed_key_refusals_total", key="team-tok", limit="tokens") == 1
    assert sample(stack, "embed_key_input_tokens_total", key="team-tok") == used


async def test_grpc_refusal_is_resource_exhausted_with_retry_after(stack: Stack) -> None:
    auth = (("authorization", f"Bearer {KEYS['grpc']}"),)
    async with stack.channel() as channel:
        stub = stack.stub(channel)
        await stub.Embed(pb.EmbedRequest(inputs=["a"]), metadata=auth, timeout=TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Embed(pb.EmbedRequest(inputs=["a"]), metadata=auth, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "team-grpc" in (info.value.details() or "")
        trailers = dict(info.value.trailing_metadata() or ())
        assert int(trailers["retry-after"]) >= 1
        stream = stub.EmbedStream(metadata=auth)
        assert await stream.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sample(stack, "embed_key_refusals_total", key="team-grpc", limit="requests") == 2


async def test_key_within_limits_is_not_starved_by_key_at_its_limit(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """The greedy key floods (16 at a time, concurrency limit 1) while the fair key works."""
    stop = asyncio.Event()
    greedy: list[int] = []

    async def flood() -> None:
        while not stop.is_set():
            burst = await asyncio.gather(
                *(post(http, KEYS["greedy"], "lorem ipsum dolor sit amet " * 8) for _ in range(16))
            )
            greedy.extend(s for s, _, _ in burst)

    flooding = asyncio.create_task(flood())
    try:
        while len(greedy) < 16:  # the flood is under way
            await asyncio.sleep(0.05)
        fair = await asyncio.gather(*(post(http, KEYS["fair"], f"query {i}") for i in range(12)))
    finally:
        stop.set()
        await flooding
    assert [s for s, _, _ in fair] == [200] * 12
    assert 429 in greedy and 200 in greedy
    assert set(greedy) <= {200, 429}
    assert sample(stack, "embed_key_refusals_total", key="greedy", limit="concurrency") == greedy.count(429)
    assert sample(stack, "embed_key_requests_total", key="fair") == 12
    assert sample(stack, "embed_key_refusals_total", key="fair", limit="concurrency") == 0


async def test_metrics_name_keys_never_secrets(stack: Stack, http: aiohttp.ClientSession) -> None:
    assert (await post(http, "sk-quota-bare-key"))[0] == 200  # an old-format key: no limits
    async with http.get("/metrics") as r:
        page = await r.text()
    assert "embed_key_requests_total" in page
    assert 'key="unnamed"' in page
    for secret in [*KEYS.values(), "sk-quota-bare-key"]:
        assert secret not in page
