"""Connection lifetime: age recycling (round_robin rebalancing), idle close and keepalive, without errors."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
import pytest
from svc_harness import serving, wait_for

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


def test_keepalive_and_idle_options(tmp_path: Path) -> None:
    """Issue 12 item 11 (gRPC half): idle and half-open connections are bounded by default."""
    options = dict(_server_options(Settings(model_dir=tmp_path)))
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 20_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.http2.max_ping_strikes"] == 2
    unset = dict(_server_options(Settings(model_dir=tmp_path, max_connection_idle_s=None)))
    assert "grpc.max_connection_idle_ms" not in unset


@pytest.mark.asyncio
async def test_idle_connection_is_closed_and_calls_still_work(toy_bundle: Path) -> None:
    async with serving(toy_bundle, max_connection_idle_s=0.3) as h:
        await h.stub.Embed(pb.EmbedRequest(inputs=["hello world"]), timeout=10)
        # The server's GOAWAY after 0.3 s without a call moves the client's channel back to IDLE.
        await wait_for(lambda: h.channel.get_state() == grpc.ChannelConnectivity.IDLE)
        reply = await h.stub.Embed(pb.EmbedRequest(inputs=["hello world"]), timeout=10)
        assert len(reply.embeddings) == 1


# The HTTP/2 client preface, an empty SETTINGS frame, and the ACK of the server's SETTINGS.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def _half_open_peer_is_dropped(port: int, timeout_s: float) -> bool:
    """Connect like an HTTP/2 client, then never answer again (as a vanished peer would)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(PREFACE + SETTINGS_ACK)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):  # the server closed the connection
                    return True
            except TimeoutError:
                return False
            except ConnectionError:
                return True
        return False


@pytest.mark.asyncio
async def test_half_open_connection_is_closed_by_keepalive(toy_bundle: Path) -> None:
    async with serving(
        toy_bundle, max_connection_idle_s=None, keepalive_time_s=0.2, keepalive_timeout_s=0.3
    ) as h:
        assert await asyncio.to_thread(_half_open_peer_is_dropped, h.port, 15.0)
