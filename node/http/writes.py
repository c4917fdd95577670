"""Write handlers: parse, route to a shard, commit through its leader, render.

Every write answers ``X-Ledger-Token: <shard>:<index>[,...]``, the Raft index that carried it on each
shard it touched: pass it as ``min_token`` to read your writes on any replica. It also answers the
routing hints a client follows (the client library does): ``X-Ledger-Leader: <shard>=<node>[,...]``,
the leader this node knows of each of those shards it hosts, and ``X-Ledger-Map-Epoch``, the epoch of
the cluster map this node routed by.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from aiohttp import web
from raftledger.client.errors import LedgerError
from raftledger.statemachine.codec import payload_hash
from raftledger.statemachine.commands import (
    Batch,
    Command,
    CreateAccount,
    CreateTransaction,
    PostPending,
    ReverseTransaction,
    VoidPending,
)

from . import bodies, cross_shard, parse
from .auth import command_accounts, record_accounts, require_accounts
from .body import read_json
from .context import NodeContext, context_of
from .forward import Route, ShardReply, submit
from .reads import locate_transaction
from .render import Rendered, replay_headers, respond

TOKEN_HEADER = "X-Ledger-Token"
LEADER_HEADER = "X-Ledger-Leader"
EPOCH_HEADER = "X-Ledger-Map-Epoch"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def router(ctx: NodeContext) -> Route:
    """Where a client command goes by the node's current map (to route it again after
    ``wrong_shard``): an account to its shard, a transaction to the home of its id."""
    def route(command: Command) -> int:
        if isinstance(command, CreateTransaction | CreateAccount):
            return ctx.shard_of(command.id)
        raise LedgerError("wrong_shard", details={"id": command.id})  # never refused so: not routed
    return route


def _observe(ctx: NodeContext, reply: ShardReply, kind: str) -> None:
    codes = Counter(r.code for r in reply.results)
    replayed = sum(r.replayed for r in reply.results)
    ctx.metrics.observe_results(reply.shard, kind, codes, replayed)


async def _single(request: web.Request, shard: int, command: Command, kind: str) -> web.Response:
    ctx = context_of(request)
    reply = await submit(ctx, shard, command, router(ctx))
    _observe(ctx, reply, kind)
    return _answer(request, reply.results[0], reply.tokens())


def _answer(request: web.Request, result: Rendered, indexes: dict[int, int]) -> web.Response:
    headers = _token(request, indexes) | replay_headers(result.replayed)
    return respond(request, result.status, result.body(), headers)


async def _cross_shard(request: web.Request, outcome: Awaitable[cross_shard.Outcome]) -> web.Response:
    done = await outcome
    _observe_outcome(context_of(request), done)
    return _answer(request, done.result, done.indexes)


def _observe_outcome(ctx: NodeContext, done: cross_shard.Outcome) -> None:
    codes = Counter(r.code for r in done.results)
    ctx.metrics.observe_results(done.coordinator, "transaction", codes, sum(r.replayed for r in done.results))


def _token(request: web.Request, indexes: dict[int, int]) -> dict[str, str]:
    """The write's token and the routing hints (module docstring)."""
    ctx = context_of(request)
    headers = {EPOCH_HEADER: str(ctx.maps.epoch)}
    if not indexes:
        return headers
    headers[TOKEN_HEADER] = parse.format_token(indexes)
    leaders = []
    for shard in sorted(indexes):
        svc = ctx.shards.get(shard)
        leader = None if svc is None else ctx.node_id if svc.is_leader() else svc.leader_node_id()
        if leader is not None:
            leaders.append(f"{shard}={leader}")
    if leaders:
        headers[LEADER_HEADER] = ",".join(leaders)
    return headers


async def _many(request: web.Request, routed: list[tuple[int, Command]], atomic: bool, kind: str,
                apart: Mapping[int, Coroutine[Any, Any, tuple[Rendered, dict[int, int]]]] | None = None
                ) -> web.Response:
    """Commands grouped by shard, one Batch per shard, results put back in request order. ``apart``
    are the items run on their own (cross-shard), concurrently with the batches."""
    ctx = context_of(request)
    apart = apart or {}
    groups: dict[int, list[int]] = {}
    for i, (shard, _) in enumerate(routed):
        if i not in apart:
            groups.setdefault(shard, []).append(i)
    shards = sorted(groups)
    route = router(ctx)
    replies = asyncio.gather(*(
        submit(ctx, s, Batch(tuple(routed[i][1] for i in groups[s]), atomic), route) for s in shards))
    alone = asyncio.gather(*apart.values())
    batches, outcomes = await asyncio.gather(replies, alone)
    results: dict[int, Rendered] = {}
    indexes: dict[int, int] = {}
    for shard, reply in zip(shards, batches, strict=True):
        _observe(ctx, reply, kind)
        results.update(zip(groups[shard], reply.results, strict=True))
    for touched in [r.tokens() for r in batches] + [t for _, t in outcomes]:
        for shard, index in touched.items():
            indexes[shard] = max(index, indexes.get(shard, 0))
    for i, (result, _) in zip(apart, outcomes, strict=True):
        results[i] = result
    items = [results[i].item(i, kind) for i in range(len(routed))]
    return respond(request, 200, {"results": items}, _token(request, indexes))


async def create_accounts(request: web.Request) -> web.Response:
    ctx = context_of(request)
    commands, is_list = bodies.parse_accounts(await read_json(request))
    require_accounts(request, [c.id for c in commands])
    routed: list[tuple[int, Command]] = [(ctx.shard_of(c.id), c) for c in commands]
    if not is_list:
        return await _single(request, routed[0][0], routed[0][1], "account")
    return await _many(request, routed, False, "account")


async def create_transaction(request: web.Request) -> web.Response:
    """At the home of its id (docs/design.md, "Transaction ids have a home"): in one round when its
    accounts live there too, else by two-phase commit with the home as coordinator."""
    ctx = context_of(request)
    command = bodies.parse_transaction(await read_json(request),
                                      request.headers.get(IDEMPOTENCY_HEADER))
    require_accounts(request, command_accounts([command]))
    if cross_shard.is_single_shard(ctx, command):
        return await _single(request, ctx.shard_of(command.id), command, "transaction")
    return await _cross_shard(request, cross_shard.create(ctx, command))


async def create_batch(request: web.Request) -> web.Response:
    """Single-shard items in one Batch per home, the others each by two-phase commit, concurrently;
    an atomic batch not wholly at one home is one two-phase commit (``cross_shard.create_atomic``)."""
    ctx = context_of(request)
    commands, atomic = bodies.parse_batch(await read_json(request))
    require_accounts(request, command_accounts(commands))  # a batch is refused whole
    single = [cross_shard.is_single_shard(ctx, c) for c in commands]
    routed: list[tuple[int, Command]] = [(ctx.shard_of(c.id), c) for c in commands]
    if atomic and not (all(single) and len({shard for shard, _ in routed}) == 1):
        done = await cross_shard.create_atomic(ctx, commands)
        _observe_outcome(ctx, done)
        items = [result.item(i, "transaction") for i, result in enumerate(done.results)]
        return respond(request, 200, {"results": items}, _token(request, done.indexes))
    apart = {i: _cross_shard_item(ctx, c) for i, (c, one) in enumerate(zip(commands, single, strict=True))
             if not one}
    return await _many(request, routed, atomic, "transaction", apart)


async def _cross_shard_item(ctx: NodeContext, command: CreateTransaction) -> tuple[Rendered, dict[int, int]]:
    """One item of a batch that is not single-shard: its outcome, or its error as its result."""
    try:
        done = await cross_shard.create(ctx, command)
    except LedgerError as exc:
        return Rendered(exc.code, command.id, details=exc.details), {}
    _observe_outcome(ctx, done)
    return done.result, done.indexes


async def _on_transaction(request: web.Request,
                          build: Callable[[Any, str, str | None], Command]) -> web.Response:
    """post / void / reverse: a new command about an existing transaction, decided where that one is
    recorded (its home); its own id is claimed at its own home first when that is another shard.
    A cross-shard target's legs are then finished on their shards."""
    ctx = context_of(request)
    target = request.match_info["id"]
    command = build(await read_json(request, empty={}), target,
                    request.headers.get(IDEMPOTENCY_HEADER))
    shard, record = await locate_transaction(ctx, target)
    if record is not None:
        require_accounts(request, record_accounts(record))
    taken = await cross_shard.claim(ctx, command.id, payload_hash(command), shard)
    if taken is not None:
        return _answer(request, taken, {})
    if record is None or not record["cross_shard"]:
        return await _single(request, shard, command, "transaction")
    if isinstance(command, ReverseTransaction):
        return await _cross_shard(request, cross_shard.reverse(ctx, command, record, shard))
    assert isinstance(command, PostPending | VoidPending)
    return await _cross_shard(request, cross_shard.follow_up(ctx, command, record, shard))


async def post_pending(request: web.Request) -> web.Response:
    return await _on_transaction(request, bodies.parse_post)


async def void_pending(request: web.Request) -> web.Response:
    return await _on_transaction(request, bodies.parse_void)


async def reverse_transaction(request: web.Request) -> web.Response:
    return await _on_transaction(request, bodies.parse_reverse)
