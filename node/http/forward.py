"""Getting a command to its shard's leader, wherever it runs; and the internal routes that serve it.

Any node accepts any write. ``submit`` hands the command to the local replica's batcher; a follower
raises ``NotLeader`` and the command is forwarded over HTTP to the leader node's internal submit
route (codec-encoded command in, rendered results out). Forwarding again is safe: the command's id is
its idempotency key, so a retried command is answered from its stored outcome, never applied twice.
Retries happen only when the command was surely not proposed (not leader, connection refused).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import msgpack
from aiohttp import web
from raftledger.statemachine import codec
from raftledger.statemachine.commands import AnyCommand

from ..errors import STATUS, ApiError, from_unavailable
from ..logs import request_id_var
from ..service import NotLeader, ShardService, Unavailable
from .context import NodeContext, context_of
from .render import Rendered

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Ledger-Forwarded"
INTERNAL_PREFIX = "/internal/v1"
# Internal replies are msgpack: several times cheaper to encode and decode than JSON for a batch of
# results. msgpack stops at 64-bit integers; larger ones (balances reach 2**127) travel as this ext.
INTERNAL_TYPE = "application/msgpack"
BIG_INT_EXT = 1
leader_poll_interval_s = 0.05
leader_watch_interval_s = 0.1
forward_requests_in_flight_max = 4
forward_batch_commands_max = 512

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
            return await _unless_leader_moves(svc, leader, remote(leader))
        except (NotLeader, RemoteNotLeader) as exc:
            hint = exc.leader if exc.leader not in (leader, None) else None
            if hint == ctx.node_id and svc is None:
                hint = None
        except Unavailable as exc:
            error = from_unavailable(exc)
            if error.code == "overloaded":
                ctx.metrics.overloaded(f"shard{shard}")
            raise error from exc
    raise ApiError("not_leader", details={"shard": shard}, retry_after_s=0.5)


async def _unless_leader_moves(svc: ShardService | None, leader: str,
                               call: Awaitable[T]) -> T:
    """Await a call to ``leader``; give up on it if the local replica learns of another leader.

    A paused or partitioned leader accepts connections but never answers; without this a forwarded
    write would wait for the whole forward timeout although a new leader was elected long before.
    Retrying with the new leader is safe: the command's id is its idempotency key.
    """
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=leader_watch_interval_s)
            if done:
                return task.result()
            moved = svc.leader_node_id() if svc is not None else None
            if moved is not None and moved != leader:
                raise RemoteNotLeader(moved)
    finally:
        if not task.done():
            task.cancel()


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
    key = (node, shard)
    forwarder = ctx.forwarders.get(key)
    if forwarder is None:
        forwarder = ctx.forwarders[key] = Forwarder(ctx, node, shard)
    reply = await forwarder.submit(codec.encode_command(command))
    ctx.metrics.forwarded.labels(str(shard), "ok").inc()
    return ShardReply(shard, int(reply["index"]), [Rendered.from_wire(w) for w in reply["results"]])


class Forwarder:
    """Commands bound for one shard's leader on another node, coalesced into few requests.

    Natural batching, no linger: a command goes out at once when fewer than
    ``forward_requests_in_flight_max`` requests are under way; otherwise it waits for the next one,
    together with whatever else arrived meanwhile (at most ``forward_batch_commands_max``).
    """

    def __init__(self, ctx: NodeContext, node: str, shard: int) -> None:
        self.ctx, self.node, self.shard = ctx, node, shard
        self.waiting: list[tuple[bytes, asyncio.Future[dict[str, Any]]]] = []
        self.in_flight = 0
        self.sending: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def submit(self, encoded: bytes) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append((encoded, future))
        self._flush()
        return await future

    def _flush(self) -> None:
        while self.waiting and self.in_flight < forward_requests_in_flight_max:
            items = self.waiting[:forward_batch_commands_max]
            del self.waiting[:forward_batch_commands_max]
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(items))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)

    async def _send(self, items: list[tuple[bytes, asyncio.Future[dict[str, Any]]]]) -> None:
        try:
            reply = await _post_internal(self.ctx, self.node, f"/shards/{self.shard}/submit",
                                         msgpack.packb([encoded for encoded, _ in items]))
            for (_, future), one in zip(items, reply["replies"], strict=True):
                _settle(future, one)
        except BaseException as exc:  # every waiter learns the failure of the shared request
            failure = exc if isinstance(exc, Exception) else Unavailable("node is shutting down")
            for _, future in items:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.in_flight -= 1
            self._flush()


def _settle(future: asyncio.Future[dict[str, Any]], reply: dict[str, Any]) -> None:
    if future.done():
        return
    error = reply.get("error")
    if error is None:
        future.set_result(reply)
    elif error["code"] == "not_leader":
        future.set_exception(RemoteNotLeader(error.get("leader")))
    else:
        code = error["code"] if error["code"] in STATUS else "unavailable"
        future.set_exception(ApiError(code, error.get("message"),
                                      retry_after_s=error.get("retry_after_s")))


async def _post_internal(ctx: NodeContext, node: str, path: str, data: bytes) -> dict[str, Any]:
    url = ctx.peer_url(node)
    if url is None:
        raise ApiError("unavailable", f"no address for node {node!r}")
    headers = {FORWARDED_HEADER: ctx.node_id, "Content-Type": "application/octet-stream",
               "Accept": INTERNAL_TYPE}
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


def _big_int(value: Any) -> msgpack.ExtType:
    if isinstance(value, int):
        return msgpack.ExtType(BIG_INT_EXT, str(value).encode())
    raise TypeError(f"cannot send {type(value).__name__}")


def _ext(code: int, data: bytes) -> Any:
    return int(data) if code == BIG_INT_EXT else msgpack.ExtType(code, data)


def _unpack_internal(payload: bytes) -> Any:
    return msgpack.unpackb(payload, ext_hook=_ext)


def _internal_reply(status: int, payload: bytes, headers: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = _unpack_internal(payload)
    if status == 200:
        return body
    error = body.get("error", {})
    code = error.get("code", "unavailable")
    if code == "not_leader":
        raise RemoteNotLeader(error.get("details", {}).get("leader"))
    retry_after = float(headers.get("Retry-After", "1"))
    if status != 503:  # the hop failed, not the client's request
        raise ApiError("unavailable", f"internal call answered {status} {code}",
                       retry_after_s=retry_after)
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


def _internal_response(body: dict[str, Any]) -> web.Response:
    return web.Response(body=msgpack.packb(body, default=_big_int), content_type=INTERNAL_TYPE)


async def internal_submit(request: web.Request) -> web.Response:
    """Forwarded commands (a msgpack list of codec-encoded commands): submit each here only,
    never forward again; answer one reply per command, in order."""
    svc = _local_shard(request)
    try:
        encoded = msgpack.unpackb(await request.read())
    except (ValueError, msgpack.UnpackException) as exc:
        raise ApiError("malformed_body", str(exc)[:200]) from exc
    if not isinstance(encoded, list) or not all(isinstance(e, bytes) for e in encoded):
        raise ApiError("malformed_body", "expected a list of encoded commands")
    replies = await asyncio.gather(*(_submit_one(svc, e) for e in encoded))
    return _internal_response({"replies": replies})


async def _submit_one(svc: ShardService, encoded: bytes) -> dict[str, Any]:
    command = codec.decode_command(encoded)
    if isinstance(command, codec.Invalid):
        return {"error": {"code": "malformed_body", "message": command.reason}}
    try:
        committed = await svc.submit(command)
    except NotLeader as exc:
        return {"error": {"code": "not_leader", "leader": exc.leader}}
    except Unavailable as exc:
        error = from_unavailable(exc)
        return {"error": {"code": error.code, "message": error.message,
                          "retry_after_s": error.retry_after_s}}
    results = [r.to_wire() for r in _results(svc.shard, committed.outcome)]
    return {"index": committed.index, "results": results}


async def internal_barrier(request: web.Request) -> web.Response:
    svc = _local_shard(request)
    try:
        index = await svc.read_barrier(context_of(request).limits.consistency_wait_s)
    except NotLeader as exc:
        raise ApiError("not_leader", details={"leader": exc.leader}) from exc
    return _internal_response({"index": index})


async def internal_status(request: web.Request) -> web.Response:
    ctx = context_of(request)
    shards = {str(s): svc.status() for s, svc in sorted(ctx.shards.items())}
    return _internal_response({"node": ctx.node_id, "shards": shards})


async def peer_statuses(ctx: NodeContext) -> dict[str, dict[str, Any] | None]:
    """Every peer's replica statuses (None for a peer that did not answer in time)."""
    timeout = aiohttp.ClientTimeout(total=ctx.limits.peer_status_timeout_s)

    async def one(node: str, url: str) -> dict[str, Any] | None:
        if node == ctx.node_id:
            return {str(s): svc.status() for s, svc in ctx.shards.items()}
        try:
            async with ctx.client().get(url + INTERNAL_PREFIX + "/status", timeout=timeout,
                                        headers={"Accept": INTERNAL_TYPE}) as r:
                return _unpack_internal(await r.read())["shards"] if r.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, msgpack.UnpackException):
            return None

    nodes = sorted(ctx.peers.items()) or [(ctx.node_id, "")]
    answers = await asyncio.gather(*(one(n, u) for n, u in nodes))
    return dict(zip([n for n, _ in nodes], answers, strict=True))
