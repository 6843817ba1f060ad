"""The cost model (issue 8): quadratic attention in the budget, memory-bounded batches and inputs."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest
from svc_harness import serving
from svc_toy import FakeRuntime

from bundle.manifest import ModelShape, load_manifest
from service.batcher import Batcher
from service.cost import CostModel, batch_cost
from service.pb.embedding.v1 import embedding_pb2 as pb

GTE_7B = ModelShape(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944)
TINY = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def test_attention_makes_long_inputs_cost_more_than_their_length() -> None:
    cost = CostModel(max_batch_tokens=16384, shape=GTE_7B)
    # For the 7B the attention term equals the linear cost near 32k tokens.
    assert 30_000 < cost.quadratic_length < 35_000
    assert cost.tokens(1, 32768) > 1.9 * batch_cost(1, 32768)
    assert cost.tokens(64, 128) < 1.01 * batch_cost(64, 128)
    # Without a shape the model is the padded-token count, exactly.
    assert CostModel(max_batch_tokens=1).tokens(7, 300) == 7 * 300


def test_chunked_graph_memory_is_linear_unchunked_is_quadratic() -> None:
    chunked = CostModel(max_batch_tokens=1, shape=TINY, attention_chunk=1024, mlp_chunk=2048)
    plain = CostModel(max_batch_tokens=1, shape=TINY)
    assert chunked.memory_bytes(1, 32768) / chunked.memory_bytes(1, 8192) < 4.5
    assert plain.memory_bytes(1, 32768) / plain.memory_bytes(1, 8192) > 14
    # The calibration measured 1.3 GB peak RSS at 32k on the chunked tiny graph: same order.
    assert 0.5 * 2**30 < chunked.memory_bytes(1, 32768) < 2 * 2**30


def test_longest_single_input_that_fits_is_exact() -> None:
    budget = 64 * 2**20
    cost = CostModel(max_batch_tokens=1, max_batch_memory_bytes=budget, shape=TINY)
    cap = cost.max_single_input(32768)
    assert cap < 32768
    assert cost.memory_bytes(1, cap) <= budget < cost.memory_bytes(1, cap + 1)
    assert CostModel(max_batch_tokens=1, shape=TINY).max_single_input(32768) == 32768


@pytest.mark.asyncio
async def test_batcher_splits_batches_that_would_exceed_memory(fake_runtime: FakeRuntime) -> None:
    length = 24
    cost = CostModel(max_batch_tokens=100_000, shape=GTE_7B, max_batch_memory_bytes=1)
    per_input = cost.memory_bytes(1, length)
    cost = CostModel(max_batch_tokens=100_000, shape=GTE_7B, max_batch_memory_bytes=2 * per_input + 1)
    batcher = Batcher(
        fake_runtime,
        max_batch_tokens=100_000,
        cost=cost,
        max_batch_size=64,
        max_batch_wait_ms=20,
        max_queue_tokens=100_000,
        pad_id=0,
    )
    batcher.start()
    try:
        seqs = [[5 + (i + j) % 40 for j in range(length)] for i in range(6)]
        await asyncio.gather(*(batcher.submit([s]) for s in seqs))
    finally:
        await batcher.close()
    sizes = [batch for batch, _ in fake_runtime.calls]
    assert sum(sizes) == 6 and max(sizes) == 2, sizes


@pytest.mark.asyncio
async def test_input_that_cannot_fit_in_memory_is_refused_or_truncated(
    toy_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(toy_bundle, bundle)
    manifest = load_manifest(bundle)
    manifest.model_copy(update={"shape": GTE_7B}).write(bundle)  # the manifest itself is not hashed
    budget = 5 * 2**20  # the 7B's activations for ~15 tokens
    cap = CostModel(max_batch_tokens=1, max_batch_memory_bytes=budget, shape=GTE_7B).max_single_input(
        manifest.max_input_tokens
    )
    assert 2 < cap < manifest.max_input_tokens
    words = " ".join(["one two three four five six seven eight nine ten"] * 3)  # 30 content tokens
    async with serving(bundle, max_batch_memory_bytes=budget) as h:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Embed(pb.EmbedRequest(inputs=[words], truncation=pb.TRUNCATION_NONE))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{cap}" in (err.value.details() or "")
        cut = await h.stub.Embed(pb.EmbedRequest(inputs=[words], truncation=pb.TRUNCATION_END))
        info = await h.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert cut.embeddings[0].token_count == cap
    assert cut.embeddings[0].dropped_tokens == 30 + 2 - cap
    assert info.max_input_tokens == cap
