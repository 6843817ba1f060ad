"""Malformed request bodies (issue 12 §1): every one a 4xx in OpenAI's error shape, never a 500.

Over a scripted core (``FakeCore`` from test_http_app_fake_core), so what is checked is the HTTP
layer alone: nesting depth, Content-Encoding (accepted, refused, lying, a zip bomb), framing.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from test_http_app_fake_core import AUTH, KEY, FakeCore, Running

from service.auth import ApiKeys
from service.errors import InvalidInput
from service.http import HttpServer
from service.http_body import MAX_JSON_DEPTH, BodyRefused, content_codings, decode_json
from service.metrics import Metrics

LIMIT = 64 * 1024
BODY = json.dumps({"input": ["a", "b"]}).encode()


@pytest_asyncio.fixture
async def srv() -> AsyncIterator[Running]:
    core, metrics = FakeCore(), Metrics()
    server = HttpServer()
    await server.serve_api(core, metrics, ApiKeys([KEY]), "127.0.0.1", 0, body_limit=LIMIT)
    async with aiohttp.ClientSession() as session:
        yield Running(f"http://127.0.0.1:{server.port}", core, metrics, session)
    await server.stop()


async def _send(srv: Running, data: bytes, **headers: str) -> tuple[int, dict]:
    async with srv.session.post(f"{srv.url}/v1/embeddings", data=data, headers={**AUTH, **headers}) as resp:
        assert resp.content_type == "application/json", await resp.text()
        payload = await resp.json()
        if resp.status >= 400:
            assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
        return resp.status, payload


def _code(payload: dict) -> str:
    return str(payload["error"]["code"])


@pytest.mark.asyncio
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 10_000])
@pytest.mark.parametrize(("open_", "close"), [("[", "]"), ('{"a":', "}")])
async def test_deep_nesting_is_a_400(srv: Running, depth: int, open_: str, close: str) -> None:
    nested = open_ * depth + "1" + close * depth
    status, payload = await _send(
        srv, json.dumps({"input": "x"}).encode()[:-1] + f', "user": {nested}}}'.encode()
    )
    assert (status, _code(payload)) == (400, "invalid_input"), payload
    assert "nested" in payload["error"]["message"]
    status, payload = await _send(srv, nested.encode())  # the whole body, not only a field
    assert (status, _code(payload)) == (400, "invalid_input")
    assert srv.core.jobs == []


@pytest.mark.asyncio
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "x-gzip"])
async def test_body_labelled_compressed_but_not_is_a_400(srv: Running, encoding: str) -> None:
    status, payload = await _send(srv, BODY, **{"Content-Encoding": encoding})
    assert (status, _code(payload)) == (400, "invalid_input"), payload
    assert "not valid" in payload["error"]["message"]


@pytest.mark.asyncio
@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "snappy", "gzip, br", "gzip, gzip", "\u00e9"])
async def test_unsupported_encodings_are_a_json_415(srv: Running, encoding: str) -> None:
    header = encoding.encode("utf-8").decode("latin-1")  # raw bytes on the wire
    status, payload = await _send(srv, BODY, **{"Content-Encoding": header})
    assert (status, _code(payload)) == (415, "unsupported_content_encoding"), payload
    assert "gzip" in payload["error"]["message"]  # says what is accepted


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),  # the zlib format, as RFC 9110 says
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some clients send it
        ("identity", lambda b: b),
        ("Identity, GZIP", gzip.compress),
    ],
)
async def test_accepted_encodings_decode_to_the_same_job(
    srv: Running, encoding: str, compress: object
) -> None:
    assert callable(compress)
    status, payload = await _send(srv, compress(BODY), **{"Content-Encoding": encoding})
    assert status == 200, payload
    assert [job.texts for job in srv.core.jobs] == [("a", "b")]


@pytest.mark.asyncio
async def test_zip_bomb_is_a_413_and_truncated_gzip_a_400(srv: Running) -> None:
    bomb = gzip.compress(b'{"input": "' + b"a" * (64 * LIMIT) + b'"}')
    assert len(bomb) < LIMIT  # small on the wire, 64 × the limit once inflated
    status, payload = await _send(srv, bomb, **{"Content-Encoding": "gzip"})
    assert (status, _code(payload)) == (413, "request_too_large")
    status, payload = await _send(srv, gzip.compress(BODY)[:-6], **{"Content-Encoding": "gzip"})
    assert (status, _code(payload)) == (400, "invalid_input")
    status, payload = await _send(srv, gzip.compress(BODY) + b"junk", **{"Content-Encoding": "gzip"})
    assert (status, _code(payload)) == (400, "invalid_input")
    assert srv.core.jobs == []


def test_depth_scan_ignores_brackets_inside_strings() -> None:
    tricky = {"input": ["[" * 500 + "{" * 500, '\\"[[[[', "]]]"], "user": '"[{'}
    assert decode_json(json.dumps(tricky).encode(), (), LIMIT) == tricky
    with pytest.raises(InvalidInput, match="nested"):
        decode_json(b'{"input": "[[[", "x": ' + b"[" * 40 + b"]" * 40 + b"}", (), LIMIT)


def test_content_codings() -> None:
    assert content_codings([]) == () and content_codings(["identity"]) == ()
    assert content_codings(["GZip"]) == ("gzip",) and content_codings(["identity", "deflate"]) == ("deflate",)
    with pytest.raises(BodyRefused) as info:
        content_codings(["<script>" * 10])
    assert info.value.status == 415 and "<script>" not in info.value.message
