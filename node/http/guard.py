"""The listener's guard: bounded connections, a deadline for request headers, descriptors in reserve.

A connection costs a file descriptor from the moment it is accepted, long before it is a request, so
the edge's per-request bounds (middleware.py) cannot protect the node from clients that connect and
never finish a request. ``GuardedSite`` serves an aiohttp runner like ``web.TCPSite`` and adds:

- **At most ``connections_max`` open connections** (``HttpSettings``). A connection arriving at the bound
  closes the oldest connection that has no request in progress (idle between requests, or never
  sent a complete request), so new clients keep being served; only when every connection is busy is
  the new one refused with 503 ``overloaded`` (counted as ``overloaded{where="connections"}``).
- **Headers within ``header_timeout_s``**, counted from the connection's opening or from the end of
  its previous response; bytes trickling in do not extend it (slowloris). A periodic sweep over the
  connections closes those past it, so the per-request path gains no timer and no task.
- **Descriptors in reserve**: ``raise_descriptor_limit()`` raises the soft RLIMIT_NOFILE to the hard
  one, and the effective ``connections_max`` is at most the soft limit less
  ``descriptors_reserved``, which stay for the Raft journal, snapshots, LMDB, Raft sockets and
  forwarding connections. The effective values are logged once when the site starts.

What a connection is doing is read from aiohttp's ``RequestHandler`` under "aiohttp internals" below
and nowhere else (``check_aiohttp`` refuses a RequestHandler without that state and warns on a
version it was not written for); tests/test_http_edge.py checks them against the aiohttp installed.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from raftledger.client.errors import LedgerError, retry_after_header

from ..metrics import Metrics
from ..settings import HttpSettings
from .context import CONTEXT
from .render import json_bytes

log = logging.getLogger("raftledger.http.guard")

sweep_interval_max_s = 1.0
sweeps_per_timeout = 4  # a connection is closed at most a quarter of the timeout late
report_interval_s = 60.0  # closures are logged at most this often
refused_retry_after_s = 1.0


# -- descriptors -----------------------------------------------------------------------------------
def raise_descriptor_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. a sandbox that refuses: keep what we have
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return descriptor_limit()


def descriptor_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 2**31 - 1 if soft == resource.RLIM_INFINITY else soft


def connections_max_for(limits: HttpSettings, descriptors_soft: int) -> int:
    """``connections_max``, capped so that ``descriptors_reserved`` descriptors stay free."""
    return max(1, min(limits.connections_max, descriptors_soft - limits.descriptors_reserved))


# -- aiohttp internals: the only reads of RequestHandler's private state ----------------------------
# Written for aiohttp 3.14. start() awaits a fresh future in ``_waiter`` while it waits for the next
# request (the parser may hold part of its headers); ``_waiter`` is None while a request is handled
# and while the rest of a body is drained. ``_request_count`` counts the requests parsed so far.
# Every RequestHandler tells its Server of its lost connection (``Server.connection_lost``).
AIOHTTP_WRITTEN_FOR = "3.14"
HANDLER_STATE = ("_waiter", "_request_count")


def waits_for_request(handler: RequestHandler) -> bool:
    """No request in progress: the connection is idle, or has sent part of a request's headers."""
    waiter = handler._waiter
    return waiter is not None and not waiter.done()


def requests_parsed(handler: RequestHandler) -> int:
    return handler._request_count


def watch_lost(server: web.Server, forget: Callable[[RequestHandler], None]) -> None:
    """Hear of every closed connection: a RequestHandler reports its loss to its Server through
    ``Server.connection_lost(handler, exc)``; this wraps that method on this one instance."""
    original = server.connection_lost

    def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
        forget(handler)
        original(handler, exc)

    server.connection_lost = connection_lost  # type: ignore[method-assign]


def check_aiohttp() -> None:
    missing = [name for name in HANDLER_STATE if name not in RequestHandler.__slots__]
    if missing:
        raise RuntimeError(f"aiohttp {aiohttp.__version__}: RequestHandler has no {missing}; "
                           f"node/http/guard.py was written for aiohttp {AIOHTTP_WRITTEN_FOR}")
    if not aiohttp.__version__.startswith(AIOHTTP_WRITTEN_FOR + "."):
        log.warning("aiohttp %s: node/http/guard.py was written for %s; run tests/test_http_edge.py",
                    aiohttp.__version__, AIOHTTP_WRITTEN_FOR)


# -- the site ----------------------------------------------------------------------------------------
class _Seen:
    """What the sweep knew of a connection: since when it waits for headers (None: busy when last
    looked at), and how many requests it had parsed then."""

    __slots__ = ("idle_since", "requests")

    def __init__(self, idle_since: float | None, requests: int) -> None:
        self.idle_since = idle_since
        self.requests = requests


def refusal_response() -> bytes:
    body = json_bytes(LedgerError("overloaded", details={"reason": "too many connections"}).body())
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: "
            f"{retry_after_header(refused_retry_after_s)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class _Refusal(asyncio.Protocol):
    """A connection past the bound while every open connection is busy: answer 503 and close."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.response)
        transport.close()


class GuardedSite(web.BaseSite):
    """``web.TCPSite`` with a bound on open connections and a deadline for request headers.

    ``http`` defaults to the settings of the API mounted on the runner's application (``NodeContext``),
    else ``HttpSettings()``. The bound is fixed at ``start()`` from the descriptor limit in force then
    (see ``raise_descriptor_limit``).
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 http: HttpSettings | None = None, backlog: int = 128,
                 reuse_address: bool | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, backlog=backlog)
        check_aiohttp()
        context = _context(runner)
        self.limits = http or (context.settings.http if context else HttpSettings())
        self.metrics: Metrics | None = context.metrics if context else None
        self.host = host
        self.requested_port = port
        self.reuse_address = reuse_address
        self.ssl_context = ssl_context  # None: plain HTTP
        self.backlog = backlog
        self.connections_max = self.limits.connections_max  # effective value: set by start()
        self.evicted = 0  # idle connections closed to admit a new one
        self.refused = 0  # new connections refused: every open one was busy
        self.timed_out = 0  # connections closed for not sending headers in time
        self._aiohttp_server: web.Server = runner.server  # type: ignore[assignment]
        self._open: dict[RequestHandler, _Seen] = {}  # insertion order: oldest first
        self._refusal = refusal_response()
        self._sweeper: asyncio.Task[None] | None = None
        self._listener: asyncio.Server | None = None
        self._reported = (0, 0, 0)
        self._report_due = 0.0

    @property
    def name(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port once started (``port=0`` picks a free one)."""
        if self._listener is not None and self._listener.sockets:
            return int(self._listener.sockets[0].getsockname()[1])
        return self.requested_port

    @property
    def connections(self) -> int:
        return len(self._open)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        soft = descriptor_limit()
        self.connections_max = connections_max_for(self.limits, soft)
        watch_lost(self._aiohttp_server, self._forget)
        self._listener = await loop.create_server(
            self._accept, self.host, self.requested_port, backlog=self.backlog,
            reuse_address=self.reuse_address, ssl=self.ssl_context)
        self._server = self._listener  # BaseSite.stop() closes it
        self._sweeper = loop.create_task(self._sweep_forever())
        log.info("listener %s: connections_max %d (configured %d; soft descriptor limit %d, %d reserved), "
                 "header_timeout_s %s", self.name, self.connections_max, self.limits.connections_max,
                 soft, self.limits.descriptors_reserved, self.limits.header_timeout_s)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await super().stop()

    # -- admission -------------------------------------------------------------------------------
    def _accept(self) -> asyncio.Protocol:
        """The protocol factory of the listening socket: called once per accepted connection."""
        if len(self._open) >= self.connections_max and not self._evict_oldest_idle():
            self.refused += 1
            if self.metrics is not None:
                self.metrics.overloaded("connections")
            return _Refusal(self._refusal)
        handler = self._aiohttp_server()
        self._open[handler] = _Seen(asyncio.get_running_loop().time(), 0)
        return handler

    def _evict_oldest_idle(self) -> bool:
        for handler in self._open:
            if waits_for_request(handler):
                self._close(handler)
                self.evicted += 1
                return True
        return False

    def _close(self, handler: RequestHandler) -> None:
        del self._open[handler]
        handler.force_close()

    def _forget(self, handler: RequestHandler) -> None:
        self._open.pop(handler, None)

    # -- the header deadline ---------------------------------------------------------------------
    async def _sweep_forever(self) -> None:
        interval_s = min(sweep_interval_max_s, self.limits.header_timeout_s / sweeps_per_timeout)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)  # a periodic sweep: no timer per request
            now = loop.time()
            for handler in self.overdue(now):
                self._close(handler)
                self.timed_out += 1
            self._report(now)

    def overdue(self, now: float) -> list[RequestHandler]:
        """Connections that have waited for a request's headers ``header_timeout_s`` or longer.

        A connection seen busy, or seen to have parsed a request since the last sweep, waits from
        this sweep on; one that never sent a request waits from its opening."""
        timeout_s = self.limits.header_timeout_s
        late: list[RequestHandler] = []
        for handler, seen in self._open.items():
            if not waits_for_request(handler):
                seen.idle_since = None
                continue
            requests = requests_parsed(handler)
            if seen.idle_since is None or requests != seen.requests:
                seen.idle_since, seen.requests = now, requests
            elif now - seen.idle_since >= timeout_s:
                late.append(handler)
        return late

    def _report(self, now: float) -> None:
        counts = (self.evicted, self.refused, self.timed_out)
        if counts == self._reported or now < self._report_due:
            return
        evicted, refused, timed_out = (n - before for n, before in zip(counts, self._reported,
                                                                       strict=True))
        log.warning("listener %s: closed %d idle connections for new ones, refused %d, closed %d "
                    "without headers after %ss (%d open)", self.name, evicted, refused, timed_out,
                    self.limits.header_timeout_s, len(self._open))
        self._reported, self._report_due = counts, now + report_interval_s


def _context(runner: web.BaseRunner) -> Any:
    app = getattr(runner, "app", None)  # an AppRunner's application
    return app.get(CONTEXT) if app is not None else None
