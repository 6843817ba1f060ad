"""Credential files without a running stack: certificate checks, and SIGHUP in a real process."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from http_pki import Pki
from http_stack import KEY, OLD_KEY
from test_http_e2e import Server

from service.tls import TlsConfigError, TlsFiles, load, not_after

TIMEOUT_S = 30.0


def replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def test_expired_and_unreadable_certificates_are_refused(tmp_path: Path, pki: Pki) -> None:
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
        load(TlsFiles(pki.server.cert, pki.server.key, tmp_path / "empty-ca.pem"))
    assert info.value.path == tmp_path / "empty-ca.pem"


def _http_status(url: str, key: str) -> int:
    request = urllib.request.Request(
        f"{url}/v1/embeddings",
        data=json.dumps({"input": "a"}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_sighup_reloads_keys_in_a_real_process(tiny_qwen2_bundle: Path, tmp_path: Path) -> None:
    """``embed-serve`` with polling off: only SIGHUP reloads, and a bad file keeps the old keys."""
    keys = tmp_path / "api-keys"
    keys.write_text(f"{OLD_KEY}\n")
    server = Server(
        [
            *("--model-dir", str(tiny_qwen2_bundle), "--port", "0", "--http-port", "0"),
            *("--api-keys-file", str(keys), "--credentials-poll-interval-s", "0", "--log-format", "json"),
        ]
    )
    try:
        url = server.wait_for(r"^HTTP API listening")["url"]
        server.wait_for(r"^ready")
        assert _http_status(url, OLD_KEY) == 200
        replace(keys, f"{KEY}\n".encode())
        assert _http_status(url, OLD_KEY) == 200  # no polling: not yet
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"^API keys reloaded")
        assert (_http_status(url, OLD_KEY), _http_status(url, KEY)) == (401, 200)
        replace(keys, b"\n")
        server.proc.send_signal(signal.SIGHUP)
        failed = server.wait_for(r"not reloaded")
        assert str(keys) in failed["msg"] and failed["level"].lower() == "error"
        assert _http_status(url, KEY) == 200
    finally:
        assert server.stop() == 0
    assert not any(KEY in line or OLD_KEY in line for line in server.lines)
