"""Unit tests (no model, no server) for the API keys, TLS, metrics and log modules."""

from __future__ import annotations

import io
import json
import logging
import ssl
from pathlib import Path

import pytest
from http_pki import make_pki
from prometheus_client.parser import text_string_to_metric_families

from service.auth import ApiKeyError, ApiKeys, bearer_token
from service.logs import JsonFormatter, RedactFilter, TextFormatter, configure_logging, log_request
from service.metrics import Metrics
from service.settings import Settings
from service.tls import TlsConfigError, TlsFiles, grpc_server_credentials, http_ssl_context


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --- API keys ---------------------------------------------------------------------------------


def test_keys_file_several_keys_comments_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# rotation: old key first\nold-key\n\n  new-key  \n")
    keys = ApiKeys.from_file(f)
    assert keys.enabled and len(keys) == 2
    assert keys.accepts("old-key") and keys.accepts("new-key")
    assert not keys.accepts("new-ke") and not keys.accepts("new-key2") and not keys.accepts(None)
    assert not keys.accepts("# rotation: old key first")
    assert "old-key" not in repr(keys) and "new-key" not in repr(keys)


def test_no_keys_file_means_open() -> None:
    keys = ApiKeys.from_file(None)
    assert not keys.enabled
    assert keys.accepts(None) and keys.accepts_headers([]) and keys.accepts_headers(["a", "b"])


def test_empty_or_missing_keys_file_fails_closed_without_showing_content(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ApiKeyError, match="holds no key"):
        ApiKeys.from_file(empty)
    with pytest.raises(ApiKeyError, match="cannot read"):
        ApiKeys.from_file(tmp_path / "absent")
    spaced = tmp_path / "spaced"
    spaced.write_text("secret part\n")
    with pytest.raises(ApiKeyError) as info:
        ApiKeys.from_file(spaced)
    assert "secret" not in str(info.value).replace(str(spaced), "")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        (None, None),
        ("", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_header_check() -> None:
    keys = ApiKeys(["k1"])
    assert keys.accepts_headers(["Bearer k1"]) and keys.accepts_headers(["  bearer   k1  "])
    assert (
        not keys.accepts_headers(["k1"])
        and not keys.accepts_headers(["Bearer k2"])
        and not keys.accepts_headers([])
    )


def test_two_authorization_headers_are_refused_even_if_one_is_valid() -> None:
    keys = ApiKeys(["k1"])
    assert not keys.accepts_headers(["Bearer k1", "Bearer k1"])
    assert not keys.accepts_headers(["Bearer k1", "Bearer k2"])


def test_non_utf8_key_is_a_wrong_key_not_an_error() -> None:
    """aiohttp decodes header bytes with surrogateescape: such a value must compare, not raise."""
    keys = ApiKeys(["k1"])
    assert not keys.accepts_headers([b"Bearer \xff\xfe".decode("utf-8", "surrogateescape")])
    assert not keys.accepts_headers(["Bearer \ud800"]) and not keys.accepts_headers(["Bearer ключ"])


# --- TLS ----------------------------------------------------------------------------------------


def test_tls_off_unless_configured(tmp_path: Path) -> None:
    assert TlsFiles.from_settings(Settings()) is None
    pki = make_pki(tmp_path)
    files = TlsFiles.from_settings(Settings(tls_cert_file=pki.server.cert, tls_key_file=pki.server.key))
    assert files is not None and not files.mutual
    assert http_ssl_context(files).verify_mode == ssl.CERT_NONE
    assert grpc_server_credentials(files) is not None


def test_mtls_context_requires_client_certs(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    files = TlsFiles(pki.server.cert, pki.server.key, pki.ca)
    assert files.mutual
    assert http_ssl_context(files).verify_mode == ssl.CERT_REQUIRED


def test_tls_errors_name_the_file_not_the_key(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with pytest.raises(TlsConfigError, match=r"absent\.pem"):
        grpc_server_credentials(TlsFiles(tmp_path / "absent.pem", pki.server.key))
    # A key that does not belong to the certificate.
    with pytest.raises(TlsConfigError, match="cannot load TLS certificate") as info:
        http_ssl_context(TlsFiles(pki.server.cert, pki.client.key))
    assert "PRIVATE KEY" not in str(info.value)


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_names_prefixed_and_values_move() -> None:
    m = Metrics()
    m.observe_request("http", "embeddings", "200", 0.01, tokens=7)
    m.observe_request("grpc", "Embed", "INVALID_ARGUMENT", 0.002)
    m.observe_stages(0.001, 0.002, 0.003)
    m.observe_batch(size=4, real_tokens=30, padded_tokens=40)
    m.observe_truncated(2)
    m.bind_queue(lambda: 3, lambda: 120)
    m.set_self_test(True)
    m.set_providers(["CPUExecutionProvider"])
    m.set_ready(True)
    s = _samples(m)
    assert all(name.startswith("embed_") for name, _ in s)
    assert s[("embed_requests_total", (("api", "http"), ("code", "200"), ("method", "embeddings")))] == 1
    assert (
        s[("embed_requests_total", (("api", "grpc"), ("code", "INVALID_ARGUMENT"), ("method", "Embed")))] == 1
    )
    assert s[("embed_input_tokens_total", (("api", "http"),))] == 7
    assert s[("embed_batch_size_count", ())] == 1 and s[("embed_batch_size_sum", ())] == 4
    assert s[("embed_padded_token_ratio_sum", ())] == pytest.approx(0.25)
    assert s[("embed_inputs_truncated_total", ())] == 2
    assert s[("embed_queue_depth", ())] == 3 and s[("embed_queue_tokens", ())] == 120
    assert s[("embed_self_test_status", ())] == 1
    assert s[("embed_execution_provider", (("provider", "CPUExecutionProvider"),))] == 1
    for stage in ("queue", "tokenize", "inference"):
        assert s[(f"embed_{stage}_duration_seconds_count", ())] == 1


def test_two_metrics_instances_do_not_collide() -> None:
    Metrics().observe_truncated(1)
    assert _samples(Metrics())[("embed_inputs_truncated_total", ())] == 0


# --- logs ---------------------------------------------------------------------------------------


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "t", "levelname": "INFO", "levelno": 20, "msg": msg})
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_json_formatter_one_object_per_line_with_fields() -> None:
    line = JsonFormatter().format(_record("request", request_id="r1", status="200", inputs=2))
    assert "\n" not in line
    obj = json.loads(line)
    assert (
        obj["msg"] == "request"
        and obj["request_id"] == "r1"
        and obj["inputs"] == 2
        and obj["level"] == "info"
    )


def test_text_formatter_has_fields() -> None:
    assert "request_id=r1" in TextFormatter().format(_record("request", request_id="r1"))


def test_redact_filter_scrubs_secrets() -> None:
    record = _record("token was sk-secret-1", header="Bearer sk-secret-1")
    assert RedactFilter(["sk-secret-1"]).filter(record)
    assert "sk-secret-1" not in record.getMessage() and "sk-secret-1" not in record.header  # type: ignore[attr-defined]


def test_configure_logging_level_format_and_access_line() -> None:
    stream = io.StringIO()
    handler = configure_logging(Settings(log_level="warning"), secrets=["k"], stream=stream)
    try:
        logging.getLogger("service.x").info("hidden")
        assert stream.getvalue() == ""
        configure_logging(Settings(log_level="info"), stream=stream)
        log_request(
            api="http", method="embeddings", request_id="abc", status=200, inputs=3, tokens=9, latency_s=0.5
        )
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert len(lines) == 1
        assert lines[0] | {"ts": None} == {
            "ts": None,
            "level": "info",
            "logger": "service.access",
            "msg": "request",
            "request_id": "abc",
            "api": "http",
            "method": "embeddings",
            "status": "200",
            "inputs": 3,
            "tokens": 9,
            "latency_ms": 500.0,
        }
    finally:
        logging.getLogger().removeHandler(handler)
        for h in list(logging.getLogger().handlers):
            if h.get_name() == "embed-service":
                logging.getLogger().removeHandler(h)
