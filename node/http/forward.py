"""Getting a command to its shard's leader, wherever it runs.

Any node accepts any write. ``submit`` hands the command to the local replica's batcher; a follower
raises ``NotLeader`` and the command is forwarded to the leader node's internal listener
(``raftledger.node.http.internal``; sealed with the cluster secret, see ``raftledger.node.wire``).
Forwarding again is safe: the command's id is its idempotency key, so a retried command is answered
from its stored outcome, never applied twice.

A leader that is dead, deposed or unreachable is not retried at once: the write waits (bounded by
``leader_wait_s``) for the local replica to learn of the next leader, which its Raft glue signals,
and goes there. Retries happen only when the command was surely not applied by the leader tried
(it refused it, or the connection was refused) or its outcome no longer matters (another leader was
elected meanwhile: the id makes the second attempt answer the first's outcome).

A command is routed by this node's cluster map. The shard it reaches refuses it as ``wrong_shard``
when the receiving node's map (``admit``) or the slots the shard's store holds say another shard owns
one of its accounts; nothing is applied then, and the refusal names the epoch it judged by. Given a
``route``, ``submit`` waits (bounded by ``forwarding.map_wait_s``, woken by the map follower) for this
node's map to reach that epoch and sends the refused commands where ``route`` now says, at most
``forwarding.reroutes_max`` times. A forwarded request names the epoch it was routed by, and a
receiver with an older map catches up first, so two nodes never bounce a command between them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from raftledger.client.errors import LedgerError, NotLeader, Unavailable, WrongShard, from_wire
from raftledger.cluster.map import Attributed, MapCommand, Outcome
from raftledger.cluster.map import encode_command as encode_map_command
from raftledger.statemachine import codec
from raftledger.statemachine.commands import AnyCommand, Batch, Command

from .. import wire
from ..clock import Clock
from ..dial import dial_url
from ..logs import request_id_var
from ..service import ShardService
from .context import NodeContext
from .render import Rendered

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Ledger-Forwarded"
unhosted_retry_s = 0.1  # between rounds over the hosts of a shard this node does not host

T = TypeVar("T")
Route = Callable[[Command], int]  # the shard a client command belongs to, by the current map


@dataclass(frozen=True, slots=True)
class ShardReply:
    shard: int
    index: int
    results: list[Rendered]
    # Other shards that applied some of the results (commands routed again): shard -> log index.
    also: Mapping[int, int] = field(default_factory=dict)

    def tokens(self) -> dict[int, int]:
        """shard -> log index of every entry that carried these results."""
        return {**self.also, self.shard: max(self.index, self.also.get(self.shard, 0))}


def _results(shard: int, outcome: Any) -> list[Rendered]:
    items = outcome if isinstance(outcome, list) else [outcome]
    return [Rendered.of(r, shard) for r in items]


async def submit(ctx: NodeContext, shard: int, command: AnyCommand, route: Route | None = None,
                 attempt: int = 0) -> ShardReply:
    """Commit ``command`` on ``shard`` through its leader; raises LedgerError when it cannot.

    With ``route``, commands the shard refuses as ``wrong_shard`` are routed again by a newer map
    (module docstring); without it the refusal is the answer."""
    try:
        reply = await _submit_once(ctx, shard, command)
    except WrongShard as exc:  # the receiver's map refused the request whole: nothing was applied
        if route is None or not isinstance(command, Command | Batch):  # type: ignore[misc, arg-type]
            raise
        await _await_map(ctx, exc.details, attempt)
        return await _routed(ctx, command, route, attempt + 1)
    refused = [i for i, r in enumerate(reply.results) if r.code == "wrong_shard"]
    if route is None or not refused or not isinstance(command, Command | Batch):  # type: ignore[misc, arg-type]
        return reply
    await _await_map(ctx, max((reply.results[i].details for i in refused), key=_epoch_of), attempt)
    if not isinstance(command, Batch) or command.atomic:  # nothing was applied: route it all again
        return await _routed(ctx, command, route, attempt + 1)
    again = await _routed(ctx, Batch(tuple(command.commands[i] for i in refused)), route, attempt + 1)
    results = list(reply.results)
    for i, result in zip(refused, again.results, strict=True):
        results[i] = result
    also = {s: i for s, i in again.tokens().items() if s != shard or i > reply.index}
    return ShardReply(shard, reply.index, results, {**reply.also, **also})


def _epoch_of(details: Mapping[str, Any]) -> int:
    epoch = details.get("epoch")
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0


async def _await_map(ctx: NodeContext, details: Mapping[str, Any], attempt: int) -> None:
    """Wait for this node's map to reach the epoch a refusal named (bounded); 503 when it does not
    or when the command was routed again too often."""
    epoch = _epoch_of(details)
    if attempt >= ctx.settings.forwarding.reroutes_max:
        raise LedgerError("unavailable", f"routed again {attempt} times; the cluster map is changing",
                          details={"epoch": epoch}, retry_after_s=1.0)
    if not await ctx.maps.wait_epoch(epoch, ctx.settings.forwarding.map_wait_s):
        raise LedgerError("unavailable", f"this node's cluster map did not reach epoch {epoch}",
                          details={"epoch": epoch, "map_epoch": ctx.maps.epoch}, retry_after_s=1.0)


async def _routed(ctx: NodeContext, command: Command | Batch, route: Route, attempt: int) -> ShardReply:
    """Submit ``command`` where ``route`` sends it now; a non-atomic batch whose commands now belong
    to several shards is split, and its results put back in order."""
    if not isinstance(command, Batch):
        return await submit(ctx, route(command), command, route, attempt)
    groups: dict[int, list[int]] = {}
    for i, inner in enumerate(command.commands):
        groups.setdefault(route(inner), []).append(i)
    if len(groups) == 1:
        return await submit(ctx, next(iter(groups)), command, route, attempt)
    if command.atomic:  # the map moved some of its accounts: the retry plans it anew (cross-shard)
        raise LedgerError("unavailable", "the cluster map moved accounts of this atomic batch; send it again",
                          details={"shards": sorted(groups)}, retry_after_s=0.1)
    shards = sorted(groups)
    replies = await asyncio.gather(*(submit(ctx, s, Batch(tuple(command.commands[i] for i in groups[s])),
                                            route, attempt) for s in shards))
    results: list[Rendered | None] = [None] * len(command.commands)
    tokens: dict[int, int] = {}
    for s, reply in zip(shards, replies, strict=True):
        for i, result in zip(groups[s], reply.results, strict=True):
            results[i] = result
        for shard, index in reply.tokens().items():
            tokens[shard] = max(index, tokens.get(shard, 0))
    first = replies[0]
    return ShardReply(first.shard, first.index, [r for r in results if r is not None],
                      {s: i for s, i in tokens.items() if s != first.shard})


async def _submit_once(ctx: NodeContext, shard: int, command: AnyCommand) -> ShardReply:

    async def local(svc: ShardService) -> ShardReply:
        committed = await svc.submit(command)
        return ShardReply(shard, committed.index, _results(shard, committed.outcome))

    async def remote(node: str) -> ShardReply:
        return await _forward_submit(ctx, node, shard, command)

    return await _via_leader(ctx, shard, local, remote)


async def read_barrier(ctx: NodeContext, shard: int) -> int:
    """A linearizable read point for ``shard``: committed through its leader after this call."""
    timeout_s = ctx.settings.http.consistency_wait_s

    async def local(svc: ShardService) -> int:
        return await svc.read_barrier(timeout_s)

    async def remote(node: str) -> int:
        reply = await call_peer(ctx, node, f"/shards/{shard}/barrier", None)
        return int(reply["index"])

    return await _via_leader(ctx, shard, local, remote)


async def _via_leader(ctx: NodeContext, shard: int,
                      local: Callable[[ShardService], Awaitable[T]],
                      remote: Callable[[str], Awaitable[T]]) -> T:
    """Run on the local replica if it leads, else on the leader node; wait out elections (bounded)."""
    svc = ctx.shards.get(shard)
    if svc is None:
        return await via_hosts(ctx, shard, remote)
    clock = ctx.clock
    deadline = clock.monotonic() + ctx.settings.forwarding.leader_wait_s
    hint: str | None = None
    for _ in range(ctx.settings.forwarding.attempts_max):
        changed = svc.leader_changed()  # taken before looking: a change from here on wakes us
        leader = hint or (ctx.node_id if svc.is_leader() else svc.leader_node_id())
        hint = None
        try:
            if leader is None or leader == ctx.node_id and not svc.is_leader():
                raise NotLeader(message="no leader known: an election is under way")
            if leader == ctx.node_id:
                return await local(svc)
            return await _unless_leader_moves(svc, leader, changed, remote(leader))
        except NotLeader as exc:
            if exc.leader is not None and exc.leader != leader:
                hint = exc.leader  # the node we asked names the leader: go there at once
            else:  # gone, deposed or unknown: wait for the next election's result
                await _await_change(clock, changed, deadline, shard)
        except Unavailable as exc:
            if exc.code == "overloaded":
                ctx.metrics.overloaded(f"shard{shard}")
            raise
    raise LedgerError("not_leader", details={"shard": shard}, retry_after_s=0.5)


async def _await_change(clock: Clock, changed: asyncio.Future[None], deadline: float,
                        shard: int) -> None:
    remaining = deadline - clock.monotonic()
    if remaining > 0:
        await clock.wait(changed, remaining)  # never cancels the shared future
    if not changed.done():
        raise LedgerError("not_leader", details={"shard": shard}, retry_after_s=0.5)


async def _unless_leader_moves(svc: ShardService, leader: str, changed: asyncio.Future[None],
                               call: Awaitable[T]) -> T:
    """Await a call to ``leader``; give up on it once the local replica learns of another leader.

    A paused or partitioned leader accepts connections but never answers; without this a forwarded
    write would wait for the whole forward timeout although a new leader was elected long before.
    Retrying with the new leader is safe: the command's id is its idempotency key.
    """
    task = asyncio.ensure_future(call)
    try:
        while True:
            await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            moved = svc.leader_node_id()
            if moved is not None and moved != leader:
                raise NotLeader(leader=moved)
            changed = svc.leader_changed()  # the same leader again (a new term): keep waiting
    finally:
        if not task.done():
            task.cancel()


async def via_hosts(ctx: NodeContext, shard: int, remote: Callable[[str], Awaitable[T]],
                    group: Sequence[str] | None = None) -> T:
    """A shard this node does not host: ask its hosts (``group``'s, when given: the metadata
    group's members); one that does not lead names the leader."""
    hosts = [n for n in (ctx.nodes_of(shard) if group is None else group) if n != ctx.node_id]
    if not hosts:
        raise LedgerError("unavailable", f"no node hosts shard {shard}", details={"shard": shard})
    deadline = ctx.clock.monotonic() + ctx.settings.forwarding.leader_wait_s
    target: str | None = None
    for attempt in range(ctx.settings.forwarding.attempts_max * len(hosts)):
        node = target or hosts[attempt % len(hosts)]
        try:
            return await remote(node)
        except NotLeader as exc:
            target = exc.leader if exc.leader not in (None, node, ctx.node_id) else None
        if target is None and attempt % len(hosts) == len(hosts) - 1:
            if ctx.clock.monotonic() + unhosted_retry_s > deadline:
                break
            await ctx.clock.sleep(unhosted_retry_s)  # no signal from a shard hosted elsewhere
    raise LedgerError("not_leader", details={"shard": shard}, retry_after_s=0.5)


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
    ``forwarding.requests_in_flight_max`` requests are under way; otherwise it waits for the next
    one, together with whatever else arrived meanwhile (at most ``forwarding.commands_per_request_max``
    commands and ``bytes_per_request_max`` bytes). The commands waiting are bounded by the edge's own bound
    on requests in flight.
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

    def _take(self) -> list[tuple[bytes, asyncio.Future[dict[str, Any]]]]:
        count, size = 0, 0
        bytes_max = self.ctx.settings.forwarding.bytes_per_request_max
        for encoded, _ in self.waiting[:self.ctx.settings.forwarding.commands_per_request_max]:
            if count and size + len(encoded) > bytes_max:
                break
            count, size = count + 1, size + len(encoded)
        items = self.waiting[:count]
        del self.waiting[:count]
        return items

    def _flush(self) -> None:
        while self.waiting and self.in_flight < self.ctx.settings.forwarding.requests_in_flight_max:
            items = self._take()
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(items))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)

    async def _send(self, items: list[tuple[bytes, asyncio.Future[dict[str, Any]]]]) -> None:
        try:
            # The epoch routed by: a receiver with an older map catches up before it judges.
            reply = await call_peer(self.ctx, self.node,
                                    f"/shards/{self.shard}/submit?epoch={self.ctx.maps.epoch}",
                                    [encoded for encoded, _ in items])
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
    if reply.get("error") is None:
        future.set_result(reply)
    else:
        future.set_exception(from_wire(None, reply))


async def call_peer(ctx: NodeContext, node: str, path: str, payload: Any,
                    timeout_s: float | None = None) -> Any:
    """One sealed request to a peer's internal listener; its opened answer, or an error:
    NotLeader when the peer could not be reached (nothing was sent: safe to look again) or
    answered not_leader; LedgerError otherwise."""
    url = ctx.internal_url(node)
    url = None if url is None else dial_url(url)
    if url is None or ctx.sealer is None:
        raise LedgerError("unavailable", f"no internal address for node {node!r}")
    sealed = ctx.sealer.seal_request("POST", wire.PREFIX + path, payload)
    headers = {**sealed.headers, FORWARDED_HEADER: ctx.node_id}
    request_id = request_id_var.get()
    if request_id:
        headers["X-Request-Id"] = request_id
    timeout = aiohttp.ClientTimeout(total=timeout_s or ctx.settings.forwarding.timeout_s)
    try:
        async with ctx.client().post(url + wire.PREFIX + path, data=sealed.body, headers=headers,
                                     timeout=timeout) as resp:
            body = await resp.read()
            return _answer(ctx, node, sealed, resp.status, resp.headers, body)
    except aiohttp.ClientConnectorError as exc:
        raise NotLeader(message=f"node {node} is unreachable") from exc
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise LedgerError("outcome_unknown", f"request to {node} failed: {type(exc).__name__}",
                       retry_after_s=1.0) from exc


def _answer(ctx: NodeContext, node: str, sealed: wire.SealedRequest, status: int, headers: Any,
            body: bytes) -> Any:
    try:
        answer = ctx.sealer.open_answer(sealed, status, headers, body)  # type: ignore[union-attr]
    except wire.Unauthenticated as exc:
        refused = _refusal_reason(status, body)
        if refused:  # it could not open ours: its reason, unsealed (for the log only), says why
            log.error("node %s refused this node's request: %s", node, refused)
        else:
            log.error("node %s: %s (status %d); is it configured with this cluster's secret?", node, exc,
                      status)
        raise LedgerError("unavailable", f"node {node} did not authenticate") from exc
    if status == 200:
        return answer
    error = from_wire(status, answer, headers.get("Retry-After"))
    if isinstance(error, Unavailable):
        raise error
    # Anything else means the hop failed (a peer refused what this node checked already), not the
    # client's request.
    raise LedgerError("unavailable", f"node {node} answered {status} {error.code}: {error.message}")


def _refusal_reason(status: int, body: bytes) -> str:
    """The reason a peer gave, unsealed, for a 401 to a request it could not open (a clock off by
    more than the replay window, another cluster's secret): shown in the log, trusted for nothing."""
    if status != 401:
        return ""
    try:
        reason = json.loads(body)["error"]["details"]["reason"]
    except (ValueError, KeyError, TypeError):
        return ""
    return reason[:200] if isinstance(reason, str) else ""


async def peer_statuses(ctx: NodeContext) -> dict[str, dict[str, Any] | None]:
    """Every peer's replica statuses (None for a peer that did not answer in time)."""

    async def one(node: str) -> dict[str, Any] | None:
        if node == ctx.node_id:
            return {str(s): svc.status() for s, svc in ctx.shards.items()}
        try:
            answer = await call_peer(ctx, node, "/status", None, ctx.settings.internal.peer_status_timeout_s)
            return dict(answer["shards"])
        except (LedgerError, KeyError, TypeError):
            return None

    nodes = ctx.node_ids() or [ctx.node_id]
    answers = await asyncio.gather(*(one(n) for n in nodes))
    return dict(zip(nodes, answers, strict=True))


async def propose_map(ctx: NodeContext, command: MapCommand) -> Outcome:
    """Apply a change of the cluster map through the metadata group's leader, wherever it runs:
    here, or on the host this node's member names, or on the first host that answers. The command
    is attributed (the audit trail) to the caller's token, else to this node."""
    if not isinstance(command, Attributed):
        from .auth import actor_var  # auth imports this module's users: kept out of import time

        command = Attributed(command, actor_var.get() or f"node:{ctx.node_id}", ctx.clock.time_ns())
    meta = ctx.meta
    if meta is not None and meta.is_leader():
        return await meta.propose(command)  # type: ignore[no-any-return]
    hint = None if meta is None else meta.leader_node_id()
    hosts = [n.id for n in ctx.cluster_map.meta_hosts()]
    candidates = list(dict.fromkeys(h for h in (hint, *hosts) if h and h != ctx.node_id))
    payload = encode_map_command(command)
    for _ in range(2 * len(candidates)):
        if not candidates:
            break
        node = candidates.pop(0)
        try:
            answer = await call_peer(ctx, node, "/meta/propose", payload)
        except NotLeader as exc:  # unreachable, or not the leader (which it may name)
            if exc.leader not in (None, node, ctx.node_id):
                candidates.insert(0, exc.leader)  # type: ignore[arg-type]
            continue
        return Outcome(bool(answer["ok"]), int(answer["epoch"]), str(answer.get("reason", "")))
    raise LedgerError("not_leader", "no leader of the metadata group answered", retry_after_s=1.0)
