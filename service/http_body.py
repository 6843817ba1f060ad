"""Reading an HTTP request: its body into JSON (every way it can be malformed answered as a
4xx) and its deadline header.

Why aiohttp's own decompression is off (``auto_decompress=False`` in ``service.http``): it
answers an undecodable body with an exception the app sees as a bug (500), refuses ``br`` and
``zstd`` in plain text before the app runs, and has no cap on the decompressed size (a 16 MiB
gzip of zeros inflates to gigabytes). Here the accepted encodings are a short list, the output
is capped at the same byte limit as an uncompressed body, and the JSON nesting depth is bounded
before ``json.loads`` runs, so a client mistake of any shape ends in :class:`BodyRefused` or
``InvalidInput``, never in ``RecursionError`` or ``MemoryError``.
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import Sequence

import numpy as np
from aiohttp import web

from service.errors import InvalidInput

# What a client may send in Content-Encoding (RFC 9110 names; "x-gzip" is gzip's old alias).
ACCEPTED_ENCODINGS = ("identity", "gzip", "deflate")
_ALIASES = {"x-gzip": "gzip"}
# A valid request is at most 3 levels deep (object, list of lists, list); the margin is for
# clients that wrap things, and is still far below the parser's recursion limit.
MAX_JSON_DEPTH = 32
# Decoding, decompressing or scanning more than this on the event loop would stall other requests.
_OFFLOAD_BYTES = 1 << 20
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCAN_CHUNK = 1 << 20
# Seconds the client gives the server (like gRPC's deadline): work still queued when it passes is
# dropped, never computed, and the answer is 504.
TIMEOUT_HEADER = "X-Request-Timeout"
_MAX_TIMEOUT_S = 24 * 3600.0


class BodyRefused(Exception):
    """An HTTP-only refusal of the body (size, encoding, timeout) in OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def too_large(limit: int) -> BodyRefused:
    return BodyRefused(413, f"request body is too large (the limit is {limit} bytes)", "request_too_large")


def content_codings(headers: Sequence[str]) -> tuple[str, ...]:
    """The codings applied to the body, in the order applied; identity dropped.

    Raises:
        BodyRefused: 415 for a coding not in :data:`ACCEPTED_ENCODINGS`, or more than one
            compression stacked (each layer could multiply the work by the size cap).
    """
    names = [c.strip().lower() for value in headers for c in value.split(",")]
    codings = tuple(_ALIASES.get(c, c) for c in names if c and c != "identity")
    for coding in codings:
        if coding not in ACCEPTED_ENCODINGS:
            shown = coding if re.fullmatch(r"[a-z0-9._-]{1,32}", coding) else "that"
            raise BodyRefused(
                415,
                f"Content-Encoding '{shown}' is not supported; send {', '.join(ACCEPTED_ENCODINGS)}",
                "unsupported_content_encoding",
            )
    if len(codings) > 1:
        raise BodyRefused(
            415,
            f"at most one Content-Encoding ({', '.join(ACCEPTED_ENCODINGS)}) may be applied",
            "unsupported_content_encoding",
        )
    return codings


def _inflate(raw: bytes, coding: str, limit: int) -> bytes:
    if coding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    else:  # deflate is the zlib format (RFC 9110), but raw deflate is common: tell them apart
        zlib_header = len(raw) >= 2 and raw[0] & 0x0F == 8 and (raw[0] << 8 | raw[1]) % 31 == 0
        wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error:
        raise InvalidInput(
            f"the request body is not valid {coding} data (Content-Encoding: {coding})"
        ) from None
    if len(out) > limit:
        raise too_large(limit)
    if not inflater.eof or inflater.unused_data:
        raise InvalidInput(f"the request body is truncated or has trailing bytes after its {coding} data")
    return out


def _depth(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting outside strings (for valid JSON; an upper bound otherwise)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than its number of openers: the common case, no scan
    brackets = _STRING.sub(b"", raw).translate(None, delete=bytes(set(range(256)) - set(b"[]{}")))
    deepest, level = 0, 0
    for start in range(0, len(brackets), _SCAN_CHUNK):
        chunk = np.frombuffer(brackets[start : start + _SCAN_CHUNK], dtype=np.uint8)
        steps = np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1).astype(np.int64)
        levels = np.cumsum(steps) + level
        deepest = max(deepest, int(levels.max()))
        level = int(levels[-1])
    return deepest


def decode_json(raw: bytes, codings: tuple[str, ...], limit: int) -> object:
    """Decompress (capped), bound the depth, parse. Pure and synchronous: run in a thread if big.

    Raises:
        BodyRefused: 413 when the decompressed body exceeds ``limit``.
        InvalidInput: not valid compressed data, too deep, or not JSON.
    """
    for coding in reversed(codings):
        raw = _inflate(raw, coding, limit)
    if _depth(raw) > MAX_JSON_DEPTH:
        raise InvalidInput(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(raw)
    except RecursionError:  # a second line: the depth scan should have refused it already
        raise InvalidInput(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("the request body is not valid JSON") from None


async def read_json(request: web.Request, limit: int, timeout_s: float) -> object:
    """The body as parsed JSON: encoding checked before reading, read within ``timeout_s``.

    Raises:
        BodyRefused: 408 (body not complete in time; the connection is closed), 413, 415.
        InvalidInput: malformed framing, compression or JSON.
    """
    codings = content_codings(request.headers.getall("Content-Encoding", []))
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise BodyRefused(
            408, f"the request body did not arrive within {timeout_s:g} s", "request_timeout"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    except web.HTTPException:
        raise
    except Exception:  # broken chunked framing, a reset mid-body: the client's bytes, not our bug
        raise InvalidInput("the request body could not be read (broken framing or connection)") from None
    if codings or len(raw) > _OFFLOAD_BYTES:
        return await asyncio.to_thread(decode_json, raw, codings, limit)
    return decode_json(raw, codings, limit)


def request_deadline(request: web.Request, arrived: float) -> float | None:
    """``X-Request-Timeout: <seconds>`` as a ``time.monotonic()`` instant counted from ``arrived``.

    Raises:
        InvalidInput: not one number of seconds in (0, one day].
    """
    values = request.headers.getall(TIMEOUT_HEADER, [])
    if not values:
        return None
    try:
        seconds = float(values[0]) if len(values) == 1 else -1.0
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= _MAX_TIMEOUT_S:  # also refuses nan and inf
        raise InvalidInput(f"{TIMEOUT_HEADER} must be one number of seconds in (0, {_MAX_TIMEOUT_S:g}]")
    return arrived + seconds
