"""Overload at 2× capacity: every call ends OK or RESOURCE_EXHAUSTED (HTTP 429), none hangs,
nothing accepted is lost, and the server's memory stays under a bound set by its token budget.

In-process: the fake runtime's capacity is metered by the test instead of the clock: each input
it computes spends one credit, and the test grants one credit per two requests that reached the
batcher, so the offered load is twice the capacity *by construction*, however slowly a loaded
machine sends, schedules or computes (a wall-clock capacity once met a client that could not send
at twice it). Subprocess: ``embed-serve`` on the tiny gte-Qwen2 bundle (real tokenizer, real ONNX
Runtime), its capacity measured first, RSS sampled with psutil; the bound is derived in
docs/reliability.md and computed by ``bench.soak.rss_bound``.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from rel_harness import grpc_channel, live_server, stubs
from rel_toy import CLS, SEP, CountingRuntime, reference, word_id

from bench.soak import RssSampler, calibrate, drive, fill_arena, rss_bound, start_server
from service.pb.embedding.v1 import embedding_pb2 as pb

HANG_GUARD_S = 30.0

BATCH = 4  # inputs per runtime call
CALLS = 300
QUEUE_REQUESTS = 8  # max_queue_tokens = 24 = 8 single-word requests ([CLS] w [SEP])
# Accepted requests the server can hold without computing them: the queue, plus the batcher's
# two pipeline slots (one batch in the runtime, one formed and waiting for it).
HELD = QUEUE_REQUESTS + 2 * BATCH
IN_TRANSIT = 4  # requests sent that have not reached the batcher yet, at most


class MeteredRuntime(CountingRuntime):
    """Computes an input only for a credit the test granted: the test sets the capacity, not the clock."""

    def __init__(self) -> None:
        super().__init__()
        self._credits = threading.Semaphore(0)
        self.metered = False  # start-up (warm-up, self-test) runs unmetered
        self.granted = 0
        self.spent = 0  # written by the batcher's one worker thread only

    def grant(self, credits: int = 1) -> None:
        self.granted += credits
        self._credits.release(credits)

    @property
    def unspent(self) -> int:
        return self.granted - self.spent

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.metered:
            for _ in range(len(input_ids)):
                if not self._credits.acquire(timeout=HANG_GUARD_S):
                    raise RuntimeError("no credit granted: the test stopped metering")
                self.spent += 1
        return super().run(input_ids, attention_mask)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition``; the clock only bounds a hang, it decides nothing."""
    give_up = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_in_process_overload_grpc_and_http(rel_toy_bundle: Path) -> None:
    runtime = MeteredRuntime()
    async with live_server(
        rel_toy_bundle,
        runtime,
        max_batch_size=BATCH,
        max_batch_wait_ms=1,
        max_queue_tokens=3 * QUEUE_REQUESTS,
    ) as live:
        runtime.reset()
        batcher = live.core.batcher
        arrived = 0
        submit = batcher.submit

        async def metered_submit(*args: Any, **kwargs: Any) -> Any:
            # Admission is decided synchronously inside submit, so this counts decided requests.
            nonlocal arrived
            arrived += 1
            if arrived % 2 == 0:
                runtime.grant()  # one input of capacity per two requests offered: 2× overload
            return await submit(*args, **kwargs)

        batcher.submit = metered_submit  # type: ignore[method-assign]
        runtime.metered = True
        async with grpc_channel(live.grpc_target) as channel, aiohttp.ClientSession() as http:
            stub, _ = stubs(channel)
            vectors: dict[int, np.ndarray] = {}

            async def grpc_call(i: int) -> str:
                try:
                    reply = await stub.Embed(pb.EmbedRequest(inputs=[f"w{i}"]), timeout=HANG_GUARD_S)
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                vectors[i] = np.asarray(reply.embeddings[0].values, dtype=np.float32)
                return "OK"

            async def http_call(i: int) -> str:
                async with http.post(f"{live.http_url}/v1/embeddings", json={"input": f"w{i}"}) as response:
                    body = await response.json()
                    if response.status == 429:
                        assert response.headers.get("Retry-After"), "429 without Retry-After"
                        assert body["error"]["type"] == "rate_limit_error"
                        return "RESOURCE_EXHAUSTED"
                    if response.status != 200:
                        return f"HTTP {response.status}"
                    vectors[i] = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
                    return "OK"

            def may_send(i: int) -> bool:
                # The previous requests reached the batcher, and the runtime used the capacity it
                # was granted (or has nothing queued to use it on): overload, not a slow runtime.
                return arrived >= i - IN_TRANSIT and (runtime.unspent == 0 or batcher.queue_depth == 0)

            tasks = []
            for i in range(CALLS):
                await until(functools.partial(may_send, i), f"request {i} to be sent")
                tasks.append(asyncio.ensure_future(grpc_call(i) if i % 2 == 0 else http_call(i)))
            await until(lambda: arrived == CALLS, "every request to reach the batcher")
            runtime.grant(CALLS)  # the overload is over: every accepted request may finish now
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S * 2)
            assert batcher.queue_depth == 0 and batcher.queued_tokens == 0

    counts = Counter(outcomes)
    print(f"in-process overload: {CALLS} calls at 2x the metered capacity: {dict(counts)}")
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, counts
    # Overloaded by construction: before the last request arrived the runtime had credit for
    # CALLS / 2 inputs, and the server can hold at most HELD more; everything else was refused.
    assert counts["RESOURCE_EXHAUSTED"] >= CALLS // 2 - HELD, counts
    # Really serving: the capacity granted was used.
    assert counts["OK"] >= CALLS // 4, counts
    # Nothing accepted is lost or duplicated: the runtime computed exactly the answered requests,
    # each once, and each answer is the vector of its own text.
    computed = Counter(row[1] - word_id("w0") for row in runtime.rows())
    answered = {i for i, o in enumerate(outcomes) if o == "OK"}
    assert set(computed) == answered
    assert set(computed.values()) == {1}
    table = runtime.table
    for i in answered:
        expected, _ = reference(table, [[CLS, word_id(f"w{i}"), SEP]])
        np.testing.assert_allclose(vectors[i], expected[0], atol=1e-6)


def test_subprocess_overload_rss_bounded(tiny_qwen2_bundle: Path, tmp_path: Path) -> None:
    """embed-serve (tiny gte-Qwen2, real ORT) at 2× its measured capacity, RSS sampled."""
    max_queue_tokens, inputs, words = 2048, 4, 60
    server = start_server(
        tiny_qwen2_bundle,
        tmp_path / "stderr.log",
        [
            "--max-queue-tokens", str(max_queue_tokens),
            "--max-batch-tokens", "2048",
            "--max-batch-size", "16",
            "--max-input-tokens", "512",
            "--intra-op-threads", "1",
        ],
    )  # fmt: skip
    try:
        asyncio.run(fill_arena(server.grpc_target, 16, 2048 // 16))
        rss_ready = server.rss()
        capacity = asyncio.run(
            calibrate(server.grpc_target, concurrency=8, seconds=2.0, inputs=inputs, words=words)
        )
        with RssSampler(server.proc.pid) as sampler:
            result, _ = asyncio.run(
                drive(
                    server.grpc_target,
                    server.http_url,
                    rate_rps=2 * capacity,
                    duration_s=4.0,
                    max_calls=400,
                    inputs=inputs,
                    words=words,
                    dims=64,
                    hang_guard_s=HANG_GUARD_S,
                )
            )
        assert server.proc.poll() is None, "the server died under load"
    finally:
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(60)
    bound = rss_bound(rss_ready, max_queue_tokens)
    summary = (
        f"capacity {capacity:.1f} req/s, offered {2 * capacity:.1f}, {result.counts}, "
        f"RSS ready {rss_ready / 2**20:.1f} MiB, peak {sampler.peak / 2**20:.1f} MiB, "
        f"bound {bound / 2**20:.1f} MiB"
    )
    print(summary)
    assert set(result.counts) <= {"OK", "RESOURCE_EXHAUSTED"}, summary
    assert result.counts.get("RESOURCE_EXHAUSTED", 0) > 0, f"not overloaded: {summary}"
    assert result.counts.get("OK", 0) > 0, summary
    assert result.bad_answers == 0
    assert sampler.samples > 10
    assert sampler.peak <= bound, summary
    assert code == 0
