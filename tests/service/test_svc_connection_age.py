"""max_connection_age_s: connections are recycled (so round_robin clients rebalance) without errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from svc_harness import serving

from service.pb.embedding.v1 import embedding_pb2 as pb
from service.server import _server_options
from service.settings import Settings


def test_options_only_when_set(tmp_path: Path) -> None:
    plain = dict(_server_options(Settings(model_dir=tmp_path)))
    assert "grpc.max_connection_age_ms" not in plain
    aged = dict(_server_options(Settings(model_dir=tmp_path, max_connection_age_s=1.5)))
    assert aged["grpc.max_connection_age_ms"] == 1500
    assert aged["grpc.max_connection_age_grace_ms"] == 1500


@pytest.mark.asyncio
async def test_calls_keep_working_across_connection_recycling(toy_bundle: Path) -> None:
    async with serving(toy_bundle, max_connection_age_s=0.3) as h:
        for _ in range(8):  # spans several connection lifetimes
            reply = await h.stub.Embed(pb.EmbedRequest(inputs=["hello world"]), timeout=10)
            assert len(reply.embeddings) == 1
            await asyncio.sleep(0.15)
