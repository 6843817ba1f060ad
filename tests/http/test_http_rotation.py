"""Credential rotation on a real server: keys file and TLS files replaced while it serves.

The stack polls every ``POLL_S``; each test waits (generously, never on speed) until the server
has picked the change up, then checks old and new material on fresh calls and connections, and
that a stream or connection opened before the change carries on.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from http_pki import Pair, Pki, make_pki
from http_stack import KEY, OLD_KEY, Stack, stack_settings, start_stack

from service.pb.embedding.v1 import embedding_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

POLL_S = 0.2
WAIT_S = 60.0  # how long a test waits for the server to notice a change (load, not speed)
TIMEOUT_S = 30.0


def replace(path: Path, data: bytes) -> None:
    """Write-then-rename, as a Secret update or a careful operator does."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(POLL_S / 2)
    raise AssertionError(f"not within {WAIT_S} s: {what}")


def metric(stack: Stack, name: str, **labels: str) -> float:
    value = stack.edge.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@dataclass
class Creds:
    dir: Path
    keys: Path
    first: Pki
    second: Pki  # another CA and server certificate: the rotation target
    trust: Path  # both CAs, so a client can connect before and after

    @property
    def cert(self) -> Path:
        return self.dir / "tls.crt"

    @property
    def key(self) -> Path:
        return self.dir / "tls.key"


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    base = tmp_path_factory.mktemp("rotation")
    first, second = make_pki(base / "first"), make_pki(base / "second")
    live = base / "live"
    live.mkdir()
    keys = live / "api-keys"
    keys.write_text(f"{OLD_KEY}\n")
    shutil.copy(first.server.cert, live / "tls.crt")
    shutil.copy(first.server.key, live / "tls.key")
    trust = base / "trust.pem"
    trust.write_bytes(first.ca.read_bytes() + second.ca.read_bytes())
    return Creds(live, keys, first, second, trust)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_qwen2_bundle: Path, creds: Creds) -> AsyncIterator[Stack]:
    settings = stack_settings(
        tiny_qwen2_bundle,
        creds.keys,
        tls_cert_file=creds.cert,
        tls_key_file=creds.key,
        credentials_poll_interval_s=POLL_S,
    )
    s = await start_stack(settings)
    s.edge.start_rotation()
    yield s
    await s.edge.stop_rotation()
    await s.stop()


def client_ssl(trust: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(trust))


def grpc_creds(trust: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=trust.read_bytes())


async def http_status(stack: Stack, trust: Path, key: str) -> int:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            f"{stack.url}/v1/embeddings",
            json={"input": "a"},
            headers={"Authorization": f"Bearer {key}"},
            ssl=client_ssl(trust),
        ) as r,
    ):
        return r.status


async def grpc_code(stack: Stack, trust: Path, key: str) -> grpc.StatusCode:
    async with stack.channel(grpc_creds(trust)) as channel:
        try:
            await stack.stub(channel).Embed(
                pb.EmbedRequest(inputs=["a"]),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def peer_fingerprint(port: int, trust: Path, alpn: str | None = None) -> str:
    """SHA-256 of the certificate a fresh TLS connection to ``port`` is shown."""
    context = client_ssl(trust)
    if alpn is not None:
        context.set_alpn_protocols([alpn])
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"), TIMEOUT_S
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return hashlib.sha256(der).hexdigest()


def fingerprint(pem: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.read_text())).hexdigest()


async def test_key_rotation_refuses_old_key_accepts_new_and_keeps_open_stream(
    stack: Stack, creds: Creds
) -> None:
    trust = creds.trust
    assert await http_status(stack, trust, OLD_KEY) == 200
    assert await http_status(stack, trust, KEY) == 401
    async with stack.channel(grpc_creds(trust)) as channel:
        stream = stack.stub(channel).EmbedStream(metadata=(("authorization", f"Bearer {OLD_KEY}"),))
        await stream.write(pb.EmbedRequest(inputs=["before"]))
        assert (await stream.read()).count == 1

        reloads = metric(stack, "embed_credentials_reloads_total", file=str(creds.keys))
        replace(creds.keys, f"# rotated\n{KEY}\n".encode())

        async def old_refused() -> bool:
            return await http_status(stack, trust, OLD_KEY) == 401

        await eventually(old_refused, "the old key is refused over HTTP")
        assert metric(stack, "embed_credentials_reloads_total", file=str(creds.keys)) == reloads + 1
        assert await http_status(stack, trust, KEY) == 200
        assert await grpc_code(stack, trust, OLD_KEY) == grpc.StatusCode.UNAUTHENTICATED
        assert await grpc_code(stack, trust, KEY) == grpc.StatusCode.OK

        # The stream was admitted under the old key: it carries on to its end.
        await stream.write(pb.EmbedRequest(inputs=["after", "rotation"]))
        assert (await stream.read()).count == 2
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK


async def test_invalid_keys_file_keeps_old_keys_and_is_counted(
    stack: Stack, creds: Creds, caplog: pytest.LogCaptureFixture
) -> None:
    trust = creds.trust
    good = creds.keys.read_bytes()
    key = KEY if KEY in good.decode() else OLD_KEY
    label = str(creds.keys)
    for bad in (b"# nothing but a comment\n", b"sk-x rpm=oops\n"):
        failures = metric(stack, "embed_credentials_reload_failures_total", file=label)
        replace(creds.keys, bad)

        async def counted(before: float = failures) -> bool:
            return metric(stack, "embed_credentials_reload_failures_total", file=label) > before

        await eventually(counted, "the bad keys file is counted")
        assert metric(stack, "embed_credentials_reload_failing", file=label) == 1
        assert await http_status(stack, trust, key) == 200  # the old keys still work
        assert await grpc_code(stack, trust, key) == grpc.StatusCode.OK
    assert any(label in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    replace(creds.keys, good)

    async def recovered() -> bool:
        return metric(stack, "embed_credentials_reload_failing", file=label) == 0

    await eventually(recovered, "the failing gauge clears once a good file arrives")


async def test_tls_rotation_serves_new_certificate_to_new_connections(stack: Stack, creds: Creds) -> None:
    old, new = fingerprint(creds.first.server.cert), fingerprint(creds.second.server.cert)
    port_http, port_grpc = stack.http.port, stack.grpc_port
    assert port_http is not None
    assert await peer_fingerprint(port_http, creds.trust) == old
    assert await peer_fingerprint(port_grpc, creds.trust, "h2") == old
    key = KEY if KEY in creds.keys.read_text() else OLD_KEY

    async with stack.channel(grpc_creds(creds.trust)) as before:  # a connection from before
        stub = stack.stub(before)
        auth = (("authorization", f"Bearer {key}"),)
        await stub.Embed(pb.EmbedRequest(inputs=["a"]), metadata=auth, timeout=TIMEOUT_S)

        # Key first, then certificate: between the two writes the pair does not match, and the
        # server must keep the old pair (counted) rather than serve a broken one.
        replace(creds.key, creds.second.server.key.read_bytes())

        async def mismatch_counted() -> bool:
            return metric(stack, "embed_credentials_reload_failures_total", file=str(creds.cert)) > 0

        await eventually(mismatch_counted, "the key/certificate mismatch is counted")
        assert await peer_fingerprint(port_http, creds.trust) == old
        replace(creds.cert, creds.second.server.cert.read_bytes())

        async def rotated() -> bool:
            return await peer_fingerprint(port_http, creds.trust) == new

        await eventually(rotated, "HTTP serves the new certificate")
        assert await peer_fingerprint(port_grpc, creds.trust, "h2") == new
        assert metric(stack, "embed_credentials_reload_failing", file=str(creds.cert)) == 0
        # Clients that trust only the new CA connect on both ports.
        assert await http_status(stack, creds.second.ca, key) == 200
        assert await grpc_code(stack, creds.second.ca, key) == grpc.StatusCode.OK
        # The connection from before still carries calls.
        await stub.Embed(pb.EmbedRequest(inputs=["b"]), metadata=auth, timeout=TIMEOUT_S)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mtls_stack(tiny_qwen2_bundle: Path, creds: Creds) -> AsyncIterator[Stack]:
    live = creds.dir.parent / "mtls"
    live.mkdir()
    ca = live / "client-ca.pem"
    shutil.copy(creds.first.ca, ca)
    settings = stack_settings(
        tiny_qwen2_bundle,
        tls_cert_file=creds.first.server.cert,
        tls_key_file=creds.first.server.key,
        tls_client_ca_file=ca,
        credentials_poll_interval_s=POLL_S,
    )
    s = await start_stack(settings)
    s.edge.start_rotation()
    yield s
    await s.edge.stop_rotation()
    await s.stop()


async def mtls_outcomes(stack: Stack, trust: Path, client: Pair) -> tuple[bool, bool]:
    """(HTTP, gRPC) health over fresh mTLS connections presenting ``client``."""
    context = client_ssl(trust)
    context.load_cert_chain(str(client.cert), str(client.key))
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session,
            session.get(f"{stack.url}/health", ssl=context) as r,
        ):
            http_ok = r.status == 200
    except (aiohttp.ClientError, ssl.SSLError, OSError):
        http_ok = False
    cert, key = client.read()
    creds = grpc.ssl_channel_credentials(trust.read_bytes(), private_key=key, certificate_chain=cert)
    async with stack.channel(creds) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
            )
            grpc_ok = True
        except grpc.aio.AioRpcError:
            grpc_ok = False
    return http_ok, grpc_ok


async def test_client_ca_rotation_applies_to_new_connections(mtls_stack: Stack, creds: Creds) -> None:
    ca = mtls_stack.settings.tls_client_ca_file
    assert ca is not None
    trust = creds.trust
    assert await mtls_outcomes(mtls_stack, trust, creds.first.client) == (True, True)
    assert await mtls_outcomes(mtls_stack, trust, creds.second.client) == (False, False)
    replace(ca, creds.second.ca.read_bytes())

    async def rotated() -> bool:
        return await mtls_outcomes(mtls_stack, trust, creds.second.client) == (True, True)

    await eventually(rotated, "clients of the new CA are accepted on both ports")
    assert await mtls_outcomes(mtls_stack, trust, creds.first.client) == (False, False)
