"""The HTTP edge under hostile or broken clients: connections that never finish their headers, too
many connections, bodies that do not decode, clients that hang up, URLs that name no shard.

The in-process tests serve the API the way a node does (``web.AppRunner`` behind
``guard.GuardedSite``; a handler is not cancelled when its client leaves) over the direct shard
service of tests/test_http_api.py. The last tests run a real node process with a low descriptor limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from inprocess import poll
from raftledger.node.http import Limits, NodeContext, create_app, guard
from raftledger.node.http.middleware import EDGE
from raftledger.node.service import Committed
from raftledger.statemachine.store import LedgerStore
from test_http_api import SHARDS, DirectShard

close_wait_s = 10.0  # upper bound for the server to close a connection it should close


@dataclass
class Served:
    site: guard.GuardedSite
    app: web.Application
    ctx: NodeContext
    shards: dict[int, DirectShard]
    url: str
    http: aiohttp.ClientSession

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.site.port

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*self.address)


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """``await serve(Limits(...))``: the API of a node with two direct shards, behind a guarded site."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(limits: Limits | None = None) -> Served:
        limits = limits or Limits(body_read_timeout_s=2.0, descriptors_reserved=0)
        stores = [LedgerStore(str(tmp_path / f"s{s}.lmdb"), shard=s, map_size=2**28)
                  for s in range(SHARDS)]
        shards = {s: DirectShard(store, s) for s, store in enumerate(stores)}
        ctx = NodeContext("n1", shards, SHARDS, limits=limits)
        runner = web.AppRunner(create_app(ctx), access_log=None, handle_signals=False)
        await runner.setup()
        site = guard.GuardedSite(runner, "127.0.0.1", 0, limits=limits)
        await site.start()
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))

        async def cleanup() -> None:
            await http.close()
            await runner.cleanup()
            for store in stores:
                store.close()
        cleanups.append(cleanup)
        return Served(site, runner.app, ctx, shards, f"http://127.0.0.1:{site.port}", http)

    yield start
    for cleanup in reversed(cleanups):
        await cleanup()


async def closed_by_server(reader: asyncio.StreamReader, timeout_s: float = close_wait_s) -> bytes:
    """What the server sent before it closed the connection (fails if it stays open)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    except ConnectionResetError:
        return b""


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str]:
    body = await resp.json()
    assert set(body["error"]) == {"code", "message", "details"}, body
    return resp.status, body["error"]["code"]


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


# --- the guard's view of aiohttp ------------------------------------------------------------------


async def test_guard_reads_aiohttp_connection_state():
    """The one place the guard reads aiohttp's private state: check it against this aiohttp."""
    guard.check_aiohttp()
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await gate.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = guard.GuardedSite(runner, "127.0.0.1", 0, limits=Limits(descriptors_reserved=0))
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        server = runner.server
        assert server is not None
        handler = (await poll(lambda: server.connections, close_wait_s, "a connection"))[0]
        await poll(lambda: guard.waits_for_request(handler), close_wait_s, "the first wait")
        assert guard.requests_parsed(handler) == 0  # never spoke
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Part")  # part of the headers
        await writer.drain()
        assert guard.waits_for_request(handler) and guard.requests_parsed(handler) == 0
        writer.write(b"ial: 1\r\n\r\n")
        await entered.wait()
        assert not guard.waits_for_request(handler)  # a request in progress
        gate.set()
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
        await poll(lambda: guard.waits_for_request(handler), close_wait_s, "the next wait")
        assert guard.requests_parsed(handler) == 1
        writer.close()
        await poll(lambda: site.connections == 0, close_wait_s, "the connection to be forgotten")
    finally:
        await runner.cleanup()


# --- connections: the bound and the header deadline -----------------------------------------------


async def test_connection_at_the_bound_closes_the_oldest_idle_connection(serve):
    served = await serve(Limits(connections_max=4, descriptors_reserved=0))
    idle = [await served.connect() for _ in range(4)]
    await poll(lambda: served.site.connections == 4, close_wait_s, "4 open connections")
    async with served.http.get(served.url + "/healthz") as resp:  # a fifth: the oldest makes room
        assert resp.status == 200
    assert await closed_by_server(idle[0][0]) == b""
    assert served.site.evicted >= 1 and served.site.refused == 0
    for _, writer in idle:
        writer.close()


async def test_connection_past_the_bound_is_refused_while_every_connection_is_busy(serve):
    served = await serve(Limits(connections_max=2, descriptors_reserved=0))
    gate = asyncio.Event()
    original = served.shards[0].submit

    async def held(command: Any) -> Committed:
        await gate.wait()
        return await original(command)

    served.shards[0].submit = held  # type: ignore[method-assign]
    ids = [i for i in (f"busy{n}" for n in range(100)) if served.ctx.shard_of(i) == 0][:2]
    busy = [asyncio.ensure_future(served.http.post(served.url + "/v1/accounts",
                                                   json={"id": i, "currency": "BRL"}))
            for i in ids]
    await poll(lambda: served.app[EDGE].in_flight == 2, close_wait_s, "two requests in progress")
    reader, writer = await served.connect()
    answer = await closed_by_server(reader)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    assert json.loads(body)["error"]["code"] == "overloaded"
    assert served.site.refused == 1
    assert 'raftledger_overload_rejections_total{where="connections"} 1.0' in \
        served.ctx.metrics.render().decode()
    gate.set()
    for resp in await asyncio.gather(*busy):
        assert resp.status == 201
    writer.close()


async def test_connection_that_never_sends_headers_is_closed_after_header_timeout(serve):
    served = await serve(Limits(header_timeout_s=0.5, descriptors_reserved=0))
    opened = time.monotonic()
    reader, writer = await served.connect()
    assert await closed_by_server(reader) == b""
    assert time.monotonic() - opened >= 0.5
    assert served.site.timed_out == 1
    writer.close()


async def test_keep_alive_connection_waits_header_timeout_from_its_last_response(serve):
    served = await serve(Limits(header_timeout_s=2.0, descriptors_reserved=0))
    reader, writer = await served.connect()
    opened = time.monotonic()
    while True:  # requests 0.6 s apart keep the connection open well past header_timeout_s
        sent = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        if time.monotonic() - opened > 3.0:
            break
        with pytest.raises(TimeoutError):  # the client's pause: the server must not close
            await asyncio.wait_for(reader.read(1), 0.6)
    assert await closed_by_server(reader) == b""
    assert time.monotonic() - sent >= 2.0
    writer.close()


async def test_slowloris_trickling_one_header_byte_per_200ms_is_closed_after_header_timeout(serve):
    served = await serve(Limits(header_timeout_s=1.0, descriptors_reserved=0))
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100 + b"\r\n\r\n"
    opened = time.monotonic()
    reader, writer = await served.connect()
    closed_after = None
    for byte in request:  # 24 s of trickling if nothing stopped it
        try:
            writer.write(bytes([byte]))
            if await asyncio.wait_for(reader.read(1), 0.2) == b"":  # the trickle's pace
                closed_after = time.monotonic() - opened
                break
        except TimeoutError:
            continue
        except ConnectionError:
            closed_after = time.monotonic() - opened
            break
    assert closed_after is not None, "the server kept a trickling connection open"
    assert 1.0 <= closed_after < close_wait_s
    assert served.site.timed_out == 1
    writer.close()
