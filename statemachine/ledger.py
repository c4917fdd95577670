"""The ledger rules: applying commands to an LMDB write transaction.

Pure and deterministic: everything it needs — the transaction, the command, the log index and the
timestamp — is passed in. It reads no clock, draws no random numbers and performs no I/O besides the
LMDB transaction it was handed, so every replica applying the same log reaches byte-identical state.

Every change to an account is a *move*: an entry appended to the account's sequence, chained to the one
before. Holds, posts, voids, expiries and reversals only ever append moves; nothing is rewritten except
a transaction's status fields. A command either writes all its moves or none: rows are computed in
memory, checked, and only then written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import lmdb
import msgpack

from . import hashing, merkle
from .codec import DIRECTION_BYTE, Invalid, canonical, payload_hash
from .codes import ResultCode
from .commands import (
    DECIDE_NEW,
    DECIDE_POST,
    DECIDE_REVERSE,
    LEG_AS_DECIDED,
    LEG_EXPIRE,
    LEG_HOLD,
    LEG_OUTCOMES,
    LEG_POST,
    LEG_VOID,
    AccountFlag,
    AnyCommand,
    Batch,
    ClaimId,
    Command,
    CompactFeed,
    Complete,
    CreateAccount,
    CreateTransaction,
    Decide,
    Direction,
    ExpireHolds,
    FinishLeg,
    PostPending,
    PrepareLeg,
    ProtocolCommand,
    ReverseTransaction,
    SetFeedOffset,
    SetSlots,
    TxEntry,
    VoidPending,
)
from .layout import (
    CONSUMER,
    ENTRY_STATUS_BYTE,
    FEED_FLOOR_KEY,
    SLOTS_KEY,
    U32,
    U64,
    AccountRow,
    InvariantViolation,
    OwnedSlots,
    ShardState,
    ensure,
    entry_key,
    expiry_key,
    pack_balances,
    pack_entry_fields,
    pack_leg,
    pack_open_decision,
    pack_transaction,
    timed_key,
    total_limit,
    unpack_account,
    unpack_leg,
    unpack_open_decision,
    unpack_transaction,
)
from .records import (
    LEG_ABORTED,
    LEG_HELD,
    LEG_OPEN,
    LEG_PREPARED,
    LEG_REFUSED,
    STATUS_EXPIRED,
    STATUS_PENDING,
    STATUS_POSTED,
    STATUS_VOIDED,
    Leg,
    OpenDecision,
    Outcome,
    Result,
    Transaction,
)
from .slots import ranges_problem, slot_of
from .validate import (
    RULES_FEED,
    RULES_LOCAL_FINISH,
    RULES_MERKLE,
    RULES_VERSION,
    Problem,
    claim_problem,
    command_problem,
    decide_problem,
    feed_offset_problem,
    leg_problem,
)

balance_limit = total_limit  # a move past it is refused as overflow (not Final: tests lower it)
NO_DEADLINE: Final = 2**64
CLAIMED_AT: Final = "recorded_at"  # the shard a claimed id's transaction is recorded on (ClaimId)
EXPIRY_SUFFIX: Final = "#expire"  # the open decision that expires a cross-shard hold's legs (no id has "#")
FLAG_LIMIT_DEBITS: Final = int(AccountFlag.debits_must_not_exceed_credits)
FLAG_LIMIT_CREDITS: Final = int(AccountFlag.credits_must_not_exceed_debits)
FLAG_CLOSED: Final = int(AccountFlag.closed)
FLAG_HISTORY: Final = int(AccountFlag.history)
EVENT_ACCOUNT: Final = 0
EVENT_TRANSACTION: Final = 1
# A transaction and, after it, the balances of its accounts right after the event (from RULES_FEED):
# u32 length of the packed transaction, the transaction, then one BALANCES record per account, in the
# order the accounts first appear in the transaction's entries.
EVENT_TRANSACTION_BALANCES: Final = 2
feed_compaction_events_max: Final = 10_000  # events one CompactFeed drops (the leader proposes more)
EVENT_TYPES: Final = ("account.created", "transaction.posted", "transaction.pending",
                      "transaction.voided", "transaction.expired", "transaction.reversed")
EVENT_TYPE_CODE: Final = {name: i for i, name in enumerate(EVENT_TYPES)}
EVENT_HEAD: Final = struct.Struct(">BBQ")  # type code, record kind, timestamp; the record bytes follow


def event_transaction(kind: int, record: bytes) -> bytes | None:
    """The packed transaction of an outbox record of ``kind`` (None: an account's event)."""
    if kind == EVENT_TRANSACTION:
        return record
    if kind == EVENT_TRANSACTION_BALANCES:
        size: int = U32.unpack_from(record)[0]
        return record[U32.size:U32.size + size]
    return None


def decode_rejection(raw: bytes | memoryview) -> tuple[bytes, ResultCode, int, dict[str, Any]] | None:
    """An idempotency record is the payload digest alone for a success, msgpack for a rejection."""
    if len(raw) == 32:
        return None
    digest, code, ts, details = msgpack.unpackb(raw)
    return digest, ResultCode(code), ts, details


def result_codes(outcomes: list[Outcome]) -> bytes:
    """One byte per command result, in order: what the shard chain commits to besides the payload."""
    codes = bytearray()
    for outcome in outcomes:
        if isinstance(outcome, list):
            for result in outcome:
                codes.append(int(result.code) & 0xFF)
        else:
            codes.append(int(outcome.code) & 0xFF)
    return bytes(codes)


class Dbs(NamedTuple):
    accounts: Any
    entries: Any
    transactions: Any
    idempotency: Any
    outbox: Any
    expiries: Any
    meta: Any
    legs: Any
    open_legs: Any
    decisions: Any
    consumers: Any
    merkle: Any
    leaves: Any
    leaf_ids: Any


class Cursors:
    """One cursor per sub-database of the write transaction.

    A cursor's get and put skip the argument parsing and the temporary cursor of ``txn.get`` and
    ``txn.put``: about half their cost, several times per command.
    """

    def __init__(self, accounts: Any, entries: Any, transactions: Any, idempotency: Any,
                 outbox: Any, expiries: Any, legs: Any, open_legs: Any, decisions: Any,
                 merkle: Any, leaves: Any, leaf_ids: Any) -> None:
        self.accounts = accounts
        self.entries = entries
        self.transactions = transactions
        self.idempotency = idempotency
        self.outbox = outbox
        self.expiries = expiries
        self.legs = legs
        self.open_legs = open_legs
        self.decisions = decisions
        self.merkle = merkle
        self.leaves = leaves
        self.leaf_ids = leaf_ids

    @staticmethod
    def open(txn: lmdb.Transaction, dbs: Dbs) -> Cursors:
        return Cursors(txn.cursor(db=dbs.accounts), txn.cursor(db=dbs.entries),
                       txn.cursor(db=dbs.transactions), txn.cursor(db=dbs.idempotency),
                       txn.cursor(db=dbs.outbox), txn.cursor(db=dbs.expiries),
                       txn.cursor(db=dbs.legs), txn.cursor(db=dbs.open_legs),
                       txn.cursor(db=dbs.decisions), txn.cursor(db=dbs.merkle),
                       txn.cursor(db=dbs.leaves), txn.cursor(db=dbs.leaf_ids))

    def recording(self, undo: list[tuple[Any, bytes, bytes | None]]) -> Cursors:
        """The same cursors, remembering in ``undo`` every value they overwrite or delete."""
        return Cursors(Recording(self.accounts, undo), Recording(self.entries, undo),
                       Recording(self.transactions, undo), Recording(self.idempotency, undo),
                       Recording(self.outbox, undo), Recording(self.expiries, undo),
                       Recording(self.legs, undo), Recording(self.open_legs, undo),
                       Recording(self.decisions, undo), Recording(self.merkle, undo),
                       Recording(self.leaves, undo), Recording(self.leaf_ids, undo))


class Recording:
    """A cursor that notes what each write replaced, so that an atomic batch can be taken back.

    LMDB's nested transactions would do this, but they are not available with ``writemap``, which
    the store uses because it spares every commit a ``pwrite`` copy of each dirty page.
    """

    def __init__(self, cursor: Any, undo: list[tuple[Any, bytes, bytes | None]]) -> None:
        self.cursor = cursor
        self.undo = undo

    def get(self, key: bytes) -> bytes | None:
        return self.cursor.get(key)  # type: ignore[no-any-return]

    def set_key(self, key: bytes) -> bool:
        return self.cursor.set_key(key)  # type: ignore[no-any-return]

    def put(self, key: bytes, value: bytes, dupdata: bool = True, overwrite: bool = True,
            append: bool = False) -> bool:
        self.undo.append((self.cursor, key, self.cursor.get(key)))
        return self.cursor.put(key, value, dupdata, overwrite, append)  # type: ignore[no-any-return]

    def delete(self) -> bool:
        self.undo.append((self.cursor, self.cursor.key(), self.cursor.value()))
        return self.cursor.delete()  # type: ignore[no-any-return]


def take_back(undo: list[tuple[Any, bytes, bytes | None]]) -> None:
    """Restore, newest first, every value an atomic batch's cursors replaced."""
    for i in range(len(undo) - 1, -1, -1):
        cursor, key, old = undo[i]
        if old is not None:
            cursor.put(key, old)
        elif cursor.set_key(key):
            cursor.delete()


TransactionCommand = CreateTransaction | PostPending | VoidPending | ReverseTransaction


@dataclass(init=False, slots=True)
class Move:
    """One entry to append: ``released`` is the part of a hold that a post gives back."""

    account_id: str
    direction: Direction
    amount: int
    currency: str
    status: str
    released: int

    def __init__(self, account_id: str, direction: Direction, amount: int, currency: str, status: str,
                 released: int = 0) -> None:
        self.account_id = account_id
        self.direction = direction
        self.amount = amount
        self.currency = currency
        self.status = status
        self.released = released


class Rejected(Exception):
    def __init__(self, code: ResultCode, details: dict[str, Any] | None = None) -> None:
        super().__init__(code.name)
        self.code = code
        self.details = details or {}


def apply_totals(row: AccountRow, move: Move) -> None:
    debit = move.direction is Direction.debit
    if move.status == STATUS_PENDING:
        if debit:
            row.debits_pending += move.amount
        else:
            row.credits_pending += move.amount
    elif move.status == STATUS_POSTED:
        if debit:
            row.debits_posted += move.amount
            row.debits_pending -= move.released
        else:
            row.credits_posted += move.amount
            row.credits_pending -= move.released
    elif debit:
        row.debits_pending -= move.amount
    else:
        row.credits_pending -= move.amount


def _limits_problem(row: AccountRow) -> Problem | None:
    dp, cp, dpe, cpe = row.debits_posted, row.credits_posted, row.debits_pending, row.credits_pending
    if dp < 0 or cp < 0 or dpe < 0 or cpe < 0:
        raise InvariantViolation(f"negative total on {row.id}")
    limit = balance_limit
    if dp >= limit or cp >= limit or dpe >= limit or cpe >= limit:
        return ResultCode.overflow, {"account_id": row.id}
    flags = row.flags
    if flags & FLAG_LIMIT_DEBITS and dp + dpe > cp:
        return ResultCode.exceeds_credits, {"account_id": row.id}
    if flags & FLAG_LIMIT_CREDITS and cp + cpe > dp:
        return ResultCode.exceeds_debits, {"account_id": row.id}
    return None


def _effective_timestamp(proposed: int, last: int) -> int:
    """A request's time: the leader's, unless that is not after the shard's last one."""
    return max(proposed, last + 1)


def _check_moved(before: list[AccountRow], after: dict[str, AccountRow], moves: int,
                 balanced: bool = True) -> None:
    """Postconditions of one set of moves, on the rows as they were and as the moves left them.

    Per currency, the posted debits they added equal the posted credits, and the same for pending
    (ARCHITECTURE invariant 1, on what was applied rather than what was asked), unless the moves are
    one shard's leg of a cross-shard transaction (not ``balanced``: the other legs balance them);
    each account's seq grew by one per entry. ``before`` holds rows the moves did not touch
    (``_load_row`` copies).
    """
    currency = before[0].currency
    mixed = False
    posted = pending = grown = 0
    for old in before:
        new = after[old.id]
        mixed = mixed or new.currency != currency
        posted += (new.debits_posted - old.debits_posted) - (new.credits_posted - old.credits_posted)
        pending += (new.debits_pending - old.debits_pending) - (new.credits_pending - old.credits_pending)
        grown += new.seq - old.seq
    ensure(grown == moves, "account seqs did not grow by one per entry")
    if not balanced:
        return
    if mixed:
        _check_moved_per_currency(before, after)
    else:
        ensure(posted == 0 and pending == 0, "moves applied do not net to zero", currency)


def _check_moved_per_currency(before: list[AccountRow], after: dict[str, AccountRow]) -> None:
    """The net of ``_check_moved`` for a transaction in several currencies, one currency at a time."""
    net: dict[str, int] = {}
    net_pending: dict[str, int] = {}
    for old in before:
        new = after[old.id]
        c = new.currency
        net[c] = net.get(c, 0) + (new.debits_posted - old.debits_posted) - (
            new.credits_posted - old.credits_posted)
        net_pending[c] = net_pending.get(c, 0) + (new.debits_pending - old.debits_pending) - (
            new.credits_pending - old.credits_pending)
    for c in net:
        ensure(net[c] == 0 and net_pending[c] == 0, "moves applied do not net to zero", c)


def _check_balanced(moves: list[Move]) -> None:
    """Per currency, debits equal credits (ARCHITECTURE invariant 1)."""
    net: dict[str, int] = {}
    for m in moves:
        delta = m.amount if m.direction is Direction.debit else -m.amount
        net[m.currency] = net.get(m.currency, 0) + delta
    for currency, value in net.items():
        if value:
            raise Rejected(ResultCode.unbalanced, {"currency": currency})


def _check_partial(hold: Transaction, amount: int | None) -> None:
    """A partial post names one amount for every entry: the hold's entries must share theirs."""
    if amount is not None:
        amounts = {e.amount for e in hold.entries}
        if len(amounts) != 1:
            raise Rejected(ResultCode.partial_amount_not_allowed)
        if amount > amounts.pop():
            raise Rejected(ResultCode.amount_exceeds_pending)


def _local_entry(placeholder: TxEntry, placed: TxEntry | None, txid: str) -> TxEntry:
    """A decision's placeholder for an entry of the coordinator's own leg, filled with that entry."""
    ensure(placed is not None and (placed.account_id, placed.direction, placed.amount, placed.currency)
           == (placeholder.account_id, placeholder.direction, placeholder.amount, placeholder.currency),
           "a local leg that differs from its decision", txid)
    assert placed is not None
    return placed


class Applier:
    """Applies the requests of one Raft entry inside one LMDB write transaction.

    ``committed_rows`` (owned by the store, shared across entries) holds account rows as last
    committed; ``written`` the rows this entry changed, which reach the accounts table once each,
    after the entry's last request (an account in many transfers is packed and stored once), and
    the store's cache once the transaction commits. Rows are copied on load: a command that is
    rejected halfway has mutated only its copies.
    """

    def __init__(self, txn: lmdb.Transaction, dbs: Dbs, state: ShardState, expiry_floor: int = 0,
                 committed_rows: dict[str, AccountRow] | None = None,
                 rules: int = RULES_VERSION, slots: OwnedSlots | None = None) -> None:
        self.txn = txn
        self.dbs = dbs
        self.cursors = Cursors.open(txn, dbs)
        self.committed_rows: dict[str, AccountRow] = {} if committed_rows is None else committed_rows
        self.written: dict[str, AccountRow] = {}
        # Inside an atomic batch: (account id, the row it replaced in ``written`` or None), to put back.
        self.written_undo: list[tuple[str, AccountRow | None]] | None = None
        self.packb = msgpack.Packer().pack  # reused: msgpack.packb sets up a new packer per call
        self.state = state
        # A lower bound on the earliest hold deadline (a cache, not replicated state): requests
        # before it skip the expiry scan. Inserting a deadline lowers it; a scan raises it.
        self.expiry_floor = expiry_floor
        self.rules = rules  # the entry's rules version (validate.RULES_VERSION and earlier)
        # The slots this shard owns (None: none set yet, every account is accepted); SetSlots
        # replaces it, and the store keeps the new one once the entry commits.
        self.slots = slots

    # ---- entry point --------------------------------------------------------------------------

    def apply_requests(self, requests: list[tuple[int, AnyCommand | Invalid]]) -> list[Outcome]:
        """All the requests of one entry; the account rows they changed are stored at the end."""
        outcomes = [self._apply_request(ts, command) for ts, command in requests]
        accounts = self.cursors.accounts
        for account_id, row in self.written.items():
            accounts.put(account_id.encode(), row.pack())
        return outcomes

    def _apply_request(self, timestamp_ns: int, command: AnyCommand | Invalid) -> Outcome:
        last = self.state.last_timestamp
        ts = _effective_timestamp(timestamp_ns, last)
        ensure(ts > last, "request timestamp not after the shard's last")
        self.state.last_timestamp = ts
        self._expire_due(ts)
        if isinstance(command, Invalid):
            return Result(ResultCode.invalid_command, "", details={"reason": command.reason})
        if isinstance(command, Batch):
            if command.atomic:
                return self._apply_atomic(command.commands, ts)
            return [self._apply_command(c, ts) for c in command.commands]
        if isinstance(command, ExpireHolds):
            return Result(ResultCode.ok, "")  # the expiry above is all it asks for
        if isinstance(command, SetSlots):
            return self._set_slots(command)
        if isinstance(command, SetFeedOffset | CompactFeed):
            if self.rules < RULES_FEED:  # not a command before then: its tag decoded as nothing
                return Result(ResultCode.invalid_command, "", details={"reason": "unknown command tag"})
            if isinstance(command, SetFeedOffset):
                return self._set_feed_offset(command, ts)
            return self._compact_feed(command, ts)
        return self._apply_command(command, ts)

    def _apply_command(self, command: Command | ProtocolCommand, ts: int) -> Result:
        if isinstance(command, CreateTransaction):
            return self._transaction(command, ts)
        if isinstance(command, CreateAccount):
            return self._create_account(command, ts)
        if isinstance(command, PrepareLeg):
            return self._prepare_leg(command, ts)
        if isinstance(command, FinishLeg):
            return self._finish_leg(command, ts)
        if isinstance(command, Decide):
            return self._decide(command, ts)
        if isinstance(command, Complete):
            return self._complete(command)
        if isinstance(command, ClaimId):
            return self._claim(command, ts)
        return self._transaction(command, ts)

    def _apply_atomic(self, commands: tuple[Command | ProtocolCommand, ...], ts: int) -> list[Result]:
        """All or none: when a command fails, every write of the batch is put back as it was."""
        plain, saved = self.cursors, self.state.copy()
        undo: list[tuple[Any, bytes, bytes | None]] = []
        written_undo: list[tuple[str, AccountRow | None]] = []
        self.cursors, self.written_undo = plain.recording(undo), written_undo
        results: list[Result] = []
        try:
            for command in commands:
                result = self._apply_command(command, ts)
                results.append(result)
                if not result.ok:
                    break
        finally:
            # An exception (a full map, an invariant) drops the whole LMDB transaction, and LMDB
            # refuses further writes to it: there is nothing to take back then, only to re-raise.
            self.cursors, self.written_undo = plain, None
        if len(results) == len(commands) and all(r.ok for r in results):
            return results
        take_back(undo)
        self.state = saved
        for i in range(len(written_undo) - 1, -1, -1):
            account_id, before = written_undo[i]
            if before is None:
                del self.written[account_id]
            else:
                self.written[account_id] = before
        failed = results[-1]
        return [failed if i == len(results) - 1 else
                Result(ResultCode.linked_event_failed, c.id, details={"failed_index": len(results) - 1})
                for i, c in enumerate(commands)]

    # ---- slots --------------------------------------------------------------------------------

    def _set_slots(self, cmd: SetSlots) -> Result:
        """Own ``cmd.ranges`` from now on, if ``cmd.epoch`` is newer than the slots stored."""
        problem = ranges_problem(cmd.ranges)
        if problem is not None or cmd.epoch < 1:
            return Result(ResultCode.invalid_command, "",
                          details={"reason": problem or "epoch must be at least 1"})
        current = self.slots
        if current is not None and cmd.epoch <= current.epoch:
            return Result(ResultCode.ok, "", details={"epoch": current.epoch, "applied": False})
        slots = OwnedSlots(cmd.epoch, cmd.ranges)
        self.txn.put(SLOTS_KEY, slots.pack(), db=self.dbs.meta)
        self.slots = slots
        return Result(ResultCode.ok, "", details={"epoch": cmd.epoch, "applied": True})

    def _misrouted(self, command_id: str, account_ids: list[str]) -> Result | None:
        """``wrong_shard`` (nothing stored) when this shard has slots and one of the accounts is in a
        slot it does not own; the details carry the slots' epoch, for the sender to wait for."""
        slots = self.slots
        if slots is None:
            return None
        table = slots.table
        foreign = [a for a in account_ids if not table[slot_of(a)]]
        if not foreign:
            return None
        return Result(ResultCode.wrong_shard, command_id,
                      details={"epoch": slots.epoch, "accounts": sorted(set(foreign))[:16]})

    # ---- accounts -----------------------------------------------------------------------------

    def _create_account(self, cmd: CreateAccount, ts: int) -> Result:
        problem = command_problem(cmd, self.rules)
        if problem:
            return Result(problem[0], cmd.id, details=problem[1])
        if self.slots is not None:
            misrouted = self._misrouted(cmd.id, [cmd.id])
            if misrouted is not None:
                return misrouted
        existing = self._find_row(cmd.id)
        metadata_bytes = msgpack.packb(canonical(cmd.metadata))
        if existing is not None:
            same = (existing.currency, existing.normal, existing.flags, existing.metadata_bytes) == (
                cmd.currency, cmd.normal, cmd.flags, metadata_bytes)
            code = ResultCode.ok if same else ResultCode.exists_with_different_fields
            return Result(code, cmd.id, record=existing.to_account(), replayed=same)
        row = AccountRow(cmd.id, self.state.next_account_num, 0, ts, cmd.flags, cmd.normal,
                         cmd.currency, 0, 0, 0, 0, hashing.genesis(cmd.id), metadata_bytes)
        self.state.next_account_num += 1
        self._changed(row)
        self._emit("account.created", ts, EVENT_ACCOUNT, msgpack.packb([cmd.id, row.pack()]))
        return Result(ResultCode.ok, cmd.id, record=row.to_account())

    def _changed(self, row: AccountRow) -> None:
        """A row this entry changed; inside an atomic batch, what it replaces is noted first
        (copying ``written`` per batch instead was quadratic in an entry of many batches)."""
        if self.written_undo is not None:
            self.written_undo.append((row.id, self.written.get(row.id)))
        self.written[row.id] = row

    def _find_row(self, account_id: str) -> AccountRow | None:
        """The account as this transaction sees it, or None; not to be mutated (see ``_load_row``)."""
        row = self.written.get(account_id)
        if row is None:
            row = self.committed_rows.get(account_id)
        if row is None:
            raw = self.cursors.accounts.get(account_id.encode())
            if raw is None:
                return None
            row = unpack_account(account_id, raw)
        return row

    def _load_row(self, account_id: str, originals: list[AccountRow]) -> AccountRow:
        """A copy of the account's row for a command to change; the row itself joins ``originals``."""
        row = self._find_row(account_id)
        if row is None:
            raise Rejected(ResultCode.account_not_found, {"account_id": account_id})
        originals.append(row)
        return row.copy()

    # ---- moves --------------------------------------------------------------------------------

    def _move(self, moves: list[Move], txid: str, ts: int, new_entries: bool,
              balanced: bool = True) -> list[TxEntry]:
        """Append ``moves`` to their accounts, all or none. ``new_entries`` enforces closed/limits;
        ``balanced`` is False for a cross-shard transaction's leg (the other legs balance it).

        Every entry carries the request's own timestamp, which the shard's strictly increasing
        timestamps put at or after every earlier entry of the account (checked here rather than
        against the account's last entry, which would cost a read per account).
        """
        ensure(ts == self.state.last_timestamp, "entries stamped with another time than their request",
               txid)
        rows: dict[str, AccountRow] = {}
        before: list[AccountRow] = []
        staged: list[tuple[bytes, bytes]] = []
        out: list[TxEntry] = []
        txid_bytes = txid.encode()
        for m in moves:
            row = rows.get(m.account_id)
            if row is None:
                row = rows[m.account_id] = self._load_row(m.account_id, before)
                if new_entries and row.flags & FLAG_CLOSED:
                    raise Rejected(ResultCode.account_closed, {"account_id": row.id})
            if row.currency != m.currency:
                raise Rejected(ResultCode.currency_mismatch,
                               {"account_id": row.id, "currency": row.currency})
            apply_totals(row, m)
            staged.append(self._chain_entry(row, m, txid, txid_bytes, ts))
            out.append(TxEntry(row.id, m.direction, m.amount, m.currency, row.seq, row.head))
        for row in rows.values():
            problem = _limits_problem(row)
            if problem and (new_entries or problem[0] is ResultCode.overflow):
                raise Rejected(*problem)
        _check_moved(before, rows, len(moves), balanced)
        entries = self.cursors.entries
        for key, value in staged:
            # A stale row (an old seq) would otherwise overwrite entries silently.
            ensure(entries.put(key, value, True, False), "an entry would overwrite another", txid)
        for row in rows.values():
            self._changed(row)
        return out

    @staticmethod
    def _chain_entry(row: AccountRow, m: Move, txid: str, txid_bytes: bytes,
                     ts: int) -> tuple[bytes, bytes]:
        """Advance the account's seq and hash chain; returns the entry's key and packed record."""
        row.seq += 1
        status = ENTRY_STATUS_BYTE[m.status]
        direction = DIRECTION_BYTE[m.direction]
        balance = row.balance
        data = hashing.entry_bytes(row.id, row.seq, txid, direction, m.amount, m.currency, status,
                                   balance, ts, m.released)
        row.head = hashing.chain(row.head, data)
        totals = None
        if row.flags & FLAG_HISTORY:
            totals = (row.debits_posted, row.credits_posted, row.debits_pending,
                      row.credits_pending)
        value = pack_entry_fields(ts, m.amount, m.released, direction, status, balance, row.head,
                                  totals, txid_bytes)
        return entry_key(row.num, row.seq), value

    # ---- transactions -------------------------------------------------------------------------

    def _transaction(self, cmd: TransactionCommand, ts: int) -> Result:
        """Shape, then idempotency, then effects: the first outcome of an id is stored for good."""
        problem = command_problem(cmd, self.rules)
        if problem:
            return Result(problem[0], cmd.id, details=problem[1])
        if self.slots is not None and isinstance(cmd, CreateTransaction):
            misrouted = self._misrouted(cmd.id, [e.account_id for e in cmd.entries])
            if misrouted is not None:
                return misrouted
        digest = payload_hash(cmd, self.packb)
        replay = self._replay(cmd.id, digest)
        if replay is not None:
            return replay
        try:
            tx, event = self._effects(cmd, ts)
        except Rejected as exc:
            return self._reject(cmd.id, digest, exc, ts)
        self._record(tx, digest, event)
        return Result(ResultCode.ok, tx.id, record=tx)

    def _effects(self, cmd: TransactionCommand, ts: int) -> tuple[Transaction, str]:
        """Apply a transaction command; returns the new transaction and its event type."""
        if isinstance(cmd, CreateTransaction):
            tx = self._create(cmd, ts)
            return tx, "transaction.pending" if tx.pending else "transaction.posted"
        if isinstance(cmd, ReverseTransaction):
            return self._reverse(cmd, ts), "transaction.reversed"
        tx = self._resolve(cmd, ts)
        return tx, "transaction.voided" if tx.status == STATUS_VOIDED else "transaction.posted"

    def _create(self, cmd: CreateTransaction, ts: int) -> Transaction:
        status = STATUS_PENDING if cmd.pending else STATUS_POSTED
        moves = [Move(e.account_id, e.direction, e.amount, e.currency, status) for e in cmd.entries]
        _check_balanced(moves)
        entries = self._move(moves, cmd.id, ts, new_entries=True)
        tx = Transaction(cmd.id, status, tuple(entries), cmd.code, cmd.metadata, ts, cmd.pending,
                         cmd.timeout_seconds)
        if tx.expires_at is not None:
            self.cursors.expiries.put(expiry_key(tx.expires_at, tx.id), b"")
            self.expiry_floor = min(self.expiry_floor, tx.expires_at)
        return tx

    def _resolve(self, cmd: PostPending | VoidPending, ts: int) -> Transaction:
        """Post (fully or partly) or void a hold: new entries release it; the hold is marked."""
        hold = self._pending_hold(cmd.pending_id)
        post = isinstance(cmd, PostPending)
        amount = cmd.amount if isinstance(cmd, PostPending) else None
        _check_partial(hold, amount)
        if post:
            moves = [Move(e.account_id, e.direction, amount or e.amount, e.currency,
                          STATUS_POSTED, released=e.amount) for e in hold.entries]
        else:
            moves = [Move(e.account_id, e.direction, e.amount, e.currency, STATUS_VOIDED)
                     for e in hold.entries]
        entries = self._move(moves, cmd.id, ts, new_entries=post)
        status = STATUS_POSTED if post else STATUS_VOIDED
        self._update(hold.with_status(status, resolved_by=cmd.id))
        self._drop_expiry(hold)
        return Transaction(cmd.id, status, tuple(entries), hold.code, hold.metadata, ts,
                           pending_id=hold.id)

    def _pending_hold(self, pending_id: str) -> Transaction:
        hold = self._load_tx(pending_id)
        if hold is None:
            raise Rejected(ResultCode.pending_not_found, {"pending_id": pending_id})
        if not hold.pending:
            raise Rejected(ResultCode.transaction_not_pending, {"pending_id": pending_id})
        code = {STATUS_POSTED: ResultCode.pending_already_posted,
                STATUS_VOIDED: ResultCode.pending_already_voided,
                STATUS_EXPIRED: ResultCode.pending_expired}.get(hold.status)
        if code is not None:
            raise Rejected(code, {"pending_id": pending_id, "resolved_by": hold.resolved_by})
        return hold

    def _reverse(self, cmd: ReverseTransaction, ts: int) -> Transaction:
        orig = self._load_tx(cmd.transaction_id)
        if orig is None:
            raise Rejected(ResultCode.transaction_not_found, {"transaction_id": cmd.transaction_id})
        if orig.pending or orig.status != STATUS_POSTED:
            raise Rejected(ResultCode.transaction_not_posted,
                           {"transaction_id": orig.id, "status": orig.status})
        if orig.reversed_by is not None:
            raise Rejected(ResultCode.already_reversed, {"reversed_by": orig.reversed_by})
        flip = {Direction.debit: Direction.credit, Direction.credit: Direction.debit}
        moves = [Move(e.account_id, flip[e.direction], e.amount, e.currency, STATUS_POSTED)
                 for e in orig.entries]
        entries = self._move(moves, cmd.id, ts, new_entries=True)
        self._update(orig.with_status(orig.status, reversed_by=cmd.id))
        return Transaction(cmd.id, STATUS_POSTED, tuple(entries), orig.code, orig.metadata, ts,
                           reverses=orig.id)

    # ---- the change feed: consumers and retention ----------------------------------------------

    def feed_floor(self) -> int:
        """The first outbox offset still held (offsets before it were compacted)."""
        raw = self.txn.get(FEED_FLOOR_KEY, db=self.dbs.meta)
        return 1 if raw is None else int(U64.unpack(raw)[0])

    def _set_feed_offset(self, cmd: SetFeedOffset, ts: int) -> Result:
        """Store (or forget) a consumer's offset: at least the floor minus one, at most the last event."""
        problem = feed_offset_problem(cmd)
        if problem:
            return Result(problem[0], cmd.consumer, details=problem[1])
        key = cmd.consumer.encode()
        if cmd.remove:
            found = self.txn.delete(key, db=self.dbs.consumers)
            return Result(ResultCode.ok, cmd.consumer, details={"removed": bool(found)})
        floor, last = self.feed_floor(), self.state.next_offset - 1
        if not floor - 1 <= cmd.offset <= last:
            return Result(ResultCode.feed_offset_out_of_range, cmd.consumer,
                          details={"offset": cmd.offset, "first": floor, "last": last})
        self.txn.put(key, CONSUMER.pack(cmd.offset, ts), db=self.dbs.consumers)
        return Result(ResultCode.ok, cmd.consumer, details={"offset": cmd.offset, "last": last})

    def _compact_feed(self, cmd: CompactFeed, ts: int) -> Result:
        """Drop events from the floor on, in offset order, while each is at most ``through``, behind
        every consumer and old enough; at most ``feed_compaction_events_max`` of them."""
        if cmd.through < 0 or cmd.age_min_ns < 0:
            return Result(ResultCode.invalid_command, "", details={"field": "compaction"})
        bound = min(cmd.through, self.state.next_offset - 1)
        for _, value in self.txn.cursor(db=self.dbs.consumers):
            bound = min(bound, int(CONSUMER.unpack(value)[0]))
        cutoff = ts - cmd.age_min_ns
        floor = self.feed_floor()
        cursor = self.cursors.outbox
        removed = 0
        while removed < feed_compaction_events_max and floor <= bound and cursor.set_key(U64.pack(floor)):
            if EVENT_HEAD.unpack_from(cursor.value())[2] > cutoff:
                break
            cursor.delete()
            floor += 1
            removed += 1
        if removed:
            self.txn.put(FEED_FLOOR_KEY, U64.pack(floor), db=self.dbs.meta)
        return Result(ResultCode.ok, "", details={"first": floor, "removed": removed})

    # ---- cross-shard transactions: the steps of two-phase commit (docs/design.md) -------------

    def _prepare_leg(self, cmd: PrepareLeg, ts: int) -> Result:
        """Place this shard's entries of a cross-shard transaction as holds, or record why not."""
        problem = leg_problem(cmd)
        if problem:
            return Result(problem[0], cmd.id, details=problem[1])
        key = cmd.id.encode()
        raw = self.cursors.legs.get(key)
        if raw is not None:
            return self._replay_leg(unpack_leg(raw), cmd.digest)
        applied = self._applied_here(cmd.id, cmd.digest)
        if applied is not None:
            return applied
        if self.slots is not None:  # a leg routed by an older map: nothing recorded, the driver routes again
            misrouted = self._misrouted(cmd.id, [e.account_id for e in cmd.entries])
            if misrouted is not None:
                return misrouted
        moves = [Move(e.account_id, e.direction, e.amount, e.currency, STATUS_PENDING) for e in cmd.entries]
        try:
            entries = self._move(moves, cmd.id, ts, new_entries=True, balanced=False)
        except Rejected as exc:
            refused = Leg(cmd.id, LEG_REFUSED, cmd.coordinator, cmd.digest, (), cmd.pending, cmd.code,
                          cmd.metadata, cmd.shards, ts, "", int(exc.code), exc.details)
            self.cursors.legs.put(key, pack_leg(refused, self.packb))
            return Result(exc.code, cmd.id, details=exc.details)
        leg = Leg(cmd.id, LEG_PREPARED, cmd.coordinator, cmd.digest, tuple(entries), cmd.pending,
                  cmd.code, cmd.metadata, cmd.shards, ts)
        self.cursors.legs.put(key, pack_leg(leg, self.packb))
        self.cursors.open_legs.put(timed_key(ts, cmd.id), b"")
        held = leg.as_transaction()
        self._add_leaf(merkle.LEAF_LEG, held)
        return Result(ResultCode.ok, cmd.id, record=held)

    @staticmethod
    def _replay_leg(leg: Leg, digest: bytes) -> Result:
        if leg.digest != digest:
            return Result(ResultCode.idempotency_key_reused, leg.id)
        if leg.status == LEG_ABORTED:
            return Result(ResultCode.transaction_aborted, leg.id, replayed=True)
        if leg.status == LEG_REFUSED:
            return Result(ResultCode(leg.refusal), leg.id, replayed=True, details=leg.details)
        return Result(ResultCode.ok, leg.id, record=leg.as_transaction(), replayed=True)

    def _applied_here(self, txid: str, digest: bytes) -> Result | None:
        """A transaction with this id applied on this shard as a single-shard one (its home, or data
        from before ids had homes): its outcome, or a conflict; never a second application."""
        raw = self.cursors.idempotency.get(txid.encode())
        if raw is None:
            return None
        rejection = decode_rejection(raw)
        if rejection is not None and rejection[1] == ResultCode.ok:
            return None  # a claim (ClaimId): the transaction is recorded on another shard
        return self._replay(txid, digest)

    def _finish_leg(self, cmd: FinishLeg, ts: int) -> Result:
        """Post, keep, void or expire this shard's leg, as its coordinator decided. Its result has no
        record: the coordinator's decision is the transaction's record."""
        if cmd.outcome == LEG_AS_DECIDED:
            decided = self._as_decided(cmd)
            if isinstance(decided, Result):
                return decided
            cmd = decided
        ensure(cmd.outcome in LEG_OUTCOMES, "unknown leg outcome", cmd.id)
        key = cmd.id.encode()
        raw = self.cursors.legs.get(key)
        ending = cmd.outcome in (LEG_VOID, LEG_EXPIRE)
        if raw is None:
            applied = self._applied_here(cmd.id, cmd.digest)
            if applied is not None:  # it took the one-round path here (see _prepare_leg): done
                return Result(applied.code, cmd.id, replayed=True)
            # Decided before this shard prepared (or the prepare was refused unseen): never will.
            ensure(ending, "a commit of a leg that was never prepared", cmd.id)
            tomb = Leg(cmd.id, LEG_ABORTED, -1, cmd.digest, (), False, "", {}, (), ts, cmd.by)
            self.cursors.legs.put(key, pack_leg(tomb, self.packb))
            return Result(ResultCode.ok, cmd.id)
        leg = unpack_leg(raw)
        if leg.digest != cmd.digest:  # another payload's leg under this id: not this decision's
            return Result(ResultCode.idempotency_key_reused, cmd.id)
        if leg.status in (LEG_REFUSED, LEG_ABORTED):
            ensure(ending, "a commit of a refused leg", cmd.id)
            return Result(ResultCode.ok, cmd.id, replayed=True)
        if leg.status not in LEG_OPEN or (leg.status == LEG_HELD and cmd.outcome == LEG_HOLD):
            return Result(ResultCode.ok, cmd.id, replayed=True)
        if leg.status == LEG_PREPARED:
            self._close_open_leg(leg)
        if cmd.outcome == LEG_HOLD:
            held = leg.finished(LEG_HELD, cmd.by)
            self.cursors.legs.put(key, pack_leg(held, self.packb))
            return Result(ResultCode.ok, cmd.id)
        return self._end_leg(leg, cmd, ts)

    def _as_decided(self, cmd: FinishLeg) -> FinishLeg | Result:
        """The finish that the open decision ``cmd.by`` names for this leg: the coordinator's own leg,
        finished in the entry that decided (one command and one round fewer). Without that decision
        open here nothing is finished (``transaction_not_found``): the driver finishes it as usual."""
        ensure(self.rules >= RULES_LOCAL_FINISH, "a leg finished as decided before its rules", cmd.id)
        raw = self.cursors.decisions.get(cmd.by.encode())
        if raw is None:
            return Result(ResultCode.transaction_not_found, cmd.id)
        decision = unpack_open_decision(cmd.by.encode(), raw)
        if decision.leg != cmd.id or decision.digest != cmd.digest:
            return Result(ResultCode.idempotency_key_reused, cmd.id)
        return FinishLeg(cmd.id, cmd.digest, decision.outcome, decision.by, decision.amount)

    def _end_leg(self, leg: Leg, cmd: FinishLeg, ts: int) -> Result:
        """The entries that post, void or expire an open leg's holds, under transaction ``cmd.by``."""
        status = {LEG_POST: STATUS_POSTED, LEG_VOID: STATUS_VOIDED, LEG_EXPIRE: STATUS_EXPIRED}[cmd.outcome]
        amount = cmd.amount
        moves = [Move(e.account_id, e.direction, amount or e.amount, e.currency, status,
                      released=e.amount if status == STATUS_POSTED else 0) for e in leg.entries]
        try:  # reserved funds move as decided: no limit or closed account can refuse it now
            entries = self._move(moves, cmd.by, ts, new_entries=False, balanced=False)
        except Rejected as exc:
            raise InvariantViolation(f"finishing leg {leg.id} failed: {exc.code.name}") from exc
        self.cursors.legs.put(leg.id.encode(), pack_leg(leg.finished(status, cmd.by), self.packb))
        tx = Transaction(cmd.by, status, tuple(entries), leg.code, leg.metadata, ts, shards=leg.shards,
                         pending_id=leg.id if cmd.by != leg.id else None)
        event = {STATUS_POSTED: "transaction.posted", STATUS_VOIDED: "transaction.voided",
                 STATUS_EXPIRED: "transaction.expired"}[status]
        self._emit_transaction(event, ts, tx, pack_transaction(tx, self.packb))
        return Result(ResultCode.ok, cmd.id)

    def _close_open_leg(self, leg: Leg) -> None:
        cursor = self.cursors.open_legs
        if cursor.set_key(timed_key(leg.timestamp, leg.id)):
            cursor.delete()

    def _decide(self, cmd: Decide, ts: int) -> Result:
        """The commit point of a cross-shard transaction or follow-up, at its home."""
        problem = decide_problem(cmd)
        if problem:
            return Result(problem[0], cmd.id, details=problem[1])
        replay = self._replay(cmd.id, cmd.digest)
        if replay is not None:  # a second driver, a retry, or a resolver's abort got here first
            return replay
        if cmd.local:
            filled = self._with_local_leg(cmd)
            if isinstance(filled, Result):
                return filled
            cmd = filled
        try:
            if cmd.kind == DECIDE_NEW:
                return self._decide_new(cmd, ts)
            if cmd.kind == DECIDE_REVERSE:
                return self._decide_reverse(cmd, ts)
            return self._decide_follow_up(cmd, ts)
        except Rejected as exc:
            if cmd.kind in (DECIDE_NEW, DECIDE_REVERSE):  # its prepared legs are voided
                self._open_decision(cmd.id, ts, cmd.id, cmd.digest, LEG_VOID, cmd.id, None, cmd.shards)
            return self._reject(cmd.id, cmd.digest, exc, ts)

    def _with_local_leg(self, cmd: Decide) -> Decide | Result:
        """The decision with this shard's own leg, prepared just before in the same entry: its
        refusal (or abort) becomes the decision's; its entries fill the placeholders, in order."""
        raw = self.cursors.legs.get(cmd.id.encode())
        leg = unpack_leg(raw) if raw is not None else None
        if leg is not None and leg.digest != cmd.digest:  # another payload's leg: not ours to decide
            return Result(ResultCode.idempotency_key_reused, cmd.id)
        outcome, details, entries = 0, {}, cmd.entries
        if leg is None or leg.status == LEG_ABORTED:  # refused by its shape, or voided unseen before
            outcome = int(ResultCode.transaction_aborted)
        elif leg.status == LEG_REFUSED:
            outcome, details = leg.refusal, dict(leg.details)
        else:
            placed = iter(leg.entries)
            entries = tuple(_local_entry(e, next(placed, None), cmd.id) if e.seq == 0 else e
                            for e in cmd.entries)
            ensure(next(placed, None) is None, "a local leg with more entries than its decision", cmd.id)
        if outcome:
            entries = ()
        return Decide(cmd.id, cmd.digest, cmd.kind, outcome or cmd.outcome, details or dict(cmd.details),
                      entries, cmd.pending, cmd.timeout_seconds, cmd.code, cmd.metadata, cmd.shards,
                      cmd.target, cmd.amount)

    def _decide_new(self, cmd: Decide, ts: int) -> Result:
        if cmd.outcome != ResultCode.ok:
            raise Rejected(ResultCode(cmd.outcome), dict(cmd.details))
        status = STATUS_PENDING if cmd.pending else STATUS_POSTED
        tx = Transaction(cmd.id, status, cmd.entries, cmd.code, cmd.metadata, ts, cmd.pending,
                         cmd.timeout_seconds, shards=cmd.shards)
        self._store_decision(tx, cmd.digest)
        if tx.expires_at is not None:  # the home expires a cross-shard hold; its resolver, the legs
            self.cursors.expiries.put(expiry_key(tx.expires_at, tx.id), b"")
            self.expiry_floor = min(self.expiry_floor, tx.expires_at)
        outcome = LEG_HOLD if cmd.pending else LEG_POST
        finish = self._open_decision(cmd.id, ts, cmd.id, cmd.digest, outcome, cmd.id, None, cmd.shards)
        return Result(ResultCode.ok, cmd.id, record=tx, details=finish)

    def _decide_follow_up(self, cmd: Decide, ts: int) -> Result:
        """A post or void of a cross-shard hold: checked here, where the hold's record is."""
        hold = self._pending_hold(cmd.target)
        ensure(hold.cross_shard, "a cross-shard follow-up of a single-shard hold", cmd.id)
        post = cmd.kind == DECIDE_POST
        amount = cmd.amount if post else None
        _check_partial(hold, amount)
        status = STATUS_POSTED if post else STATUS_VOIDED
        entries = tuple(TxEntry(e.account_id, e.direction, amount or e.amount, e.currency, e.seq, e.hash)
                        for e in hold.entries)
        tx = Transaction(cmd.id, status, entries, hold.code, hold.metadata, ts, pending_id=hold.id,
                         shards=hold.shards)
        self._store_decision(tx, cmd.digest)
        self._update(hold.with_status(status, resolved_by=cmd.id))
        self._drop_expiry(hold)
        finish = self._open_decision(cmd.id, ts, hold.id, self._digest_of(hold.id),
                                     LEG_POST if post else LEG_VOID, cmd.id, amount, hold.shards)
        return Result(ResultCode.ok, cmd.id, record=tx, details=finish)

    def _decide_reverse(self, cmd: Decide, ts: int) -> Result:
        """A reversal of a cross-shard transaction: its mirrored legs were prepared as a new one."""
        orig = self._load_tx(cmd.target)
        if orig is None:
            raise Rejected(ResultCode.transaction_not_found, {"transaction_id": cmd.target})
        if orig.pending or orig.status != STATUS_POSTED:
            raise Rejected(ResultCode.transaction_not_posted, {"transaction_id": orig.id,
                                                               "status": orig.status})
        if orig.reversed_by is not None:
            raise Rejected(ResultCode.already_reversed, {"reversed_by": orig.reversed_by})
        if cmd.outcome != ResultCode.ok:
            raise Rejected(ResultCode(cmd.outcome), dict(cmd.details))
        tx = Transaction(cmd.id, STATUS_POSTED, cmd.entries, orig.code, orig.metadata, ts,
                         reverses=orig.id, shards=cmd.shards)
        self._store_decision(tx, cmd.digest)
        self._update(orig.with_status(orig.status, reversed_by=cmd.id))
        finish = self._open_decision(cmd.id, ts, cmd.id, cmd.digest, LEG_POST, cmd.id, None, cmd.shards)
        return Result(ResultCode.ok, cmd.id, record=tx, details=finish)

    def _store_decision(self, tx: Transaction, digest: bytes) -> None:
        """The home's record of a cross-shard transaction; its legs emit the events."""
        key = tx.id.encode()
        self.cursors.transactions.put(key, pack_transaction(tx, self.packb))
        self.cursors.idempotency.put(key, digest)
        self._add_leaf(merkle.LEAF_DECISION, tx)

    def _digest_of(self, txid: str) -> bytes:
        raw = self.cursors.idempotency.get(txid.encode())
        ensure(raw is not None, "a transaction without idempotency record", txid)
        assert raw is not None
        rejection = decode_rejection(raw)
        return bytes(raw) if rejection is None else rejection[0]

    def _open_decision(self, decision_id: str, ts: int, leg: str, digest: bytes, outcome: int, by: str,
                       amount: int | None, participants: tuple[int, ...]) -> dict[str, Any]:
        """What the participants still have to apply; the resolver drives it until ``Complete``.
        Returns it as the ``finish`` a driver applies (in the decision's result details)."""
        record = OpenDecision(decision_id, ts, leg, digest, outcome, by, amount, participants)
        self.cursors.decisions.put(decision_id.encode(), pack_open_decision(record, self.packb))
        return {"finish": {"decision": decision_id, "leg": leg, "digest": digest.hex(), "outcome": outcome,
                           "by": by, "amount": amount, "participants": list(participants)}}

    def _claim(self, cmd: ClaimId, ts: int) -> Result:
        """Take ``cmd.id`` here, at its home, for a transaction recorded on shard ``cmd.at``: stored
        like a rejection whose code is ``ok``, so every path that checks an id here sees it."""
        problem = claim_problem(cmd)
        if problem:
            return Result(problem[0], cmd.id, details=problem[1])
        if self.slots is not None:  # an id is claimed at its home: the shard of its slot
            misrouted = self._misrouted(cmd.id, [cmd.id])
            if misrouted is not None:
                return misrouted
        replay = self._replay(cmd.id, cmd.digest)
        if replay is not None:
            return replay
        details = {CLAIMED_AT: cmd.at}
        self.cursors.idempotency.put(cmd.id.encode(), msgpack.packb([cmd.digest, 0, ts, details]))
        return Result(ResultCode.ok, cmd.id, details=details)

    def _complete(self, cmd: Complete) -> Result:
        cursor = self.cursors.decisions
        if cursor.set_key(cmd.id.encode()):
            cursor.delete()
        return Result(ResultCode.ok, cmd.id)

    # ---- expiry -------------------------------------------------------------------------------

    def _expire_due(self, ts: int) -> None:
        """Release every hold whose deadline is at or before ``ts``, in deadline order."""
        if ts < self.expiry_floor:
            return
        cursor = self.cursors.expiries
        self.expiry_floor = NO_DEADLINE
        while cursor.first():
            key = cursor.key()
            deadline = U64.unpack_from(key)[0]
            if deadline > ts:
                self.expiry_floor = deadline
                return
            cursor.delete()
            hold = self._load_tx(bytes(key[8:]).decode())
            ensure(hold is not None and hold.status == STATUS_PENDING, "expiry of a non-hold")
            assert hold is not None
            expired = hold.with_status(STATUS_EXPIRED)
            self._update(expired)
            if hold.cross_shard:  # its legs expire on their shards, driven by the home's resolver
                self._open_decision(hold.id + EXPIRY_SUFFIX, ts, hold.id, self._digest_of(hold.id),
                                    LEG_EXPIRE, hold.id, None, hold.shards)
                continue
            moves = [Move(e.account_id, e.direction, e.amount, e.currency, STATUS_EXPIRED)
                     for e in hold.entries]
            self._move(moves, hold.id, ts, new_entries=False)
            self._emit_transaction("transaction.expired", ts, expired,
                                   pack_transaction(expired, self.packb))

    def _drop_expiry(self, hold: Transaction) -> None:
        if hold.expires_at is not None:
            cursor = self.cursors.expiries
            if cursor.set_key(expiry_key(hold.expires_at, hold.id)):
                cursor.delete()

    # ---- storage helpers ----------------------------------------------------------------------

    def _load_tx(self, txid: str) -> Transaction | None:
        raw = self.cursors.transactions.get(txid.encode())
        return None if raw is None else unpack_transaction(raw)

    def _update(self, tx: Transaction) -> None:
        self.cursors.transactions.put(tx.id.encode(), pack_transaction(tx, self.packb))

    def _record(self, tx: Transaction, digest: bytes, event: str) -> None:
        packed = pack_transaction(tx, self.packb)
        key = tx.id.encode()
        self.cursors.transactions.put(key, packed)
        self.cursors.idempotency.put(key, digest)
        self._emit_transaction(event, tx.timestamp, tx, packed)

    def _reject(self, txid: str, digest: bytes, exc: Rejected, ts: int) -> Result:
        """Store the rejection so that a retry of the same payload gets it again, forever."""
        record = msgpack.packb([digest, int(exc.code), ts, exc.details])
        self.cursors.idempotency.put(txid.encode(), record)
        return Result(exc.code, txid, details=exc.details)

    def _replay(self, txid: str, digest: bytes) -> Result | None:
        raw = self.cursors.idempotency.get(txid.encode())
        if raw is None:
            return None
        rejection = decode_rejection(raw)
        stored = bytes(raw) if rejection is None else rejection[0]
        if stored != digest:
            return Result(ResultCode.idempotency_key_reused, txid)
        if rejection is not None:
            return Result(rejection[1], txid, replayed=True, details=rejection[3])
        tx = self._load_tx(txid)
        ensure(tx is not None, "idempotency record without transaction", txid)
        assert tx is not None
        as_created = tx.with_status(tx.initial_status)
        return Result(ResultCode.ok, txid, record=as_created, replayed=True)

    def _emit_transaction(self, event_type: str, ts: int, tx: Transaction, packed: bytes) -> None:
        """A transaction's event; from RULES_FEED with each of its accounts' balances right after it
        (the rows this entry wrote last are those, as the event is emitted when its moves are done),
        in the order the accounts first appear in its entries."""
        self._add_leaf(merkle.LEAF_RECORD, tx)
        if self.rules < RULES_FEED:
            self._emit(event_type, ts, EVENT_TRANSACTION, packed)
            return
        written = self.written
        try:
            balances = b"".join([pack_balances(written[account_id])
                                 for account_id in dict.fromkeys([e.account_id for e in tx.entries])])
        except KeyError as exc:
            raise InvariantViolation(f"an event's account was not moved by it: {exc}") from exc
        self._emit(event_type, ts, EVENT_TRANSACTION_BALANCES, U32.pack(len(packed)) + packed + balances)

    def _add_leaf(self, kind: int, tx: Transaction) -> None:
        """Append ``tx``'s record to the shard's transaction tree (entries of RULES_MERKLE on)."""
        if self.rules < RULES_MERKLE:
            return
        leaf = merkle.transaction_leaf(kind, tx, self.packb)
        index = self.state.tree_size
        self.state.tree_size = index + 1
        self.cursors.leaves.put(U64.pack(index), leaf, True, True, True)  # append
        self.cursors.leaf_ids.put(merkle.leaf_id_key(tx.id, index), b"")
        merkle.append(index, leaf, self._tree_node, self._put_tree_node)

    def _tree_node(self, level: int, index: int) -> bytes:
        raw = self.cursors.merkle.get(merkle.node_key(level, index))
        ensure(raw is not None, "a complete subtree of the transaction tree is missing")
        return bytes(raw)

    def _put_tree_node(self, level: int, index: int, digest: bytes) -> None:
        # Keys only grow (merkle.node_key): an append, which also refuses to overwrite a node.
        ensure(self.cursors.merkle.put(merkle.node_key(level, index), digest, True, False, True),
               "a node of the transaction tree would be overwritten")

    def _emit(self, event_type: str, ts: int, kind: int, record: bytes) -> None:
        offset = self.state.next_offset
        self.state.next_offset += 1
        head = EVENT_HEAD.pack(EVENT_TYPE_CODE[event_type], kind, ts)
        self.cursors.outbox.put(U64.pack(offset), head + record, True, True, True)  # append
