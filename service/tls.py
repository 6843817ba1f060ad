"""TLS and mTLS for both front ends, from the same three PEM files.

Why one module: gRPC (``grpc.ssl_server_credentials``) and HTTP (``ssl.SSLContext``) take the
same certificate, key and client CA in different shapes; building both here keeps the two ports
on one policy. Setting ``tls_client_ca_file`` turns on mTLS: a client certificate signed by that
CA is *required* on both ports. :class:`TlsMaterial` holds the current material and swaps it on
:meth:`TlsMaterial.reload` (service/credentials.py decides when): gRPC through grpc's dynamic
credentials (its fetcher is asked before every handshake), HTTP through the SNI callback of the
listening context, which hands each new handshake the newest context. Connections already open
keep the material they shook hands with.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.settings import Settings


class TlsConfigError(Exception):
    """A TLS file is missing or unusable; names the file, never key material."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsFiles | None:
        """``None`` when TLS is off (settings already check cert and key come together)."""
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        return cls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(
            f"cannot read TLS {what} {path}: {exc.strerror or type(exc).__name__}", path
        ) from None


def http_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """Server-side context for aiohttp: TLS 1.2+, and CERT_REQUIRED when mTLS is on."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"cannot load TLS certificate {files.cert} with key {files.key}: {type(exc).__name__}",
            files.cert,
        ) from None
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(files.client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(
                f"cannot load TLS client CA {files.client_ca}: {type(exc).__name__}", files.client_ca
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """One DER element at ``pos``: (tag, content start, content end)."""
    tag, length = der[pos], der[pos + 1]
    start = pos + 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[start : start + size], "big")
        start += size
    if start + length > len(der):
        raise ValueError("truncated DER")
    return tag, start, start + length


def not_after(pem: bytes) -> dt.datetime:
    """The end of the first certificate's validity (the leaf of a chain).

    A few lines of DER rather than a dependency: the ``ssl`` module only decodes certificates
    of a live connection, and ``cryptography`` is a test-only dependency here.
    """
    text = pem.decode("ascii", "replace")
    begin = text.index("-----BEGIN CERTIFICATE-----") + len("-----BEGIN CERTIFICATE-----")
    der = base64.b64decode("".join(text[begin : text.index("-----END CERTIFICATE-----", begin)].split()))
    _, cert, _ = _tlv(der, 0)
    _, pos, _ = _tlv(der, cert)  # tbsCertificate
    if der[pos] == 0xA0:  # [0] version
        pos = _tlv(der, pos)[2]
    for _ in range(3):  # serialNumber, signature, issuer
        pos = _tlv(der, pos)[2]
    _, validity, _ = _tlv(der, pos)
    after = _tlv(der, _tlv(der, validity)[2])
    value = der[after[1] : after[2]].decode("ascii")
    fmt = "%y%m%d%H%M%SZ" if after[0] == 0x17 else "%Y%m%d%H%M%SZ"  # UTCTime / GeneralizedTime
    return dt.datetime.strptime(value, fmt).replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class _Loaded:
    context: ssl.SSLContext
    grpc_config: grpc.ServerCertificateConfiguration
    digest: str  # of the three files' bytes, to tell a change from a re-read


def load(files: TlsFiles) -> _Loaded:
    """Read and check all TLS files as one unit.

    Raises:
        TlsConfigError: a file is unreadable, the key does not match the certificate, the CA is
            unusable, the certificate has expired, or a file changed while it was being read.
    """
    paths = [files.cert, files.key, *([files.client_ca] if files.client_ca is not None else [])]
    before = [
        _read(path, what) for path, what in zip(paths, ("certificate", "key", "client CA"), strict=False)
    ]
    try:
        expires = not_after(before[0])
    except (ValueError, IndexError, binascii.Error) as exc:
        raise TlsConfigError(
            f"cannot parse TLS certificate {files.cert}: {type(exc).__name__}", files.cert
        ) from None
    if expires <= dt.datetime.now(dt.timezone.utc):
        raise TlsConfigError(f"TLS certificate {files.cert} expired at {expires.isoformat()}", files.cert)
    context = http_ssl_context(files)
    if [_read(path, "file") for path in paths] != before:  # replaced between the two reads
        raise TlsConfigError(f"TLS files changed while being read ({files.cert}); retrying later", files.cert)
    config = grpc.ssl_server_certificate_configuration(
        [(before[1], before[0])], root_certificates=before[2] if files.client_ca is not None else None
    )
    return _Loaded(context, config, hashlib.sha256(b"\0".join(before)).hexdigest())


class TlsMaterial:
    """The current certificate, key and client CA for both ports, swapped whole on reload."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()  # grpc calls the fetcher from its own threads
        self._current = load(files)
        self._version = 0

    def reload(self) -> bool:
        """Load the files again; True when the material changed. Raises TlsConfigError (old kept)."""
        loaded = load(self.files)
        with self._lock:
            if loaded.digest == self._current.digest:
                return False
            self._current = loaded
            self._version += 1
        return True

    def http_context(self) -> ssl.SSLContext:
        """The context to listen with: each new handshake switches to the newest material."""
        base = self._current.context

        def newest(conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext) -> None:
            current = self._current.context
            if current is not ctx:
                conn.context = current

        base.sni_callback = newest
        return base

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Dynamic credentials: grpc asks ``fetch`` before each handshake for newer material."""
        seen = self._version

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal seen
            with self._lock:
                if self._version == seen:
                    return None  # no change: keep the current configuration
                seen = self._version
                return self._current.grpc_config

        fetcher: Callable[[], grpc.ServerCertificateConfiguration | None] = fetch
        return grpc.dynamic_ssl_server_credentials(
            self._current.grpc_config, fetcher, require_client_authentication=self.files.mutual
        )


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``; with a client CA, client certs are required."""
    return TlsMaterial(files).grpc_credentials()
