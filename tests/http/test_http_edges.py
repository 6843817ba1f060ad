"""Issue 12 §2, §11, §12, §13 on HTTP: odd Authorization headers, slow clients, token-id inputs.

Raw sockets where a client library would not send the bytes (non-UTF-8 headers, duplicate
headers, a chunked body that never ends) or would hide when the server closed the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from test_http_app_fake_core import KEY, FakeCore

from service.auth import ApiKeys
from service.http import HttpOptions, HttpServer
from service.metrics import Metrics

TIMEOUT_S = 1.0
# How long a test waits for the server to close: generous (shared, loaded CI machines), and
# still far below what an unbounded server would allow (aiohttp's own default is an hour).
CLOSE_WITHIN_S = 30.0


@dataclass
class Raw:
    port: int
    core: FakeCore
    metrics: Metrics

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def exchange(self, request: bytes) -> tuple[int, dict[str, str], dict]:
        """Send one request, read to EOF (the request says Connection: close)."""
        reader, writer = await self.open()
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), CLOSE_WITHIN_S)
        writer.close()
        return parse_response(data)


def parse_response(data: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body or b"{}")


def post(body: bytes, *headers: bytes) -> bytes:
    head = [b"POST /v1/embeddings HTTP/1.1", b"Host: x", b"Connection: close", *headers]
    head.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


GOOD = b'{"input": ["a"]}'
AUTH = b"Authorization: Bearer " + KEY.encode()


@pytest_asyncio.fixture
async def raw() -> AsyncIterator[Raw]:
    core, metrics = FakeCore(), Metrics()
    server = HttpServer(options=HttpOptions(keepalive_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S))
    await server.serve_api(core, metrics, ApiKeys([KEY]), "127.0.0.1", 0, body_limit=4096)
    assert server.port is not None
    yield Raw(server.port, core, metrics)
    await server.stop()


def _requests(metrics: Metrics, code: str) -> float:
    text = metrics.render()[0].decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "embed_requests_total" and s.labels == {
                "api": "http",
                "method": "embeddings",
                "code": code,
            }:
                return s.value
    return 0.0


# --- Authorization ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "header",
    [
        "Authorization: Bearer ключ".encode(),  # UTF-8
        b"Authorization: Bearer \xff\xfe\x80",  # not UTF-8 at all
        "Authorization: Bearer é".encode("latin-1"),
        AUTH + "é".encode(),  # a valid key with a non-ASCII tail
    ],
)
async def test_non_ascii_authorization_is_a_logged_counted_401(
    raw: Raw, header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    status, headers, body = await raw.exchange(post(GOOD, header))
    assert (status, body["error"]["code"], headers["www-authenticate"]) == (401, "invalid_api_key", "Bearer")
    assert _requests(raw.metrics, "401") == 1
    access = [r for r in caplog.records if r.name == "service.access"]
    assert [r.status for r in access] == ["401"]  # type: ignore[attr-defined]
    assert raw.core.jobs == []


@pytest.mark.asyncio
async def test_two_authorization_headers_are_a_401_even_if_both_valid(raw: Raw) -> None:
    for second in (AUTH, b"Authorization: Bearer wrong"):
        status, _, body = await raw.exchange(post(GOOD, AUTH, second))
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    status, _, _ = await raw.exchange(post(GOOD, b"authorization:   bearer " + KEY.encode() + b"  "))
    assert status == 200  # lowercase scheme, spaces around: documented as accepted
    assert len(raw.core.jobs) == 1


# --- token ids (LangChain) -------------------------------------------------------------------------

# What langchain_openai.OpenAIEmbeddings(check_embedding_ctx_length=True, the default) sends for
# embed_documents(["hello world", "goodbye"]): cl100k (tiktoken) ids, base64 asked by the
# openai client, the default model name.
LANGCHAIN_BODY = {
    "input": [[15339, 1917], [19045, 29474]],
    "model": "text-embedding-ada-002",
    "encoding_format": "base64",
}


@pytest.mark.asyncio
async def test_langchain_token_ids_are_refused_with_the_fix(raw: Raw) -> None:
    status, _, body = await raw.exchange(post(json.dumps(LANGCHAIN_BODY).encode(), AUTH))
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "invalid_input", "input")
    message = body["error"]["message"]
    assert "check_embedding_ctx_length=False" in message and "Send text" in message
    for ids in ([1, 2, 3], [[1, 2]]):
        status, _, _ = await raw.exchange(post(json.dumps({"input": ids}).encode(), AUTH))
        assert status == 400
    assert raw.core.jobs == []


@pytest.mark.asyncio
async def test_token_ids_accepted_when_the_operator_allows_them() -> None:
    core = FakeCore()
    server = HttpServer(options=HttpOptions(allow_token_ids=True))
    await server.serve_api(core, Metrics(), ApiKeys([KEY]), "127.0.0.1", 0, body_limit=4096)
    try:
        assert server.port is not None
        body = {**LANGCHAIN_BODY, "model": "tiny"}
        status, _, _ = await Raw(server.port, core, Metrics()).exchange(post(json.dumps(body).encode(), AUTH))
        assert status == 200 and core.jobs[0].token_ids == ((15339, 1917), (19045, 29474))
    finally:
        await server.stop()


# --- slow clients ------------------------------------------------------------------------------------


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent until it closed; fails if it is still open after ``seconds``."""
    return await asyncio.wait_for(reader.read(), seconds)


@pytest.mark.asyncio
async def test_headers_that_never_end_are_closed(raw: Raw) -> None:
    reader, writer = await raw.open()
    writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")  # no blank line: headers go on
    started = time.monotonic()
    assert await _closed_within(reader, CLOSE_WITHIN_S) == b""
    assert time.monotonic() - started >= TIMEOUT_S * 0.9
    writer.close()


@pytest.mark.asyncio
async def test_headers_sent_one_byte_at_a_time_are_closed(raw: Raw) -> None:
    """Arriving bytes do not reset the timer: a slowloris client cannot hold a connection."""
    reader, writer = await raw.open()
    started = time.monotonic()
    with pytest.raises((ConnectionError, AssertionError)):
        while time.monotonic() - started < CLOSE_WITHIN_S:
            writer.write(b"X")
            await writer.drain()
            try:
                assert await asyncio.wait_for(reader.read(1), 0.2) != b""  # b"": closed
            except TimeoutError:
                continue
    assert time.monotonic() - started < CLOSE_WITHIN_S
    writer.close()


@pytest.mark.asyncio
async def test_idle_keep_alive_connection_is_closed(raw: Raw) -> None:
    reader, writer = await raw.open()
    request = post(GOOD, AUTH).replace(b"Connection: close", b"Connection: keep-alive")
    writer.write(request)
    status_line = await asyncio.wait_for(reader.readline(), CLOSE_WITHIN_S)
    assert b" 200 " in status_line
    rest = await _closed_within(reader, CLOSE_WITHIN_S)  # the response, then EOF once idle
    assert b'"embedding"' in rest
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("chunked", [True, False])
async def test_body_that_never_ends_gets_408_and_is_closed(raw: Raw, chunked: bool) -> None:
    reader, writer = await raw.open()
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"
    if chunked:  # a chunk, then no terminating 0-size chunk
        writer.write(head + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"inp\r\n')
    else:  # fewer bytes than Content-Length promises
        writer.write(head + b'Content-Length: 100\r\n\r\n{"inp')
    data = await _closed_within(reader, CLOSE_WITHIN_S)
    status, headers, body = parse_response(data)
    assert (status, body["error"]["code"]) == (408, "request_timeout")
    assert headers["connection"].lower() == "close"
    assert raw.core.jobs == [] and _requests(raw.metrics, "408") == 1
    writer.close()


# --- what aiohttp's parser refuses -------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/../x http/1.1\r\nHost: x\r\n\r\n",  # bad version
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\x01\r\n\r\n",
        b"PUT /\xc6{\xda HTTP/1.1\r\nHost: x\r\n\r\n",  # bytes not allowed in a path
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_parser_refusals_are_a_400_and_a_debug_line_without_the_bytes(
    raw: Raw, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the fuzzer: aiohttp logged each at error level, quoting the client's bytes."""
    caplog.set_level(logging.DEBUG)
    reader, writer = await raw.open()
    writer.write(request_bytes)
    data = await _closed_within(reader, CLOSE_WITHIN_S)
    assert data.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), data[:100]
    writer.close()
    server_records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert server_records and all(r.levelno == logging.DEBUG for r in server_records)
    assert KEY not in caplog.text and "\\xc6" not in caplog.text and "http/1.1" not in caplog.text
    caplog.clear()
    caplog.set_level(logging.INFO)
    reader, writer = await raw.open()
    writer.write(request_bytes)
    await _closed_within(reader, CLOSE_WITHIN_S)
    writer.close()
    assert not [r for r in caplog.records if r.name == "aiohttp.server"]
