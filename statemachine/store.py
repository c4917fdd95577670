"""One shard replica's ledger on disk: an LMDB file, the apply entry point, and read queries.

``apply_entry`` applies one Raft log entry in one LMDB write transaction that also records the entry's
index, so an entry at or below the stored index is skipped: apply is exactly-once across restarts and
journal replays. Readers use read-only LMDB transactions and never block the writer.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lmdb
import msgpack

from . import hashing, merkle
from .codec import CodecError, Invalid, decode_requests, entry_version
from .codes import ResultCode
from .commands import AnyCommand
from .layout import (
    BALANCES,
    CONSUMER,
    DB_NAMES,
    FEED_FLOOR_KEY,
    SLOTS_KEY,
    STATE_KEY,
    U32,
    U64,
    AccountRow,
    InvariantViolation,
    OwnedSlots,
    Raw,
    ShardState,
    entry_hash_of,
    entry_key,
    entry_timestamp_of,
    split_timed_key,
    unpack_account,
    unpack_balances,
    unpack_entry,
    unpack_leg,
    unpack_open_decision,
    unpack_transaction,
)
from .ledger import (
    CLAIMED_AT,
    EVENT_ACCOUNT,
    EVENT_HEAD,
    EVENT_TRANSACTION_BALANCES,
    EVENT_TYPES,
    Applier,
    Dbs,
    decode_rejection,
    event_transaction,
    result_codes,
)
from .records import (
    Account,
    Balance,
    Entry,
    Event,
    Leg,
    OpenDecision,
    Outcome,
    Rejection,
    Transaction,
)

map_size_bytes_default = 64 * 2**30
rows_cached_max = 200_000  # committed account rows kept decoded between entries
readers_max = 1024
statement_page_limit_default = 100
statement_page_limit_max = 1000
events_page_limit_max = 10_000
leaves_per_id_max = 16  # an id has one leaf per record this shard kept of it (a few at most)


class QueryError(Exception):
    """A read that cannot be answered as asked; ``code`` is stable (e.g. ``account_not_found``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LedgerStore:
    def __init__(self, path: str, shard: int = 0, *, sync: bool = True,
                 map_size: int = map_size_bytes_default) -> None:
        self.path = path
        self.shard = shard
        # writemap: a commit writes its pages straight into the map instead of copying each through
        # pwrite (a quarter of apply's CPU); the file is sized to the map, sparse. It rules out nested
        # transactions, so an atomic batch undoes its own writes (ledger.Recording).
        self.env = lmdb.open(path, subdir=False, map_size=map_size, max_dbs=len(DB_NAMES),
                             sync=sync, metasync=False, max_readers=readers_max, readahead=False,
                             writemap=True)
        self._page_size = self.env.stat()["psize"]
        with self.env.begin(write=True) as txn:
            self.dbs = Dbs(*(self.env.open_db(name.encode(), txn=txn) for name in DB_NAMES))
        self._state = self._read_state()
        self._slots = self._read_slots()
        self._expiry_floor = 0  # unknown until the first request scans the expiries
        # Account rows as committed, decoded: hot accounts skip the LMDB read and the unpacking.
        # Only this store's apply writes the accounts table, and it updates the cache after commit.
        self._rows: dict[str, AccountRow] = {}

    def _read_state(self) -> ShardState:
        with self.env.begin() as txn:
            return ShardState.unpack(txn.get(STATE_KEY, db=self.dbs.meta))

    def _read_slots(self) -> OwnedSlots | None:
        with self.env.begin() as txn:
            return OwnedSlots.unpack(txn.get(SLOTS_KEY, db=self.dbs.meta))

    def applied_index(self) -> int:
        return self._state.applied_index

    def slots(self) -> tuple[int, tuple[tuple[int, int], ...]]:
        """(map epoch, ranges) of the slots this shard owns as applied; (0, ()) before any."""
        slots = self._slots
        return (0, ()) if slots is None else (slots.epoch, slots.ranges)

    def last_timestamp(self) -> int:
        return self._state.last_timestamp

    def fingerprint(self) -> tuple[int, str]:
        return self._state.applied_index, self._state.chain.hex()

    def apply_entry(self, index: int, payload: bytes) -> list[Outcome] | None:
        """Apply one Raft entry; None (and nothing changes) if ``index`` was applied already."""
        if index <= self._state.applied_index:
            return None
        rules = entry_version(payload)  # UnknownVersion stops this replica: never apply it as empty
        try:
            requests = decode_requests(payload)
        except CodecError:  # unreadable as a whole: applied as no request, the same on every replica
            requests = []
        while True:
            try:
                return self._apply_requests(index, payload, requests, rules)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def bytes_used(self) -> int:
        """The file up to LMDB's last page: what must be backed by disk (the rest is a sparse hole)."""
        return (self.env.info()["last_pgno"] + 1) * self._page_size

    def _apply_requests(self, index: int, payload: bytes,
                        requests: list[tuple[int, AnyCommand | Invalid]], rules: int) -> list[Outcome]:
        state = self._state.copy()
        with self.env.begin(write=True) as txn:
            applier = Applier(txn, self.dbs, state, self._expiry_floor, self._rows, rules, self._slots)
            outcomes = applier.apply_requests(requests)
            state = applier.state
            state.applied_index = index
            state.chain = hashing.shard_chain(state.chain, index, payload, result_codes(outcomes))
            txn.put(STATE_KEY, state.pack(), db=self.dbs.meta)
        self._state = state
        self._slots = applier.slots
        self._expiry_floor = applier.expiry_floor
        if len(self._rows) + len(applier.written) > rows_cached_max:
            self._rows.clear()
        self._rows.update(applier.written)
        return outcomes

    def copy_to_fd(self, fd: int, before_copy: Callable[[tuple[int, str]], None] | None = None) -> int:
        """A consistent, compacted copy of the whole store; returns the applied index inside it.

        Safe from any thread: the copy and the index come from one read transaction. ``before_copy``
        receives the copy's fingerprint before the first byte is written (a backup streams it).
        """
        with self.env.begin() as txn:
            state = ShardState.unpack(txn.get(STATE_KEY, db=self.dbs.meta))
            if before_copy is not None:
                before_copy((state.applied_index, state.chain.hex()))
            self.env.copyfd(fd, compact=True, txn=txn)
        return state.applied_index

    def close(self) -> None:
        self.env.close()

    @contextmanager
    def reader(self) -> Iterator[Reader]:
        with self.env.begin(buffers=False) as txn:
            yield Reader(txn, self.dbs, self.shard)


class _SeqTimes:
    """Lazy sequence of entry timestamps by seq, for bisecting statements by time."""

    def __init__(self, txn: lmdb.Transaction, db: Any, num: int, count: int) -> None:
        self.txn, self.db, self.num, self.count = txn, db, num, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:
        value = self.txn.get(entry_key(self.num, i + 1), db=self.db)
        if value is None:
            raise InvariantViolation(f"gap in entries of account #{self.num} at {i + 1}")
        return entry_timestamp_of(value)


class Reader:
    """Queries over one consistent read-only view of the store."""

    def __init__(self, txn: lmdb.Transaction, dbs: Dbs, shard: int) -> None:
        self.txn = txn
        self.dbs = dbs
        self.shard = shard

    def _get(self, key: bytes, db: Any) -> Raw:
        value = self.txn.get(key, db=db)
        if value is None:
            raise InvariantViolation(f"missing record {key!r}")
        return value

    def state(self) -> ShardState:
        return ShardState.unpack(self.txn.get(STATE_KEY, db=self.dbs.meta))

    def slots(self) -> tuple[int, tuple[tuple[int, int], ...]]:
        """(map epoch, ranges) of the slots this shard owns; (0, ()) before any ``SetSlots``."""
        slots = OwnedSlots.unpack(self.txn.get(SLOTS_KEY, db=self.dbs.meta))
        return (0, ()) if slots is None else (slots.epoch, slots.ranges)

    def account(self, account_id: str) -> Account | None:
        raw = self.txn.get(account_id.encode(), db=self.dbs.accounts)
        if raw is None:
            return None
        return unpack_account(account_id, raw).to_account()

    def _need_account(self, account_id: str) -> Account:
        account = self.account(account_id)
        if account is None:
            raise QueryError("account_not_found", f"no account {account_id!r}")
        return account

    def balance(self, account_id: str, at_seq: int | None = None,
                at_ns: int | None = None) -> Balance:
        """Current balance, or the balance right after entry ``at_seq`` / at time ``at_ns``."""
        acct = self._need_account(account_id)
        if at_seq is None and at_ns is None:
            return Balance(acct.id, acct.currency, acct.normal, acct.debits_posted,
                           acct.credits_posted, acct.debits_pending, acct.credits_pending,
                           acct.seq, acct.timestamp)
        if not acct.flags & 8:  # AccountFlag.history
            raise QueryError("history_not_enabled",
                             "point-in-time balances need the account flag 'history'")
        seq = self._seq_at(acct, at_ns) if at_seq is None else min(max(at_seq, 0), acct.seq)
        if seq == 0:
            return Balance(acct.id, acct.currency, acct.normal, 0, 0, 0, 0, 0, acct.timestamp)
        row = unpack_entry(self._get(entry_key(acct.num, seq), self.dbs.entries))
        assert row.totals is not None
        return Balance(acct.id, acct.currency, acct.normal, *row.totals, seq, row.timestamp)

    def _seq_at(self, acct: Account, at_ns: int | None) -> int:
        """The last seq whose timestamp is <= at_ns (0 if none)."""
        times = _SeqTimes(self.txn, self.dbs.entries, acct.num, acct.seq)
        return bisect.bisect_right(times, at_ns if at_ns is not None else 2**64)

    def entries(self, account_id: str, *, after_seq: int | None = None,
                before_seq: int | None = None, limit: int = statement_page_limit_default,
                order: str = "asc", from_ns: int | None = None,
                to_ns: int | None = None) -> tuple[list[Entry], int | None]:
        """A statement page and the cursor for the next one (None on the last page)."""
        if order not in ("asc", "desc"):
            raise QueryError("invalid_query", "order is asc or desc")
        if not 1 <= limit <= statement_page_limit_max:
            raise QueryError("invalid_query", f"limit is 1..{statement_page_limit_max}")
        acct = self._need_account(account_id)
        times = _SeqTimes(self.txn, self.dbs.entries, acct.num, acct.seq)
        low = max(after_seq or 0, 0) + 1
        high = min(acct.seq, before_seq - 1 if before_seq is not None else acct.seq)
        if from_ns is not None:
            low = max(low, bisect.bisect_left(times, from_ns) + 1)
        if to_ns is not None:
            high = min(high, bisect.bisect_right(times, to_ns))
        if low > high:
            return [], None
        if order == "asc":
            seqs = range(low, min(high, low + limit - 1) + 1)
            more = seqs[-1] < high
        else:
            seqs = range(high, max(low, high - limit + 1) - 1, -1)
            more = seqs[-1] > low
        page = [self._entry(acct, s) for s in seqs]
        return page, (seqs[-1] if more else None)

    def _entry(self, acct: Account, seq: int) -> Entry:
        db = self.dbs.entries
        row = unpack_entry(self._get(entry_key(acct.num, seq), db))
        prev = hashing.genesis(acct.id) if seq == 1 else entry_hash_of(
            self._get(entry_key(acct.num, seq - 1), db))
        return Entry(acct.id, seq, row.transaction_id, row.direction, row.amount, acct.currency,
                     row.status, row.balance_after, row.timestamp, row.released, row.hash, prev,
                     row.totals)

    def transaction(self, txid: str) -> Transaction | Rejection | None:
        raw = self.txn.get(txid.encode(), db=self.dbs.transactions)
        if raw is not None:
            return unpack_transaction(raw)
        idem = self.txn.get(txid.encode(), db=self.dbs.idempotency)
        rejection = None if idem is None else decode_rejection(idem)
        if rejection is None:
            return None
        _digest, code, ts, details = rejection
        if code == ResultCode.ok:  # a claim: the transaction is recorded elsewhere (recorded_at)
            return None
        return Rejection(txid, code, ts, details)

    def recorded_at(self, txid: str) -> int | None:
        """The shard that records ``txid`` when this one, its home, only holds a claim on it."""
        idem = self.txn.get(txid.encode(), db=self.dbs.idempotency)
        rejection = None if idem is None else decode_rejection(idem)
        if rejection is None or rejection[1] != ResultCode.ok:
            return None
        return int(rejection[3][CLAIMED_AT])

    def earliest_hold_deadline(self) -> int | None:
        """The deadline (ns) of the pending hold that expires first, or None if no hold has one.

        One read, the first key of the expiries table: cheap enough for a leader to poll, and to
        propose ``ExpireHolds`` once its clock reaches it (a hold expires at a request timestamped
        at or after its deadline).
        """
        cursor = self.txn.cursor(db=self.dbs.expiries)
        if not cursor.first():
            return None
        deadline: int = U64.unpack_from(cursor.key())[0]
        return deadline

    def leg(self, txid: str) -> Leg | None:
        """This shard's leg of cross-shard transaction ``txid``, if it has one."""
        raw = self.txn.get(txid.encode(), db=self.dbs.legs)
        return None if raw is None else unpack_leg(raw)

    def open_legs(self, prepared_before_ns: int, limit: int) -> list[Leg]:
        """Legs prepared before the given time and not decided here yet, oldest first."""
        out: list[Leg] = []
        cursor = self.txn.cursor(db=self.dbs.open_legs)
        for key, _ in cursor:
            ts, txid = split_timed_key(key)
            if ts >= prepared_before_ns or len(out) >= limit:
                break
            leg = self.leg(txid)
            if leg is not None:
                out.append(leg)
        return out

    def open_decisions(self, decided_before_ns: int, limit: int) -> list[OpenDecision]:
        """Decisions taken here before the given time whose participants may not all have finished
        (only those in flight or interrupted are open: the table stays small)."""
        out: list[OpenDecision] = []
        for key, value in self.txn.cursor(db=self.dbs.decisions):
            decision = unpack_open_decision(key, value)
            if decision.timestamp < decided_before_ns:
                out.append(decision)
        return sorted(out, key=lambda d: d.timestamp)[:limit]

    def feed_bounds(self) -> tuple[int, int]:
        """(first offset still held, last offset written); first > last when none is held."""
        raw = self.txn.get(FEED_FLOOR_KEY, db=self.dbs.meta)
        first = 1 if raw is None else int(U64.unpack(raw)[0])
        return first, self.state().next_offset - 1

    def events(self, after: int = 0, limit: int = 100) -> list[Event]:
        """Outbox events with offset > ``after``, in offset order (dense from the first one held)."""
        limit = max(1, min(limit, events_page_limit_max))
        out: list[Event] = []
        cursor = self.txn.cursor(db=self.dbs.outbox)
        if not cursor.set_range(U64.pack(max(after, 0) + 1)):
            return out
        for key, value in cursor:
            out.append(self._event(U64.unpack(key)[0], value))
            if len(out) >= limit:
                break
        return out

    def _event(self, offset: int, value: Raw) -> Event:
        type_code, kind, ts = EVENT_HEAD.unpack_from(value)
        event_type, record = EVENT_TYPES[type_code], bytes(value[EVENT_HEAD.size:])
        if kind == EVENT_ACCOUNT:
            account_id, packed = msgpack.unpackb(record)
            acct = unpack_account(account_id, packed).to_account()
            return Event(offset, event_type, ts, acct.to_json(self.shard))
        packed = event_transaction(kind, record)
        assert packed is not None
        tx = unpack_transaction(packed)
        data = tx.to_json(self.shard)
        if kind != EVENT_TRANSACTION_BALANCES:
            return Event(offset, event_type, ts, data)
        at = U32.size + len(packed)
        accounts = dict.fromkeys(e.account_id for e in tx.entries)
        data["balances"] = [self._balance_after(account_id, record, at + i * BALANCES.size, ts)
                            for i, account_id in enumerate(accounts)]
        return Event(offset, event_type, ts, data)

    def _balance_after(self, account_id: str, record: bytes, pos: int, ts: int) -> dict[str, Any]:
        """An account's balances as an event recorded them; currency and side never change."""
        acct = self._need_account(account_id)
        seq, dp, cp, dpe, cpe = unpack_balances(record, pos)
        return Balance(account_id, acct.currency, acct.normal, dp, cp, dpe, cpe, seq, ts).to_json()

    def consumers(self) -> dict[str, tuple[int, int]]:
        """Every durable consumer of this shard's feed: name -> (offset, timestamp of its last commit)."""
        out: dict[str, tuple[int, int]] = {}
        for key, value in self.txn.cursor(db=self.dbs.consumers):
            offset, ts = CONSUMER.unpack(value)
            out[bytes(key).decode()] = (int(offset), int(ts))
        return out

    def consumer(self, name: str) -> tuple[int, int] | None:
        raw = self.txn.get(name.encode(), db=self.dbs.consumers)
        if raw is None:
            return None
        offset, ts = CONSUMER.unpack(raw)
        return int(offset), int(ts)

    def event_timestamp(self, offset: int) -> int | None:
        """When the event at ``offset`` was written (None if it is not held)."""
        raw = self.txn.get(U64.pack(offset), db=self.dbs.outbox)
        return None if raw is None else int(EVENT_HEAD.unpack_from(raw)[2])

    # ---- the transaction tree (merkle.py) -----------------------------------------------------

    def _tree(self, size: int) -> merkle.SubtreeHashes:
        have = self.state().tree_size
        if not 0 <= size <= have:
            raise QueryError("tree_size_unavailable", f"tree size {size} is not in 0..{have}")
        return merkle.SubtreeHashes(size, self._tree_node)

    def _tree_node(self, level: int, index: int) -> bytes:
        return bytes(self._get(merkle.node_key(level, index), self.dbs.merkle))

    def tree_head(self, size: int | None = None) -> tuple[int, bytes, int]:
        """(tree size, root, timestamp of its last leaf or 0) at ``size`` (default: as applied)."""
        size = self.state().tree_size if size is None else size
        root = self._tree(size).root()
        return size, root, merkle.leaf_timestamp(self.leaf(size - 1)) if size else 0

    def leaf(self, index: int) -> bytes:
        return bytes(self._get(U64.pack(index), self.dbs.leaves))

    def leaf_indexes(self, txid: str) -> list[int]:
        """The leaves recorded under ``txid`` on this shard, in order (a hold and its expiry share one)."""
        prefix = txid.encode() + b"\x00"
        found: list[int] = []
        cursor = self.txn.cursor(db=self.dbs.leaf_ids)
        ok = cursor.set_range(prefix)
        while ok and len(found) < leaves_per_id_max:
            key = bytes(cursor.key())
            if not key.startswith(prefix) or len(key) != len(prefix) + 8:
                break
            found.append(U64.unpack_from(key, len(prefix))[0])
            ok = cursor.next()
        return found

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return self._tree(size).inclusion_path(index)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        if not 0 <= first <= second:
            raise QueryError("invalid_tree_size", f"first {first} must be in 0..second {second}")
        return self._tree(second).consistency_proof(first)

    def account_ids(self) -> Iterator[str]:
        cursor = self.txn.cursor(db=self.dbs.accounts)
        for key in cursor.iternext(keys=True, values=False):
            yield bytes(key).decode()

    def payload_digest(self) -> str:
        """SHA-256 over every key and value of every sub-database: byte-identity of replicas."""
        h = hashlib.sha256()
        for db in self.dbs:
            for key, value in self.txn.cursor(db=db):
                h.update(len(key).to_bytes(4, "big") + bytes(key))
                h.update(len(value).to_bytes(4, "big") + bytes(value))
        return h.hexdigest()
