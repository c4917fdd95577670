"""The two thin transports under the core (``client.core``): each performs one ``Send`` and nothing
else. ``SyncTransport`` uses the standard library's ``http.client`` with kept-alive connections per
node; ``AsyncTransport`` an aiohttp session. Neither retries, routes or decodes: the core does."""

from __future__ import annotations

import asyncio
import http.client
import io
import socket
import ssl
import threading
import time
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp

from .core import Outcome, Program, Reply, Send, Sleep, TransportFailure

T = TypeVar("T")

idle_connections_max = 16  # kept-alive connections per node, per client
# A node closes a connection idle for its header timeout (10 s by default); one idle longer than
# this is not reused, so a request rarely meets a connection the node has just closed.
idle_s_max = 5.0


def trust(ca_file: str | None) -> ssl.SSLContext | None:
    """The context ``https://`` nodes are verified with: the system's CAs, and ``ca_file`` (a
    cluster's own CA, e.g. the one ``raftledger up --tls`` made) when given."""
    if not ca_file:
        return None
    context = ssl.create_default_context()
    context.load_verify_locations(ca_file)
    return context


class _Stale:
    """A kept-alive connection turned out closed (or the node closed it while we sent)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Stream:
    """A streamed answer's body: read from the response; closing it closes its connection (never
    kept alive: the caller may stop before the end)."""

    def __init__(self, response: http.client.HTTPResponse, conn: http.client.HTTPConnection) -> None:
        self._response = response
        self._conn = conn

    def read(self, size: int) -> bytes:
        return self._response.read(size)

    def close(self) -> None:
        self._response.close()
        self._conn.close()


class SyncTransport:
    """Blocking HTTP/1.1 with a small pool of kept-alive connections per node; thread-safe."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._idle: dict[str, list[tuple[http.client.HTTPConnection, float]]] = {}
        self._lock = threading.Lock()
        self._ssl = ssl_context  # None: the system's CAs

    def drive(self, program: Program[T]) -> T:
        """Run a core program to its end: send what it asks, sleep when it asks."""
        outcome: Outcome = None
        while True:
            try:
                action = program.send(outcome)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if isinstance(action, Sleep):
                time.sleep(action.seconds)
                outcome = None
            else:
                outcome = self.send(action)

    def send(self, request: Send) -> Reply | TransportFailure:
        parts = urlsplit(request.url)
        origin = f"{parts.scheme}://{parts.netloc}"
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = self._idle_connection(origin)
        if conn is not None:
            answer = self._exchange(origin, conn, request, path)
            if not isinstance(answer, _Stale):
                return answer
        # A new connection; after a kept-alive one failed, the request may have reached the node.
        fresh = self._exchange(origin, self._new_connection(parts.scheme, parts.netloc), request, path)
        if isinstance(fresh, _Stale):
            return TransportFailure(fresh.reason, sent=True)
        if isinstance(fresh, TransportFailure) and conn is not None:
            return TransportFailure(fresh.reason, sent=True)
        return fresh

    def _exchange(self, origin: str, conn: http.client.HTTPConnection, request: Send,
                  path: str) -> Reply | TransportFailure | _Stale:
        conn.timeout = request.timeout_s
        if conn.sock is not None:
            conn.sock.settimeout(request.timeout_s)
        try:
            conn.request(request.method, path or "/", body=request.body, headers=dict(request.headers))
            response = conn.getresponse()
            if request.stream and 200 <= response.status < 300:
                headers = {k.lower(): v for k, v in response.getheaders()}
                return Reply(response.status, headers, b"", _Stream(response, conn))
            body = response.read()
        except (ConnectionRefusedError, socket.gaierror) as exc:
            conn.close()
            return TransportFailure(f"{type(exc).__name__}: {exc}", sent=False)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            conn.close()
            return _Stale(f"{type(exc).__name__}: {exc}")
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            return TransportFailure(f"{type(exc).__name__}: {exc}", sent=True)
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.will_close:
            conn.close()
        else:
            self._release(origin, conn)
        return Reply(response.status, headers, body)

    def _idle_connection(self, origin: str) -> http.client.HTTPConnection | None:
        """A kept-alive connection used recently enough that the node has not closed it."""
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(origin, [])
            while idle:
                conn, since = idle.pop()
                if now - since < idle_s_max:
                    return conn
                conn.close()
        return None

    def _new_connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, context=self._ssl)
        return http.client.HTTPConnection(netloc)

    def _release(self, origin: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < idle_connections_max:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            pools, self._idle = list(self._idle.values()), {}
        for idle in pools:
            for conn, _ in idle:
                conn.close()


class AsyncTransport:
    """aiohttp, one session (its connection pool) per client."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._ssl = ssl_context  # None: the system's CAs

    async def drive(self, program: Program[T]) -> T:
        outcome: Outcome = None
        while True:
            try:
                action = program.send(outcome)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if isinstance(action, Sleep):
                await asyncio.sleep(action.seconds)
                outcome = None
            else:
                outcome = await self.send(action)

    async def send(self, request: Send) -> Reply | TransportFailure:
        session = self._open()
        timeout = aiohttp.ClientTimeout(total=request.timeout_s)
        try:
            async with session.request(request.method, request.url, data=request.body,
                                       headers=dict(request.headers), timeout=timeout) as response:
                body = await response.read()
                headers = {k.lower(): v for k, v in response.headers.items()}
                if request.stream and 200 <= response.status < 300:  # read whole: no blocking reads here
                    return Reply(response.status, headers, b"", io.BytesIO(body))
                return Reply(response.status, headers, body)
        except aiohttp.ClientConnectorError as exc:  # the connection could not be made
            return TransportFailure(f"{type(exc).__name__}: {exc}", sent=False)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return TransportFailure(f"{type(exc).__name__}: {exc}", sent=True)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(keepalive_timeout=idle_s_max, ssl=self._ssl or True)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
