"""The aiohttp application of one node: every route of API.md, plus the internal routes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from aiohttp import web

from ..metrics import Metrics
from . import forward, ops, reads, writes
from .context import CONTEXT, Limits, NodeContext
from .guard import GuardedSite
from .middleware import EDGE, EdgeState, edge

ID = "{id:[^/]+}"  # ids may hold braces ({tag}), raw or percent-encoded

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/v1/accounts", writes.create_accounts),
    ("GET", f"/v1/accounts/{ID}", reads.get_account),
    ("GET", f"/v1/accounts/{ID}/balance", reads.get_balance),
    ("GET", f"/v1/accounts/{ID}/entries", reads.get_entries),
    ("POST", "/v1/transactions", writes.create_transaction),
    ("POST", "/v1/transactions/batch", writes.create_batch),
    ("GET", f"/v1/transactions/{ID}", reads.get_transaction),
    ("POST", f"/v1/transactions/{ID}/post", writes.post_pending),
    ("POST", f"/v1/transactions/{ID}/void", writes.void_pending),
    ("POST", f"/v1/transactions/{ID}/reverse", writes.reverse_transaction),
    ("POST", "/transacoes", writes.create_transaction),
    ("GET", f"/contas/{ID}/saldo", reads.get_balance),
    ("GET", f"/contas/{ID}/extrato", reads.get_entries),
    ("GET", "/v1/cluster", ops.cluster),
    ("GET", "/healthz", ops.healthz),
    ("GET", "/readyz", ops.readyz),
    ("GET", "/metrics", ops.metrics),
    ("GET", "/openapi.json", ops.openapi_json),
    ("POST", "/internal/v1/shards/{shard}/submit", forward.internal_submit),
    ("POST", "/internal/v1/shards/{shard}/barrier", forward.internal_barrier),
    ("GET", "/internal/v1/status", forward.internal_status),
)


def create_app(ctx: NodeContext) -> web.Application:
    """The HTTP API of the node described by ``ctx`` (its shard services, peers and limits)."""
    app = web.Application()
    install(app, ctx)
    return app


def mount_api(app: web.Application, runtime: Any) -> NodeContext:
    """Mount the API on the node process's application (``raftledger.node.runtime``).

    Optional runtime attributes: ``metrics`` (a ``Metrics`` the Raft glue also reports to) and
    ``http_limits`` (``Limits``); defaults otherwise."""
    ctx = NodeContext(runtime.node_id, runtime.services, runtime.shard_count,
                      peers=runtime.peers, placement=runtime.placement,
                      limits=getattr(runtime, "http_limits", None) or Limits(),
                      metrics=getattr(runtime, "metrics", None) or Metrics(runtime.node_id))
    install(app, ctx)
    return ctx


def install(app: web.Application, ctx: NodeContext) -> None:
    """Add the edge middleware, the routes and the shard metrics to a not yet started ``app``."""
    app.middlewares.append(edge)
    app[CONTEXT] = ctx
    app[EDGE] = EdgeState()
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    ctx.metrics.watch_shards(lambda: {s: svc.status() for s, svc in ctx.shards.items()})

    async def close_client(_: web.Application) -> None:
        await ctx.close()

    app.on_cleanup.append(close_client)


async def start(ctx: NodeContext, host: str, port: int) -> web.AppRunner:
    """Serve the node's API on ``host:port`` from the running loop; ``await runner.cleanup()``."""
    runner = web.AppRunner(create_app(ctx), access_log=None, handle_signals=False)
    await runner.setup()
    await GuardedSite(runner, host, port, limits=ctx.limits, backlog=1024).start()
    return runner


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The server loop: uvloop (the node process runs everything on it)."""
    return uvloop.new_event_loop()
