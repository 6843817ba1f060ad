"""TLS and mTLS for both front ends, from the same three PEM files.

Why one module: gRPC (``grpc.ssl_server_credentials``) and HTTP (``ssl.SSLContext``) take the
same certificate, key and client CA in different shapes; building both here keeps the two ports
on one policy. Setting ``tls_client_ca_file`` turns on mTLS: a client certificate signed by that
CA is *required* on both ports. Files are read once at start-up (reload on restart is enough).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.settings import Settings


class TlsConfigError(Exception):
    """A TLS file is missing or unusable; names the file, never key material."""


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
        raise TlsConfigError(f"cannot read TLS {what} {path}: {exc.strerror or type(exc).__name__}") from None


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``; with a client CA, client certs are required."""
    cert, key = _read(files.cert, "certificate"), _read(files.key, "key")
    ca = _read(files.client_ca, "client CA") if files.client_ca is not None else None
    # Catch a wrong path or a key/cert mismatch here with a clear message; grpc only logs it
    # from its C core and then fails to bind.
    http_ssl_context(files)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def http_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """Server-side context for aiohttp: TLS 1.2+, and CERT_REQUIRED when mTLS is on."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"cannot load TLS certificate {files.cert} with key {files.key}: {type(exc).__name__}"
        ) from None
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(files.client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(
                f"cannot load TLS client CA {files.client_ca}: {type(exc).__name__}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
