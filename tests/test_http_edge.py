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
import resource
import select
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster
from raftledger.node.http import NodeContext, create_app, guard, openapi
from raftledger.node.http.middleware import EDGE
from raftledger.node.runtime import listener_settings
from raftledger.node.service import Committed
from raftledger.node.settings import HttpSettings, NodeSettings
from raftledger.node.testing import wait_until
from raftledger.statemachine.store import LedgerStore
from test_http_api import SHARDS, TAG, DirectShard, transfer

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
    """``await serve(HttpSettings(...))``: the API of a node with two direct shards, behind a guarded
    site."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(limits: HttpSettings | None = None) -> Served:
        limits = limits or HttpSettings(body_read_timeout_s=2.0, descriptors_reserved=0)
        stores = [LedgerStore(str(tmp_path / f"s{s}.lmdb"), shard=s, map_size=2**28)
                  for s in range(SHARDS)]
        shards = {s: DirectShard(store, s) for s, store in enumerate(stores)}
        ctx = NodeContext("n1", shards, SHARDS, settings=NodeSettings(http=limits))
        runner = web.AppRunner(create_app(ctx), access_log=None, handle_signals=False)
        await runner.setup()
        site = guard.GuardedSite(runner, "127.0.0.1", 0, http=limits)
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
    site = guard.GuardedSite(runner, "127.0.0.1", 0, http=HttpSettings(descriptors_reserved=0))
    await site.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        server = runner.server
        assert server is not None
        handler = (await wait_until(lambda: server.connections, close_wait_s, "a connection"))[0]
        await wait_until(lambda: guard.waits_for_request(handler), close_wait_s, "the first wait")
        assert guard.requests_parsed(handler) == 0  # never spoke
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Part")  # part of the headers
        await writer.drain()
        assert guard.waits_for_request(handler) and guard.requests_parsed(handler) == 0
        writer.write(b"ial: 1\r\n\r\n")
        await entered.wait()
        assert not guard.waits_for_request(handler)  # a request in progress
        gate.set()
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
        await wait_until(lambda: guard.waits_for_request(handler), close_wait_s, "the next wait")
        assert guard.requests_parsed(handler) == 1
        writer.close()
        await wait_until(lambda: site.connections == 0, close_wait_s, "the connection to be forgotten")
    finally:
        await runner.cleanup()


# --- connections: the bound and the header deadline -----------------------------------------------


async def test_connection_at_the_bound_closes_the_oldest_idle_connection(serve):
    served = await serve(HttpSettings(connections_max=4, descriptors_reserved=0))
    idle = [await served.connect() for _ in range(4)]
    await wait_until(lambda: served.site.connections == 4, close_wait_s, "4 open connections")
    async with served.http.get(served.url + "/healthz") as resp:  # a fifth: the oldest makes room
        assert resp.status == 200
    assert await closed_by_server(idle[0][0]) == b""
    assert served.site.evicted >= 1 and served.site.refused == 0
    for _, writer in idle:
        writer.close()


async def test_connection_past_the_bound_is_refused_while_every_connection_is_busy(serve):
    served = await serve(HttpSettings(connections_max=2, descriptors_reserved=0))
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
    await wait_until(lambda: served.app[EDGE].in_flight == 2, close_wait_s, "two requests in progress")
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
    served = await serve(HttpSettings(header_timeout_s=0.5, descriptors_reserved=0))
    opened = time.monotonic()
    reader, writer = await served.connect()
    assert await closed_by_server(reader) == b""
    assert time.monotonic() - opened >= 0.5
    assert served.site.timed_out == 1
    writer.close()


async def test_keep_alive_connection_waits_header_timeout_from_its_last_response(serve):
    served = await serve(HttpSettings(header_timeout_s=2.0, descriptors_reserved=0))
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
    served = await serve(HttpSettings(header_timeout_s=1.0, descriptors_reserved=0))
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


# --- bodies and clients that go away --------------------------------------------------------------


@pytest.mark.parametrize("encoding,body", [
    ("deflate", b"not deflate at all"),
    ("deflate", zlib.compress(b'{"id": "x", "currency": "BRL"}')[:-6] + b"\x00" * 6),
    ("gzip", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xff\xff garbage"),  # a reserved block type
])
async def test_body_that_does_not_decode_is_400_malformed_body_and_logs_no_error(
        serve, caplog, encoding, body):
    served = await serve()
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    async with served.http.post(served.url + "/v1/accounts", data=body, headers=headers) as resp:
        assert await error_of(resp) == (400, "malformed_body")
        assert resp.headers["Connection"] == "close"  # the parser stopped: nothing more is read
    async with served.http.post(served.url + "/v1/nothing", data=body, headers=headers) as resp:
        assert await error_of(resp) == (404, "not_found")  # a route that never reads the body
    async with served.http.post(served.url + "/v1/accounts",
                                json={"id": f"a{TAG}", "currency": "BRL"}) as resp:
        assert resp.status == 201
    assert errors_logged(caplog) == []
    assert 'status="500"' not in served.ctx.metrics.render().decode()


async def test_valid_deflate_body_is_accepted(serve):
    served = await serve()
    body = zlib.compress(json.dumps({"id": f"z{TAG}", "currency": "BRL"}).encode())
    async with served.http.post(served.url + "/v1/accounts", data=body, headers={
            "Content-Type": "application/json", "Content-Encoding": "deflate"}) as resp:
        assert resp.status == 201


async def test_client_hanging_up_mid_body_is_not_logged_as_an_error_nor_counted_as_500(
        serve, caplog):
    served = await serve()
    reader, writer = await served.connect()
    writer.write(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"id\":")
    await writer.drain()
    await wait_until(lambda: served.app[EDGE].in_flight == 1, close_wait_s, "the body being read")
    writer.transport.abort()
    metrics = served.ctx.metrics
    await wait_until(lambda: 'status="499"' in metrics.render().decode(), close_wait_s,
                "the request to be counted")
    assert 'status="500"' not in metrics.render().decode()
    assert errors_logged(caplog) == []
    async with served.http.get(served.url + "/healthz") as resp:
        assert resp.status == 200


# --- URLs and query parameters --------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/internal/v1/shards/x/submit", "/internal/v1/shards/-1/submit", "/internal/v1/shards/99/submit",
    "/internal/v1/shards/%EF%BC%91/submit",  # a fullwidth digit one: int() would take it
    "/internal/v1/shards/" + "9" * 5000 + "/barrier",  # beyond int()'s digit limit
    "/internal/v1/shards/1e3/barrier",
])
async def test_path_shard_that_names_no_shard_is_404(serve, caplog, path):
    served = await serve()
    async with served.http.post(served.url + path, data=b"") as resp:
        assert await error_of(resp) == (404, "not_found")
    assert errors_logged(caplog) == []


async def test_405_answers_allow_header(serve):
    served = await serve()
    async with served.http.delete(served.url + "/v1/accounts") as resp:
        assert await error_of(resp) == (405, "method_not_allowed")
        assert resp.headers["Allow"] == "POST"
    async with served.http.put(served.url + f"/v1/accounts/a{TAG}") as resp:
        assert await error_of(resp) == (405, "method_not_allowed")
        assert resp.headers["Allow"] == "GET"


@pytest.mark.parametrize("path", [f"/v1/accounts/a{TAG}", f"/v1/accounts/a{TAG}/balance",
                                  f"/v1/accounts/a{TAG}/entries", f"/v1/transactions/t1{TAG}"])
async def test_min_token_naming_a_shard_that_does_not_exist_is_400_invalid_token(serve, path):
    served = await serve()
    async with served.http.post(served.url + "/v1/accounts",
                                json={"id": f"a{TAG}", "currency": "BRL"}) as resp:
        assert resp.status == 201
    async with served.http.post(served.url + "/v1/accounts",
                                json={"id": f"b{TAG}", "currency": "BRL"}) as resp:
        assert resp.status == 201
    async with served.http.post(served.url + "/v1/transactions", json=transfer("t1")) as resp:
        assert resp.status == 201
        token = resp.headers["X-Ledger-Token"]
    async with served.http.get(served.url + path, params={"min_token": token}) as resp:
        assert resp.status == 200
    for missing in (f"{SHARDS}:1", f"{token},{SHARDS + 5}:1"):
        async with served.http.get(served.url + path, params={"min_token": missing}) as resp:
            assert await error_of(resp) == (400, "invalid_token")


# --- the API description --------------------------------------------------------------------------


async def test_openapi_declares_415_on_every_body_and_the_list_form_of_accounts(serve):
    served = await serve()
    async with served.http.get(served.url + "/openapi.json") as resp:
        spec = await resp.json()
    assert spec == json.loads(json.dumps(openapi.spec()))
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if "requestBody" in op and "internal" not in op["tags"]:
                assert "415" in op["responses"], (method, path)
    create = spec["paths"]["/v1/accounts"]["post"]
    body_forms = create["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {"$ref": "#/components/schemas/NewAccounts"} in body_forms
    listed = spec["components"]["schemas"]["NewAccounts"]
    assert listed["required"] == ["accounts"]
    ok = create["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"]
    assert {"$ref": "#/components/schemas/BatchResults"} in ok
    # ... and the node answers as described
    async with served.http.post(served.url + "/v1/accounts", json={"accounts": [
            {"id": f"l1{TAG}", "currency": "BRL"}, {"id": f"l2{TAG}", "currency": "BRL"}]}) as resp:
        assert resp.status == 200
        results = (await resp.json())["results"]
    item_fields = spec["components"]["schemas"]["BatchResults"]["properties"]["results"]["items"]
    for item in results:
        assert set(item) <= set(item_fields["properties"]) and item["status"] == 201
    async with served.http.post(served.url + "/v1/accounts", data=b"{}",
                                headers={"Content-Type": "text/plain"}) as resp:
        assert await error_of(resp) == (415, "unsupported_media_type")


# --- a real node with few descriptors -------------------------------------------------------------

NODE_DESCRIPTORS = 1024  # the node's RLIMIT_NOFILE, soft and hard
IDLE_SOCKETS = 3 * NODE_DESCRIPTORS
NODE_HEADER_TIMEOUT_S = 4.0
idle_step = 256  # connections opened at once: well within the node's listen backlog (1024)
node_wait_s = 60.0


def _few_descriptors() -> None:  # runs in the node process before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (NODE_DESCRIPTORS, NODE_DESCRIPTORS))


@pytest.fixture(scope="module")
def scarce_node(tmp_path_factory: pytest.TempPathFactory):
    """One node, one shard, RLIMIT_NOFILE 1024, header_timeout_s 4 s."""
    settings = NodeSettings(http=HttpSettings(header_timeout_s=NODE_HEADER_TIMEOUT_S))
    cluster = LocalCluster(tmp_path_factory.mktemp("scarce"), nodes=1, shards=1, settings=settings,
                           preexec_fn=_few_descriptors)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def more_descriptors():
    """This process may need more descriptors than its soft limit for the idle sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_SOCKETS + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"needs {wanted} descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_idle(address: tuple[str, int], count: int, bound: int) -> list[socket.socket]:
    """``count`` connections that never send a byte, opened in steps the node's accept queue holds
    (a connection dropped from a full queue looks open to us but never reaches the node). After
    each step, wait until the node has taken it: it holds at most ``bound`` connections, so it has
    closed all but ``bound`` of ours (the oldest idle ones)."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            step = min(idle_step, count - len(sockets))
            sockets.extend(socket.create_connection(address, timeout=node_wait_s) for _ in range(step))
            launcher.wait_until(lambda: _closed_by_peer(sockets) >= len(sockets) - bound,
                                node_wait_s, f"the node to take {len(sockets)} connections")
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


def _closed_by_peer(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the other side closed (readable at EOF, or reset)."""
    poller = select.poll()
    for s in sockets:
        poller.register(s, select.POLLIN)
    return len(poller.poll(0))


def _node_request(cluster: LocalCluster, method: str, path: str, body: Any = None) -> tuple[
        int, dict[str, str], Any]:
    data = None if body is None else json.dumps(body).encode()
    return launcher.http_request(method, cluster.urls["n0"] + path, data, timeout_s=node_wait_s)


def _log_levels(log: str) -> set[str]:
    """The levels of a node's JSON log lines ("unparsed" for anything else it wrote)."""
    levels = set()
    for line in log.splitlines():
        try:
            levels.add(json.loads(line)["level"])
        except (ValueError, KeyError, TypeError):
            levels.add("unparsed")
    return levels


@pytest.mark.slow
def test_node_with_scarce_descriptors_keeps_serving_while_idle_sockets_pile_up(
        scarce_node, more_descriptors):
    cluster = scarce_node
    host, port = cluster.urls["n0"].removeprefix("http://").rsplit(":", 1)
    public = listener_settings(NodeSettings(http=HttpSettings(header_timeout_s=NODE_HEADER_TIMEOUT_S)))[1]
    bound = NODE_DESCRIPTORS - public.descriptors_reserved
    idle = _open_idle((host, int(port)), IDLE_SOCKETS, bound)
    try:
        for account in (f"a{TAG}", f"b{TAG}"):
            status, _, body = _node_request(cluster, "POST", "/v1/accounts",
                                            {"id": account, "currency": "BRL"})
            assert status == 201, body
        status, headers, body = _node_request(cluster, "POST", "/v1/transactions",
                                              transfer("scarce-1", 700))
        assert status == 201, body
        token = headers["X-Ledger-Token"]
        status, _, balance = _node_request(cluster, "GET",
                                           f"/v1/accounts/b%7Bc1%7D/balance?min_token={token}")
        assert status == 200 and balance["balance"] == -700
        node = cluster.status("n0")  # the internal listener answers too
        assert node is not None
        shard = node["shards"]["0"]
        assert shard["commit_index"] >= int(token.split(":")[1]) and shard["applied_index"] >= 3
        # The rest wait for headers that never come: closed after header_timeout_s.
        launcher.wait_until(lambda: _closed_by_peer(idle) == IDLE_SOCKETS,
                            NODE_HEADER_TIMEOUT_S + node_wait_s, "every idle socket to be closed")
    finally:
        for s in idle:
            s.close()
    log = cluster.log("n0")
    assert "Too many open files" not in log and "EMFILE" not in log
    assert _log_levels(log) <= {"info", "warning"}, log[-4000:]
    assert f"connections_max {bound} " in log and "idle connections for new ones" in log


@pytest.mark.slow
def test_node_answers_404_to_a_path_shard_that_names_no_shard(scarce_node):
    for path in ("/_node/shards/x/totals", "/_node/shards/7/totals", "/_node/shards/%EF%BC%91/totals"):
        status, _, body = _node_request(scarce_node, "GET", path)
        assert (status, body["error"]["code"]) == (404, "not_found"), (path, body)
    assert _log_levels(scarce_node.log("n0")) <= {"info", "warning"}
