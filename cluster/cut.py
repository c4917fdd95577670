"""A cut of the cluster: one reading of every shard, and whether those readings fit together.

Shards are read at their own points of their own logs. Two-phase commit orders its steps across
shards (a participant's prepare, then its home's decision, then the participant's finish, then the
home's ``Complete``), so readings taken at different moments can hold a later step without the
earlier one: a home's commit whose participant has no leg (read before its prepare), or a leg
finished while its home has no decision (read before the decision). A set of readings is a
*consistent cut* when no step is in it without every step it depends on; only then do the legs
balance across shards once each open one is settled as its decision says.

``ShardCut`` is what one shard's reading keeps of its cross-shard state (``summarize``, from one
read transaction of a live store or of a backup's copy). ``cut_problems`` checks the rules above
over one reading per shard; ``settled_totals`` sums every shard's per-currency totals with each
open leg moved to where its decision takes it (an undecided one voided: its transaction was never
acknowledged), which must balance exactly on a consistent cut.

Readings of a live cluster keep only what is recent (``since_ns``: legs prepared or finished, and
decisions recorded, since then; every open leg and open decision whatever its age): what is older
was settled before any reading began. ``judged_from_ns`` says from when on a step is judged, so that
a step is never judged against one that happened before ``since_ns`` and was left out. A backup's
copies are read whole (``since_ns`` and ``judged_from_ns`` 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raftledger.statemachine.audit import currency_totals
from raftledger.statemachine.codes import ResultCode
from raftledger.statemachine.commands import LEG_EXPIRE, LEG_HOLD, LEG_POST, LEG_VOID
from raftledger.statemachine.layout import unpack_leg, unpack_open_decision, unpack_transaction
from raftledger.statemachine.ledger import EVENT_HEAD, EXPIRY_SUFFIX, decode_rejection, event_transaction
from raftledger.statemachine.store import Reader

LEG_PREPARED, LEG_HELD = "prepared", "held"
OPEN = (LEG_PREPARED, LEG_HELD)
FINISHED = ("held", "posted", "voided", "expired")  # reached through a FinishLeg of a decision
NOT_PLACED = ("refused", "aborted")  # a leg that never held funds
TOTALS = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
OUTCOME_NAMES = {LEG_POST: "post", LEG_HOLD: "hold", LEG_VOID: "void", LEG_EXPIRE: "expire"}
_DEBIT, _CREDIT = 0, 1
Totals = list[int]  # debits posted, credits posted, debits pending, credits pending


@dataclass(frozen=True)
class LegView:
    id: str
    status: str
    coordinator: int
    shards: tuple[int, ...]
    timestamp: int  # when it was prepared
    finished_by: str
    finished_at: int | None  # when it was posted, voided or expired, if recent (its outbox event)
    digest: str
    entries: tuple[tuple[str, int, int], ...]  # (currency, 0 debit / 1 credit, amount)


@dataclass(frozen=True)
class RecordView:
    """A home's record of a cross-shard transaction or follow-up (the decision)."""

    id: str
    status: str
    shards: tuple[int, ...]
    timestamp: int
    pending_id: str | None  # a follow-up: the hold it posts or voids
    deadline: int | None  # a hold's expiry


@dataclass(frozen=True)
class DecisionView:
    """An open decision: what its participants still have to apply."""

    id: str
    leg: str
    digest: str
    outcome: int
    amount: int | None
    participants: tuple[int, ...]
    timestamp: int


@dataclass
class ShardCut:
    shard: int
    node: str
    applied_index: int
    last_timestamp: int
    since_ns: int
    currencies: dict[str, Totals] = field(default_factory=dict)
    legs: dict[str, LegView] = field(default_factory=dict)
    records: dict[str, RecordView] = field(default_factory=dict)
    rejections: set[str] = field(default_factory=set)
    decisions: dict[str, DecisionView] = field(default_factory=dict)

    def knows(self, decision_id: str) -> bool:
        """This home recorded ``decision_id`` (a commit, a follow-up, or an abort) by this reading."""
        return decision_id in self.records or decision_id in self.rejections or decision_id in self.decisions

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "node": self.node, "applied_index": self.applied_index,
                "last_timestamp": self.last_timestamp, "since_ns": self.since_ns,
                "currencies": {c: dict(zip(TOTALS, t, strict=True))
                               for c, t in sorted(self.currencies.items())},
                "legs": [vars(v) for v in self.legs.values()],
                "records": [vars(v) for v in self.records.values()],
                "rejections": sorted(self.rejections),
                "decisions": [vars(v) for v in self.decisions.values()]}

    @staticmethod
    def from_json(data: dict[str, Any]) -> ShardCut:
        def tupled(row: dict[str, Any], *names: str) -> dict[str, Any]:
            lists = {n: tuple(tuple(x) if isinstance(x, list) else x for x in row[n]) for n in names}
            return {**row, **lists}
        return ShardCut(
            int(data["shard"]), str(data["node"]), int(data["applied_index"]), int(data["last_timestamp"]),
            int(data["since_ns"]),
            {c: [int(t[n]) for n in TOTALS] for c, t in data["currencies"].items()},
            {v["id"]: LegView(**tupled(v, "shards", "entries")) for v in data["legs"]},
            {v["id"]: RecordView(**tupled(v, "shards")) for v in data["records"]},
            set(data["rejections"]),
            {v["id"]: DecisionView(**tupled(v, "participants")) for v in data["decisions"]})


# -- one shard's reading ------------------------------------------------------------------------------

def summarize(reader: Reader, since_ns: int, node: str = "") -> ShardCut:
    """What one read transaction holds of the shard's cross-shard state (see the module's doc)."""
    state = reader.state()
    cut = ShardCut(reader.shard, node, state.applied_index, state.last_timestamp, since_ns,
                   {c: list(t) for c, t in currency_totals(reader).items()})
    finished_at = _recent_finishes(reader, since_ns)
    for _key, raw in reader.txn.cursor(db=reader.dbs.legs):
        leg = unpack_leg(raw)
        if leg.status in OPEN or leg.timestamp >= since_ns or leg.id in finished_at:
            cut.legs[leg.id] = LegView(
                leg.id, leg.status, leg.coordinator, tuple(leg.shards), leg.timestamp, leg.finished_by,
                finished_at.get(leg.id), leg.digest.hex(),
                tuple((e.currency, _DEBIT if e.direction == "debit" else _CREDIT, e.amount)
                      for e in leg.entries))
    for _key, raw in reader.txn.cursor(db=reader.dbs.transactions):
        tx = unpack_transaction(raw)
        deadline = tx.expires_at
        if tx.shards and (tx.timestamp >= since_ns or (deadline is not None and deadline >= since_ns)):
            cut.records[tx.id] = RecordView(tx.id, tx.status, tuple(tx.shards), tx.timestamp, tx.pending_id,
                                            deadline)
    for key, raw in reader.txn.cursor(db=reader.dbs.idempotency):
        rejection = decode_rejection(raw)
        if rejection is not None and rejection[1] != ResultCode.ok and rejection[2] >= since_ns:
            cut.rejections.add(bytes(key).decode())
    for key, raw in reader.txn.cursor(db=reader.dbs.decisions):
        d = unpack_open_decision(key, raw)
        cut.decisions[d.id] = DecisionView(d.id, d.leg, d.digest.hex(), d.outcome, d.amount,
                                           tuple(d.participants), d.timestamp)
    return cut


def _recent_finishes(reader: Reader, since_ns: int) -> dict[str, int]:
    """Legs posted, voided or expired since ``since_ns``: id -> when. The outbox is in apply order
    and a shard's timestamps only grow, so it is read backwards until an older event."""
    found: dict[str, int] = {}
    cursor = reader.txn.cursor(db=reader.dbs.outbox)
    if not cursor.last():
        return found
    for _key, raw in cursor.iterprev():
        _type, kind, ts = EVENT_HEAD.unpack_from(raw)
        if ts < since_ns:
            break
        packed = event_transaction(kind, bytes(raw[EVENT_HEAD.size:]))
        if packed is None:
            continue
        tx = unpack_transaction(packed)
        if tx.shards:  # a leg's finish: its own id, or the follow-up's naming the hold
            found.setdefault(tx.pending_id or tx.id, ts)
    return found


# -- the rules -------------------------------------------------------------------------------------------

def cut_problems(cuts: dict[int, ShardCut], judged_from_ns: int = 0) -> list[str]:
    """Every way the readings do not fit together (empty: a consistent cut)."""
    problems: list[str] = []
    for cut in cuts.values():
        for leg in cut.legs.values():
            home = cuts.get(leg.coordinator)
            if home is not None:
                problems.extend(_leg_against_home(cut.shard, leg, home, judged_from_ns))
        for record in cut.records.values():
            if record.timestamp >= judged_from_ns or (record.deadline or -1) >= judged_from_ns:
                problems.extend(_record_against_legs(cut, record, cuts))
    return sorted(set(problems))


def _leg_against_home(shard: int, leg: LegView, home: ShardCut, judged_from_ns: int) -> list[str]:
    """A leg finished by a decision its home does not have yet (the home was read before it)."""
    where = f"leg {leg.id} on shard {shard}"
    recent = leg.timestamp >= judged_from_ns or (leg.finished_at or -1) >= judged_from_ns
    if leg.status not in FINISHED or not recent:
        return []
    if not home.knows(leg.finished_by):
        return [f"{where} is {leg.status} by {leg.finished_by}, which its home shard {home.shard} "
                f"had not decided when read"]
    record = home.records.get(leg.id)
    if leg.status == "expired" and leg.id + EXPIRY_SUFFIX not in home.decisions and (
            record is None or record.status != "expired"):
        return [f"{where} expired; its home shard {home.shard} had not expired it when read"]
    return []


def _record_against_legs(home: ShardCut, record: RecordView, cuts: dict[int, ShardCut]) -> list[str]:
    """A home's decision: every participant prepared its leg before it was taken, and finished the
    leg before it was completed."""
    problems = []
    follow_up = record.pending_id is not None
    txid = record.pending_id or record.id
    completed = record.id not in home.decisions
    expiry_completed = record.status == "expired" and txid + EXPIRY_SUFFIX not in home.decisions
    where = f"shard {home.shard} decided {record.id}"
    for shard in record.shards:
        cut = cuts.get(shard)
        leg = None if cut is None else cut.legs.get(txid)
        if cut is None or (follow_up and not completed):
            continue
        if leg is None or leg.status in NOT_PLACED:
            problems.append(f"{where}, but shard {shard} has no leg of {txid} (read before its prepare)")
        elif follow_up and leg.finished_by != record.id:
            problems.append(f"{where} and completed it, but its leg on shard {shard} is {leg.status}")
        elif completed and leg.status == LEG_PREPARED:
            problems.append(f"{where} and completed it, but its leg on shard {shard} is still prepared")
        elif expiry_completed and leg.status != "expired":
            problems.append(f"{where}, expired and completed, but its leg on shard {shard} is {leg.status}")
    return problems


# -- the balance -----------------------------------------------------------------------------------------

def settled_totals(cuts: dict[int, ShardCut]) -> dict[str, Totals]:
    """Per currency over all shards, every open leg moved to where its decision takes it."""
    sums: dict[str, Totals] = {}
    for cut in cuts.values():
        for currency, totals in cut.currencies.items():
            acc = sums.setdefault(currency, [0, 0, 0, 0])
            for i, value in enumerate(totals):
                acc[i] += value
    for cut in cuts.values():
        for leg in cut.legs.values():
            if leg.status in OPEN:
                outcome, amount = settling(cut.shard, leg, cuts.get(leg.coordinator))
                _settle(sums, leg, outcome, amount)
    return dict(sorted(sums.items()))


def decision_for(shard: int, leg: LegView, home: ShardCut | None) -> DecisionView | None:
    """The latest of the home's open decisions that finishes this leg (its own, or a follow-up's)."""
    decided = [] if home is None else [
        d for d in home.decisions.values()
        if d.leg == leg.id and d.digest == leg.digest and shard in d.participants]
    return max(decided, key=lambda d: d.timestamp, default=None)


def settling(shard: int, leg: LegView, home: ShardCut | None) -> tuple[int, int | None]:
    """(outcome, amount) an open leg is finished with: its home's latest open decision for it,
    else as it is (a hold kept) or voided (prepared, and decided nowhere: its transaction aborts)."""
    decided = decision_for(shard, leg, home)
    if decided is not None:
        return decided.outcome, decided.amount
    return (LEG_HOLD if leg.status == LEG_HELD else LEG_VOID), None


def _settle(sums: dict[str, Totals], leg: LegView, outcome: int, amount: int | None) -> None:
    if outcome == LEG_HOLD:
        return
    for currency, side, placed in leg.entries:
        totals = sums.setdefault(currency, [0, 0, 0, 0])
        totals[2 + side] -= placed  # the hold is released ...
        if outcome == LEG_POST:
            totals[side] += amount or placed  # ... and posted


def imbalances(sums: dict[str, Totals]) -> list[str]:
    out = []
    for currency, (dp, cp, dpe, cpe) in sums.items():
        if dp != cp or dpe != cpe:
            out.append(f"{currency}: debits exceed credits by {dp - cp} posted and {dpe - cpe} pending "
                       "over all shards (open cross-shard legs settled as decided)")
    return out
