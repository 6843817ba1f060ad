"""Structured logs: one JSON object per line (or plain text), and one access line per request.

Why our own small formatter rather than a logging dependency: the fields are few and fixed
(request id, api, method, status, input count, token count, latency), log shippers parse one
JSON object per line, and ``extra={...}`` on the standard ``logging`` API is all the call sites
need. Secrets never reach a record: keys are not passed to loggers, and :class:`RedactFilter`
scrubs any configured key from a rendered message as a second line of defence.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any, TextIO

from service.settings import Settings

ACCESS_LOGGER = "service.access"
access_logger = logging.getLogger(ACCESS_LOGGER)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_REDACTED = "[redacted]"
_HANDLER_NAME = "embed-service"


# A client-chosen request id is echoed in replies and written into every log line of its request,
# so it must be short and harmless in any log format or header: both front ends apply this rule.
REQUEST_ID_MAX_CHARS = 64
REQUEST_ID_CHARS = "A-Z a-z 0-9 . _ : -"
_SAFE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{REQUEST_ID_MAX_CHARS}}}")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def is_safe_request_id(value: str) -> bool:
    """True for 1-64 characters of ``A-Z a-z 0-9 . _ : -`` (what a client may choose)."""
    return _SAFE_REQUEST_ID.fullmatch(value) is not None


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra fields, "exc"}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable: ``time level logger msg key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        return f"{base} {extra}" if extra else base


class RedactFilter(logging.Filter):
    """Replaces any configured secret found in a record's message or fields with ``[redacted]``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        clean = self._scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        for key, value in _fields(record).items():
            if isinstance(value, str):
                setattr(record, key, self._scrub(value))
        return True

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text


def configure_logging(
    settings: Settings, secrets: Iterable[str] = (), stream: TextIO | None = None
) -> logging.Handler:
    """Install one root handler with the configured format, level and redaction; returns it.

    Called once from the entry point; replaces handlers a previous call installed, so tests
    and repeated starts do not duplicate lines.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(RedactFilter(secrets))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # aiohttp's own access log would duplicate ours, without the fields.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler


def add_redaction(secrets: Iterable[str]) -> None:
    """Scrub ``secrets`` on the handler :func:`configure_logging` installed (keys load later)."""
    secrets = tuple(secrets)
    if not secrets:
        return
    for handler in logging.getLogger().handlers:
        if handler.get_name() == _HANDLER_NAME:
            handler.addFilter(RedactFilter(secrets))


def log_request(
    *,
    api: str,
    method: str,
    request_id: str,
    status: str | int,
    inputs: int,
    tokens: int,
    latency_s: float,
    error: str | None = None,
) -> None:
    """The one access line per request, with the same fields for gRPC and HTTP."""
    fields: dict[str, Any] = {
        "request_id": request_id,
        "api": api,
        "method": method,
        "status": str(status),
        "inputs": inputs,
        "tokens": tokens,
        "latency_ms": round(latency_s * 1000.0, 3),
    }
    if error:
        fields["error"] = error
    access_logger.info("request", extra=fields)
