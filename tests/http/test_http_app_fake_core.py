"""The HTTP front end over a scripted core: every error path, auth, limits, metrics, logs.

A fake core makes states that are slow or racy to reach with a model (warming up, overloaded,
a runtime crash) deterministic; the same paths run against the real core in test_http_server.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from service.auth import ApiKeys
from service.domain import EmbedJob, EmbedResult, Limits, ModelInfo, SelfTestResult, Timings, Tokenized, Usage
from service.errors import InputTooLong, ModelNotFound, NotReady, Overloaded, RuntimeFailure, TooManyInputs
from service.http import HttpServer
from service.metrics import Metrics

KEY = "sk-test-Zq8v1"
DIMS = 4


def _info() -> ModelInfo:
    limits = Limits(8, 32, 1024, 8, 4096, 1 << 20, "none", False)
    return ModelInfo(
        model="tiny",
        model_id="org/tiny",
        source_kind="builtin",
        source_id="x",
        source_revision=None,
        family="bert",
        model_type="bert",
        dimensions=DIMS,
        max_input_tokens=32,
        pooling="mean",
        attention="bidirectional",
        precision="fp32",
        execution_providers=("CPUExecutionProvider",),
        bundle_sha256="0" * 64,
        tasks={},
        default_task=None,
        query_template=None,
        limits=limits,
        validation={},
        self_test=SelfTestResult(ran=True, passed=True),
        batch_invariant=True,
        matryoshka=False,
    )


@dataclass
class FakeCore:
    serving: bool = True
    fail_with: BaseException | None = None
    jobs: list[EmbedJob] = field(default_factory=list)

    def model_info(self, model: str | None = None) -> ModelInfo:
        if model not in (None, "tiny", "org/tiny"):
            raise ModelNotFound(f"model {model!r} is not served here; served: tiny", field="model")
        return _info()

    def model_infos(self) -> list[ModelInfo]:
        return [_info()]

    async def embed(self, job: EmbedJob) -> EmbedResult:
        self.jobs.append(job)
        if self.fail_with is not None:
            raise self.fail_with
        n = job.count
        vectors = np.arange(n * DIMS, dtype=np.float32).reshape(n, DIMS) / 7.0
        return EmbedResult(
            vectors=vectors,
            inputs=tuple(Tokenized((1, 2, 3)) for _ in range(n)),
            usage=Usage(input_tokens=3 * n, truncated_inputs=0),
            timings=Timings(1.0, 2.0, 3.0, 6.0),
            model="tiny",
            request_id=job.request_id,
        )


@dataclass
class Running:
    url: str
    core: FakeCore
    metrics: Metrics
    session: aiohttp.ClientSession


@pytest_asyncio.fixture
async def srv() -> AsyncIterator[Running]:
    core, metrics = FakeCore(), Metrics()
    server = HttpServer()
    await server.serve_api(core, metrics, ApiKeys([KEY, "sk-old"]), "127.0.0.1", 0, body_limit=4096)
    async with aiohttp.ClientSession() as session:
        yield Running(f"http://127.0.0.1:{server.port}", core, metrics, session)
    await server.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


async def _post(
    r: Running, body: object, headers: dict[str, str] | None = None
) -> tuple[int, dict, CIMultiDict[str]]:
    async with r.session.post(
        f"{r.url}/v1/embeddings", json=body, headers=AUTH if headers is None else headers
    ) as resp:
        return resp.status, await resp.json(), resp.headers.copy()


@pytest.mark.asyncio
async def test_success_float_and_base64(srv: Running) -> None:
    status, body, headers = await _post(srv, {"input": ["a", "b"], "model": "tiny"})
    assert status == 200 and headers["X-Request-Id"]
    assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"] == {
        "prompt_tokens": 6,
        "total_tokens": 6,
    }
    status, b64, _ = await _post(srv, {"input": ["a", "b"], "encoding_format": "base64", "model": "org/tiny"})
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]]
    np.testing.assert_array_equal(
        np.array([d["embedding"] for d in body["data"]], np.float32), np.stack(decoded)
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "status", "code", "retry_after"),
    [
        (Overloaded("queue is full"), 429, "overloaded", "1"),
        (NotReady("warming up"), 503, "not_ready", "5"),
        (TooManyInputs("too many inputs", field="input"), 413, "too_many_inputs", None),
        (InputTooLong("input 0 is too long", field="input"), 413, "input_too_long", None),
        (RuntimeFailure("ORT said: secret internals"), 500, "runtime_failure", None),
        (ValueError("a bug"), 500, "runtime_failure", None),
    ],
)
async def test_core_errors_map_through_the_shared_table(
    srv: Running, error: BaseException, status: int, code: str, retry_after: str | None
) -> None:
    srv.core.fail_with = error
    got, body, headers = await _post(srv, {"input": "x"})
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code
    assert headers.get("Retry-After") == retry_after
    assert "internals" not in body["error"]["message"] and "a bug" not in body["error"]["message"]


@pytest.mark.asyncio
async def test_bad_json_unknown_model_and_too_big_body(srv: Running) -> None:
    async with srv.session.post(f"{srv.url}/v1/embeddings", data=b"{nope", headers=AUTH) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"
    status, body, _ = await _post(srv, {"input": "x", "model": "gpt"})
    assert (status, body["error"]["code"], body["error"]["param"]) == (404, "model_not_found", "model")
    status, body, _ = await _post(srv, {"input": "x" * 5000})
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert srv.core.jobs == []  # none of these reached the core


@pytest.mark.asyncio
async def test_keys_health_and_metrics(srv: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, body, h = await _post(srv, {"input": "x"}, headers)
        assert (status, body["error"]["code"], h["WWW-Authenticate"]) == (401, "invalid_api_key", "Bearer")
        assert KEY not in body["error"]["message"]
    assert (await _post(srv, {"input": "x"}, {"Authorization": "Bearer sk-old"}))[0] == 200  # rotation
    async with srv.session.get(f"{srv.url}/v1/models") as resp:
        assert resp.status == 401
    async with srv.session.get(f"{srv.url}/v1/models", headers=AUTH) as resp:
        assert (await resp.json())["data"][0]["id"] == "tiny"
    async with srv.session.get(f"{srv.url}/health") as resp:
        assert resp.status == 200 and (await resp.json()) == {"status": "SERVING"}
    srv.core.serving = False
    async with srv.session.get(f"{srv.url}/health") as resp:
        assert resp.status == 503
    async with srv.session.get(f"{srv.url}/metrics") as resp:
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert (
        samples[("embed_requests_total", (("api", "http"), ("code", "401"), ("method", "embeddings")))] == 3
    )
    assert (
        samples[("embed_requests_total", (("api", "http"), ("code", "200"), ("method", "embeddings")))] == 1
    )
    assert samples[("embed_requests_total", (("api", "http"), ("code", "503"), ("method", "health")))] == 1
    assert KEY not in text and KEY not in caplog.text
    access = [r for r in caplog.records if r.name == "service.access"]
    assert {r.status for r in access} >= {"401", "200"}  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_unknown_route_and_method_in_openai_shape(srv: Running) -> None:
    async with srv.session.get(f"{srv.url}/v1/nothing", headers=AUTH) as resp:
        assert (resp.status, (await resp.json())["error"]["code"]) == (404, "not_found")
    async with srv.session.get(f"{srv.url}/v1/embeddings", headers=AUTH) as resp:
        assert (resp.status, (await resp.json())["error"]["code"]) == (405, "method_not_allowed")
    status, body, _ = await _post(srv, {"input": "x" * 5000})
    assert status == 413
    assert body["error"]["message"] == "request body is too large (the limit is 4096 bytes)"
