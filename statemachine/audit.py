"""Independent checks of a store against the ledger invariants (ARCHITECTURE.md, 1-4).

Used by tests after every step and by operators' verification tools; each disagreement is a line of
text, and an empty list means all is well.

The auditor shares no code with what it checks (STYLE.md 16): it imports nothing from the ledger, its
row classes or its hashing. It reads the raw tables through the reader's LMDB transaction, decodes the
byte layouts documented in layout.py and hashing.py with its own few lines, and re-derives from the
entries alone what the apply path keeps: each account's totals (folding entry statuses), its dense
seqs and its hash chain. From the transactions table it re-derives what must be pending (the holds
still open) and which holds must have an expiry. A bug in the apply helpers therefore shows here
as a disagreement instead of being repeated by the check.

A shard holding legs of cross-shard transactions is not balanced by itself: per currency, its debits
exceed its credits by the net of the entries its legs placed and finished (the other shards' legs
balance them). The auditor folds those entries separately, from the legs table and the entries
alone, and checks the shard's totals against that net; the balance over all shards is checked by
adding every shard's ``currency_totals``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import msgpack

if TYPE_CHECKING:
    from .store import Reader

Totals = tuple[int, int, int, int]  # debits posted, credits posted, debits pending, credits pending
Raw = bytes | memoryview  # what LMDB hands back

# The byte layouts, as documented in layout.py (big-endian; a total is a 16-byte unsigned integer).
_ACCOUNT = struct.Struct(">QQQIB12s16s16s16s16s32s")
_ENTRY = struct.Struct(">QQQBBB16s32s")
_ENTRY_KEY = struct.Struct(">QQ")
_STATE = struct.Struct(">QQQQ32s")  # applied index, last timestamp, next account num, next offset, chain
_STATE_KEY = b"state"  # in the meta table
_OFFSET = struct.Struct(">Q")  # an outbox key; a leaf index; the tree size after the state
_LEAF_LEG = 3
_FEED_FLOOR_KEY = b"feed_floor"  # in meta: the first outbox offset compaction kept
# An outbox value: type code, kind, timestamp (">BBQ"), then the record. Kind 2 (from rules 4): u32
# length of the packed transaction, the transaction, then per account of its entries (in the order
# they first appear) its seq and four totals as u64 halves (">9Q"), right after the event.
_EVENT_HEAD = struct.Struct(">BBQ")
_EVENT_WITH_BALANCES = 2
_U32 = struct.Struct(">I")
_BALANCES = struct.Struct(">QQQQQQQQQ")
# A transaction record is msgpack [id, status, code, metadata, timestamp, pending, timeout_seconds,
# pending_id, reverses, reversed_by, resolved_by, entries], an entry of it [account id, direction
# byte, amount, currency, seq, hash] (layout.pack_transaction).
# A cross-shard transaction's record at its home has a 13th field, its shards; its entries live on
# those shards, as legs (msgpack [id, status, coordinator, digest, entries, pending, code, metadata,
# shards, timestamp, finished by, refusal, details], layout.pack_leg).
_TX_ID, _TX_STATUS, _TX_TIMESTAMP, _TX_PENDING, _TX_TIMEOUT, _TX_ENTRIES = 0, 1, 4, 5, 6, 11
_TX_SHARDS = 12
_LEG_ID, _LEG_STATUS, _LEG_ENTRIES, _LEG_TIMESTAMP, _LEG_FINISHED_BY = 0, 1, 4, 9, 10
_LEG_OPEN = ("prepared", "held")
_TOTAL = 16
_PENDING, _POSTED, _VOIDED, _EXPIRED = range(4)  # entry status bytes
_DEBIT, _CREDIT = 0, 1  # direction bytes
_FLAG_DEBITS_LIMITED, _FLAG_CREDITS_LIMITED, _FLAG_HISTORY = 1, 2, 8
_TOTAL_BOUND = 2**127
_GENESIS_PREFIX = b"raftledger/account/v1\0"
_NS_PER_SECOND = 1_000_000_000


class _Account(NamedTuple):
    id: str
    num: int
    seq: int
    timestamp: int
    flags: int
    normal: int
    currency: str
    totals: Totals
    head: bytes


class _Entry(NamedTuple):
    timestamp: int
    amount: int
    released: int
    direction: int
    status: int
    balance_after: int
    hash: bytes
    totals: Totals | None
    transaction_id: str


def _u(data: Raw) -> int:
    return int.from_bytes(data, "big")


def _decode_account(account_id: str, raw: Raw) -> _Account:
    num, seq, ts, flags, normal, currency, dp, cp, dpe, cpe, head = _ACCOUNT.unpack_from(raw)
    return _Account(account_id, num, seq, ts, flags, normal, currency.rstrip(b"\0").decode(),
                    (_u(dp), _u(cp), _u(dpe), _u(cpe)), head)


def _decode_entry(raw: Raw) -> _Entry:
    ts, amount, released, direction, status, has_totals, balance, digest = _ENTRY.unpack_from(raw)
    pos, totals = _ENTRY.size, None
    if has_totals:
        dp, cp, dpe, cpe = (_u(raw[pos + i * _TOTAL:pos + (i + 1) * _TOTAL]) for i in range(4))
        totals, pos = (dp, cp, dpe, cpe), pos + 4 * _TOTAL
    return _Entry(ts, amount, released, direction, status, int.from_bytes(balance, "big", signed=True),
                  digest, totals, bytes(raw[pos:]).decode())


# ---- the hash chain, from the byte form documented in hashing.py ---------------------------------

def _text(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


def _link(prev: bytes, acct: _Account, seq: int, e: _Entry) -> bytes:
    data = b"".join((
        _text(acct.id), seq.to_bytes(8, "big"), _text(e.transaction_id), bytes((e.direction,)),
        e.amount.to_bytes(8, "big"), _text(acct.currency), bytes((e.status,)),
        e.balance_after.to_bytes(16, "big", signed=True), e.timestamp.to_bytes(8, "big"),
        e.released.to_bytes(8, "big"),
    ))
    return hashlib.sha256(prev + data).digest()


# ---- one account: fold its entries --------------------------------------------------------------

class _Fold:
    """An account's totals as its entries say, indexed by direction byte."""

    def __init__(self) -> None:
        self.posted = [0, 0]
        self.pending = [0, 0]

    def add(self, e: _Entry) -> None:
        side = e.direction
        if e.status == _PENDING:
            self.pending[side] += e.amount
        elif e.status == _POSTED:  # a post of a hold also gives the hold (``released``) back
            self.posted[side] += e.amount
            self.pending[side] -= e.released
        else:  # voided, expired
            self.pending[side] -= e.amount

    def totals(self) -> Totals:
        return self.posted[_DEBIT], self.posted[_CREDIT], self.pending[_DEBIT], self.pending[_CREDIT]

    def balance(self, normal: int) -> int:
        return self.posted[normal] - self.posted[1 - normal]


def _flag_problem(flags: int, totals: Totals) -> str | None:
    """A limit of the account's flags, or the bound of every total, that ``totals`` break."""
    dp, cp, dpe, cpe = totals
    if max(totals) >= _TOTAL_BOUND:
        return "total beyond 2**127"
    if flags & _FLAG_DEBITS_LIMITED and dp + dpe > cp:
        return "debits (posted and pending) exceed credits"
    if flags & _FLAG_CREDITS_LIMITED and cp + cpe > dp:
        return "credits (posted and pending) exceed debits"
    return None


def _entry_problems(acct: _Account, seq: int, e: _Entry, fold: _Fold) -> Iterator[str]:
    """What one entry (already folded into ``fold``) disagrees with."""
    where = f"{acct.id} seq {seq}"
    if e.released and e.status != _POSTED:
        yield f"{where}: an entry of status {e.status} (not posted) releases {e.released}"
    if e.balance_after != fold.balance(acct.normal):
        yield f"{where}: balance_after {e.balance_after} != fold {fold.balance(acct.normal)}"
    if (e.totals is not None) != bool(acct.flags & _FLAG_HISTORY):
        yield f"{where}: totals kept {e.totals is not None}, history flag {bool(acct.flags & _FLAG_HISTORY)}"
    if e.totals is not None and e.totals != fold.totals():
        yield f"{where}: history totals {e.totals} != fold {fold.totals()}"
    if min(fold.totals()) < 0:
        yield f"{where}: a total goes negative {fold.totals()}"


def _entries(reader: Reader, num: int) -> Iterator[tuple[int, Raw]]:
    """(seq, raw entry) of account ``num``, in seq order, whatever seqs are stored."""
    cursor = reader.txn.cursor(db=reader.dbs.entries)
    if not cursor.set_range(_ENTRY_KEY.pack(num, 0)):
        return
    for key, value in cursor:
        owner, seq = _ENTRY_KEY.unpack(key)
        if owner != num:
            return
        yield seq, value


def _audit_account(reader: Reader, acct: _Account,
                   legs: _LegFold | None = None) -> tuple[list[str], int]:
    """Problems of one account, and how many entries it has; entries of legs also go to ``legs``."""
    if acct.normal not in (_DEBIT, _CREDIT):
        return [f"{acct.id}: normal side {acct.normal} unknown"], 0
    problems: list[str] = []
    fold, head, seq, count = _Fold(), hashlib.sha256(_GENESIS_PREFIX + acct.id.encode()).digest(), 0, 0
    last_ts, group = acct.timestamp, None
    for stored_seq, raw in _entries(reader, acct.num):
        count += 1
        if stored_seq != seq + 1:
            problems.append(f"{acct.id}: seq {stored_seq} follows {seq}")
        seq = stored_seq
        e = _decode_entry(raw)
        if _link(head, acct, seq, e) != e.hash:
            problems.append(f"{acct.id}: hash chain breaks at seq {seq}")
        head = e.hash
        if e.timestamp < last_ts:
            problems.append(f"{acct.id} seq {seq}: timestamp {e.timestamp} before {last_ts}")
        last_ts = e.timestamp
        if e.direction not in (_DEBIT, _CREDIT) or e.status not in (_PENDING, _POSTED, _VOIDED, _EXPIRED):
            problems.append(f"{acct.id} seq {seq}: direction {e.direction} or status {e.status} unknown")
            continue
        if group is not None and e.transaction_id != group:  # limits hold between transactions
            problem = _flag_problem(acct.flags, fold.totals())
            if problem:
                problems.append(f"{acct.id} before seq {seq}: {problem}")
        group = e.transaction_id
        fold.add(e)
        if legs is not None and e.transaction_id in legs.ids:
            legs.add(acct.currency, e)
        problems.extend(_entry_problems(acct, seq, e, fold))
    if seq != acct.seq:
        problems.append(f"{acct.id}: row says seq {acct.seq}, entries end at {seq}")
    elif head != acct.head:
        problems.append(f"{acct.id}: row's head is not the hash of its last entry")
    if fold.totals() != acct.totals:
        problems.append(f"{acct.id}: totals {acct.totals} != fold of entries {fold.totals()}")
    problem = _flag_problem(acct.flags, acct.totals)
    if problem:
        problems.append(f"{acct.id}: {problem}")
    return problems, count


class _LegFold:
    """Per currency, the totals the entries of this shard's legs (placed and finished) add up to."""

    def __init__(self, ids: set[str]) -> None:
        self.ids = ids
        self.folds: dict[str, _Fold] = {}

    def add(self, currency: str, e: _Entry) -> None:
        self.folds.setdefault(currency, _Fold()).add(e)

    def net(self, currency: str) -> tuple[int, int]:
        """(posted, pending) debits minus credits."""
        dp, cp, dpe, cpe = self.folds[currency].totals() if currency in self.folds else (0, 0, 0, 0)
        return dp - cp, dpe - cpe


def _legs(reader: Reader) -> Iterator[list[Any]]:
    for _key, value in reader.txn.cursor(db=reader.dbs.legs):
        yield msgpack.unpackb(value)


def _leg_problems(reader: Reader, legs: list[list[Any]], by_id: dict[str, _Account]) -> Iterator[str]:
    """An open leg's entries are stored as its holds; the open_legs index lists the prepared ones."""
    expected: set[bytes] = set()
    for leg in legs:
        txid = leg[_LEG_ID]
        if leg[_LEG_STATUS] == "prepared":
            expected.add(leg[_LEG_TIMESTAMP].to_bytes(8, "big") + txid.encode())
        for account_id, direction, amount, _currency, seq, digest in leg[_LEG_ENTRIES]:
            acct = by_id.get(account_id)
            key = None if acct is None else _ENTRY_KEY.pack(acct.num, seq)
            raw = None if key is None else reader.txn.get(key, db=reader.dbs.entries)
            e = None if raw is None else _decode_entry(raw)
            if e is None or (e.transaction_id, e.direction, e.amount, e.hash, e.status) != (
                    txid, direction, amount, digest, _PENDING):
                yield f"leg {txid}: its hold entry {account_id} seq {seq} is not as stored"
    stored = {bytes(key) for key in reader.txn.cursor(db=reader.dbs.open_legs).iternext(values=False)}
    for key in sorted(expected ^ stored):
        yield f"open legs: {key[8:].decode()} listed {key in stored}, prepared {key in expected}"


# ---- the whole store ----------------------------------------------------------------------------

def _accounts(reader: Reader) -> Iterator[_Account]:
    for key, value in reader.txn.cursor(db=reader.dbs.accounts):
        yield _decode_account(bytes(key).decode(), value)


def _transactions(reader: Reader) -> Iterator[list[Any]]:
    for _key, value in reader.txn.cursor(db=reader.dbs.transactions):
        yield msgpack.unpackb(value)


def verify_account(reader: Reader, account_id: str) -> list[str]:
    """Balances equal the fold of entries, seqs are dense, the hash chain verifies, flags hold."""
    raw = reader.txn.get(account_id.encode(), db=reader.dbs.accounts)
    if raw is None:
        return [f"{account_id}: missing"]
    return _audit_account(reader, _decode_account(account_id, raw))[0]


def currency_totals(reader: Reader) -> dict[str, Totals]:
    """Per currency, the sum over all accounts of (debits_posted, credits_posted, d_pending, c_pending)."""
    sums: dict[str, list[int]] = {}
    for acct in _accounts(reader):
        acc = sums.setdefault(acct.currency, [0, 0, 0, 0])
        for i, value in enumerate(acct.totals):
            acc[i] += value
    return {c: (v[0], v[1], v[2], v[3]) for c, v in sums.items()}


def _transaction_problems(reader: Reader, tx: list[Any], by_id: dict[str, _Account]) -> Iterator[str]:
    """A transaction record nets to zero per currency and names the entries it wrote, as stored."""
    txid, entries = tx[_TX_ID], tx[_TX_ENTRIES]
    net: dict[str, int] = {}
    for account_id, direction, amount, currency, seq, digest in entries:
        net[currency] = net.get(currency, 0) + (amount if direction == _DEBIT else -amount)
        acct = by_id.get(account_id)
        raw = None if acct is None else reader.txn.get(_ENTRY_KEY.pack(acct.num, seq), db=reader.dbs.entries)
        if acct is None or raw is None:
            yield f"transaction {txid}: no entry {account_id} seq {seq}"
            continue
        e = _decode_entry(raw)
        if (e.transaction_id, e.direction, e.amount, e.hash, acct.currency) != (
                txid, direction, amount, digest, currency):
            yield f"transaction {txid}: entry {account_id} seq {seq} differs from the record"
    for currency, value in net.items():
        if value:
            yield f"transaction {txid}: debits and credits differ by {value} {currency}"
    if reader.txn.get(txid.encode(), db=reader.dbs.idempotency) is None:
        yield f"transaction {txid}: no idempotency record"


def _hold_problems(reader: Reader, holds: list[list[Any]], by_id: dict[str, _Account],
                   open_legs: list[list[Any]]) -> Iterator[str]:
    """Pending totals are the open holds and open legs; a hold has an expiry iff it has a deadline
    (a cross-shard hold at its home, whose entries are legs elsewhere, too)."""
    pending: dict[str, list[int]] = {}
    expected: set[bytes] = set()
    for leg in open_legs:
        for account_id, direction, amount, _currency, _seq, _digest in leg[_LEG_ENTRIES]:
            pending.setdefault(account_id, [0, 0])[direction] += amount
    for tx in holds:
        txid, ts, timeout, entries = tx[_TX_ID], tx[_TX_TIMESTAMP], tx[_TX_TIMEOUT], tx[_TX_ENTRIES]
        local = [] if len(tx) > _TX_SHARDS else entries  # a cross-shard hold's entries are legs
        for account_id, direction, amount, _currency, _seq, _digest in local:
            pending.setdefault(account_id, [0, 0])[direction] += amount
        if timeout:
            expected.add((ts + timeout * _NS_PER_SECOND).to_bytes(8, "big") + txid.encode())
    for acct in by_id.values():
        held = pending.get(acct.id, [0, 0])
        if (held[_DEBIT], held[_CREDIT]) != acct.totals[2:]:
            yield f"{acct.id}: pending totals {acct.totals[2:]} != open holds {tuple(held)}"
    stored = {bytes(key) for key in reader.txn.cursor(db=reader.dbs.expiries).iternext(values=False)}
    for key in sorted(expected - stored):
        yield f"hold {key[8:].decode()}: has a deadline but no expiry"
    for key in sorted(stored - expected):
        yield f"expiry of {key[8:].decode()}: not an open hold with that deadline"


def _state_problems(reader: Reader, nums: set[int]) -> Iterator[str]:
    """The shard's counters: account nums below the next one, outbox offsets dense from the first one
    still held (1 until compaction moved it) to the last one written."""
    raw = reader.txn.get(_STATE_KEY, db=reader.dbs.meta)
    next_num, next_offset = (1, 1) if raw is None else _STATE.unpack_from(raw)[2:4]
    if nums and max(nums) >= next_num:
        yield f"shard state: next account num {next_num}, yet {max(nums)} is taken"
    cursor = reader.txn.cursor(db=reader.dbs.outbox)
    count = reader.txn.stat(reader.dbs.outbox)["entries"]
    floor_raw = reader.txn.get(_FEED_FLOOR_KEY, db=reader.dbs.meta)
    floor = 1 if floor_raw is None else _OFFSET.unpack(floor_raw)[0]
    if not 1 <= floor <= next_offset:
        yield f"outbox: first held offset {floor} outside 1..{next_offset}"
    held = next_offset - floor
    first = _OFFSET.unpack(cursor.key())[0] if cursor.first() else floor
    last = _OFFSET.unpack(cursor.key())[0] if cursor.last() else floor - 1
    if (count, first, last) != (held, floor, next_offset - 1):
        yield f"outbox: {count} events from offset {first} to {last}, not {floor} to {next_offset - 1}"


def _event_problems(reader: Reader, by_id: dict[str, _Account]) -> Iterator[str]:
    """Each event's balances are those its accounts' entries had right after it: the entry at the
    recorded seq belongs to the event's transaction and has the recorded balance (and totals, on an
    account that keeps them)."""
    for key, value in reader.txn.cursor(db=reader.dbs.outbox):
        _, kind, _ = _EVENT_HEAD.unpack_from(value)
        if kind != _EVENT_WITH_BALANCES:
            continue
        offset, pos = _OFFSET.unpack(key)[0], _EVENT_HEAD.size
        size = _U32.unpack_from(value, pos)[0]
        tx = msgpack.unpackb(bytes(value[pos + _U32.size:pos + _U32.size + size]))
        pos += _U32.size + size
        for account_id in dict.fromkeys(e[0] for e in tx[_TX_ENTRIES]):
            seq, *halves = _BALANCES.unpack_from(value, pos)
            pos += _BALANCES.size
            totals = tuple(halves[i] << 64 | halves[i + 1] for i in range(0, 8, 2))
            acct = by_id.get(account_id)
            entries = reader.dbs.entries
            raw = None if acct is None else reader.txn.get(_ENTRY_KEY.pack(acct.num, seq), db=entries)
            if acct is None or raw is None:
                yield f"event {offset}: {account_id} has no entry {seq}"
                continue
            entry = _decode_entry(raw)
            dp, cp = totals[0], totals[1]
            balance = dp - cp if acct.normal == _DEBIT else cp - dp
            if entry.transaction_id != tx[_TX_ID] or entry.balance_after != balance or \
                    entry.totals not in (None, totals):
                yield f"event {offset}: {account_id} at seq {seq} is not as its entry says"


def verify_store(reader: Reader) -> list[str]:
    """Every account verifies; per currency, debits equal credits (posted and pending); every
    transaction nets to zero and matches its entries; pending totals are the open holds; the
    shard's counters agree with what is stored."""
    problems: list[str] = []
    by_id: dict[str, _Account] = {}
    nums: set[int] = set()
    counted = 0
    legs = list(_legs(reader))
    leg_ids = {leg[_LEG_ID] for leg in legs} | {leg[_LEG_FINISHED_BY] for leg in legs
                                                if leg[_LEG_FINISHED_BY]}
    leg_fold = _LegFold(leg_ids)
    for acct in _accounts(reader):
        by_id[acct.id] = acct
        if acct.num in nums:
            problems.append(f"{acct.id}: account num {acct.num} used twice")
        nums.add(acct.num)
        found, count = _audit_account(reader, acct, leg_fold)
        problems.extend(found)
        counted += count
    stored = reader.txn.stat(reader.dbs.entries)["entries"]
    if counted != stored:
        problems.append(f"entries: the table holds {stored}, the accounts' ranges {counted}")
    for currency, (dp, cp, dpe, cpe) in currency_totals(reader).items():
        if (dp - cp, dpe - cpe) != leg_fold.net(currency):
            problems.append(f"{currency}: debits {dp}/{dpe} - credits {cp}/{cpe} (posted/pending) != "
                            f"the net of the legs' entries {leg_fold.net(currency)}")
    holds: list[list[Any]] = []
    for tx in _transactions(reader):
        cross_shard = len(tx) > _TX_SHARDS
        if not cross_shard:  # a cross-shard record's entries are its legs, on their own shards
            problems.extend(_transaction_problems(reader, tx, by_id))
        if tx[_TX_PENDING] and tx[_TX_STATUS] == "pending":  # a hold, still open
            holds.append(tx)
    open_legs = [leg for leg in legs if leg[_LEG_STATUS] in _LEG_OPEN]
    problems.extend(_hold_problems(reader, holds, by_id, open_legs))
    problems.extend(_leg_problems(reader, open_legs, by_id))
    problems.extend(_state_problems(reader, nums))
    problems.extend(_event_problems(reader, by_id))
    problems.extend(_tree_problems(reader))
    return problems


# ---- the transaction tree: recomputed from its leaves (docs/integrity.md) ----------------------------

def _leaf_fields(leaf: bytes) -> tuple[int, str, list[tuple[str, int, int, str, int, bytes]]]:
    """(kind, transaction id, entries) of a leaf, decoded with these few lines."""
    kind, pos = leaf[1], 10

    def text() -> str:
        nonlocal pos
        n = int.from_bytes(leaf[pos:pos + 2], "big")
        pos += 2 + n
        return leaf[pos - n:pos].decode()
    txid = text()
    pos += 1
    text(), text(), text()  # pending_id, reverses, code
    pos += 4
    pos += 1 + 2 * leaf[pos]  # shards
    count = int.from_bytes(leaf[pos:pos + 2], "big")
    pos += 2
    entries = []
    for _ in range(count):
        account = text()
        direction, amount = leaf[pos], int.from_bytes(leaf[pos + 1:pos + 9], "big")
        pos += 9
        currency = text()
        seq, digest = int.from_bytes(leaf[pos:pos + 8], "big"), leaf[pos + 8:pos + 40]
        pos += 40
        entries.append((account, direction, amount, currency, seq, digest))
    return kind, txid, entries


def _tree_problems(reader: Reader) -> Iterator[str]:
    """Leaves dense and as many as the state says; every stored subtree root equals the one recomputed
    from the leaves (streamed: a stack of complete subtrees); each transaction record names the entries
    of its first leaf."""
    raw = reader.txn.get(_STATE_KEY, db=reader.dbs.meta)
    size = 0 if raw is None or len(raw) <= _STATE.size else _OFFSET.unpack_from(raw, _STATE.size)[0]
    nodes = reader.txn.cursor(db=reader.dbs.merkle)
    stack: list[tuple[int, bytes]] = []  # (level, root) of the complete subtrees so far, largest first
    seen: set[str] = set()
    count = 0
    for key, value in reader.txn.cursor(db=reader.dbs.leaves):
        index, leaf = _OFFSET.unpack(bytes(key))[0], bytes(value)
        if index != count:
            yield f"transaction tree: leaf {count} is missing"
            return
        count += 1
        level, digest = 0, hashlib.sha256(b"\x00" + leaf).digest()
        while True:
            node = nodes.get(index.to_bytes(8, "big") + bytes([level]))  # keyed by its last leaf
            if node is None or bytes(node) != digest:
                yield f"transaction tree: node {level}/{index >> level} is not its leaves' hash"
            if not stack or stack[-1][0] != level:
                break
            digest = hashlib.sha256(b"\x01" + stack.pop()[1] + digest).digest()
            level += 1
        stack.append((level, digest))
        yield from _leaf_against_record(reader, leaf, seen)
    stored = reader.txn.stat(reader.dbs.merkle)["entries"]
    if count != size or stored != 2 * count - bin(count).count("1"):
        yield f"transaction tree: {count} leaves and {stored} nodes stored for a tree of {size}"


def _leaf_against_record(reader: Reader, leaf: bytes, seen: set[str]) -> Iterator[str]:
    kind, txid, entries = _leaf_fields(leaf)
    if kind == _LEAF_LEG or txid in seen:
        return
    seen.add(txid)
    record = reader.txn.get(txid.encode(), db=reader.dbs.transactions)
    if record is None:
        return  # a cross-shard transaction's leg finished here: its record is at its home
    named = [(a, d, amt, cur, seq, bytes(h))
             for a, d, amt, cur, seq, h in msgpack.unpackb(record)[_TX_ENTRIES]]
    if named != entries:
        yield f"transaction {txid}: record differs from its leaf in the transaction tree"
