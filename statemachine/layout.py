"""The LMDB layout: named sub-databases, big-endian keys, and the byte form of stored records.

Sub-databases:
  accounts     account id (utf-8)                -> account record
  entries      account num (u64) + seq (u64)     -> entry record
  transactions transaction id (utf-8)            -> transaction record (msgpack)
  idempotency  transaction id (utf-8)            -> [payload hash, result code, timestamp, details]
  outbox       offset (u64)                      -> [type, kind, timestamp, record bytes]: an event of
                                                    the change feed (kinds in ``ledger``, EVENT_*)
  expiries     deadline ns (u64) + transaction id -> b""
  meta         b"state"                          -> shard state (applied index, chain, counters)
  legs         transaction id (utf-8)            -> this shard's leg of a cross-shard transaction
  open_legs    prepared ns (u64) + transaction id -> b"" (legs prepared and not yet decided here)
  decisions    decision id (utf-8)               -> what the participants still have to finish
               b"slots"                          -> msgpack [epoch, [[first, last], ...]]: the hash
                                                    slots this shard owns, as of that map epoch
                                                    (absent: no slots yet, every account accepted)
               b"feed_floor"                     -> u64: the first outbox offset still held (absent:
                                                    1, nothing compacted yet)
  consumers    consumer name (utf-8)             -> u64 offset + u64 timestamp: a durable consumer of
                                                    the feed has processed every event up to offset
  merkle       u64 last leaf + u8 level          -> 32-byte root of the complete subtree of that level
                                                    ending at that leaf, in the shard's transaction
                                                    tree (merkle.py; from RULES_MERKLE)
  leaves       leaf index (u64)                  -> the leaf bytes (merkle.transaction_leaf)
  leaf_ids     transaction id + 0x00 + u64 index -> b"": the leaves recorded under an id

Account and entry records are fixed-layout structs with a variable tail, so the apply path packs and
unpacks them without building dictionaries. Totals are unsigned 128-bit; ``balance_after`` is signed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from .codec import DIRECTION_BYTE, DIRECTIONS
from .commands import Direction, TxEntry
from .records import Account, Leg, OpenDecision, Transaction
from .slots import owned_table

DB_NAMES: Final = ("accounts", "entries", "transactions", "idempotency", "outbox", "expiries", "meta",
                   "legs", "open_legs", "decisions", "consumers", "merkle", "leaves", "leaf_ids")
STATE_KEY: Final = b"state"
SLOTS_KEY: Final = b"slots"
FEED_FLOOR_KEY: Final = b"feed_floor"

Raw = bytes | memoryview  # what LMDB hands back

U64: Final = struct.Struct(">Q")
ENTRY_KEY: Final = struct.Struct(">QQ")
# applied index, last timestamp, next account num, next offset, chain; then (from RULES_MERKLE,
# absent in stores written before) the number of leaves of the transaction tree
STATE: Final = struct.Struct(">QQQQ32s")
STATE_TREE: Final = struct.Struct(">QQQQ32sQ")

# num, seq, timestamp, flags, normal, currency, debits_posted, credits_posted, debits_pending,
# credits_pending, head; the tail is msgpack(metadata).
# Each 128-bit total is packed as two u64 halves: the same bytes as a 16-byte big-endian integer.
ACCOUNT: Final = struct.Struct(">QQQIB12sQQQQQQQQ32s")
M64: Final = 2**64 - 1
# timestamp, amount, released, direction, status, has_totals, balance_after, hash; then optional
# totals (4 x 16 bytes) and the transaction id (utf-8).
ENTRY: Final = struct.Struct(">QQQBBB16s32s")
TOTALS: Final = struct.Struct(">16s16s16s16s")
# A feed event's balances of one account right after it: seq, then the four 128-bit totals as halves.
BALANCES: Final = struct.Struct(">QQQQQQQQQ")
U32: Final = struct.Struct(">I")
CONSUMER: Final = struct.Struct(">QQ")  # offset, timestamp of the last change

ENTRY_STATUSES: Final = ("pending", "posted", "voided", "expired")
ENTRY_STATUS_BYTE: Final = {s: i for i, s in enumerate(ENTRY_STATUSES)}
# Every total of a stored account stays below this (the ledger refuses a move past it as overflow),
# although its 16 bytes could hold more: a total at or above it, or below zero, is a bug or damage.
TOTAL_BITS: Final = 127
total_limit: Final = 2**TOTAL_BITS


class InvariantViolation(Exception):
    """A ledger invariant failed: a bug, never a client error. Aborts the whole LMDB transaction."""


def ensure(condition: bool, message: str, subject: str = "") -> None:
    """An assertion that survives ``python -O``. ``subject`` (an account or transaction id) joins
    the message only on failure, so a check on the hot path formats nothing."""
    if not condition:
        raise InvariantViolation(f"{message}: {subject}" if subject else message)


def _totals_in_range(dp: int, cp: int, dpe: int, cpe: int) -> bool:
    # The OR of ints is negative if one is, and otherwise below 2**127 iff each is; shifting
    # instead of comparing with the (boxed) limit keeps it to small-int operations.
    return (dp | cp | dpe | cpe) >> TOTAL_BITS == 0


def u128(value: int) -> bytes:
    return value.to_bytes(16, "big")


def from_u128(data: bytes) -> int:
    return int.from_bytes(data, "big")


def i128(value: int) -> bytes:
    return value.to_bytes(16, "big", signed=True)


def from_i128(data: bytes) -> int:
    return int.from_bytes(data, "big", signed=True)


def entry_key(num: int, seq: int) -> bytes:
    return ENTRY_KEY.pack(num, seq)


@dataclass(init=False, slots=True)
class AccountRow:
    """An account as the apply path handles it: mutable, metadata kept as encoded bytes.

    The spelled-out ``__init__`` compiles to a native constructor (see commands.py).
    """

    id: str
    num: int
    seq: int
    timestamp: int
    flags: int
    normal: Direction
    currency: str
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    head: bytes
    metadata_bytes: bytes

    def __init__(self, id: str, num: int, seq: int, timestamp: int, flags: int, normal: Direction,
                 currency: str, debits_posted: int, credits_posted: int, debits_pending: int,
                 credits_pending: int, head: bytes, metadata_bytes: bytes) -> None:
        self.id = id
        self.num = num
        self.seq = seq
        self.timestamp = timestamp
        self.flags = flags
        self.normal = normal
        self.currency = currency
        self.debits_posted = debits_posted
        self.credits_posted = credits_posted
        self.debits_pending = debits_pending
        self.credits_pending = credits_pending
        self.head = head
        self.metadata_bytes = metadata_bytes

    def copy(self) -> AccountRow:
        return AccountRow(self.id, self.num, self.seq, self.timestamp, self.flags, self.normal,
                          self.currency, self.debits_posted, self.credits_posted,
                          self.debits_pending, self.credits_pending, self.head, self.metadata_bytes)

    def pack(self) -> bytes:
        dp, cp, dpe, cpe = (self.debits_posted, self.credits_posted, self.debits_pending,
                            self.credits_pending)
        ensure(_totals_in_range(dp, cp, dpe, cpe), "account totals out of range before writing", self.id)
        return ACCOUNT.pack(
            self.num, self.seq, self.timestamp, self.flags, DIRECTION_BYTE[self.normal],
            self.currency.encode(), dp >> 64, dp & M64, cp >> 64, cp & M64, dpe >> 64, dpe & M64,
            cpe >> 64, cpe & M64, self.head,
        ) + self.metadata_bytes

    @property
    def metadata(self) -> dict[str, Any]:
        value: dict[str, Any] = msgpack.unpackb(self.metadata_bytes)
        return value

    def to_account(self) -> Account:
        return Account(self.id, self.currency, self.normal, self.flags, self.metadata, self.num,
                       self.debits_posted, self.credits_posted, self.debits_pending,
                       self.credits_pending, self.seq, self.head, self.timestamp)

    @property
    def balance(self) -> int:
        if self.normal is Direction.credit:
            return self.credits_posted - self.debits_posted
        return self.debits_posted - self.credits_posted


def pack_balances(row: AccountRow) -> bytes:
    """What a feed event records of an account it moved: its seq and totals right after it."""
    dp, cp, dpe, cpe = row.debits_posted, row.credits_posted, row.debits_pending, row.credits_pending
    return BALANCES.pack(row.seq, dp >> 64, dp & M64, cp >> 64, cp & M64, dpe >> 64, dpe & M64,
                         cpe >> 64, cpe & M64)


def unpack_balances(data: Raw, pos: int = 0) -> tuple[int, int, int, int, int]:
    """(seq, debits_posted, credits_posted, debits_pending, credits_pending) of the record at ``pos``."""
    seq, dp1, dp0, cp1, cp0, dpe1, dpe0, cpe1, cpe0 = BALANCES.unpack_from(data, pos)
    return seq, dp1 << 64 | dp0, cp1 << 64 | cp0, dpe1 << 64 | dpe0, cpe1 << 64 | cpe0


def unpack_account(account_id: str, data: Raw) -> AccountRow:
    (num, seq, ts, flags, normal, currency, dp1, dp0, cp1, cp0, dpe1, dpe0, cpe1, cpe0,
     head) = ACCOUNT.unpack_from(data)
    # Unsigned halves: only the bound can fail, and only through the high halves.
    ensure((dp1 | cp1 | dpe1 | cpe1) >> (TOTAL_BITS - 64) == 0, "account totals out of range as read",
           account_id)
    return AccountRow(
        account_id, num, seq, ts, flags, DIRECTIONS[normal], currency.rstrip(b"\0").decode(),
        dp1 << 64 | dp0, cp1 << 64 | cp0, dpe1 << 64 | dpe0, cpe1 << 64 | cpe0, head,
        bytes(data[ACCOUNT.size:]),
    )


@dataclass(frozen=True, slots=True)
class EntryRow:
    timestamp: int
    amount: int
    released: int
    direction: Direction
    status: str
    balance_after: int
    hash: bytes
    transaction_id: str
    totals: tuple[int, int, int, int] | None


def pack_entry_fields(timestamp: int, amount: int, released: int, direction: int, status: int,
                      balance_after: int, digest: bytes, totals: tuple[int, int, int, int] | None,
                      transaction_id: bytes) -> bytes:
    head = ENTRY.pack(timestamp, amount, released, direction, status, totals is not None,
                      i128(balance_after), digest)
    if totals is not None:
        head += TOTALS.pack(*(u128(t) for t in totals))
    return head + transaction_id


def unpack_entry(data: Raw) -> EntryRow:
    ts, amount, released, direction, status, has_totals, bal, digest = ENTRY.unpack_from(data)
    pos = ENTRY.size
    totals = None
    if has_totals:
        dp, cp, dpe, cpe = TOTALS.unpack_from(data, pos)
        totals = (from_u128(dp), from_u128(cp), from_u128(dpe), from_u128(cpe))
        pos += TOTALS.size
    return EntryRow(ts, amount, released, DIRECTIONS[direction], ENTRY_STATUSES[status],
                    from_i128(bal), digest, bytes(data[pos:]).decode(), totals)


def entry_hash_of(data: Raw) -> bytes:
    """The stored hash of an entry record, without unpacking the rest."""
    return bytes(data[ENTRY.size - 32:ENTRY.size])


def entry_timestamp_of(data: Raw) -> int:
    value: int = U64.unpack_from(data)[0]
    return value


@dataclass(slots=True)
class ShardState:
    applied_index: int = 0
    last_timestamp: int = 0
    next_account_num: int = 1
    next_offset: int = 1
    chain: bytes = b"\0" * 32
    tree_size: int = 0

    def pack(self) -> bytes:
        return STATE_TREE.pack(self.applied_index, self.last_timestamp, self.next_account_num,
                               self.next_offset, self.chain, self.tree_size)

    @classmethod
    def unpack(cls, data: Raw | None) -> ShardState:
        if data is None:
            return cls()
        if len(data) == STATE.size:  # written before the transaction tree
            return cls(*STATE.unpack(data))
        return cls(*STATE_TREE.unpack(data))

    def copy(self) -> ShardState:
        return ShardState(self.applied_index, self.last_timestamp, self.next_account_num,
                          self.next_offset, self.chain, self.tree_size)


class OwnedSlots:
    """The slots a shard owns (``SetSlots``): the map epoch they came from, the ranges, and a
    4096-byte table (1: owned) for the apply path's per-account check."""

    def __init__(self, epoch: int, ranges: tuple[tuple[int, int], ...]) -> None:
        self.epoch = epoch
        self.ranges = ranges
        self.table = owned_table(ranges)

    def pack(self) -> bytes:
        packed: bytes = msgpack.packb([self.epoch, [[a, b] for a, b in self.ranges]])
        return packed

    @staticmethod
    def unpack(data: Raw | None) -> OwnedSlots | None:
        if data is None:
            return None
        epoch, ranges = msgpack.unpackb(bytes(data))
        return OwnedSlots(epoch, tuple((int(a), int(b)) for a, b in ranges))


def pack_transaction(tx: Transaction, packb: Callable[[Any], bytes] = msgpack.packb) -> bytes:
    entries = [[e.account_id, DIRECTION_BYTE[e.direction], e.amount, e.currency, e.seq, e.hash]
               for e in tx.entries]
    fields = [tx.id, tx.status, tx.code, tx.metadata, tx.timestamp, tx.pending, tx.timeout_seconds,
              tx.pending_id, tx.reverses, tx.reversed_by, tx.resolved_by, entries]
    if tx.shards:  # a cross-shard transaction's record at its home (older records have 12 fields)
        fields.append(list(tx.shards))
    packed: bytes = packb(fields)
    return packed


def _tx_entries(entries: list[Any]) -> tuple[TxEntry, ...]:
    return tuple(TxEntry(a, DIRECTIONS[d], amt, cur, seq, h) for a, d, amt, cur, seq, h in entries)


def unpack_transaction(data: Raw) -> Transaction:
    fields = msgpack.unpackb(data)
    (txid, status, code, metadata, ts, pending, timeout, pending_id, reverses, reversed_by,
     resolved_by, entries) = fields[:12]
    shards = tuple(fields[12]) if len(fields) > 12 else ()
    return Transaction(txid, status, _tx_entries(entries), code, metadata, ts, pending, timeout,
                       pending_id, reverses, reversed_by, resolved_by, shards)


def pack_leg(leg: Leg, packb: Callable[[Any], bytes] = msgpack.packb) -> bytes:
    entries = [[e.account_id, DIRECTION_BYTE[e.direction], e.amount, e.currency, e.seq, e.hash]
               for e in leg.entries]
    packed: bytes = packb([leg.id, leg.status, leg.coordinator, leg.digest, entries, leg.pending, leg.code,
                           leg.metadata, list(leg.shards), leg.timestamp, leg.finished_by, leg.refusal,
                           leg.details])
    return packed


def unpack_leg(data: Raw) -> Leg:
    (txid, status, coordinator, digest, entries, pending, code, metadata, shards, ts, finished_by,
     refusal, details) = msgpack.unpackb(data)
    return Leg(txid, status, coordinator, digest, _tx_entries(entries), pending, code, metadata,
               tuple(shards), ts, finished_by, refusal, details)


def pack_open_decision(d: OpenDecision, packb: Callable[[Any], bytes] = msgpack.packb) -> bytes:
    packed: bytes = packb([d.timestamp, d.leg, d.digest, d.outcome, d.by, d.amount, list(d.participants)])
    return packed


def unpack_open_decision(key: Raw, data: Raw) -> OpenDecision:
    ts, leg, digest, outcome, by, amount, participants = msgpack.unpackb(data)
    return OpenDecision(bytes(key).decode(), ts, leg, digest, outcome, by, amount, tuple(participants))


def timed_key(ns: int, transaction_id: str) -> bytes:
    """A key of the open_legs table: time order, then the id."""
    return U64.pack(ns) + transaction_id.encode()


def split_timed_key(key: Raw) -> tuple[int, str]:
    return U64.unpack_from(key)[0], bytes(key[8:]).decode()


def expiry_key(deadline_ns: int, transaction_id: str) -> bytes:
    return U64.pack(deadline_ns) + transaction_id.encode()
