"""Write handlers: parse, route to a shard, commit through its leader, render.

Every write answers ``X-Ledger-Token: <shard>:<index>[,...]``, the Raft index that carried it on each
shard it touched: pass it as ``min_token`` to read your writes on any replica.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from raftledger.client.errors import LedgerError
from raftledger.statemachine.commands import Batch, Command, CreateAccount, CreateTransaction

from . import bodies, parse
from .body import read_json
from .context import NodeContext, context_of
from .forward import Route, ShardReply, submit
from .reads import locate_transaction
from .render import Rendered, replay_headers, respond

TOKEN_HEADER = "X-Ledger-Token"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def transaction_shard(ctx: NodeContext, command: CreateTransaction) -> int:
    """The one shard holding every account of the transaction (cross-shard is not supported yet)."""
    shards = {ctx.shard_of(e.account_id) for e in command.entries}
    if len(shards) > 1:
        raise LedgerError("cross_shard_not_supported",
                       details={"id": command.id, "shards": sorted(shards)})
    return shards.pop() if shards else 0


def router(ctx: NodeContext) -> Route:
    """The shard of a client command by the node's current map (to route it again after
    ``wrong_shard``): an account's, or the one shard of a transaction's accounts."""
    def route(command: Command) -> int:
        if isinstance(command, CreateTransaction):
            return transaction_shard(ctx, command)
        if isinstance(command, CreateAccount):
            return ctx.shard_of(command.id)
        raise LedgerError("wrong_shard", details={"id": command.id})  # never refused so: not routed
    return route


def token_headers(replies: Sequence[ShardReply]) -> dict[str, str]:
    if not replies:
        return {}  # nothing was written (every item was refused before reaching a shard)
    tokens: dict[int, int] = {}
    for reply in replies:
        for shard, index in reply.tokens().items():
            tokens[shard] = max(index, tokens.get(shard, 0))
    return {TOKEN_HEADER: parse.format_token(tokens)}


def _observe(ctx: NodeContext, reply: ShardReply, kind: str) -> None:
    codes = Counter(r.code for r in reply.results)
    replayed = sum(r.replayed for r in reply.results)
    ctx.metrics.observe_results(reply.shard, kind, codes, replayed)


async def _single(request: web.Request, shard: int, command: Command, kind: str) -> web.Response:
    ctx = context_of(request)
    reply = await submit(ctx, shard, command, router(ctx))
    _observe(ctx, reply, kind)
    result = reply.results[0]
    headers = token_headers([reply]) | replay_headers(result.replayed)
    return respond(request, result.status, result.body(), headers)


async def _many(request: web.Request, routed: list[tuple[int, Command]], atomic: bool,
                kind: str, early: dict[int, Rendered] | None = None) -> web.Response:
    """Commands grouped by shard, one Batch per shard, results put back in request order."""
    ctx = context_of(request)
    early = early or {}
    groups: dict[int, list[int]] = {}
    for i, (shard, _) in enumerate(routed):
        if i not in early:
            groups.setdefault(shard, []).append(i)
    shards = sorted(groups)
    route = router(ctx)
    replies = await asyncio.gather(*(
        submit(ctx, s, Batch(tuple(routed[i][1] for i in groups[s]), atomic), route) for s in shards))
    results: dict[int, Rendered] = dict(early)
    for shard, reply in zip(shards, replies, strict=True):
        _observe(ctx, reply, kind)
        results.update(zip(groups[shard], reply.results, strict=True))
    items = [results[i].item(i, kind) for i in range(len(routed))]
    return respond(request, 200, {"results": items}, token_headers(replies))


async def create_accounts(request: web.Request) -> web.Response:
    ctx = context_of(request)
    commands, is_list = bodies.parse_accounts(await read_json(request))
    routed: list[tuple[int, Command]] = [(ctx.shard_of(c.id), c) for c in commands]
    if not is_list:
        return await _single(request, routed[0][0], routed[0][1], "account")
    return await _many(request, routed, False, "account")


async def create_transaction(request: web.Request) -> web.Response:
    ctx = context_of(request)
    command = bodies.parse_transaction(await read_json(request),
                                      request.headers.get(IDEMPOTENCY_HEADER))
    return await _single(request, transaction_shard(ctx, command), command, "transaction")


async def create_batch(request: web.Request) -> web.Response:
    ctx = context_of(request)
    commands, atomic = bodies.parse_batch(await read_json(request))
    routed: list[tuple[int, Command]] = []
    early: dict[int, Rendered] = {}
    for i, command in enumerate(commands):
        try:
            routed.append((transaction_shard(ctx, command), command))
        except LedgerError as exc:
            routed.append((-1, command))
            early[i] = Rendered(exc.code, command.id, details=exc.details)
    if atomic and (early or len({s for s, _ in routed}) > 1):
        raise LedgerError("cross_shard_not_supported", "an atomic batch must stay on one shard",
                       details={"shards": sorted({s for s, _ in routed if s >= 0})})
    return await _many(request, routed, atomic, "transaction", early)


async def _on_transaction(request: web.Request,
                          build: Callable[[Any, str, str | None], Command]) -> web.Response:
    """post / void / reverse: a new command about an existing transaction, on that one's shard."""
    ctx = context_of(request)
    target = request.match_info["id"]
    command = build(await read_json(request, empty={}), target,
                    request.headers.get(IDEMPOTENCY_HEADER))
    shard = await locate_transaction(ctx, target)
    return await _single(request, shard, command, "transaction")


async def post_pending(request: web.Request) -> web.Response:
    return await _on_transaction(request, bodies.parse_post)


async def void_pending(request: web.Request) -> web.Response:
    return await _on_transaction(request, bodies.parse_void)


async def reverse_transaction(request: web.Request) -> web.Response:
    return await _on_transaction(request, bodies.parse_reverse)
