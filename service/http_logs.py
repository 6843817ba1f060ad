"""aiohttp's own log records about requests it refused before the app ran.

Why: aiohttp's parser answers malformed bytes (a bad request line, a control character in a
header, a broken chunk size) with a 400 itself, then logs each one at *error* level with a
traceback that quotes the offending line. Those are a client's mistakes, as common on an open
port as scans are, so error level would page someone for nothing, and the quoted line can hold
whatever the client sent next to it (an ``Authorization`` header, for one). Found by the HTTP
fuzzer (bench/fuzz_http.py). The filter keeps one debug line naming the kind of error, no bytes.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

AIOHTTP_SERVER_LOGGER = "aiohttp.server"


class ParserRefusals(logging.Filter):
    """Turns aiohttp's "Error handling request" for a client's malformed bytes into a debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not 400 <= (exc.code or 400) < 500:
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = "malformed HTTP request refused by the parser: %s", (type(exc).__name__,)
        record.exc_info, record.exc_text = None, None
        return True


def quiet_parser_refusals() -> None:
    """Install :class:`ParserRefusals` on aiohttp's server logger (once)."""
    logger = logging.getLogger(AIOHTTP_SERVER_LOGGER)
    if not any(isinstance(f, ParserRefusals) for f in logger.filters):
        logger.addFilter(ParserRefusals())
