"""The apply path's postconditions: each one, given the bug it guards against, stops the apply
(InvariantViolation out of ``LedgerStore.apply_entry``) and leaves the store as it was.

Bugs are planted in an interpreted copy of ledger.py (``testing.interpreted``), which the store is
made to apply through; a compiled module's calls to its own functions would not see the patches.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from raftledger.statemachine import layout
from raftledger.statemachine.commands import (
    AccountFlag,
    CreateAccount,
    CreateTransaction,
    Direction,
    EntrySpec,
    ExpireHolds,
    PostPending,
)
from raftledger.statemachine.layout import AccountRow, InvariantViolation, unpack_account
from raftledger.statemachine.testing import Harness, transfer

D, CR = Direction.debit, Direction.credit


@pytest.fixture
def funded(ledger: Harness) -> Harness:
    """bank (debit normal) has lent 10_000 to alice (credit normal, may not overdraw); bob is empty."""
    limited = int(AccountFlag.debits_must_not_exceed_credits)
    for account_id, flags, normal in (("bank", 0, D), ("alice", limited, CR), ("bob", 0, CR)):
        assert ledger.one(CreateAccount(account_id, "BRL", normal, flags)).ok
    assert ledger.one(transfer("fund", "bank", "alice", 10_000)).ok
    return ledger


def stops_unchanged(ledger: Harness, apply: Callable[[], object], message: str) -> None:
    """``apply`` raises InvariantViolation naming ``message``; nothing of the store changed."""
    store = ledger.store
    with store.reader() as r:
        before = r.payload_digest()
    state = (store.fingerprint(), store.last_timestamp(), dict(store._rows))
    with pytest.raises(InvariantViolation, match=message):
        apply()
    with store.reader() as r:
        assert r.payload_digest() == before
    assert (store.fingerprint(), store.last_timestamp(), dict(store._rows)) == state


def test_the_interpreted_copy_applies_like_the_installed_build(funded: Harness, planted: ModuleType) -> None:
    assert funded.one(transfer("t", "alice", "bob", 5)).ok
    assert funded.store._rows["bob"].credits_posted == 5


def test_moves_that_do_not_net_to_zero_stop_the_apply(funded: Harness, planted: ModuleType,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = planted.apply_totals

    def one_more_credit(row: AccountRow, move: Any) -> None:
        real(row, move)
        row.credits_posted += 1

    monkeypatch.setattr(planted, "apply_totals", one_more_credit)
    stops_unchanged(funded, lambda: funded.one(transfer("t", "alice", "bob", 5)), "do not net to zero")


def test_pending_moves_that_do_not_net_to_zero_stop_the_apply(funded: Harness, planted: ModuleType,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert funded.one(transfer("hold", "alice", "bob", 50, pending=True)).ok
    real = planted.apply_totals

    def release_only_the_debit(row: AccountRow, move: Any) -> None:
        real(row, move)
        if move.direction is CR:
            row.credits_pending += move.released

    monkeypatch.setattr(planted, "apply_totals", release_only_the_debit)
    stops_unchanged(funded, lambda: funded.one(PostPending("post", "hold")), "do not net to zero")


def test_a_multi_currency_transaction_is_netted_per_currency(ledger: Harness, planted: ModuleType,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for account_id, currency in (("b1", "BRL"), ("b2", "BRL"), ("u1", "USD"), ("u2", "USD")):
        assert ledger.one(CreateAccount(account_id, currency)).ok
    fx = CreateTransaction("fx", (EntrySpec("b1", D, 5, "BRL"), EntrySpec("u1", CR, 5, "USD"),
                                  EntrySpec("u2", D, 5, "USD"), EntrySpec("b2", CR, 5, "BRL")))
    real = planted.apply_totals

    def brl_credit_lands_in_usd(row: AccountRow, move: Any) -> None:
        # The sum over all rows still nets to zero; each currency does not.
        real(row, move)
        if row.id == "b2":
            row.credits_posted -= move.amount
        if row.id == "u1":
            row.credits_posted += move.amount

    monkeypatch.setattr(planted, "apply_totals", brl_credit_lands_in_usd)
    stops_unchanged(ledger, lambda: ledger.one(fx), "do not net to zero: (BRL|USD)")


def test_a_request_timestamp_not_after_the_last_stops_the_apply(funded: Harness, planted: ModuleType,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planted, "_effective_timestamp", lambda proposed, last: proposed)  # trusts the leader
    funded.now_ns -= 10**9  # a new leader whose clock is behind
    stops_unchanged(funded, lambda: funded.one(transfer("t", "alice", "bob", 5)), "timestamp not after")


def test_a_request_from_a_clock_behind_still_applies_after_the_last(funded: Harness) -> None:
    last = funded.store.last_timestamp()
    funded.now_ns -= 10**9
    assert funded.one(transfer("t", "alice", "bob", 5)).ok
    assert funded.store.last_timestamp() == last + 1


def test_entries_stamped_with_another_time_than_their_request_stop_the_apply(
        funded: Harness, planted: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """An expiry that stamped its entries with the hold's own time would put them before entries
    the account received since."""
    assert funded.one(transfer("hold", "alice", "bob", 50, pending=True, timeout_seconds=1)).ok
    assert funded.one(transfer("later", "bank", "alice", 5)).ok
    real = planted.Applier._move

    def stamped_with_the_hold_time(self: Any, moves: Any, txid: str, ts: int, new_entries: bool) -> Any:
        return real(self, moves, txid, self._load_tx(txid).timestamp, new_entries)

    monkeypatch.setattr(planted.Applier, "_move", stamped_with_the_hold_time)
    funded.advance(2)
    stops_unchanged(funded, lambda: funded.one(ExpireHolds()), "stamped with another time")


def test_a_seq_that_skips_stops_the_apply(funded: Harness, planted: ModuleType,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = planted.Applier._chain_entry

    def skip_one(row: AccountRow, *args: Any) -> Any:
        row.seq += 1
        return real(row, *args)

    monkeypatch.setattr(planted.Applier, "_chain_entry", staticmethod(skip_one))
    stops_unchanged(funded, lambda: funded.one(transfer("t", "alice", "bob", 5)), "did not grow by one")


def test_a_stale_cached_row_cannot_overwrite_entries(funded: Harness) -> None:
    """The installed build: a row cache that missed an update (an old seq) would write the next
    entry over one that exists."""
    stale = funded.store._rows["alice"]
    assert funded.one(transfer("t1", "alice", "bob", 5)).ok
    funded.store._rows["alice"] = stale
    stops_unchanged(funded, lambda: funded.one(transfer("t2", "alice", "bob", 5)),
                    "an entry would overwrite another")


@pytest.mark.parametrize("total", [-1, 2**127, 2**128 - 1])
def test_a_row_with_a_total_out_of_range_is_not_packed(total: int) -> None:
    row = AccountRow("a", 1, 0, 0, 0, D, "BRL", 0, 0, 0, 0, b"\0" * 32, b"\x80")
    row.credits_pending = total
    with pytest.raises(InvariantViolation, match="out of range before writing: a"):
        row.pack()


def test_a_row_at_the_largest_total_packs_and_reads_back() -> None:
    row = AccountRow("a", 1, 0, 0, 0, D, "BRL", 2**127 - 1, 0, 0, 2**127 - 1, b"\0" * 32, b"\x80")
    assert unpack_account("a", row.pack()) == row


def _stored_with_debits_posted(ledger: Harness, account_id: str, value: int) -> None:
    """Write the account's row straight into LMDB with another debits_posted (16 bytes, two halves)."""
    store = ledger.store
    key, size = account_id.encode(), layout.ACCOUNT.size
    with store.env.begin(write=True) as txn:
        raw = txn.get(key, db=store.dbs.accounts)
        fields = list(layout.ACCOUNT.unpack(raw[:size]))
        fields[6], fields[7] = value >> 64, value & layout.M64
        txn.put(key, layout.ACCOUNT.pack(*fields) + raw[size:], db=store.dbs.accounts)
    store._rows.clear()


def test_a_stored_row_with_a_total_out_of_range_stops_the_apply_that_reads_it(funded: Harness) -> None:
    _stored_with_debits_posted(funded, "bob", 2**127)
    stops_unchanged(funded, lambda: funded.one(transfer("t", "bob", "alice", 5)),
                    "out of range as read: bob")
    with funded.store.reader() as r, pytest.raises(InvariantViolation):
        r.account("bob")
