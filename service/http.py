"""The OpenAI-compatible HTTP front end, served by aiohttp in the gRPC server's event loop.

Why in-process and on the same loop: both front ends hand jobs to the one ``EmbeddingCore``, so
HTTP and gRPC requests share the batcher (they batch *together*) and the one model copy. This
module only translates: JSON ⇄ :mod:`service.http_schema`, keys ⇄ :mod:`service.auth`, domain
errors ⇄ OpenAI's error shape through the shared table in :mod:`service.errors`.

Open without a key: ``GET /health`` (probes) and ``GET /metrics`` (scrapers); everything under
``/v1`` needs ``Authorization: Bearer <key>`` when keys are configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aiohttp import web

from service import trace_hooks
from service.auth import UNAUTHENTICATED_MESSAGE, ApiKeys
from service.domain import EmbedJob, EmbedResult, ModelInfo
from service.errors import Unauthenticated, describe
from service.http_body import BodyRefused, read_json, request_deadline
from service.http_logs import quiet_parser_refusals
from service.http_quota import call_limited
from service.http_rerank import parse_rerank_request, rerank_response
from service.http_schema import (
    embeddings_response,
    error_body,
    model_card,
    parse_embeddings_request,
)
from service.logs import is_safe_request_id, log_request, new_request_id
from service.metrics import Metrics
from service.rerank import rerank as rank_documents
from service.settings import Settings

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics"})
REQUEST_ID_HEADER = "X-Request-Id"
_MAX_LINGER_S = 10.0
# JSON is bulkier than protobuf (a token id is ~6 bytes of text vs ~3 as a varint), so the body
# limit is a multiple of the gRPC message limit rather than equal to it.
BODY_LIMIT_FACTOR = 4
# Encoding more floats than this on the event loop would stall every other request (json.dumps
# of a full 256 × 3584 response takes a large fraction of a second): use a thread.
_OFFLOAD_FLOATS = 1 << 16
RETRY_AFTER_S = {429: "1", 503: "5"}

_ROUTE_NAMES = {
    "/v1/embeddings": "embeddings",
    "/v1/models": "models",
    "/v1/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/health": "health",
    "/metrics": "metrics",
}


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


class Core(Protocol):
    """What the HTTP front end needs from ``service.models.ModelRegistry``.

    ``model_info`` resolves a client's model name (or alias; None: the default model) and raises
    ``ModelNotFound`` (404 from the one table) for a name that is not served.
    """

    async def embed(self, job: EmbedJob) -> EmbedResult: ...

    def model_info(self, model: str | None = None) -> ModelInfo: ...

    def model_infos(self) -> list[ModelInfo]: ...

    @property
    def serving(self) -> bool: ...


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP-only settings (see ``service.settings`` for what each bounds)."""

    keepalive_timeout_s: float = _default("http_keepalive_timeout_s")
    body_timeout_s: float = _default("http_body_timeout_s")
    allow_token_ids: bool = _default("http_allow_token_ids")

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpOptions:
        return cls(
            settings.http_keepalive_timeout_s, settings.http_body_timeout_s, settings.http_allow_token_ids
        )


@dataclass(frozen=True)
class HttpConfig:
    max_body_bytes: int
    created: int  # /v1/models "created": when this process started serving
    options: HttpOptions = HttpOptions()


CORE_KEY = web.AppKey("core", Core)
METRICS_KEY = web.AppKey("metrics", Metrics)
KEYS_KEY = web.AppKey("keys", ApiKeys)
CONFIG_KEY = web.AppKey("config", HttpConfig)


@dataclass
class _Seen:
    """What the access log and metrics need to know about one request, filled as it goes."""

    request_id: str
    arrived: float = 0.0  # time.monotonic() when the request reached the app
    inputs: int = 0
    tokens: int = 0
    trace: trace_hooks.CallTrace | None = None  # set only when tracing is on


SEEN_KEY = web.RequestKey("seen", _Seen)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, kind: str, param: str | None, code: str | None) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_S[status]} if status in RETRY_AFTER_S else None
    return web.json_response(error_body(message, kind, param, code), status=status, headers=headers)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _param(field: str | None) -> str | None:
    """The core names fields as gRPC does (``inputs``, ``token_inputs[3]``); OpenAI says ``input``."""
    if field is None:
        return None
    return re.sub(r"^(?:token_)?inputs\b", "input", field)


# The core names gRPC's truncation enum values; HTTP clients send "end" / "start".
_GRPC_TRUNCATION = re.compile(r"\btruncation END or START\b")


def _from_exception(exc: BaseException, request_id: str) -> web.Response:
    public = describe(exc, request_id)
    message = _GRPC_TRUNCATION.sub('"truncation": "end" or "start"', public.message)
    return _error(public.http_status, message, public.kind, _param(public.field), _snake(public.error_class))


def _from_refusal(exc: BodyRefused) -> web.Response:
    response = _error(exc.status, exc.message, "invalid_request_error", None, exc.code)
    # The body was not (fully) read: the connection cannot carry another request.
    response.force_close()
    return response


def _from_http_exception(exc: web.HTTPException, body_limit: int) -> web.Response:
    """aiohttp's own refusals (body too large, unknown route, wrong method) in OpenAI's shape."""
    if exc.status == 413:
        message = f"request body is too large (the limit is {body_limit} bytes)"
        return _error(413, message, "invalid_request_error", None, "request_too_large")
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return _error(exc.status, exc.reason, kind, None, _snake(exc.reason.replace(" ", "")))


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if is_safe_request_id(given) else new_request_id()


@web.middleware
async def _front_door(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, API key, error shape, metrics and the access log: one place for all routes."""
    started = time.perf_counter()
    request_id = _request_id(request)
    request[SEEN_KEY] = _Seen(request_id, time.monotonic())
    route = _ROUTE_NAMES.get(request.path, "model" if request.path.startswith("/v1/models/") else "other")
    if trace_hooks.tracing() and request.path not in OPEN_PATHS:
        request[SEEN_KEY].trace = trace_hooks.begin_http(
            request.method, request.path, request_id, request.headers
        )
    keys = request.app[KEYS_KEY]
    is_open = request.path in OPEN_PATHS
    entry = None if is_open else keys.identify_headers(request.headers.getall("Authorization", []))
    if keys.enabled and not is_open and entry is None:
        public = describe(Unauthenticated(UNAUTHENTICATED_MESSAGE), request_id)
        # OpenAI's code for this case, so clients that branch on it keep working.
        response: web.StreamResponse = _error(
            public.http_status, public.message, public.kind, None, "invalid_api_key"
        )
        response.headers["WWW-Authenticate"] = "Bearer"
    else:
        try:
            response = await call_limited(keys.quota_for(entry), handler, request, request_id)
        except web.HTTPException as exc:
            response = _from_http_exception(exc, request.app[CONFIG_KEY].max_body_bytes)
        except BodyRefused as exc:
            response = _from_refusal(exc)
        except asyncio.CancelledError:
            # The client went away (handler_cancellation): nothing to send, but count it.
            _finish(request, route, 499, started)
            raise
        except Exception as exc:  # domain errors and bugs alike go through the one table
            response = _from_exception(exc, request_id)
    response.headers[REQUEST_ID_HEADER] = request_id
    _finish(request, route, response.status, started)
    return response


def _finish(request: web.Request, route: str, status: int, started: float) -> None:
    latency = time.perf_counter() - started
    seen = request[SEEN_KEY]
    trace_hooks.end_http(seen.trace, status)
    request.app[METRICS_KEY].observe_request("http", route, str(status), latency, seen.tokens)
    if route in ("health", "metrics") and status < 400:
        return  # probes and scrapes every few seconds would drown the access log
    log_request(
        api="http",
        method=route,
        request_id=seen.request_id,
        status=status,
        inputs=seen.inputs,
        tokens=seen.tokens,
        latency_s=latency,
    )


async def embeddings(request: web.Request) -> web.StreamResponse:
    core = request.app[CORE_KEY]
    seen = request[SEEN_KEY]
    config = request.app[CONFIG_KEY]
    deadline = request_deadline(request, seen.arrived)
    body = await read_json(request, config.max_body_bytes, config.options.body_timeout_s)
    parsed = parse_embeddings_request(
        body, seen.request_id, deadline, allow_token_ids=config.options.allow_token_ids
    )
    seen.inputs = parsed.job.count
    info = core.model_info(parsed.model)  # an unknown name: ModelNotFound, 404
    result = await core.embed(replace(parsed.job, model=info.model))
    seen.tokens = result.usage.input_tokens  # stage timings are recorded by the core (Edge.observe_core)
    answer = embeddings_response(result, parsed.encoding_format, info.model)
    if result.vectors.size > _OFFLOAD_FLOATS:
        text = await asyncio.to_thread(json.dumps, answer)
    else:
        text = json.dumps(answer)
    return web.Response(text=text, content_type="application/json")


async def rerank(request: web.Request) -> web.StreamResponse:
    """Cohere / Jina-style rerank (service/http_rerank.py), through the same core as embeddings."""
    core = request.app[CORE_KEY]
    seen = request[SEEN_KEY]
    config = request.app[CONFIG_KEY]
    deadline = request_deadline(request, seen.arrived)
    body = await read_json(request, config.max_body_bytes, config.options.body_timeout_s)
    parsed = parse_rerank_request(body, seen.request_id, deadline)
    seen.inputs = len(parsed.job.documents) + 1
    info = core.model_info(parsed.model)  # an unknown name: ModelNotFound, 404
    result = await rank_documents(core, replace(parsed.job, model=info.model))
    seen.tokens = result.usage.input_tokens
    answer = rerank_response(
        result, parsed.job.documents, return_documents=parsed.return_documents, model=info.model
    )
    return web.json_response(answer)


async def list_models(request: web.Request) -> web.StreamResponse:
    created = request.app[CONFIG_KEY].created
    cards = [model_card(info, created) for info in request.app[CORE_KEY].model_infos()]
    if not cards:  # nothing loaded yet: the same 503 as every other call while warming up
        request.app[CORE_KEY].model_info()
    return web.json_response({"object": "list", "data": cards})


async def get_model(request: web.Request) -> web.StreamResponse:
    info = request.app[CORE_KEY].model_info(request.match_info["model"])
    return web.json_response(model_card(info, request.app[CONFIG_KEY].created))


async def health(request: web.Request) -> web.StreamResponse:
    """Mirrors the gRPC health service: 200 SERVING, 503 NOT_SERVING (warming up or draining)."""
    serving = request.app[CORE_KEY].serving
    return web.json_response(
        {"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503
    )


async def metrics_page(request: web.Request) -> web.StreamResponse:
    body, content_type = request.app[METRICS_KEY].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def build_app(
    core: Core, metrics: Metrics, keys: ApiKeys, max_body_bytes: int, options: HttpOptions | None = None
) -> web.Application:
    """The aiohttp application. Serve it with :class:`HttpServer`, which turns aiohttp's own
    decompression off: ``service.http_body`` decodes bodies, with a size cap and 4xx errors."""
    app = web.Application(middlewares=[_front_door], client_max_size=max_body_bytes)
    app[CORE_KEY] = core
    app[METRICS_KEY] = metrics
    app[KEYS_KEY] = keys
    app[CONFIG_KEY] = HttpConfig(max_body_bytes, int(time.time()), options or HttpOptions())
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/rerank", rerank)
    app.router.add_post("/v2/rerank", rerank)  # where Cohere's ClientV2 posts; the same shape
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    return app


def build_metrics_app(metrics: Metrics) -> web.Application:
    """Only ``/metrics``, for the optional separate metrics port."""
    app = web.Application()
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", metrics_page)
    return app


class HttpServer:
    """Running aiohttp sites (API port, optional metrics port) on the current event loop."""

    def __init__(self, grace_s: float = 5.0, options: HttpOptions | None = None) -> None:
        self._grace_s = grace_s
        self._options = options or HttpOptions()
        self._runners: list[web.AppRunner] = []
        self.port: int | None = None
        self.metrics_port: int | None = None

    async def _serve(
        self, app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None
    ) -> int:
        # handler_cancellation: a client that disconnects cancels its handler, so the batcher
        # drops its queued inputs instead of computing them for nobody.
        # auto_decompress off: service.http_body decodes bodies with a size cap and 4xx errors.
        # keepalive_timeout: aiohttp arms it when a connection opens and after each response and
        # does not reset it on arriving bytes, so it also bounds a client sending headers slowly
        # (it closes only a connection still waiting for a request head, never one in a handler).
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=self._grace_s,
            auto_decompress=False,
            keepalive_timeout=self._options.keepalive_timeout_s,
            # After an answer sent before the body was read (401, 408, 413, 415), aiohttp drains
            # the rest so the client can read it: no longer than the body timeout, nor than
            # aiohttp's own 10 s, so a stalled or unauthenticated upload cannot hold a connection.
            lingering_time=min(self._options.body_timeout_s, _MAX_LINGER_S),
        )
        quiet_parser_refusals()
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        await site.start()
        address: Any = runner.addresses[0]
        return int(address[1])

    async def serve_api(
        self,
        core: Core,
        metrics: Metrics,
        keys: ApiKeys,
        host: str,
        port: int,
        body_limit: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> int:
        """Serve the API app; returns the bound port (``port=0`` picks a free one)."""
        app = build_app(core, metrics, keys, body_limit, self._options)
        self.port = await self._serve(app, host, port, ssl_context)
        scheme = "https" if ssl_context is not None else "http"
        logger.info("HTTP API listening", extra={"url": f"{scheme}://{host}:{self.port}"})
        return self.port

    async def serve_metrics(
        self, metrics: Metrics, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        """Serve only ``/metrics`` on a port of its own."""
        self.metrics_port = await self._serve(build_metrics_app(metrics), host, port, ssl_context)
        logger.info("metrics listening", extra={"port": self.metrics_port})
        return self.metrics_port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then close."""
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()


def max_body_bytes(max_message_bytes: int) -> int:
    return BODY_LIMIT_FACTOR * max_message_bytes
