"""Getting a command to its shard's leader, wherever it runs; and the internal routes that serve it.

Any node accepts any write. ``submit`` hands the command to the local replica's batcher; a follower
raises ``NotLeader`` and the command is forwarded over HTTP to the leader node's internal submit
route (codec-encoded command in, rendered results out). Forwarding again is safe: the command's id is
its idempotency key, so a retried command is answered from its stored outcome, never applied twice.
Retries happen only when the command was surely not proposed (not leader, connection refused).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from raftledger.statemachine import codec
from raftledger.statemachine.commands import AnyCommand

from ..errors import ApiError, from_unavailable
from ..logs import request_id_var
from ..service import NotLeader, ShardService, Unavailable
from .context import NodeContext, context_of
from .render import Rendered

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Ledger-Forwarded"
INTERNAL_PREFIX = "/internal/v1"
leader_poll_interval_s = 0.05

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ShardReply:
    shard: int
    index: int
    results: list[Rendered]


class RemoteNotLeader(Exception):
    def __init__(self, leader: str | None) -> None:
        super().__init__(leader)
        self.leader = leader


def _results(shard: int, outcome: Any) -> list[Rendered]:
    items = outcome if isinstance(outcome, list) else [outcome]
    return [Rendered.of(r, shard) for r in items]


async def submit(ctx: NodeContext, shard: int, command: AnyCommand) -> ShardReply:
    """Commit ``command`` on ``shard`` through its leader; raises ApiError when it cannot."""

    async def local(svc: ShardService) -> ShardReply:
        committed = await svc.submit(command)
        return ShardReply(shard, committed.index, _results(shard, committed.outcome))

    async def remote(node: str) -> ShardReply:
        return await _forward_submit(ctx, node, shard, command)

    return await _via_leader(ctx, shard, local, remote)


async def read_barrier(ctx: NodeContext, shard: int) -> int:
    """A linearizable read point for ``shard``: committed through its leader after this call."""
    timeout_s = ctx.limits.consistency_wait_s

    async def local(svc: ShardService) -> int:
        return await svc.read_barrier(timeout_s)

    async def remote(node: str) -> int:
        reply = await _post_internal(ctx, node, f"/shards/{shard}/barrier", b"")
        return int(reply["index"])

    return await _via_leader(ctx, shard, local, remote)


async def _via_leader(ctx: NodeContext, shard: int,
                      local: Callable[[ShardService], Awaitable[T]],
                      remote: Callable[[str], Awaitable[T]]) -> T:
    """Run on the local replica if it leads, else on the leader node; bounded retries."""
    svc = ctx.shards.get(shard)
    hint: str | None = None
    deadline = time.monotonic() + ctx.limits.leader_wait_s
    for _ in range(ctx.limits.forward_attempts_max):
        leader = hint or await _find_leader(ctx, shard, svc, deadline)
        hint = None
        try:
            if leader == ctx.node_id and svc is not None:
                return await local(svc)
            return await remote(leader)
        except NotLeader as exc:
            hint = exc.leader if exc.leader != leader else None
        except RemoteNotLeader as exc:
            hint = exc.leader if exc.leader != leader else None
        except Unavailable as exc:
            raise from_unavailable(exc) from exc
    raise ApiError("not_leader", details={"shard": shard}, retry_after_s=0.5)


async def _find_leader(ctx: NodeContext, shard: int, svc: ShardService | None,
                       deadline: float) -> str:
    """The leader as the local replica knows it (waiting out an election, bounded)."""
    if svc is None:
        nodes = [n for n in ctx.nodes_of(shard) if n != ctx.node_id]
        if not nodes:
            raise ApiError("unavailable", f"no node hosts shard {shard}")
        return nodes[0]  # it knows its leader and forwards
    while True:
        if svc.is_leader():
            return ctx.node_id
        leader = svc.leader_node_id()
        if leader is not None and leader != ctx.node_id:
            return leader
        if time.monotonic() >= deadline:
            raise ApiError("not_leader", details={"shard": shard}, retry_after_s=0.5)
        await asyncio.sleep(leader_poll_interval_s)  # an election is under way: poll, bounded


async def _forward_submit(ctx: NodeContext, node: str, shard: int,
                          command: AnyCommand) -> ShardReply:
    reply = await _post_internal(ctx, node, f"/shards/{shard}/submit",
                                 codec.encode_command(command))
    ctx.metrics.forwarded.labels(str(shard), "ok").inc()  # type: ignore[union-attr]
    return ShardReply(shard, int(reply["index"]), [Rendered.from_wire(w) for w in reply["results"]])


async def _post_internal(ctx: NodeContext, node: str, path: str, data: bytes) -> dict[str, Any]:
    url = ctx.peer_url(node)
    if url is None:
        raise ApiError("unavailable", f"no address for node {node!r}")
    headers = {FORWARDED_HEADER: ctx.node_id, "Content-Type": "application/octet-stream"}
    request_id = request_id_var.get()
    if request_id:
        headers["X-Request-Id"] = request_id
    timeout = aiohttp.ClientTimeout(total=ctx.limits.forward_timeout_s)
    try:
        async with ctx.client().post(url + INTERNAL_PREFIX + path, data=data, headers=headers,
                                     timeout=timeout) as resp:
            payload = await resp.read()
            return _internal_reply(resp.status, payload, dict(resp.headers))
    except aiohttp.ClientConnectorError as exc:
        raise RemoteNotLeader(None) from exc  # nothing was sent: safe to look again
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise ApiError("outcome_unknown", f"forward to {node} failed: {type(exc).__name__}",
                       retry_after_s=1.0) from exc


def _internal_reply(status: int, payload: bytes, headers: dict[str, str]) -> dict[str, Any]:
    body = json.loads(payload)
    if status == 200:
        return body
    error = body.get("error", {})
    if error.get("code") == "not_leader":
        raise RemoteNotLeader(error.get("details", {}).get("leader"))
    code = error.get("code", "unavailable")
    retry_after = float(headers.get("Retry-After", "1"))
    raise ApiError(code, error.get("message"), details=error.get("details"),
                   retry_after_s=retry_after)


# --- internal routes (served on the leader) --------------------------------------------------


def _local_shard(request: web.Request) -> ShardService:
    ctx = context_of(request)
    try:
        shard = int(request.match_info["shard"])
    except ValueError:
        raise ApiError("not_found", details={"shard": request.match_info["shard"]}) from None
    svc = ctx.shards.get(shard)
    if svc is None:
        raise ApiError("not_found", f"shard {shard} is not hosted here", details={"shard": shard})
    return svc


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(body, separators=(",", ":")),
                        content_type="application/json")


async def internal_submit(request: web.Request) -> web.Response:
    """A forwarded command: submit it here only (never forward again), answer rendered results."""
    svc = _local_shard(request)
    command = codec.decode_command(await request.read())
    if isinstance(command, codec.Invalid):
        raise ApiError("malformed_body", command.reason)
    try:
        committed = await svc.submit(command)
    except NotLeader as exc:
        raise ApiError("not_leader", details={"leader": exc.leader}) from exc
    results = [r.to_wire() for r in _results(svc.shard, committed.outcome)]
    return _json({"index": committed.index, "results": results})


async def internal_barrier(request: web.Request) -> web.Response:
    svc = _local_shard(request)
    try:
        index = await svc.read_barrier(context_of(request).limits.consistency_wait_s)
    except NotLeader as exc:
        raise ApiError("not_leader", details={"leader": exc.leader}) from exc
    return _json({"index": index})


async def internal_status(request: web.Request) -> web.Response:
    ctx = context_of(request)
    shards = {str(s): svc.status() for s, svc in sorted(ctx.shards.items())}
    return _json({"node": ctx.node_id, "shards": shards})


async def peer_statuses(ctx: NodeContext) -> dict[str, dict[str, Any] | None]:
    """Every peer's replica statuses (None for a peer that did not answer in time)."""
    timeout = aiohttp.ClientTimeout(total=ctx.limits.peer_status_timeout_s)

    async def one(node: str, url: str) -> dict[str, Any] | None:
        if node == ctx.node_id:
            return {str(s): svc.status() for s, svc in ctx.shards.items()}
        try:
            async with ctx.client().get(url + INTERNAL_PREFIX + "/status", timeout=timeout) as r:
                return (await r.json())["shards"] if r.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
            return None

    nodes = sorted(ctx.peers.items()) or [(ctx.node_id, "")]
    answers = await asyncio.gather(*(one(n, u) for n, u in nodes))
    return dict(zip([n for n, _ in nodes], answers, strict=True))
