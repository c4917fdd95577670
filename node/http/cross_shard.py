"""Transactions whose accounts live on other shards than their home: two-phase commit over Raft groups.

The node that received the request drives it (docs/design.md, "Cross-shard transactions"): every
participant prepares its leg (holds), the coordinator decides (the commit point), every participant
finishes its leg, and only then is the client answered, with a token that names the decision and
every finish, so a read of any leg with it sees the transaction finished everywhere. ``Complete``
at the coordinator follows, off the client's path. Each step is idempotent by transaction id; a
step that cannot reach its shard is left to the resolvers (``resolve``), which run on every shard
leader.

The coordinator is the home of the transaction's id. An atomic batch is one run: its items'
decisions are taken together, in one entry at the home of its first item, which records them all;
each other item's id is claimed at its own home first (``ClaimId``), so that it stays unique in the
ledger and a lookup there finds where it is recorded.

What each step answers decides the next:
- every prepare ok -> commit; a refusal (a ledger rule) -> abort with the first refusal in shard
  order (in an atomic batch, every item aborts); a prepare whose outcome is unknown -> no decision
  yet: the client gets 503 and retries with the same id (the legs already prepared replay), or the
  resolver aborts later;
- a leg or claim of another payload under the id -> 409, nothing decided for this payload;
- the decision replayed (a retry, a second driver, a resolver's abort) -> finish as it says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from raftledger.client.errors import LedgerError, Unavailable
from raftledger.statemachine.codec import payload_hash
from raftledger.statemachine.codes import ResultCode
from raftledger.statemachine.commands import (
    DECIDE_NEW,
    DECIDE_POST,
    DECIDE_REVERSE,
    DECIDE_VOID,
    LEG_AS_DECIDED,
    LEG_HOLD,
    LEG_POST,
    LEG_VOID,
    Batch,
    ClaimId,
    Complete,
    CreateTransaction,
    Decide,
    Direction,
    EntrySpec,
    FinishLeg,
    PostPending,
    PrepareLeg,
    ProtocolCommand,
    ReverseTransaction,
    TxEntry,
    VoidPending,
    batch_commands_max,
)
from raftledger.statemachine.ledger import EXPIRY_SUFFIX
from raftledger.statemachine.records import OpenDecision

from .. import faults
from .context import NodeContext
from .forward import ShardReply, submit
from .render import Rendered

log = logging.getLogger(__name__)

FLIP = {Direction.debit: Direction.credit, Direction.credit: Direction.debit}
REUSED = "idempotency_key_reused"
FINISHED_HERE = -1  # in the results of a decision taken with its local leg: that leg's finish
ANY_TIME_NS = 1 << 64  # after every timestamp: the resolver reads every open decision and leg

Key = tuple[int, int]  # (the item's index in its run, a shard)


@dataclass(frozen=True, slots=True)
class Item:
    """One transaction of a run: its legs to prepare and the decision its coordinator takes (a
    template: the entries and the outcome come from what the legs answer)."""

    id: str
    digest: bytes
    home: int  # where its id lives: claimed there when its coordinator is another shard
    prepares: dict[int, PrepareLeg]
    decision: Decide
    order: tuple[int, ...]  # the shard of each entry, in the client's order (the record keeps it)


@dataclass(slots=True)
class Outcome:
    """What the client is answered: each item's result, and every shard index that carried a step."""

    results: list[Rendered]
    coordinator: int
    indexes: dict[int, int] = field(default_factory=dict)

    @property
    def result(self) -> Rendered:
        return self.results[0]

    def touched(self, indexes: dict[int, int]) -> None:
        for shard, index in indexes.items():
            self.indexes[shard] = max(index, self.indexes.get(shard, 0))


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


def new_item(ctx: NodeContext, command: CreateTransaction, coordinator: int) -> Item:
    legs = participants_of(ctx, command.entries)
    digest = payload_hash(command)
    prepares = {shard: PrepareLeg(command.id, coordinator, digest, entries, command.pending,
                                  command.code, command.metadata, tuple(legs))
                for shard, entries in legs.items()}
    decision = Decide(command.id, digest, DECIDE_NEW, 0, pending=command.pending,
                      timeout_seconds=command.timeout_seconds, code=command.code,
                      metadata=command.metadata, shards=tuple(legs))
    order = tuple(ctx.shard_of(e.account_id) for e in command.entries)
    return Item(command.id, digest, ctx.shard_of(command.id), prepares, decision, order)


# -- new transactions ----------------------------------------------------------------------------------


async def create(ctx: NodeContext, command: CreateTransaction) -> Outcome:
    home = ctx.shard_of(command.id)
    return await _run(ctx, [new_item(ctx, command, home)], home, atomic=False)


async def create_atomic(ctx: NodeContext, commands: Sequence[CreateTransaction]) -> Outcome:
    """An atomic batch whose transactions are not all single-shard at one home: all or none."""
    coordinator = ctx.shard_of(commands[0].id)
    return await _run(ctx, [new_item(ctx, c, coordinator) for c in commands], coordinator, atomic=True)


async def reverse(ctx: NodeContext, command: ReverseTransaction, original: dict[str, Any],
                  coordinator: int) -> Outcome:
    """A new transaction mirroring every entry of a cross-shard one, decided where the original is
    recorded, ``coordinator`` (which checks and marks the original in the same step)."""
    mirrored = tuple(EntrySpec(e["account_id"], FLIP[Direction(e["direction"])], int(e["amount"]),
                               e["currency"]) for e in original["entries"])
    legs = participants_of(ctx, mirrored)
    digest = payload_hash(command)
    prepares = {shard: PrepareLeg(command.id, coordinator, digest, entries, False, original["code"],
                                  original["metadata"], tuple(legs))
                for shard, entries in legs.items()}
    decision = Decide(command.id, digest, DECIDE_REVERSE, 0, shards=tuple(legs), target=original["id"])
    order = tuple(ctx.shard_of(e.account_id) for e in mirrored)
    item = Item(command.id, digest, coordinator, prepares, decision, order)  # its id claimed by the caller
    return await _run(ctx, [item], coordinator, atomic=False)


async def _run(ctx: NodeContext, items: list[Item], coordinator: int, atomic: bool) -> Outcome:
    outcome = Outcome([], coordinator)
    settled = await _claim_ids(ctx, items, coordinator, outcome)
    failed = atomic and any(not r.ok for r in settled.values())
    live = [i for i in range(len(items)) if i not in settled]
    # One transaction whose coordinator holds one of its legs: that leg is prepared in the decision's
    # entry (one command and one round fewer for the coordinator), the others first.
    local = coordinator if len(items) == 1 and coordinator in items[0].prepares else None
    prepared: dict[Key, Rendered | Exception] = {}
    if live and not failed:
        steps: dict[Key, ProtocolCommand] = {(i, s): p for i in live for s, p in items[i].prepares.items()
                                             if s != local}
        prepared, indexes = await _send(ctx, steps)
        outcome.touched(indexes)
    faults.crash_point("cross_shard.prepared")
    await _unless_misrouted(ctx, items, prepared)
    refusals = {i: _refusal(i, items[i], prepared) for i in live}
    unknown = next((r for r in prepared.values() if isinstance(r, Exception)), None)
    if unknown is not None and not any(refusals.values()):
        raise _unknown(unknown, items[0].id)  # nothing decided: a retry with the same ids goes on
    for i, refusal in refusals.items():
        if refusal is not None and refusal.code == REUSED:  # the id is another payload's
            settled[i] = refusal
    if failed:  # an atomic run whose claim failed: nothing was prepared, every item aborts
        linked = int(ResultCode.linked_event_failed)
        decisions = {i: _aborted(items[i].decision, linked, {}) for i in live}
    else:
        decisions = {i: _decision_from(i, items[i], prepared, refusals[i]) for i in live if i not in settled}
    finished_here: set[Key] = set()  # the coordinator's own leg, finished in the deciding entry
    if local is not None and decisions and decisions[0].local:
        decided = await _decide_with_local_leg(ctx, items[0].prepares[local], decisions[0], prepared, outcome)
        if decided.pop(FINISHED_HERE).ok:
            finished_here.add((0, local))
    else:
        decided = await _decide(ctx, coordinator, decisions, settled, atomic, outcome)
    faults.crash_point("cross_shard.decided")
    ends = decided | {i: settled[i] for i in live if i in settled}  # another payload's id: ours go
    finishes: dict[Key, ProtocolCommand] = {
        (i, s): FinishLeg(items[i].id, items[i].digest, _leg_outcome(result), items[i].id)
        for i, result in ends.items() for s in items[i].prepares
        if (i, s) in prepared and (i, s) not in finished_here}
    finished, indexes = await _send(ctx, finishes)
    outcome.touched(indexes)
    unfinished = [key for key, r in finished.items() if isinstance(r, Exception)]
    for i, s in unfinished:
        log.warning("leg %s on shard %d not finished now (%s); the resolver at shard %d will",
                    items[i].id, s, finished[(i, s)], coordinator)
    if unfinished:  # decided, but a read of that leg would not show it yet: no answer until it does
        i, s = unfinished[0]
        raise _unknown(finished[(i, s)], items[i].id)  # (found by raftledger chaos, seed 7)
    if decisions:
        _complete_later(ctx, coordinator, [items[i].id for i in decisions])
    outcome.results = [decided.get(i) or settled[i] for i in range(len(items))]
    return outcome


async def _claim_ids(ctx: NodeContext, items: list[Item], coordinator: int,
                     outcome: Outcome) -> dict[int, Rendered]:
    """Claim at its home each id whose coordinator is elsewhere. Returns the items settled by it:
    the id is another payload's (409), or was applied before on the one-round path (its outcome)."""
    claims: dict[Key, ProtocolCommand] = {(i, it.home): ClaimId(it.id, it.digest, coordinator)
                                          for i, it in enumerate(items) if it.home != coordinator}
    if not claims:
        return {}
    answered, indexes = await _send(ctx, claims)
    outcome.touched(indexes)
    settled = {}
    for (i, _), result in answered.items():
        if isinstance(result, Exception):
            raise _unknown(result, items[i].id)
        if not result.ok or result.record is not None:
            settled[i] = result
    return settled


async def _unless_misrouted(ctx: NodeContext, items: list[Item], prepared: dict[Key, Rendered | Exception]
                            ) -> None:
    """A leg refused as ``wrong_shard`` was planned by an older map: decide nothing; once this node's
    map caught up, answer 503 so that the client's retry (same id) is planned by the new one. Legs
    prepared meanwhile replay or, where the new plan has no leg, are voided by their resolvers."""
    misrouted = [r for r in prepared.values() if isinstance(r, Rendered) and r.code == "wrong_shard"]
    if not misrouted:
        return
    epoch = max(int(r.details.get("epoch", 0)) for r in misrouted)
    await ctx.maps.wait_epoch(epoch, ctx.settings.forwarding.map_wait_s)
    raise LedgerError("unavailable", f"{items[0].id}: the cluster map moved an account; retry with the "
                      "same id", details={"epoch": epoch}, retry_after_s=0.1)


def _refusal(i: int, item: Item, prepared: dict[Key, Rendered | Exception]) -> Rendered | None:
    """The first refusal among an item's legs, in shard order."""
    answers = (prepared.get((i, s)) for s in sorted(item.prepares))
    return next((r for r in answers if isinstance(r, Rendered) and not r.ok), None)


def _decision_from(i: int, item: Item, prepared: dict[Key, Rendered | Exception],
                   refusal: Rendered | None) -> Decide:
    """The item's decision: commit with the entries its legs placed, or abort with its refusal."""
    t = item.decision
    if refusal is not None:
        return _aborted(t, _code(refusal.code), dict(refusal.details))
    placed = {s: iter(map(_leg_entry, prepared[(i, s)].record["entries"]))  # type: ignore[union-attr]
              if (i, s) in prepared else iter(map(_placeholder, item.prepares[s].entries))
              for s in item.prepares}
    entries = tuple(next(placed[s]) for s in item.order)  # each leg keeps its entries' order
    local = len(item.prepares) > len([s for s in item.prepares if (i, s) in prepared])
    return Decide(t.id, t.digest, t.kind, 0, {}, entries, t.pending, t.timeout_seconds, t.code, t.metadata,
                  t.shards, t.target, t.amount, local)


def _placeholder(e: EntrySpec) -> TxEntry:
    """An entry of the coordinator's own leg, filled in when its decision is applied (seq 0)."""
    return TxEntry(e.account_id, e.direction, e.amount, e.currency, 0, b"")


async def _decide_with_local_leg(ctx: NodeContext, leg: PrepareLeg, decision: Decide,
                                 prepared: dict[Key, Rendered | Exception], outcome: Outcome
                                 ) -> dict[int, Rendered]:
    """The coordinator's own leg prepared, decided and finished in one entry (``Decide.local``, then
    ``LEG_AS_DECIDED``): the decision's result at 0, the finish's at ``FINISHED_HERE``."""
    finish = FinishLeg(leg.id, leg.digest, LEG_AS_DECIDED, decision.id)
    try:
        reply = await submit(ctx, outcome.coordinator, Batch((leg, decision, finish)))
    except LedgerError as exc:
        raise _unknown(exc, decision.id) from exc
    outcome.touched({outcome.coordinator: reply.index})
    prepared[(0, outcome.coordinator)] = reply.results[0]
    return {0: reply.results[1], FINISHED_HERE: reply.results[2]}


def _aborted(t: Decide, code: int, details: dict[str, Any]) -> Decide:
    return Decide(t.id, t.digest, t.kind, code, details, (), t.pending, t.timeout_seconds, t.code,
                  t.metadata, t.shards, t.target, t.amount)


def _code(name: str) -> int:
    """A refusal's code as the ledger stores it (an error of the edge becomes an abort)."""
    code = ResultCode.__members__.get(name, ResultCode.transaction_aborted)
    return int(code)


async def _decide(ctx: NodeContext, coordinator: int, decisions: dict[int, Decide],
                  settled: dict[int, Rendered], atomic: bool, outcome: Outcome) -> dict[int, Rendered]:
    """Take the decisions at the coordinator, each on its own or, for an atomic run, all in one entry
    (all committed or none); an atomic run that fails is then decided aborted item by item: the
    first failure with its refusal, every other item ``linked_event_failed``."""
    if not decisions:
        return {}
    if atomic:
        failing = min([i for i, r in settled.items() if not r.ok]
                      + [i for i, d in decisions.items() if d.outcome], default=None)
        if failing is None:
            results = _decided(await _send(ctx, _at(coordinator, decisions), atomic=True), outcome)
            failing = next((i for i in sorted(results) if not results[i].ok), None)
            if failing is None:
                return results
            refusal = results[failing]
            decisions[failing] = _aborted(decisions[failing], _code(refusal.code), dict(refusal.details))
        linked = int(ResultCode.linked_event_failed), {"failed_index": failing}
        decisions = {i: d if i == failing else _aborted(d, *linked) for i, d in decisions.items()}
    return _decided(await _send(ctx, _at(coordinator, decisions)), outcome)


def _at(shard: int, decisions: dict[int, Decide]) -> dict[Key, ProtocolCommand]:
    return {(i, shard): d for i, d in decisions.items()}


def _decided(sent: tuple[dict[Key, Rendered | Exception], dict[int, int]], outcome: Outcome
             ) -> dict[int, Rendered]:
    answered, indexes = sent
    outcome.touched(indexes)
    results = {}
    for (i, _), result in answered.items():
        if isinstance(result, Exception):  # the decision may be taken: a retry or the resolver knows
            raise _unknown(result, "the decision")
        results[i] = result
    return results


def _leg_outcome(decided: Rendered) -> int:
    """What a decision makes of its legs: holds kept (a pending transaction), posted, or voided (a
    refusal, or the id is another payload's)."""
    if not decided.ok:
        return LEG_VOID
    return LEG_HOLD if (decided.record or {}).get("pending") else LEG_POST


def _leg_entry(e: dict[str, Any]) -> TxEntry:
    return TxEntry(e["account_id"], Direction(e["direction"]), int(e["amount"]), e["currency"],
                    int(e["seq"]), bytes.fromhex(e["hash"]))


async def _send(ctx: NodeContext, steps: dict[Key, ProtocolCommand], atomic: bool = False
                ) -> tuple[dict[Key, Rendered | Exception], dict[int, int]]:
    """Each step to its shard, one request per shard (a Batch when several): each step's result, or
    the error that kept its shard from answering; and the index that carried each shard's steps."""
    by_shard: dict[int, list[Key]] = {}
    for key in steps:
        by_shard.setdefault(key[1], []).append(key)
    shards = sorted(by_shard)

    async def one(shard: int) -> ShardReply:
        keys = by_shard[shard]
        if len(keys) == 1:
            return await submit(ctx, shard, steps[keys[0]])
        return await submit(ctx, shard, Batch(tuple(steps[k] for k in keys), atomic))

    replies = await asyncio.gather(*(one(s) for s in shards), return_exceptions=True)
    answered: dict[Key, Rendered | Exception] = {}
    indexes = {}
    for shard, reply in zip(shards, replies, strict=True):
        keys = by_shard[shard]
        if isinstance(reply, ShardReply):
            indexes[shard] = reply.index
            answered.update(zip(keys, reply.results, strict=True))
        elif isinstance(reply, LedgerError) and not reply.retryable:  # refused at that shard's edge
            answered.update((k, Rendered(reply.code, steps[k].id, details=reply.details)) for k in keys)
        elif isinstance(reply, Exception):
            answered.update((k, reply) for k in keys)
        else:
            raise reply
    return answered, indexes


def _complete_later(ctx: NodeContext, coordinator: int, decision_ids: list[str]) -> None:
    """``Complete`` at the coordinator, off the client's path (the resolver does it if this fails).
    One sender per coordinator: what concurrent requests queue meanwhile travels as one Batch."""
    queued = ctx.completions.get(coordinator)
    if queued is not None:
        queued.extend(decision_ids)
        return
    ctx.completions[coordinator] = list(decision_ids)
    task = asyncio.get_running_loop().create_task(_send_completions(ctx, coordinator))
    ctx.background.add(task)
    task.add_done_callback(ctx.background.discard)


async def _send_completions(ctx: NodeContext, coordinator: int) -> None:
    queued = ctx.completions[coordinator]
    try:
        while queued:
            decision_ids = queued[:batch_commands_max]
            del queued[:batch_commands_max]
            steps: dict[Key, ProtocolCommand] = {
                (i, coordinator): Complete(d) for i, d in enumerate(decision_ids)}
            answered, _ = await _send(ctx, steps)
            for key, result in answered.items():
                if isinstance(result, Exception):  # the resolver completes it later
                    log.info("complete of %s at shard %d postponed: %s", decision_ids[key[0]],
                             coordinator, result)
    finally:
        del ctx.completions[coordinator]


def _unknown(exc: BaseException, txid: str) -> LedgerError:
    if isinstance(exc, Unavailable):
        return exc
    return LedgerError("outcome_unknown", f"{txid}: a shard did not answer; retry with the same id")


# -- follow-ups ------------------------------------------------------------------------------------------


async def claim(ctx: NodeContext, txid: str, digest: bytes, at: int) -> Rendered | None:
    """Before a transaction is recorded on shard ``at``, not its id's home: take the id at its home.
    Returns the answer to give instead (409: the id is another payload's), or None to go on."""
    home = ctx.shard_of(txid)
    if home == at:
        return None
    result = (await submit(ctx, home, ClaimId(txid, digest, at))).results[0]
    return None if result.ok else result


async def follow_up(ctx: NodeContext, command: PostPending | VoidPending, target: dict[str, Any],
                    home: int) -> Outcome:
    """Post or void a cross-shard hold: decided where the hold is recorded (``home``: the home of its
    id, or of its atomic batch's first item), then finished on its legs."""
    post = isinstance(command, PostPending)
    amount = command.amount if isinstance(command, PostPending) else None
    decision = Decide(command.id, payload_hash(command), DECIDE_POST if post else DECIDE_VOID, 0,
                      target=target["id"], amount=amount)
    decided = await submit(ctx, home, decision)
    result = decided.results[0]
    outcome = Outcome([result], home, {home: decided.index})
    finish = result.details.get("finish") if result.ok else None  # a replay finishes too: idempotent
    if finish is not None:
        leg = FinishLeg(finish["leg"], bytes.fromhex(finish["digest"]), finish["outcome"], finish["by"],
                        finish["amount"])
        finished, indexes = await _send(ctx, {(0, s): leg for s in finish["participants"]})
        outcome.touched(indexes)
        failure = next((r for r in finished.values() if isinstance(r, Exception)), None)
        if failure is not None:  # as in ``_run``: no answer before every leg shows the decision
            raise _unknown(failure, command.id)
        _complete_later(ctx, home, [finish["decision"]])
    return outcome


# -- resolvers: what crashes interrupted ------------------------------------------------------------------


class Backoff:
    """When each decision or leg a resolver failed on may be tried again: one pass later, then twice
    the last wait each time, at most ``retry_max_s``."""

    def __init__(self, ctx: NodeContext) -> None:
        self.clock = ctx.clock
        self.first_s = ctx.settings.cross_shard.resolver_interval_s
        self.max_s = ctx.settings.cross_shard.retry_max_s
        self.waits: dict[str, tuple[float, float]] = {}  # id -> (not before, last wait)
        self.first_seen: dict[int, dict[str, float]] = {}  # shard -> id -> when first seen open

    def open_for_s(self, shard: int, ids: list[str]) -> dict[str, float]:
        """How long this resolver has seen each of ``ids`` open on ``shard`` (monotonic; the rest of
        the shard's are forgotten). Age by timestamp alone trusts the wall clock of whoever stamped
        it: after a leader whose clock ran ahead, a shard's timestamps stay ahead of every clock
        until time catches up, and a leader whose clock runs behind sees nothing as old."""
        now = self.clock.monotonic()
        before = self.first_seen.get(shard, {})
        seen = self.first_seen[shard] = {i: before.get(i, now) for i in ids}
        return {i: now - since for i, since in seen.items()}

    def due(self, key: str) -> bool:
        return self.waits.get(key, (0.0, 0.0))[0] <= self.clock.monotonic()

    def failed(self, key: str) -> float:
        wait = min(self.max_s, 2 * self.waits.get(key, (0.0, self.first_s / 2))[1])
        self.waits[key] = (self.clock.monotonic() + wait, wait)
        return wait

    def done(self, key: str) -> None:
        self.waits.pop(key, None)


async def resolve(ctx: NodeContext) -> None:
    """Forever: on every shard this node leads, finish the decisions and legs left open too long.
    A timer, not a poll of something that could signal: what it looks for is time passing."""
    backoff = Backoff(ctx)
    while True:
        await ctx.clock.sleep(ctx.settings.cross_shard.resolver_interval_s)
        for shard, svc in sorted(ctx.shards.items()):
            if svc.is_leader():
                await resolve_shard(ctx, shard, backoff)


async def resolve_shard(ctx: NodeContext, shard: int, backoff: Backoff | None = None) -> None:
    """One pass over one shard: its open decisions, then its open legs, each on its own (one that
    fails waits its backoff; the others go on)."""
    backoff = backoff or Backoff(ctx)
    settings = ctx.settings.cross_shard
    now, most = ctx.clock.time_ns(), settings.resolved_per_pass_max
    finished_by = now - int(settings.finish_timeout_s * 1e9)
    prepared_by = now - int(settings.prepare_timeout_s * 1e9)
    with ctx.shards[shard].store.reader() as reader:
        open_decisions = reader.open_decisions(ANY_TIME_NS, most)
        open_legs = reader.open_legs(ANY_TIME_NS, most)
    # Old by its timestamp, or open for that long as this leader saw it (a skewed clock cannot hold
    # a hold forever); an expired cross-shard hold has no driver: its legs are released at once.
    ages = backoff.open_for_s(shard, [f"decision {d.id}" for d in open_decisions]
                              + [f"leg {leg.id}" for leg in open_legs])
    decisions = [d for d in open_decisions
                 if d.timestamp < finished_by or d.id.endswith(EXPIRY_SUFFIX)
                 or ages[f"decision {d.id}"] >= settings.finish_timeout_s]
    legs = [leg for leg in open_legs
            if leg.timestamp < prepared_by or ages[f"leg {leg.id}"] >= settings.prepare_timeout_s]
    work = [(f"decision {d.id}", _finish_decision(ctx, shard, d)) for d in decisions if backoff.due(d.id)]
    work += [(f"leg {leg.id}", _resolve_leg(ctx, shard, leg.id, leg.digest, leg.coordinator))
             for leg in legs if backoff.due(leg.id)]
    for what, step in work:
        key = what.split(" ", 1)[1]
        try:
            await step
        except Exception as exc:  # noqa: BLE001 (tried again after its backoff)
            log.warning("resolver: %s on shard %d not finished (%s); again in %.1fs", what, shard, exc,
                        backoff.failed(key))
        else:
            backoff.done(key)


async def _finish_decision(ctx: NodeContext, shard: int, d: OpenDecision) -> None:
    finish = FinishLeg(d.leg, d.digest, d.outcome, d.by, d.amount)
    finished, _ = await _send(ctx, {(0, s): finish for s in d.participants})
    failure = next((r for r in finished.values() if isinstance(r, Exception)), None)
    if failure is not None:
        raise failure
    await submit(ctx, shard, Complete(d.id))
    log.info("resolver: finished decision %s on shards %s", d.id, list(d.participants))


async def _resolve_leg(ctx: NodeContext, shard: int, txid: str, digest: bytes, coordinator: int) -> None:
    """Ask the coordinator for the decision; one that has none records an abort first (so a driver
    still running cannot commit any more), then this leg is finished as decided."""
    fence = Decide(txid, digest, DECIDE_NEW, int(ResultCode.transaction_aborted))
    decided = (await submit(ctx, coordinator, fence)).results[0]
    outcome = _leg_outcome(decided)
    if shard not in (decided.record or {}).get("shards", [shard]):  # not a participant of that decision
        outcome = LEG_VOID
    await submit(ctx, shard, FinishLeg(txid, digest, outcome, txid))
    log.info("resolver: leg %s on shard %d finished as decided at shard %d (%s)", txid, shard, coordinator,
             decided.code)
