"""The edge around every handler: request id, bounded in-flight requests, timeout, error rendering,
metrics and the access log. Whatever a handler raises becomes a JSON error with a stable code."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from raftledger.client.errors import LedgerError

from ..logs import new_request_id, request_id_var
from .context import context_of
from .render import error_response

log = logging.getLogger("raftledger.http")

REQUEST_ID_HEADER = "X-Request-Id"
UNBOUNDED_ROUTES = frozenset({"/healthz", "/metrics", "/readyz"})
# Long-lived answers (Server-Sent Events): no request timeout, and a bound of their own
# ([feed] streams_max) instead of a share of the in-flight requests.
STREAM_ROUTES = frozenset({"/v1/feed/stream"})
# Routes whose work grows with the ledger (a whole shard streamed or audited), and streams: no
# request timeout.
UNTIMED_ROUTES = frozenset({"/v1/admin/verify", "/v1/admin/shards/{shard}/backup"}) | STREAM_ROUTES
slow_request_s = 1.0
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
SHARD_RE = re.compile(r"[0-9]{1,9}")
client_closed_status = 499  # recorded (never sent) when the client hung up first, as nginx does

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class EdgeState:
    in_flight: int = 0


EDGE = web.AppKey("raftledger_edge", EdgeState)


def route_name(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


def _http_error(exc: web.HTTPException) -> LedgerError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return LedgerError("body_too_large")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        return LedgerError("method_not_allowed", details={"allowed": allowed},
                        headers={"Allow": ", ".join(allowed)})
    if isinstance(exc, web.HTTPNotFound):
        return LedgerError("not_found", "no such route")
    return LedgerError("invalid_query" if exc.status == 400 else "internal_error", exc.reason)


def _check_shard(request: web.Request, shard_count: int) -> None:
    """A ``{shard}`` in the path names one of the cluster's shards, else the URL names nothing."""
    raw = request.match_info.get("shard")
    if raw is not None and not (SHARD_RE.fullmatch(raw) and int(raw) < shard_count):
        raise LedgerError("not_found", f"no shard {raw[:20]!r}", details={"shard": raw[:20]})


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = context_of(request)
    try:
        _check_shard(request, ctx.shard_count)
        untimed = route_name(request) in UNTIMED_ROUTES
        async with asyncio.timeout(None if untimed else ctx.settings.http.request_timeout_s):
            return await handler(request)
    except LedgerError as exc:
        return error_response(request, exc)
    except web.HTTPException as exc:
        return error_response(request, _http_error(exc))
    except TimeoutError:
        return error_response(request, LedgerError("timeout"))
    except Exception:
        if _client_gone(request):  # it hung up (mid-body, say): nobody to answer, nothing broken
            log.debug("client closed the connection", exc_info=True,
                      extra={"route": route_name(request)})
            return web.Response(status=client_closed_status)
        log.exception("unhandled error", extra={"route": route_name(request)})
        return error_response(request, LedgerError("internal_error"))


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = context_of(request)
    state = request.app[EDGE]
    request_id = new_request_id(request.headers.get(REQUEST_ID_HEADER))
    token = request_id_var.set(request_id)
    started = time.perf_counter()
    route = route_name(request)
    bounded = int(route not in UNBOUNDED_ROUTES and route not in STREAM_ROUTES)
    response: web.StreamResponse
    try:
        if bounded and state.in_flight >= ctx.settings.http.requests_in_flight_max:
            ctx.metrics.overloaded("http")
            response = error_response(request, LedgerError(
                "overloaded", retry_after_s=ctx.settings.batching.overloaded_retry_after_s))
        else:
            state.in_flight += bounded
            try:
                response = await _guarded(request, handler)
            finally:
                state.in_flight -= bounded
        if request.content.exception() is not None:
            settle_broken_body(request, response)
        response.headers[REQUEST_ID_HEADER] = request_id
        _observe(request, route, response.status, time.perf_counter() - started)
        return response
    finally:
        request_id_var.reset(token)


def settle_broken_body(request: web.Request, response: web.StreamResponse) -> None:
    """The body failed (it did not decode, or the client hung up): aiohttp's parser has stopped at
    the error, so the connection cannot carry another request and is closed after this response.
    The body is marked finished, else aiohttp would try to drain it after the response and log
    its error again, at ERROR level, for every such request."""
    request.content.feed_eof()
    response.force_close()


def _observe(request: web.Request, route: str, status: int, seconds: float) -> None:
    ctx = context_of(request)
    method = request.method if request.method in KNOWN_METHODS else "other"  # bounded labels
    ctx.metrics.observe_request(method, route, status, seconds)
    ctx.metrics.in_flight.set(request.app[EDGE].in_flight)
    if status >= 500 or seconds >= slow_request_s:
        log.info("request", extra={"method": request.method, "route": route, "status": status,
                                   "duration_ms": round(seconds * 1000, 2)})
    elif log.isEnabledFor(logging.DEBUG):
        log.debug("request", extra={"method": request.method, "route": route, "status": status,
                                    "duration_ms": round(seconds * 1000, 2)})
