"""files/grpc-health-check.py (the TLS exec probe and the image's HEALTHCHECK) against a real
grpc.health.v1 server: plaintext, TLS and mTLS."""

from __future__ import annotations

import datetime
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from chartlib import CHART
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

pytestmark = pytest.mark.chart

SCRIPT = CHART / "files" / "grpc-health-check.py"
SERVICE = "embedding.v1.EmbeddingService"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grpc_health_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = _load()


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _issue(tmp: Path, name: str, ca_key, ca_name, *, ca: bool = False, san: str | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    cert = builder.sign(ca_key or key, hashes.SHA256())
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return key, subject, cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    ca_key, ca_name, ca_cert, _ = _issue(tmp, "ca", None, None, ca=True)
    _, _, server_cert, server_key = _issue(tmp, "server", ca_key, ca_name, san="embed.test")
    _, _, client_cert, client_key = _issue(tmp, "client", ca_key, ca_name, san="client.test")
    return Pki(ca_cert, server_cert, server_key, client_cert, client_key)


def _serve(credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    return server, port


@pytest.fixture(scope="module")
def plain() -> Iterator[int]:
    server, port = _serve(None)
    yield port
    server.stop(None)


@pytest.fixture(scope="module")
def mtls(pki: Pki) -> Iterator[int]:
    creds = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    server, port = _serve(creds)
    yield port
    server.stop(None)


def test_plaintext_serving_and_not_serving(plain: int) -> None:
    assert probe.main([f"--addr=127.0.0.1:{plain}"]) == 0
    assert probe.main([f"--addr=127.0.0.1:{plain}", f"--service={SERVICE}"]) == 1
    assert probe.main([f"--addr=127.0.0.1:{plain}", "--service=no.such.Service"]) == 1


def test_unreachable_server_fails_fast(plain: int) -> None:
    server, port = _serve(None)
    server.stop(None)
    assert probe.main([f"--addr=127.0.0.1:{port}", "--timeout=1"]) == 1


def test_mtls(pki: Pki, mtls: int) -> None:
    base = [
        f"--addr=127.0.0.1:{mtls}",
        "--tls",
        f"--ca-file={pki.ca}",
        "--server-name=embed.test",
        "--timeout=2",
    ]
    client = [f"--cert-file={pki.client_cert}", f"--key-file={pki.client_key}"]
    assert probe.main(base + client) == 0
    assert probe.main([*base, *client, f"--service={SERVICE}"]) == 1
    assert probe.main(base) == 1, "mTLS server accepted a client without a certificate"
    wrong_name = [a if not a.startswith("--server-name") else "--server-name=other.test" for a in base]
    assert probe.main(wrong_name + client) == 1


def test_runs_as_a_script(plain: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), f"--addr=127.0.0.1:{plain}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "SERVING" in proc.stdout
