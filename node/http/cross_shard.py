"""Transactions whose accounts live on other shards than their home: two-phase commit over Raft groups.

The node that received the request drives it (docs/design.md, "Cross-shard transactions"): every
participant prepares its leg (holds), the home decides (the commit point), every participant
finishes its leg, and only then is the client answered, with a token that names the decision and
every finish, so a read of any leg with it sees the transaction finished everywhere. ``Complete``
at the home follows, off the client's path. Each step is idempotent by transaction id; a step that
cannot reach its shard is left to the resolvers (``resolve``), which run on every shard leader.

What each step answers decides the next:
- every prepare ok -> commit; a refusal (a ledger rule, another payload's leg) -> abort with the first
  refusal in shard order; a prepare whose outcome is unknown -> no decision yet: the client gets 503
  and retries with the same id (the legs already prepared replay), or the resolver aborts later;
- the decision replayed (a retry, a second driver, a resolver's abort) -> finish as it says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raftledger.client.errors import LedgerError, Unavailable
from raftledger.statemachine.codec import payload_hash
from raftledger.statemachine.codes import ResultCode
from raftledger.statemachine.commands import (
    DECIDE_NEW,
    DECIDE_POST,
    DECIDE_REVERSE,
    DECIDE_VOID,
    LEG_HOLD,
    LEG_POST,
    LEG_VOID,
    Complete,
    CreateTransaction,
    Decide,
    Direction,
    EntrySpec,
    FinishLeg,
    LegEntry,
    PostPending,
    PrepareLeg,
    ReverseTransaction,
    VoidPending,
)

from .context import NodeContext
from .forward import ShardReply, submit
from .render import Rendered

log = logging.getLogger(__name__)

FLIP = {Direction.debit: Direction.credit, Direction.credit: Direction.debit}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the client is answered: the home's result, and every shard index that carried a step."""

    result: Rendered
    home: int
    indexes: dict[int, int]


def participants_of(ctx: NodeContext, entries: Sequence[EntrySpec]) -> dict[int, tuple[EntrySpec, ...]]:
    """Each shard's entries, in the transaction's order."""
    legs: dict[int, list[EntrySpec]] = {}
    for e in entries:
        legs.setdefault(ctx.shard_of(e.account_id), []).append(e)
    return {shard: tuple(legs[shard]) for shard in sorted(legs)}


def is_single_shard(ctx: NodeContext, command: CreateTransaction) -> bool:
    """Its accounts all live at the home of its id: the one-round path."""
    home = ctx.shard_of(command.id)
    return all(ctx.shard_of(e.account_id) == home for e in command.entries)


# -- a new transaction ----------------------------------------------------------------------------------


async def create(ctx: NodeContext, command: CreateTransaction) -> Outcome:
    legs = participants_of(ctx, command.entries)
    digest = payload_hash(command)
    prepares = {shard: PrepareLeg(command.id, ctx.shard_of(command.id), digest, entries, command.pending,
                                  command.code, command.metadata, tuple(legs))
                for shard, entries in legs.items()}
    decision = Decide(command.id, digest, DECIDE_NEW, 0, pending=command.pending,
                      timeout_seconds=command.timeout_seconds, code=command.code,
                      metadata=command.metadata, shards=tuple(legs))
    return await _two_phases(ctx, command.id, digest, prepares, decision)


async def reverse(ctx: NodeContext, command: ReverseTransaction, original: dict[str, Any]) -> Outcome:
    """A new transaction mirroring every entry of a cross-shard one, decided at the original's home."""
    mirrored = tuple(EntrySpec(e["account_id"], FLIP[Direction(e["direction"])], int(e["amount"]),
                               e["currency"]) for e in original["entries"])
    legs = participants_of(ctx, mirrored)
    digest = payload_hash(command)
    home = ctx.shard_of(original["id"])
    prepares = {shard: PrepareLeg(command.id, home, digest, entries, False, original["code"],
                                  original["metadata"], tuple(legs))
                for shard, entries in legs.items()}
    decision = Decide(command.id, digest, DECIDE_REVERSE, 0, shards=tuple(legs), target=original["id"])
    return await _two_phases(ctx, command.id, digest, prepares, decision, home)


async def _two_phases(ctx: NodeContext, txid: str, digest: bytes, prepares: dict[int, PrepareLeg],
                      decision: Decide, home: int | None = None) -> Outcome:
    home = ctx.shard_of(txid) if home is None else home
    prepared = await _prepare(ctx, prepares)
    replies = {s: r for s, r in prepared.items() if isinstance(r, ShardReply)}
    refusal = next((r.results[0] for r in replies.values() if not r.results[0].ok), None)
    unknown = next((r for r in prepared.values() if isinstance(r, BaseException)), None)
    if refusal is None and unknown is not None:
        raise _unknown(unknown, txid)  # no decision yet: a retry with the same id goes on from here
    indexes = {s: r.index for s, r in replies.items()}
    if refusal is not None and refusal.code == "idempotency_key_reused":
        # The id is another payload's: nothing is decided for this one, its own legs go.
        result = refusal
    else:
        decided = await submit(ctx, home, _decision_from(decision, replies, refusal))
        result = decided.results[0]
        indexes[home] = decided.index
    finishes = {s: FinishLeg(txid, digest, _leg_outcome(result), txid) for s in prepares}
    finished = await _finish(ctx, finishes)
    if len(finished) == len(finishes) and indexes.get(home):
        _complete_later(ctx, home, txid)
    return Outcome(result, home, indexes | finished)


def _leg_outcome(decided: Rendered) -> int:
    """What a decision makes of its legs: holds kept (a pending transaction), posted, or voided (a
    refusal, or the id is another payload's)."""
    if not decided.ok:
        return LEG_VOID
    return LEG_HOLD if (decided.record or {}).get("pending") else LEG_POST


def _decision_from(template: Decide, replies: dict[int, ShardReply], refusal: Rendered | None) -> Decide:
    t = template
    if refusal is not None:
        code = int(ResultCode[refusal.code]) if refusal.code in ResultCode.__members__ else \
            int(ResultCode.transaction_aborted)
        return Decide(t.id, t.digest, t.kind, code, dict(refusal.details), (), t.pending, t.timeout_seconds,
                      t.code, t.metadata, t.shards, t.target, t.amount)
    entries = tuple(_leg_entry(e) for shard in sorted(replies)
                    for e in replies[shard].results[0].record["entries"])  # type: ignore[index]
    return Decide(t.id, t.digest, t.kind, 0, {}, entries, t.pending, t.timeout_seconds, t.code, t.metadata,
                  t.shards, t.target, t.amount)


def _leg_entry(e: dict[str, Any]) -> LegEntry:
    return LegEntry(e["account_id"], Direction(e["direction"]), int(e["amount"]), e["currency"],
                    int(e["seq"]), bytes.fromhex(e["hash"]))


async def _prepare(ctx: NodeContext, prepares: dict[int, PrepareLeg]
                   ) -> dict[int, ShardReply | BaseException]:
    shards = list(prepares)
    replies = await asyncio.gather(*(submit(ctx, s, prepares[s]) for s in shards), return_exceptions=True)
    out: dict[int, ShardReply | BaseException] = {}
    for shard, reply in zip(shards, replies, strict=True):
        if isinstance(reply, LedgerError) and not reply.retryable:  # refused at the edge of that shard
            reply = ShardReply(shard, 0, [Rendered(reply.code, prepares[shard].id, details=reply.details)])
        elif isinstance(reply, BaseException) and not isinstance(reply, Exception):
            raise reply
        out[shard] = reply
    return out


async def _finish(ctx: NodeContext, finishes: dict[int, FinishLeg]) -> dict[int, int]:
    """Finish every leg; a leg that cannot be reached now is finished by the home's resolver."""
    shards = list(finishes)
    replies = await asyncio.gather(*(submit(ctx, s, finishes[s]) for s in shards), return_exceptions=True)
    indexes = {}
    for shard, reply in zip(shards, replies, strict=True):
        if isinstance(reply, ShardReply):
            indexes[shard] = reply.index
        elif isinstance(reply, Exception):
            log.warning("leg %s on shard %d not finished now (%s); its home's resolver will",
                        finishes[shard].id, shard, reply)
        else:
            raise reply
    return indexes


def _complete_later(ctx: NodeContext, home: int, decision_id: str) -> None:
    """``Complete`` at the home, off the client's path (the resolver does it if this fails)."""
    task = asyncio.get_running_loop().create_task(_complete(ctx, home, decision_id))
    ctx.background.add(task)
    task.add_done_callback(ctx.background.discard)


async def _complete(ctx: NodeContext, home: int, decision_id: str) -> None:
    try:
        await submit(ctx, home, Complete(decision_id))
    except Exception as exc:  # noqa: BLE001 (the resolver completes it later)
        log.info("complete of %s at shard %d postponed: %s", decision_id, home, exc)


def _unknown(exc: BaseException, txid: str) -> LedgerError:
    if isinstance(exc, Unavailable):
        return exc
    return LedgerError("outcome_unknown", f"{txid}: a participant did not answer; retry with the same id")


# -- follow-ups ------------------------------------------------------------------------------------------


async def follow_up(ctx: NodeContext, command: PostPending | VoidPending, target: dict[str, Any]) -> Outcome:
    """Post or void a cross-shard hold: decided at the hold's home, then finished on its legs."""
    home = ctx.shard_of(target["id"])
    post = isinstance(command, PostPending)
    amount = command.amount if isinstance(command, PostPending) else None
    decision = Decide(command.id, payload_hash(command), DECIDE_POST if post else DECIDE_VOID, 0,
                      target=target["id"], amount=amount)
    decided = await submit(ctx, home, decision)
    result = decided.results[0]
    indexes = {home: decided.index}
    finish = result.details.get("finish") if result.ok and not result.replayed else None
    if finish is not None:
        leg = FinishLeg(finish["leg"], bytes.fromhex(finish["digest"]), finish["outcome"], finish["by"],
                        finish["amount"])
        finished = await _finish(ctx, {s: leg for s in finish["participants"]})
        if len(finished) == len(finish["participants"]):
            _complete_later(ctx, home, finish["decision"])
        indexes |= finished
    return Outcome(result, home, indexes)


# -- resolvers: what crashes interrupted ------------------------------------------------------------------


async def resolve(ctx: NodeContext) -> None:
    """Forever: on every shard this node leads, finish the decisions and legs left open too long.
    A timer, not a poll of something that could signal: what it looks for is time passing."""
    settings = ctx.settings.cross_shard
    while True:
        await ctx.clock.sleep(settings.resolver_interval_s)
        for shard, svc in sorted(ctx.shards.items()):
            if not svc.is_leader():
                continue
            try:
                await resolve_shard(ctx, shard)
            except Exception:  # noqa: BLE001 (the next pass tries again)
                log.warning("resolver: shard %d pass failed", shard, exc_info=True)


async def resolve_shard(ctx: NodeContext, shard: int) -> None:
    """One pass over one shard: its open decisions, then its open legs."""
    settings = ctx.settings.cross_shard
    now, most = ctx.clock.time_ns(), settings.resolved_per_pass_max
    with ctx.shards[shard].store.reader() as reader:
        decisions = reader.open_decisions(now - int(settings.finish_timeout_s * 1e9), most)
        legs = reader.open_legs(now - int(settings.prepare_timeout_s * 1e9), most)
    for d in decisions:
        finish = FinishLeg(d.leg, d.digest, d.outcome, d.by, d.amount)
        finished = await _finish(ctx, {s: finish for s in d.participants})
        if len(finished) == len(d.participants):
            await submit(ctx, shard, Complete(d.id))
            log.info("resolver: finished decision %s on shards %s", d.id, list(d.participants))
    for leg in legs:
        await _resolve_leg(ctx, shard, leg.id, leg.digest, leg.coordinator)


async def _resolve_leg(ctx: NodeContext, shard: int, txid: str, digest: bytes, coordinator: int) -> None:
    """Ask the coordinator for the decision; one that has none records an abort first (so a driver
    still running cannot commit any more), then this leg is finished as decided."""
    fence = Decide(txid, digest, DECIDE_NEW, int(ResultCode.transaction_aborted))
    decided = (await submit(ctx, coordinator, fence)).results[0]
    await submit(ctx, shard, FinishLeg(txid, digest, _leg_outcome(decided), txid))
    log.info("resolver: leg %s on shard %d finished as decided at shard %d (%s)", txid, shard, coordinator,
             decided.code)
