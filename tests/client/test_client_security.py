"""TLS (server-verified and mutual), API keys, and W3C trace context in the call's metadata."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from client_support import toy_truth
from http_pki import Pki
from http_stack import KEY
from opentelemetry import context, trace
from rel_harness import Live, ThreadedServer

from embedding_client import EmbeddingClient, TLSConfig, Unauthenticated, Unavailable
from embedding_client._wire import trace_metadata
from service.pb.embedding.v1 import embedding_pb2 as pb


@pytest.fixture(scope="module")
def secure(client_bundle: Path, client_pki: Pki, client_keys_file: Path) -> Iterator[Live]:
    """TLS + API keys + client certificates required (mTLS)."""
    with ThreadedServer(
        client_bundle,
        api_keys_file=client_keys_file,
        tls_cert_file=client_pki.server.cert,
        tls_key_file=client_pki.server.key,
        tls_client_ca_file=client_pki.ca,
    ) as live:
        yield live


def _mtls(pki: Pki) -> TLSConfig:
    return TLSConfig(ca=pki.ca, cert=pki.client.cert, key=pki.client.key, server_name="localhost")


def test_mtls_and_api_key_embed(secure: Live, client_pki: Pki) -> None:
    with EmbeddingClient(secure.grpc_target, tls=_mtls(client_pki), api_key=KEY) as client:
        assert client.health() == "SERVING"
        vectors = client.embed(["w1 w2 w3"])
    np.testing.assert_allclose(vectors, toy_truth(["w1 w2 w3"]), atol=1e-5)


def test_missing_or_wrong_key_is_unauthenticated_not_retried(secure: Live, client_pki: Pki) -> None:
    for key in (None, "sk-wrong"):
        client = EmbeddingClient(secure.grpc_target, tls=_mtls(client_pki), api_key=key, timeout=60)
        with client, pytest.raises(Unauthenticated) as refused:
            client.embed(["w1"])
        assert refused.value.status == grpc.StatusCode.UNAUTHENTICATED


def test_untrusted_server_certificate_is_unavailable(secure: Live, client_pki: Pki) -> None:
    wrong_ca = TLSConfig(
        ca=client_pki.other_ca,
        cert=client_pki.client.cert,
        key=client_pki.client.key,
        server_name="localhost",
    )
    client = EmbeddingClient(secure.grpc_target, tls=wrong_ca, api_key=KEY, timeout=30)
    with client, pytest.raises(Unavailable):
        client.embed(["w1"])


def test_tls_config_needs_cert_and_key_together(client_pki: Pki) -> None:
    with pytest.raises(ValueError, match="cert and key"):
        EmbeddingClient("127.0.0.1:1", tls=TLSConfig(ca=client_pki.ca, cert=client_pki.client.cert))


# --- trace context ---------------------------------------------------------------------------------
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Recorder(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A stand-in server that records each call's metadata and answers GetModelInfo."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def service(self, details: Any) -> Any:
        def answer(request: bytes, ctx: Any) -> bytes:
            self.seen.append({k: v for k, v in ctx.invocation_metadata() if isinstance(v, str)})
            info = pb.GetModelInfoResponse(
                model="m", dimensions=4, limits=pb.Limits(max_inputs_per_request=8)
            )
            return info.SerializeToString()

        return grpc.unary_unary_rpc_method_handler(answer)


def test_traceparent_of_the_current_span_is_sent() -> None:
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[recorder])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with EmbeddingClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.model_info()  # no active span: nothing extra
            span = trace.NonRecordingSpan(
                trace.SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=trace.TraceFlags(1))
            )
            token = context.attach(trace.set_span_in_context(span))
            try:
                assert dict(trace_metadata())["traceparent"] == TRACEPARENT
                client.model_info(refresh=True)
            finally:
                context.detach(token)
    finally:
        server.stop(0)
    assert "traceparent" not in recorder.seen[0]
    assert recorder.seen[1]["traceparent"] == TRACEPARENT
