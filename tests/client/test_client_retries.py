"""Retries come from gRPC's service config: RESOURCE_EXHAUSTED is retried (then succeeds),
and the attempts are bounded; the server's own counter shows what happened on the wire."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from client_support import queued_tokens, toy_truth, wait_count, words
from rel_harness import Live, ThreadedServer
from rel_toy import CountingRuntime

from embedding_client import EmbeddingClient, Overloaded, RetryPolicy
from service.pb.embedding.v1 import embedding_pb2 as pb
from service.pb.embedding.v1 import embedding_pb2_grpc as pb_grpc

# One text of 6 words = 8 queued tokens: the queue holds one such request, not two.
TINY_QUEUE = {"max_queue_tokens": 10, "max_batch_size": 1, "max_batch_wait_ms": 1.0}


def _fill_queue(live: Live, runtime: CountingRuntime) -> tuple[grpc.Channel, list[grpc.Future], int]:
    """One request held in the runtime, one in the batch formed next, one queued: the next is refused.

    Also returns how many of its own attempts were refused (the server counted them).
    """
    channel = grpc.insecure_channel(live.grpc_target)
    stub = pb_grpc.EmbeddingServiceStub(channel)
    runtime.hold()

    def send(start: int) -> grpc.Future:
        return stub.Embed.future(pb.EmbedRequest(inputs=[words(6, start=start)]), timeout=120)

    held = [send(0)]
    assert runtime.entered.wait(60), "first request never reached the runtime"
    held.append(send(10))
    deadline, refused = time.monotonic() + 60, 0
    while True:  # the second request leaves the queue when the next batch forms; then one more fits
        third = send(20)
        while not third.done() and queued_tokens(live.http_url) < 8:
            time.sleep(0.02)
        if not third.done():
            held.append(third)
            return channel, held, refused
        assert third.exception() is not None and third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        refused += 1
        assert time.monotonic() < deadline, "could not fill the queue"
        time.sleep(0.05)


def test_resource_exhausted_is_retried_until_it_succeeds(client_bundle: Path) -> None:
    runtime = CountingRuntime()
    with ThreadedServer(client_bundle, runtime, **TINY_QUEUE) as live:
        channel, held, refused = _fill_queue(live, runtime)
        assert wait_count(live.http_url, "RESOURCE_EXHAUSTED", refused) == refused
        retries = RetryPolicy(max_attempts=5, initial_backoff_s=1.0, max_backoff_s=5.0)
        result: dict[str, np.ndarray | BaseException] = {}

        def call() -> None:
            try:
                with EmbeddingClient(live.grpc_target, retries=retries, timeout=120) as client:
                    result["v"] = client.embed([words(6, start=200)])
            except BaseException as exc:
                result["v"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        # The client's first attempt is refused; only then does the queue drain.
        assert wait_count(live.http_url, "RESOURCE_EXHAUSTED", refused + 1) >= refused + 1
        assert runtime.gate is not None
        runtime.gate.set()
        caller.join(120)
        for future in held:
            future.result(60)
        channel.close()
    vectors = result["v"]
    assert isinstance(vectors, np.ndarray), vectors
    np.testing.assert_allclose(vectors, toy_truth([words(6, start=200)]), atol=1e-5)


def test_attempts_are_bounded_then_overloaded_is_raised(client_bundle: Path) -> None:
    runtime = CountingRuntime()
    with ThreadedServer(client_bundle, runtime, **TINY_QUEUE) as live:
        channel, held, before = _fill_queue(live, runtime)
        assert wait_count(live.http_url, "RESOURCE_EXHAUSTED", before) == before
        retries = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)
        try:
            client = EmbeddingClient(live.grpc_target, retries=retries, timeout=60)
            with client, pytest.raises(Overloaded) as refused:
                client.embed([words(6, start=300)])
            assert refused.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.request_id
            after = wait_count(live.http_url, "RESOURCE_EXHAUSTED", before + 3)
            assert after == before + 3, (before, after)  # exactly max_attempts on the wire
        finally:
            assert runtime.gate is not None
            runtime.gate.set()
            for future in held:
                future.result(60)
            channel.close()
