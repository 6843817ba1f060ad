"""Per-key quotas on the HTTP front end (service/quotas.py), with OpenAI's rate-limit headers.

Why a module of its own: ``service.http`` stays a translator; admission, the concurrency slot's
lifetime and the ``x-ratelimit-*`` / ``Retry-After`` headers are quota policy. A refusal is
answered before the body is read, so an over-limit tenant costs the server nothing but the
headers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from service.errors import describe
from service.http_schema import error_body
from service.quotas import KeyQuota, QuotaExceeded, current_quota, retry_after_header

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def quota_refusal(exc: QuotaExceeded, request_id: str) -> web.Response:
    public = describe(exc, request_id)
    headers = {**exc.headers, "Retry-After": retry_after_header(exc.retry_after_s)}
    body = error_body(public.message, public.kind, None, "rate_limit_exceeded")
    return web.json_response(body, status=public.http_status, headers=headers)


async def call_limited(
    quota: KeyQuota | None, handler: Handler, request: web.Request, request_id: str
) -> web.StreamResponse:
    """Run ``handler`` under ``quota`` (``None``: a key without limits, or auth off)."""
    if quota is None:
        return await handler(request)
    try:
        quota.admit()
    except QuotaExceeded as exc:
        refusal = quota_refusal(exc, request_id)
        # The body was not read: the connection cannot carry another request.
        refusal.force_close()
        return refusal
    current_quota.set(quota)  # the core charges tokens to it (a handler task of its own)
    try:
        response = await handler(request)
    except QuotaExceeded as exc:  # tokens/minute, found after tokenisation
        return quota_refusal(exc, request_id)
    finally:
        quota.release()
    if not response.prepared:
        response.headers.update(quota.headers())
    return response
