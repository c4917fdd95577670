"""The aiohttp applications of one node: the public API (every route of API.md) and the internal
listener (``internal.create_app``), each served on its own port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import uvloop
from aiohttp import web

from ..feed import exporter
from . import admin, auth, cross_shard, feed, integrity, internal, membership, ops, reads, writes
from .context import CONTEXT, NodeContext
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
    ("GET", "/v1/feed", feed.get_feed),
    ("GET", "/v1/feed/stream", feed.stream_feed),
    ("PUT", "/v1/feed/consumers/{name}/offsets", feed.put_offsets),
    ("GET", "/v1/feed/consumers/{name}", feed.get_consumer),
    ("DELETE", "/v1/feed/consumers/{name}", feed.delete_consumer),
    ("GET", "/v1/feed/dlq", feed.list_dead_letters),
    ("POST", "/v1/feed/dlq/redrive", feed.redrive_dead_letters),
    ("GET", "/v1/cluster", membership.cluster_status),
    ("GET", "/v1/cluster/map", ops.cluster_map),
    ("POST", "/v1/cluster/nodes", membership.register_node),
    ("DELETE", "/v1/cluster/nodes/{node}", membership.remove_node),
    ("POST", "/v1/shards/{shard}/replicas", membership.add_replica),
    ("DELETE", "/v1/shards/{shard}/replicas/{node}", membership.remove_replica),
    ("POST", "/v1/cluster/meta/move", membership.move_meta),
    ("GET", "/healthz", ops.healthz),
    ("GET", "/readyz", ops.readyz),
    ("GET", "/metrics", ops.metrics),
    ("GET", "/openapi.json", ops.openapi_json),
    ("GET", "/v1/admin/verify", admin.verify),
    ("GET", "/v1/admin/shards/{shard}/fingerprint", admin.fingerprint),
    ("GET", "/v1/admin/shards/{shard}/totals", admin.totals),
    ("GET", "/v1/admin/shards/{shard}/cut", admin.cut),
    ("GET", "/v1/admin/shards/{shard}/backup", admin.backup_shard),
    ("GET", "/v1/admin/cluster/map", admin.cluster_map),
    *auth.TOKEN_ROUTES,
    ("GET", "/v1/keys", integrity.get_keys),
    ("GET", "/v1/shards/{shard}/tree-head", integrity.get_tree_head),
    ("GET", "/v1/shards/{shard}/consistency", integrity.get_consistency),
    ("GET", "/v1/shards/{shard}/leaves/{index}/proof", integrity.get_leaf_proof),
    ("GET", f"/v1/transactions/{ID}/proof", integrity.get_transaction_proof),
    ("GET", f"/v1/accounts/{ID}/chain", integrity.get_chain),
)


def create_app(ctx: NodeContext, credentials: bool = False) -> web.Application:
    """The HTTP API of the node described by ``ctx`` (its shard services, peers and limits);
    ``credentials``: every route but the open ones takes a bearer token (``auth``)."""
    app = web.Application()
    install(app, ctx, credentials)
    return app


def install(app: web.Application, ctx: NodeContext, credentials: bool = False) -> None:
    """Add the edge and credential middlewares, the routes and the shard metrics to a not yet
    started ``app``."""
    app.middlewares.append(edge)
    auth.install(app, ctx, credentials)
    app[CONTEXT] = ctx
    app[EDGE] = EdgeState()
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    ctx.metrics.watch_shards(lambda: {s: svc.status() for s, svc in ctx.shards.items()})

    async def close_client(_: web.Application) -> None:
        await ctx.close()

    app.cleanup_ctx.append(partial(_resolvers, ctx))
    app.cleanup_ctx.append(partial(_key_publisher, ctx))
    feed.install(app, ctx)
    app.cleanup_ctx.append(partial(exporter.background, ctx))
    app.on_cleanup.append(close_client)


async def _key_publisher(ctx: NodeContext, _: web.Application) -> AsyncIterator[None]:
    """Publish this node's public signing keys in the cluster map (``integrity.publish_keys``)."""
    task = asyncio.get_running_loop().create_task(integrity.publish_keys(ctx), name="publish-keys")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _resolvers(ctx: NodeContext, _: web.Application) -> AsyncIterator[None]:
    """The cross-shard resolver runs while the API serves (docs/design.md)."""
    task = asyncio.get_running_loop().create_task(cross_shard.resolve(ctx), name="cross-shard-resolver")
    yield
    task.cancel()
    for pending in [task, *ctx.background]:
        pending.cancel()
    await asyncio.gather(task, *ctx.background, return_exceptions=True)


async def start(ctx: NodeContext, host: str, port: int,
                internal_port: int | None = None) -> list[web.AppRunner]:
    """Serve the node's API on ``host:port`` (and its internal listener on ``internal_port``) from
    the running loop, each behind the listener guard; ``await runner.cleanup()`` each runner."""
    apps = [(create_app(ctx), port)]
    if internal_port is not None:
        apps.append((internal.create_app(ctx), internal_port))
    runners = []
    for app, app_port in apps:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await GuardedSite(runner, host, app_port, http=ctx.settings.http, backlog=1024).start()
        runners.append(runner)
    return runners


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The server loop: uvloop (the node process runs everything on it)."""
    return uvloop.new_event_loop()
