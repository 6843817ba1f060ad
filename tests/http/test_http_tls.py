"""TLS and mTLS handshakes on the gRPC, HTTP and metrics ports, with certificates made in the test.

Handshakes do not need a loaded model (health answers NOT_SERVING over TLS just as well), so the
TLS-only stack is never warmed; the mTLS stack is, to run one real embed through each front end.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from http_pki import Pair, Pki
from http_stack import KEY, Stack, stack_settings, start_stack

from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT_S = 5.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls_stack(tiny_qwen2_bundle: Path, pki: Pki) -> AsyncIterator[Stack]:
    settings = stack_settings(
        tiny_qwen2_bundle, tls_cert_file=pki.server.cert, tls_key_file=pki.server.key, metrics_port=0
    )
    s = await start_stack(settings, warm=False)
    yield s
    await s.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mtls_stack(tiny_qwen2_bundle: Path, pki: Pki, keys_file: Path) -> AsyncIterator[Stack]:
    settings = stack_settings(
        tiny_qwen2_bundle,
        keys_file,
        tls_cert_file=pki.server.cert,
        tls_key_file=pki.server.key,
        tls_client_ca_file=pki.ca,
    )
    s = await start_stack(settings)
    yield s
    await s.stop()


def grpc_creds(ca: Path, client: Pair | None = None) -> grpc.ChannelCredentials:
    cert, key = client.read() if client else (None, None)
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key, certificate_chain=cert
    )


def http_ssl(ca: Path, client: Pair | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


async def grpc_health(stack: Stack, credentials: grpc.ChannelCredentials | None) -> int:
    async with stack.channel(credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
        )
    return int(reply.status)


async def http_health(url: str, context: ssl.SSLContext | bool) -> int:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{url}/health", ssl=context) as r,
    ):
        return r.status


HANDSHAKE_FAILED = (aiohttp.ClientError, ssl.SSLError, ConnectionError)


# --- TLS (server certificate only) ---------------------------------------------------------------


async def test_tls_valid_ca_connects(tls_stack: Stack, pki: Pki) -> None:
    assert await grpc_health(tls_stack, grpc_creds(pki.ca)) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await http_health(tls_stack.url, http_ssl(pki.ca)) == 503  # reached the app: not warmed


async def test_tls_wrong_ca_is_refused(tls_stack: Stack, pki: Pki) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_health(tls_stack, grpc_creds(pki.other_ca))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await http_health(tls_stack.url, http_ssl(pki.other_ca))


async def test_tls_ports_refuse_plaintext(tls_stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_health(tls_stack, None)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(HANDSHAKE_FAILED):
        await http_health(tls_stack.url.replace("https://", "http://"), False)


async def test_metrics_port_serves_only_metrics_over_tls(tls_stack: Stack, pki: Pki) -> None:
    base = f"https://127.0.0.1:{tls_stack.http.metrics_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/metrics", ssl=http_ssl(pki.ca)) as r:
            assert r.status == 200 and "embed_requests_total" in await r.text()
        async with session.get(f"{base}/v1/models", ssl=http_ssl(pki.ca)) as r:
            assert r.status == 404


# --- mTLS (client certificate required) ----------------------------------------------------------


async def test_mtls_with_client_cert_embeds_on_both_apis(mtls_stack: Stack, pki: Pki) -> None:
    async with mtls_stack.channel(grpc_creds(pki.ca, pki.client)) as channel:
        response = await mtls_stack.stub(channel).Embed(
            pb.EmbedRequest(inputs=["over mtls"], encoding=pb.ENCODING_VALUES),
            metadata=(("authorization", f"Bearer {KEY}"),),
            timeout=TIMEOUT_S,
        )
    http_client = openai.DefaultAsyncHttpxClient(verify=http_ssl(pki.ca, pki.client))
    async with openai.AsyncOpenAI(
        base_url=f"{mtls_stack.url}/v1", api_key=KEY, max_retries=0, http_client=http_client
    ) as client:
        result = await client.embeddings.create(
            model="tiny-gte-qwen2", input=["over mtls"], encoding_format="float"
        )
    assert result.data[0].embedding == pytest.approx(list(response.embeddings[0].values), abs=0)


@pytest.mark.parametrize("client_cert", ["none", "stranger"])
async def test_mtls_refuses_missing_or_foreign_client_cert(
    mtls_stack: Stack, pki: Pki, client_cert: str
) -> None:
    pair = None if client_cert == "none" else pki.stranger
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_health(mtls_stack, grpc_creds(pki.ca, pair))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(HANDSHAKE_FAILED):
        await http_health(mtls_stack.url, http_ssl(pki.ca, pair))


async def test_mtls_health_is_open_but_only_to_trusted_clients(mtls_stack: Stack, pki: Pki) -> None:
    assert (
        await grpc_health(mtls_stack, grpc_creds(pki.ca, pki.client))
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert await http_health(mtls_stack.url, http_ssl(pki.ca, pki.client)) == 200
