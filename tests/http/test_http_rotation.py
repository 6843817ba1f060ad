"""Credential rotation on a real server: keys file and TLS files replaced while it serves.

The stack polls every ``POLL_S``; each test waits (generously, never on speed) until the server
has picked the change up, then checks old and new material on fresh calls and connections, and
that a stream or connection opened before the change carries on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
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
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from http_pki import Pki, make_pki
from http_stack import KEY, OLD_KEY, Stack, stack_settings, start_stack

from service.pb.embedding.v1 import embedding_pb2 as pb
from service.tls import TlsConfigError, TlsFiles, load, not_after

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


def _expired_pair(directory: Path) -> TlsFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (directory / "expired.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "expired.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return TlsFiles(directory / "expired.pem", directory / "expired.key")


async def test_expired_and_unreadable_certificates_are_refused(tmp_path: Path, creds: Creds) -> None:
    files = _expired_pair(tmp_path)
    assert not_after(files.cert.read_bytes()) < dt.datetime.now(dt.timezone.utc)
    with pytest.raises(TlsConfigError, match="expired") as info:
        load(files)
    assert info.value.path == files.cert
    with pytest.raises(TlsConfigError) as info:
        load(TlsFiles(tmp_path / "absent.pem", files.key))
    assert info.value.path == tmp_path / "absent.pem"
    (tmp_path / "empty-ca.pem").write_text("")
    with pytest.raises(TlsConfigError) as info:
        load(TlsFiles(creds.first.server.cert, creds.first.server.key, tmp_path / "empty-ca.pem"))
    assert info.value.path == tmp_path / "empty-ca.pem"
