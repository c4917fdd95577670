"""The internal listener: what nodes ask each other, on a port of its own, sealed with the cluster secret.

Routes (all POST, bodies sealed as ``raftledger.node.wire`` describes):

- ``/internal/v1/shards/{shard}/submit[?epoch=E]`` — forwarded commands, committed here (this node
  leads the shard) or refused with ``not_leader``; never forwarded again. Each command is checked as a
  public request is: its shape (``parse.check``), the batch limit, and that every account it names
  lives on this shard by this node's map (``wrong_shard`` otherwise, with this map's ``epoch`` in the
  details); a command that fails is answered with its error and never proposed. ``epoch`` is the map
  epoch the sender routed by: a receiver whose map is older first waits (bounded) to catch up. The
  steps of a cross-shard transaction (``PrepareLeg``, ``Decide``, ``FinishLeg``, ``Complete``,
  ``ClaimId``) arrive here too, alone or batched.
- ``/internal/v1/shards/{shard}/barrier`` — a linearizable read index from the leader.
- ``/internal/v1/shards/{shard}/transaction`` — where a transaction is recorded and its record,
  looked for on that shard (post / void / reverse and the cross-shard protocol find their target so).
- ``/internal/v1/status`` — this node's replicas (role, term, indexes, fingerprint), its map epoch
  and its member of the metadata group.
- ``/internal/v1/map`` ``{"epoch": E}`` — the cluster map, as soon as this node's is newer than
  ``E``, else after ``meta.long_poll_s`` (``{"map": null}`` while it has none).
- ``/internal/v1/meta/propose`` — a map command (``cluster.map.encode_command``), applied through
  this node's member of the metadata group if it leads it (``not_leader`` with a hint otherwise).
- ``/internal/v1/shards/{shard}/sign-head`` — this replica's signature of a tree head, if its own
  tree has that root at that size (``integrity.sign_head``); ``/internal/v1/keys/rotate`` — a new
  signing key for this node (``raftledger keys rotate``).
- ``/internal/v1/shards/{shard}/totals`` — per-currency sums of a shard, for invariant checks.
- ``/internal/v1/meta/membership`` — the same for the metadata group, on its leader.
- ``/internal/v1/shards/{shard}/membership`` — on the shard's leader: its view of the group
  (members, last contact, match index), or one Raft membership step (``membership.leader_op``).
- ``/internal/v1/shards/{shard}/bench`` and ``/internal/v1/bench/{run}`` — the in-process load
  generator; served only when the node runs with ``RAFTLEDGER_BENCH=1``.
- ``/internal/v1/faults`` — arms crash points (``raftledger.node.faults``); served only when the
  node runs with ``RAFTLEDGER_FAULTS=1``.

A request that does not authenticate gets 401 and touches nothing; one from a node the map marks
removed gets 403 ``forbidden``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from raftledger.client.errors import LedgerError
from raftledger.cluster.map import NODE_REMOVED, Attributed, MapError, decode_command
from raftledger.statemachine import codec
from raftledger.statemachine.audit import currency_totals
from raftledger.statemachine.commands import (
    AnyCommand,
    Batch,
    ClaimId,
    Command,
    Complete,
    CreateAccount,
    CreateTransaction,
    Decide,
    ExpireHolds,
    FinishLeg,
    PostPending,
    PrepareLeg,
    ProtocolCommand,
    ReverseTransaction,
    SetFeedOffset,
    VoidPending,
    batch_commands_max,
)

from .. import faults, wire
from ..service import ShardService
from . import integrity, membership, parse
from .body import read_raw
from .context import NodeContext
from .forward import FORWARDED_HEADER, propose_map
from .reads import transaction_at
from .render import Rendered

log = logging.getLogger(__name__)

BENCH_ENV = "RAFTLEDGER_BENCH"

CLIENT_COMMANDS = (CreateAccount, CreateTransaction, PostPending, VoidPending, ReverseTransaction)

Handler = Callable[[NodeContext, web.Request, Any], Awaitable[Any]]


# -- the edge: authenticate, run, seal ---------------------------------------------------------------


def _unauthenticated(reason: str) -> web.Response:
    body = LedgerError("unauthorized", "the request is not sealed with this cluster's secret",
                       details={"reason": reason}).body()
    return web.json_response(body, status=401)


def sealed(ctx: NodeContext, guard: wire.ReplayGuard, handler: Handler
           ) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler of one route: open the request (or answer 401), run ``handler`` with its
    payload, seal what it returns (errors included)."""

    async def handle(request: web.Request) -> web.Response:
        try:
            raw = await read_raw(request, ctx.settings.http, ctx.settings.internal.body_bytes_max)
            peer, nonce, payload = ctx.sealer.open_request(  # type: ignore[union-attr]
                request.method, request.path_qs, request.headers, raw, guard)
        except wire.Unauthenticated as exc:
            ctx.metrics.internal_refused.labels("unauthenticated").inc()
            log.warning("internal request refused: %s", exc,
                        extra={"path": request.path, "peer": request.headers.get(wire.PEER_HEADER)})
            return _unauthenticated(str(exc))
        except wire.Busy as exc:
            return _seal_error(ctx, b"", LedgerError("overloaded", str(exc)))
        except LedgerError as exc:  # too large or too slow: refused before anything was opened
            return web.json_response(exc.body(), status=exc.status, headers=exc.headers())
        refused = _removed_sender(ctx, peer)
        if refused is not None:
            return _seal_error(ctx, nonce, refused)
        try:
            answer = await handler(ctx, request, payload)
        except LedgerError as exc:
            return _seal_error(ctx, nonce, exc)
        headers, body = ctx.sealer.seal_answer(nonce, 200, answer)  # type: ignore[union-attr]
        return web.Response(status=200, body=body, headers=headers)

    return handle


def _removed_sender(ctx: NodeContext, peer: str) -> LedgerError | None:
    """A node the map marks removed takes no further part in the cluster."""
    node = None if ctx.maps.current is None else ctx.maps.current.node(peer)
    if node is None or node.state != NODE_REMOVED:
        return None
    return LedgerError("forbidden", f"node {peer} was removed from the cluster",
                       details={"reason": "node_removed", "node": peer})


def _seal_error(ctx: NodeContext, nonce: bytes, exc: LedgerError) -> web.Response:
    headers, body = ctx.sealer.seal_answer(nonce, exc.status, exc.body())
    return web.Response(status=exc.status, body=body, headers={**exc.headers(), **headers})


# -- routes ----------------------------------------------------------------------------------------


def _local_shard(ctx: NodeContext, request: web.Request) -> ShardService:
    raw = request.match_info["shard"]
    svc = ctx.shards.get(int(raw)) if raw.isdigit() and len(raw) <= 6 else None
    if svc is None:
        raise LedgerError("not_found", f"shard {raw[:16]!r} is not hosted here", details={"shard": raw[:16]})
    return svc


async def submit(ctx: NodeContext, request: web.Request, encoded: Any) -> dict[str, Any]:
    """Forwarded commands (codec-encoded), each admitted as a public request would be, then
    proposed here only; one reply per command, in order."""
    svc = _local_shard(ctx, request)
    if not isinstance(encoded, list) or not all(isinstance(e, bytes) for e in encoded):
        raise LedgerError("malformed_body", "expected a list of encoded commands")
    commands_max = ctx.settings.forwarding.commands_per_request_max
    if len(encoded) > commands_max:
        raise LedgerError("too_many_commands", details={"max": commands_max,
                                                     "count": len(encoded)})
    sender_epoch = request.query.get("epoch", "")
    if sender_epoch.isdigit() and len(sender_epoch) <= 18:  # routed by a newer map than ours: catch up
        await ctx.maps.wait_epoch(int(sender_epoch), ctx.settings.forwarding.map_wait_s)
    replies = await asyncio.gather(*(_submit_one(ctx, svc, e) for e in encoded))
    return {"replies": replies}


def admit(ctx: NodeContext, shard: int, command: AnyCommand | codec.Invalid) -> AnyCommand:
    """The checks of the public edge, for a command that arrives already built: its shape, the
    batch limit, and that it belongs to ``shard``. Raises LedgerError."""
    if isinstance(command, codec.Invalid):
        raise LedgerError("malformed_body", command.reason)
    if isinstance(command, Batch):
        if not command.commands or len(command.commands) > batch_commands_max:
            raise LedgerError("too_many_commands", details={"max": batch_commands_max,
                                                         "count": len(command.commands)})
        for i, inner in enumerate(command.commands):
            _admit_one(ctx, shard, inner, f"commands[{i}]")
        return command
    if isinstance(command, ExpireHolds):
        raise LedgerError("malformed_body", "ExpireHolds is not a command peers send")
    if isinstance(command, SetFeedOffset):  # a feed consumer's offset: the state machine checks it
        return command
    _admit_one(ctx, shard, command, "")
    return command


def _admit_one(ctx: NodeContext, shard: int, command: Command | ProtocolCommand, where: str) -> None:
    if isinstance(command, PrepareLeg):  # a step of a cross-shard transaction (cross_shard.py)
        _only_here(ctx, shard, command.id, [e.account_id for e in command.entries])
        return
    if isinstance(command, Decide | FinishLeg | Complete | ClaimId):  # the state machine checks these
        return
    if not isinstance(command, CLIENT_COMMANDS):
        raise LedgerError("malformed_body", f"{type(command).__name__} is not a command peers send")
    parse.check(command, where)
    if isinstance(command, CreateAccount):
        _only_here(ctx, shard, command.id, [command.id])
    elif isinstance(command, CreateTransaction):
        _only_here(ctx, shard, command.id, [e.account_id for e in command.entries])
    # post / void / reverse: found on the shard that holds their transaction


def _only_here(ctx: NodeContext, shard: int, command_id: str, accounts: list[str]) -> None:
    """Refuse a command naming an account that this node's map gives to another shard."""
    current = ctx.cluster_map
    elsewhere = sorted({a for a in accounts if current.shard_of(a) != shard})
    if elsewhere:
        raise LedgerError("wrong_shard", details={"shard": shard, "accounts": elsewhere[:16],
                                                  "id": command_id, "epoch": current.epoch})


async def _submit_one(ctx: NodeContext, svc: ShardService, encoded: bytes) -> dict[str, Any]:
    try:
        command = admit(ctx, svc.shard, codec.decode_command(encoded))
        committed = await svc.submit(command)
    except LedgerError as exc:  # one item of a batch: its retry hint travels in its details
        error = exc.body()["error"]
        if exc.retry_after_s is not None:
            error["details"] = {**error["details"], "retry_after_s": exc.retry_after_s}
        return {"error": error}
    if faults.is_armed("leg.prepared") and _prepares(command):
        faults.crash_point("leg.prepared")
    outcome = committed.outcome
    results = outcome if isinstance(outcome, list) else [outcome]
    return {"index": committed.index, "results": [Rendered.of(r, svc.shard).to_wire() for r in results]}


async def transaction(ctx: NodeContext, request: web.Request, payload: Any) -> dict[str, Any]:
    """A transaction's record on a shard hosted here (``reads.transaction_at``)."""
    svc = _local_shard(ctx, request)
    txid = payload.get("id") if isinstance(payload, dict) else None
    if not isinstance(txid, str):
        raise LedgerError("malformed_body", "expected {\"id\": <transaction id>}")
    where, record = await transaction_at(ctx, svc.shard, parse.parse_id(txid, "", "id"))
    return {"shard": where, "record": record}


def _prepares(command: AnyCommand) -> bool:
    steps = command.commands if isinstance(command, Batch) else (command,)
    return any(isinstance(c, PrepareLeg) for c in steps)


async def arm_faults(ctx: NodeContext, request: web.Request, payload: Any) -> dict[str, Any]:
    """Arm crash points (``raftledger.node.faults``); served only with ``RAFTLEDGER_FAULTS=1``."""
    points = payload.get("crash") if isinstance(payload, dict) else None
    if not isinstance(points, list) or not all(isinstance(p, str) for p in points):
        raise LedgerError("malformed_body", "expected {\"crash\": [<point>, ...]}")
    try:
        faults.arm(points)
    except ValueError as exc:
        raise LedgerError("malformed_body", str(exc)) from None
    return {"armed": sorted(points)}


async def barrier(ctx: NodeContext, request: web.Request, _: Any) -> dict[str, Any]:
    svc = _local_shard(ctx, request)
    return {"index": await svc.read_barrier(ctx.settings.http.consistency_wait_s)}


def replica_status(svc: ShardService) -> dict[str, Any]:
    index, chain = svc.fingerprint()
    return {**svc.status(), "fingerprint": {"index": index, "chain": chain}}


async def status(ctx: NodeContext, request: web.Request, _: Any) -> dict[str, Any]:
    return {"node": ctx.node_id, "pid": os.getpid(), "map_epoch": ctx.maps.epoch,
            "meta": None if ctx.meta is None else ctx.meta.status(),
            "shards": {str(s): replica_status(svc) for s, svc in sorted(ctx.shards.items())}}


async def cluster_map(ctx: NodeContext, request: web.Request, params: Any) -> dict[str, Any]:
    """A long poll: this node's map once it is newer than the caller's epoch, or after a bounded
    wait whatever it is (None while this node has none)."""
    held = params.get("epoch") if isinstance(params, dict) else None
    if isinstance(held, bool) or not isinstance(held, int):
        raise LedgerError("malformed_body", "expected {\"epoch\": <int>}")
    await ctx.maps.wait_epoch(held + 1, ctx.settings.meta.long_poll_s)
    current = ctx.maps.current
    return {"map": None if current is None else current.to_wire()}


async def meta_propose(ctx: NodeContext, request: web.Request, encoded: Any) -> dict[str, Any]:
    """A map command, applied through the metadata group's leader: this node's member, or (for a
    request that no node forwarded yet) the leader wherever it runs."""
    if not isinstance(encoded, bytes):
        raise LedgerError("malformed_body", "expected an encoded map command")
    try:
        command = decode_command(encoded)
    except MapError as exc:
        raise LedgerError("malformed_body", str(exc)) from None
    if FORWARDED_HEADER not in request.headers:
        if not isinstance(command, Attributed):  # a tool holding the cluster secret (raftledger up)
            sender = request.headers.get(wire.PEER_HEADER, "?")[:64]
            command = Attributed(command, f"secret:{sender}", ctx.clock.time_ns())
        return dict((await propose_map(ctx, command)).to_wire())
    if ctx.meta is None:
        raise LedgerError("not_leader", f"node {ctx.node_id} hosts no member of the metadata group")
    return dict((await ctx.meta.propose(command)).to_wire())


async def meta_membership(ctx: NodeContext, request: web.Request, payload: Any) -> dict[str, Any]:
    """The metadata group as its leader sees it, or one membership step run by the leader."""
    if ctx.meta is None:
        raise LedgerError("not_leader", f"node {ctx.node_id} hosts no member of the metadata group")
    return await membership.leader_op(ctx, ctx.meta, payload)


async def shard_membership(ctx: NodeContext, request: web.Request, payload: Any) -> dict[str, Any]:
    """The shard's group as its leader sees it, or one membership step run by the leader
    (``membership.leader_op``)."""
    return await membership.leader_op(ctx, _local_shard(ctx, request), payload)


async def totals(ctx: NodeContext, request: web.Request, _: Any) -> dict[str, Any]:
    """Per-currency sums over every account of a shard, for ledger invariant checks."""
    svc = _local_shard(ctx, request)
    with svc.store.reader() as reader:
        sums = currency_totals(reader)
        accounts = sum(1 for _ in reader.account_ids())
        applied = reader.state().applied_index
    names = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
    return {"accounts": accounts, "applied_index": applied,
            "currencies": {c: dict(zip(names, v, strict=True)) for c, v in sums.items()}}


_bench_runs: dict[str, asyncio.Task[dict[str, Any]]] = {}


async def bench_start(ctx: NodeContext, request: web.Request, params: Any) -> dict[str, Any]:
    """Run the in-process load generator against this replica in the background; poll its result."""
    from raftledger.bench.load import run_load

    svc = _local_shard(ctx, request)
    run = f"{svc.shard}.{len(_bench_runs)}"
    tag = next(t for t in (f"{{b{n}}}" for n in range(100_000)) if ctx.shard_of(t) == svc.shard)
    _bench_runs[run] = asyncio.create_task(run_load(
        svc, transfers=int(params["transfers"]), concurrency=int(params["concurrency"]),
        prefix=str(params["prefix"]), tag=tag))
    return {"run": run}


async def bench_result(ctx: NodeContext, request: web.Request, _: Any) -> dict[str, Any]:
    task = _bench_runs.get(request.match_info["run"])
    if task is None:
        raise LedgerError("not_found", "no such run")
    if not task.done():
        return {"done": False}
    return {"done": True, **task.result()}


ROUTES: tuple[tuple[str, Handler], ...] = (
    ("/shards/{shard}/submit", submit),
    ("/shards/{shard}/barrier", barrier),
    ("/shards/{shard}/transaction", transaction),
    ("/shards/{shard}/totals", totals),
    ("/shards/{shard}/membership", shard_membership),
    ("/status", status),
    ("/map", cluster_map),
    ("/meta/propose", meta_propose),
    ("/meta/membership", meta_membership),
    *integrity.INTERNAL_ROUTES,
)
BENCH_ROUTES: tuple[tuple[str, Handler], ...] = (
    ("/shards/{shard}/bench", bench_start),
    ("/bench/{run}", bench_result),
)


def create_app(ctx: NodeContext) -> web.Application:
    """The internal listener's application (``ctx.sealer`` must be set)."""
    if ctx.sealer is None:
        raise ValueError("the internal listener needs the cluster secret (NodeContext.sealer)")
    app = web.Application(middlewares=[not_found], client_max_size=ctx.settings.internal.body_bytes_max)
    guard = wire.ReplayGuard(ctx.settings.internal.window_s, ctx.settings.internal.replay_nonces_max,
                             ctx.peer_clocks)
    routes = ROUTES + (BENCH_ROUTES if os.environ.get(BENCH_ENV) == "1" else ())
    routes += (("/faults", arm_faults),) if faults.enabled() else ()
    for path, handler in routes:
        app.router.add_post(wire.PREFIX + path, sealed(ctx, guard, handler))
    return app


@web.middleware
async def not_found(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
    """An unknown path or method gets the one error shape (unsealed: nothing was opened)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        code = "method_not_allowed" if exc.status == 405 else "not_found"
        error = LedgerError(code, exc.reason)
        return web.json_response(error.body(), status=error.status)
