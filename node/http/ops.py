"""Operations routes: liveness, readiness, the cluster map, metrics and the API description (the
cluster's status is ``membership.cluster_status``)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ..metrics import CONTENT_TYPE
from . import openapi
from .context import NodeContext, context_of
from .render import respond

ready_lag_max = 1000


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop turns."""
    return respond(request, 200, {"status": "ok", "node": context_of(request).node_id})


def shard_readiness(ctx: NodeContext) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for shard, svc in sorted(ctx.shards.items()):
        status = svc.status()
        leader = status.get("leader") or (ctx.node_id if svc.is_leader() else None)
        lag = int(status.get("lag", 0))
        out[str(shard)] = {"leader": leader, "lag": lag,
                           "ready": leader is not None and lag <= ready_lag_max}
    return out


async def readyz(request: web.Request) -> web.Response:
    """This node has a cluster map, and every hosted shard has a known leader and this replica is
    caught up with its commit index."""
    ctx = context_of(request)
    shards = shard_readiness(ctx)
    has_map = ctx.maps.current is not None
    ready = has_map and all(s["ready"] for s in shards.values())
    body = {"ready": ready, "node": ctx.node_id, "map": {"epoch": ctx.maps.epoch, "ready": has_map},
            "shards": shards}
    return respond(request, 200 if ready else 503, body, None if ready else {"Retry-After": "1"})


async def cluster_map(request: web.Request) -> web.Response:
    """The cluster map this node routes by (503 ``unavailable`` while it has none)."""
    return respond(request, 200, context_of(request).cluster_map.to_json())


async def metrics(request: web.Request) -> web.Response:
    ctx = context_of(request)
    return web.Response(body=ctx.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def openapi_json(request: web.Request) -> web.Response:
    body = json.dumps(openapi.spec(), separators=(",", ":"))
    return web.Response(body=body, content_type="application/json")
