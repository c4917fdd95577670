"""The auditor (statemachine/audit.py) re-derives the ledger from raw stored entries and shares no
code with the apply path, so it reports what a bug in the apply helpers or damage to the store
leaves behind."""

from __future__ import annotations

import ast
import struct
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from raftledger.statemachine import audit, layout
from raftledger.statemachine.audit import currency_totals, verify_store
from raftledger.statemachine.commands import (
    AccountFlag,
    Batch,
    CreateAccount,
    CreateTransaction,
    Direction,
    EntrySpec,
    PostPending,
    ReverseTransaction,
    VoidPending,
)
from raftledger.statemachine.layout import AccountRow
from raftledger.statemachine.store import LedgerStore
from raftledger.statemachine.testing import Harness, transfer

D, CR = Direction.debit, Direction.credit
LIMIT_DEBITS = int(AccountFlag.debits_must_not_exceed_credits)
HISTORY = int(AccountFlag.history)


def problems(store: LedgerStore) -> list[str]:
    with store.reader() as r:
        return verify_store(r)


@pytest.fixture
def busy(ledger: Harness) -> Harness:
    """bank lends to alice (may not overdraw, keeps history); alice pays bob, holds for him (one hold
    open with a deadline, one open without, others posted, voided, expired), one payment reversed."""
    chart = (("bank", 0, D, "BRL"), ("alice", LIMIT_DEBITS | HISTORY, CR, "BRL"), ("bob", 0, CR, "BRL"),
             ("fx", 0, D, "USD"), ("usd", 0, CR, "USD"))
    for account_id, flags, normal, currency in chart:
        assert ledger.one(CreateAccount(account_id, currency, normal, flags)).ok
    steps = [transfer("fund", "bank", "alice", 10_000), transfer("pay", "alice", "bob", 100),
             transfer("expires", "alice", "bob", 7, pending=True, timeout_seconds=1)]
    for command in steps:
        assert ledger.one(command).ok
    ledger.advance(2)
    steps = [transfer("h-post", "alice", "bob", 40, pending=True), PostPending("p", "h-post", 25),
             transfer("h-void", "alice", "bob", 30, pending=True), VoidPending("v", "h-void"),
             ReverseTransaction("r", "pay"), transfer("dollars", "fx", "usd", 9, "USD"),
             CreateTransaction("split", (EntrySpec("alice", D, 3, "BRL"), EntrySpec("alice", D, 4, "BRL"),
                                         EntrySpec("bob", CR, 7, "BRL"))),
             transfer("open", "alice", "bob", 11, pending=True, timeout_seconds=3600),
             transfer("open-forever", "alice", "bob", 13, pending=True)]
    for command in steps:
        assert ledger.one(command).ok, command
    assert all(r.ok for r in ledger.batch(Batch((transfer("b1", "bank", "bob", 1),
                                                 transfer("b2", "bob", "bank", 1)), atomic=True)))
    return ledger


def test_a_store_with_every_kind_of_move_is_sound(busy: Harness) -> None:
    assert problems(busy.store) == []
    with busy.store.reader() as r:
        assert r.account("alice").seq == 13  # the hold that expired has its expiry entry
        assert currency_totals(r) == {"BRL": (10_234, 10_234, 24, 24), "USD": (9, 9, 0, 0)}


def test_the_auditor_imports_nothing_from_what_it_checks() -> None:
    """STYLE.md 16: no ledger, layout, hashing or record code; the store only for the Reader type."""
    tree = ast.parse(Path(audit.__file__).read_text())
    relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert relative == {"store"}
    guarded = [n for node in tree.body if isinstance(node, ast.If)
               and ast.unparse(node.test) == "TYPE_CHECKING" for n in node.body]
    assert any(isinstance(n, ast.ImportFrom) and n.module == "store" for n in guarded)


# ---- a bug planted in the apply helper --------------------------------------------------------------

def fold_sharing_the_helper(ledger_module: ModuleType, store: LedgerStore,
                            account_id: str) -> tuple[int, ...]:
    """How the auditor folded entries before it had its own lines: with ``ledger.apply_totals``."""
    with store.reader() as r:
        acct = r.account(account_id)
        page, _ = r.entries(account_id, limit=1000)
    row = AccountRow(acct.id, acct.num, 0, 0, acct.flags, acct.normal, acct.currency, 0, 0, 0, 0, b"", b"")
    for e in page:
        move = ledger_module.Move(acct.id, e.direction, e.amount, e.currency, e.status, e.released)
        ledger_module.apply_totals(row, move)
    return row.debits_posted, row.credits_posted, row.debits_pending, row.credits_pending


def stored_totals(store: LedgerStore, account_id: str) -> tuple[int, ...]:
    with store.reader() as r:
        a = r.account(account_id)
    return a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending


def some_business(ledger: Harness) -> None:
    for account_id, flags, normal in (("bank", 0, D), ("alice", LIMIT_DEBITS | HISTORY, CR), ("bob", 0, CR)):
        assert ledger.one(CreateAccount(account_id, "BRL", normal, flags)).ok
    for command in (transfer("fund", "bank", "alice", 10_000), transfer("pay", "alice", "bob", 100),
                    transfer("hold", "alice", "bob", 500, pending=True),
                    transfer("timed", "alice", "bob", 50, pending=True, timeout_seconds=60)):
        assert ledger.one(command).ok, command


def test_holds_booked_as_posted_by_a_planted_apply_totals_are_caught_by_the_auditor(
        ledger: Harness, planted: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """``apply_totals`` planted to book a hold as posted, on both sides. Every move still nets to zero
    and every seq grows by one, so the apply-path postconditions pass and the hold is stored: its
    entries say ``pending``, the rows (and the entries' balance_after) say posted.

    The auditor folds the entries with its own lines, so it sees rows that are not the fold of their
    entries, and pending totals that are not the open holds. The auditor this replaced folded the
    entries with ``ledger.apply_totals`` itself: the helper that wrote the rows repeated its bug in
    the check, and the fold agreed with the rows (the last assertion replays that fold).
    """
    real = planted.apply_totals

    def pending_as_posted(row: AccountRow, move: Any) -> None:
        if move.status == "pending":
            move = planted.Move(move.account_id, move.direction, move.amount, move.currency, "posted")
        real(row, move)

    monkeypatch.setattr(planted, "apply_totals", pending_as_posted)
    some_business(ledger)
    found = problems(ledger.store)
    for prefix in ("alice: totals", "bob: totals", "alice seq 3: balance_after",
                   "alice seq 3: history totals", "bob: pending totals"):
        assert any(p.startswith(prefix) for p in found), (prefix, found)
    for account_id in ("bank", "alice", "bob"):
        old_fold = fold_sharing_the_helper(planted, ledger.store, account_id)
        assert old_fold == stored_totals(ledger.store, account_id)


def test_an_extra_credit_the_postcondition_would_stop_is_also_caught_by_the_auditor(
        ledger: Harness, planted: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bug with the apply-path check removed: the auditor does not rely on it."""
    real = planted.apply_totals

    def one_more_credit(row: AccountRow, move: Any) -> None:
        real(row, move)
        row.credits_posted += 1

    monkeypatch.setattr(planted, "apply_totals", one_more_credit)
    monkeypatch.setattr(planted, "_check_moved", lambda *args: None)
    some_business(ledger)
    found = problems(ledger.store)
    for prefix in ("bank: totals", "alice: totals", "bob: totals", "BRL: debits"):
        assert any(p.startswith(prefix) for p in found), (prefix, found)
    for account_id in ("bank", "alice", "bob"):
        old_fold = fold_sharing_the_helper(planted, ledger.store, account_id)
        assert old_fold == stored_totals(ledger.store, account_id)


# ---- damage written straight into LMDB ----------------------------------------------------------

Change = Callable[[bytes | None], bytes | None]  # a stored value (None: absent) -> its new value


def edit(store: LedgerStore, db: str, key: bytes, change: Change) -> None:
    """Replace (or, when ``change`` returns None, delete) one stored value, bypassing the ledger."""
    handle = getattr(store.dbs, db)
    with store.env.begin(write=True) as txn:
        new = change(txn.get(key, db=handle))
        if new is None:
            txn.delete(key, db=handle)
        else:
            txn.put(key, new, db=handle)
    store._rows.clear()


def entry_of(store: LedgerStore, account_id: str, seq: int) -> bytes:
    with store.reader() as r:
        return layout.entry_key(r.account(account_id).num, seq)


def with_field(head: struct.Struct, index: int, value: Callable[[Any], Any]) -> Change:
    """A change of field ``index`` of the fixed-layout ``head`` of a stored record."""
    def change(raw: bytes | None) -> bytes:
        assert raw is not None
        fields = list(head.unpack(raw[:head.size]))
        fields[index] = value(fields[index])
        return head.pack(*fields) + raw[head.size:]
    return change


def with_account_field(index: int, value: Callable[[Any], Any]) -> Change:
    return with_field(layout.ACCOUNT, index, value)


def with_entry_field(index: int, value: Callable[[Any], Any]) -> Change:
    return with_field(layout.ENTRY, index, value)


def with_transaction_field(index: int, value: Callable[[Any], Any]) -> Change:
    def change(raw: bytes | None) -> bytes:
        record = msgpack.unpackb(raw)
        record[index] = value(record[index])
        return bytes(msgpack.packb(record))
    return change


def _first_amount_plus_one(entries: list[list[Any]]) -> list[list[Any]]:
    account_id, direction, amount, *rest = entries[0]
    return [[account_id, direction, amount + 1, *rest], *entries[1:]]


def _expiry_of(store: LedgerStore, txid: str) -> bytes:
    with store.reader() as r:
        tx = r.transaction(txid)
    assert tx.expires_at is not None
    return layout.expiry_key(tx.expires_at, txid)


DAMAGE: dict[str, tuple[Callable[[LedgerStore], None], list[str]]] = {
    "a credit added to a row": (
        lambda s: edit(s, "accounts", b"bob", with_account_field(9, lambda low: low + 1)),  # credits posted
        ["bob: totals", "BRL: debits"]),
    "a row's head": (
        lambda s: edit(s, "accounts", b"bob", with_account_field(14, lambda head: bytes(32))),
        ["bob: row's head is not the hash of its last entry"]),
    "a row's total beyond 2**127": (
        lambda s: edit(s, "accounts", b"bank", with_account_field(6, lambda high: high | 2**63)),
        ["bank: total beyond 2**127", "bank: totals", "BRL: debits"]),
    "a flag the totals break": (
        lambda s: edit(s, "accounts", b"bank", with_account_field(3, lambda flags: flags | LIMIT_DEBITS)),
        ["bank before seq 2: debits (posted and pending) exceed credits", "bank: debits (posted"]),
    "an entry's amount": (
        lambda s: edit(s, "entries", entry_of(s, "bob", 1), with_entry_field(1, lambda amount: amount + 1)),
        ["bob: hash chain breaks at seq 1", "bob: totals", "transaction pay: entry bob seq 1 differs"]),
    "an entry's time moved back": (
        lambda s: edit(s, "entries", entry_of(s, "bob", 3), with_entry_field(0, lambda ts: ts - 10**10)),
        ["bob seq 3: timestamp", "bob: hash chain breaks at seq 3"]),
    "an entry's hash": (
        lambda s: edit(s, "entries", entry_of(s, "bob", 2), with_entry_field(7, lambda h: bytes(32))),
        ["bob: hash chain breaks at seq 2", "bob: hash chain breaks at seq 3"]),
    "an entry taken from the middle": (
        lambda s: edit(s, "entries", entry_of(s, "alice", 3), lambda raw: None),
        ["alice: seq 4 follows 2", "transaction expires: no entry alice seq 3"]),
    "the last entry taken": (
        lambda s: edit(s, "entries", entry_of(s, "usd", 1), lambda raw: None),
        ["usd: row says seq 1, entries end at 0", "usd: totals", "transaction dollars: no entry usd seq 1"]),
    "an entry past the row's seq": (
        lambda s: edit(s, "entries", entry_of(s, "usd", 2), lambda raw: bytes(layout.ENTRY.size) + b"x"),
        ["usd: row says seq 1, entries end at 2", "usd: hash chain breaks at seq 2"]),
    "an entry of no account": (
        lambda s: edit(s, "entries", layout.entry_key(999, 1), lambda raw: bytes(layout.ENTRY.size)),
        ["entries: the table holds"]),
    "a hold's expiry taken": (
        lambda s: edit(s, "expiries", _expiry_of(s, "open"), lambda raw: None),
        ["hold open: has a deadline but no expiry"]),
    "an expiry of a posted transaction": (
        lambda s: edit(s, "expiries", layout.expiry_key(1, "pay"), lambda raw: b""),
        ["expiry of pay: not an open hold"]),
    "a hold marked posted without its entries": (
        lambda s: edit(s, "transactions", b"open-forever", with_transaction_field(1, lambda _: "posted")),
        ["alice: pending totals", "bob: pending totals"]),
    "a transaction record's amount": (
        lambda s: edit(s, "transactions", b"fund", with_transaction_field(11, _first_amount_plus_one)),
        ["transaction fund: entry bank seq 1 differs", "transaction fund: debits and credits differ by 1"]),
    "an event taken from the outbox": (
        lambda s: edit(s, "outbox", layout.U64.pack(3), lambda raw: None),
        ["outbox: 19 events from offset 1 to 20, not 1 to 20"]),
    "the shard's next account num": (
        lambda s: edit(s, "meta", layout.STATE_KEY, with_field(layout.STATE, 2, lambda num: 3)),
        ["shard state: next account num 3, yet 5 is taken"]),
    "an idempotency record taken": (
        lambda s: edit(s, "idempotency", b"split", lambda raw: None),
        ["transaction split: no idempotency record"]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_the_auditor_reports_damage(busy: Harness, damage: str) -> None:
    do, expected = DAMAGE[damage]
    do(busy.store)
    found = problems(busy.store)
    for prefix in expected:
        assert any(p.startswith(prefix) for p in found), (prefix, found)
