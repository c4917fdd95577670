"""The ledger rules, one behaviour per test, against a real LMDB store."""

from __future__ import annotations

import pytest
from raftledger.statemachine import codec
from raftledger.statemachine import ledger as ledger_module
from raftledger.statemachine.audit import verify_store
from raftledger.statemachine.codec import encode_requests
from raftledger.statemachine.codes import ResultCode as C
from raftledger.statemachine.commands import (
    AccountFlag,
    Batch,
    CreateAccount,
    CreateTransaction,
    Direction,
    EntrySpec,
    ExpireHolds,
    PostPending,
    Request,
    ReverseTransaction,
    VoidPending,
)
from raftledger.statemachine.records import Result
from raftledger.statemachine.store import LedgerStore, QueryError
from raftledger.statemachine.testing import Harness, transfer

D, CR = Direction.debit, Direction.credit
LIMIT_DEBITS = int(AccountFlag.debits_must_not_exceed_credits)
LIMIT_CREDITS = int(AccountFlag.credits_must_not_exceed_debits)


def open_account(ledger: Harness, account_id: str, flags: int = 0, currency: str = "BRL",
            normal: Direction = D) -> None:
    assert ledger.one(CreateAccount(account_id, currency, normal, flags)).ok


def acct(ledger: Harness, account_id: str):  # type: ignore[no-untyped-def]
    with ledger.store.reader() as r:
        return r.account(account_id)


@pytest.fixture
def funded(ledger: Harness) -> Harness:
    """bank (debit normal, no limits) has lent 10_000 to alice (credit normal, may not overdraw)."""
    open_account(ledger, "bank")
    open_account(ledger, "alice", LIMIT_DEBITS, normal=CR)
    open_account(ledger, "bob", normal=CR)
    assert ledger.one(transfer("fund", "bank", "alice", 10_000)).ok
    return ledger


def test_create_account_starts_empty_with_genesis_head(ledger: Harness) -> None:
    result = ledger.one(CreateAccount("a:{u1}", "BRL", CR, 0, {"name": "A"}))
    assert result.ok and not result.replayed
    a = acct(ledger, "a:{u1}")
    assert (a.balance, a.available, a.seq, a.metadata) == (0, 0, 0, {"name": "A"})
    assert len(a.head) == 32


def test_identical_account_again_is_a_replay(ledger: Harness) -> None:
    ledger.one(CreateAccount("a", "BRL", CR, 0, {"x": 1, "y": 2}))
    again = ledger.one(CreateAccount("a", "BRL", CR, 0, {"y": 2, "x": 1}))
    assert again.ok and again.replayed


def test_account_with_same_id_and_other_fields_is_refused(ledger: Harness) -> None:
    ledger.one(CreateAccount("a", "BRL", CR))
    assert ledger.one(CreateAccount("a", "USD", CR)).code is C.exists_with_different_fields


@pytest.mark.parametrize(("command", "code"), [
    (CreateAccount("bad id!", "BRL"), C.invalid_id),
    (CreateAccount("two{a}{b}", "BRL"), C.invalid_id),
    (CreateAccount("a", "brl"), C.invalid_currency),
    (CreateAccount("a", "BRL", D, LIMIT_DEBITS | LIMIT_CREDITS), C.flags_conflict),
    (CreateAccount("a", "BRL", D, 1 << 10), C.invalid_command),
    (CreateAccount("a", "BRL", D, 0, {"rate": 1.5}), C.invalid_metadata),
    (CreateAccount("a", "BRL", D, 0, {"big": "x" * 5000}), C.invalid_metadata),
])
def test_malformed_accounts_are_rejected(ledger: Harness, command: CreateAccount, code: C) -> None:
    assert ledger.one(command).code is code
    assert acct(ledger, "a") is None


def test_transfer_moves_balances_on_both_normal_sides(funded: Harness) -> None:
    assert funded.one(transfer("t", "alice", "bob", 1_500)).ok
    assert acct(funded, "alice").balance == 8_500
    assert acct(funded, "bob").balance == 1_500
    assert acct(funded, "bank").balance == 10_000  # debit normal: debits - credits


def test_transaction_records_seq_and_hash_per_entry(funded: Harness) -> None:
    tx = funded.one(transfer("t", "alice", "bob", 1)).record
    assert [(e.account_id, e.seq) for e in tx.entries] == [("alice", 2), ("bob", 1)]
    with funded.store.reader() as r:
        page, _ = r.entries("alice", after_seq=1)
    assert page[0].hash == tx.entries[0].hash


@pytest.mark.parametrize(("command", "code"), [
    (transfer("t", "alice", "ghost", 1), C.account_not_found),
    (transfer("t", "alice", "bob", 1, "USD"), C.currency_mismatch),
    (transfer("t", "alice", "bob", 10_001), C.exceeds_credits),
    (CreateTransaction("t", (EntrySpec("alice", D, 5, "BRL"), EntrySpec("bob", CR, 4, "BRL"))),
     C.unbalanced),
    (CreateTransaction("t", (EntrySpec("alice", D, 5, "BRL"),)), C.too_few_entries),
    (CreateTransaction("t", tuple(EntrySpec("bob", CR if i % 2 else D, 1, "BRL") for i in range(130))),
     C.too_many_entries),
    (transfer("t", "alice", "bob", 0), C.invalid_amount),
    (transfer("t", "alice", "bob", -5), C.invalid_amount),
    (transfer("t", "alice", "bob", 2**63), C.invalid_amount),
    (transfer("t", "alice", "bob", 5, "brl"), C.invalid_currency),
    (transfer("bad id", "alice", "bob", 5), C.invalid_id),
    (transfer("t", "alice", "bob", 5, timeout_seconds=10), C.invalid_timeout),
    (transfer("t", "alice", "bob", 5, pending=True, timeout_seconds=-1), C.invalid_timeout),
    (transfer("t", "alice", "bob", 5, code="no spaces"), C.invalid_command),
    (transfer("t", "alice", "alice", 5), C.accounts_must_be_different),
])
def test_rejected_transactions_change_nothing(funded: Harness, command: CreateTransaction,
                                              code: C) -> None:
    before = [acct(funded, a) for a in ("alice", "bob", "bank")]
    assert funded.one(command).code is code
    assert [acct(funded, a) for a in ("alice", "bob", "bank")] == before
    with funded.store.reader() as r:
        assert verify_store(r) == []


def test_credits_must_not_exceed_debits_is_enforced(ledger: Harness) -> None:
    open_account(ledger, "src")
    open_account(ledger, "capped", LIMIT_CREDITS)
    assert ledger.one(transfer("t", "src", "capped", 1)).code is C.exceeds_debits


def test_closed_account_takes_no_entries(ledger: Harness) -> None:
    open_account(ledger, "src")
    open_account(ledger, "gone", int(AccountFlag.closed))
    assert ledger.one(transfer("t", "src", "gone", 1)).code is C.account_closed


def test_balance_beyond_the_limit_is_overflow(ledger: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # 2**127 takes 2**57 maximal transactions to reach; the same check is exercised at 2**66.
    monkeypatch.setattr(ledger_module, "balance_limit", 2**66)
    open_account(ledger, "a")
    open_account(ledger, "b")
    big = 2**63 - 1
    entries = tuple(EntrySpec("a", D, big, "BRL") for _ in range(4)) + tuple(
        EntrySpec("b", CR, big, "BRL") for _ in range(4))
    for i in range(2):
        assert ledger.one(CreateTransaction(f"t{i}", entries)).ok
    assert ledger.one(CreateTransaction("last", entries)).code is C.overflow
    assert acct(ledger, "a").debits_posted == 8 * big


def test_the_balance_limit_is_2_to_the_127(ledger: Harness) -> None:
    assert ledger_module.balance_limit == 2**127


def test_multi_currency_transaction_balances_per_currency(ledger: Harness) -> None:
    for a, cur in (("brl1", "BRL"), ("brl2", "BRL"), ("usd1", "USD"), ("usd2", "USD")):
        open_account(ledger, a, currency=cur)
    tx = CreateTransaction("fx", (EntrySpec("brl1", D, 500, "BRL"), EntrySpec("usd1", CR, 100, "USD"),
                                  EntrySpec("brl2", CR, 500, "BRL"), EntrySpec("usd2", D, 100, "USD")))
    assert ledger.one(tx).ok


def test_same_account_twice_in_one_transaction_gets_two_entries(funded: Harness) -> None:
    tx = CreateTransaction("split", (EntrySpec("alice", D, 30, "BRL"), EntrySpec("alice", D, 70, "BRL"),
                                     EntrySpec("bob", CR, 100, "BRL")))
    assert funded.one(tx).ok
    assert acct(funded, "alice").seq == 3


@pytest.mark.parametrize(("entries", "field"), [
    ((EntrySpec("alice", D, 5, "BRL"), EntrySpec("alice", CR, 5, "BRL")), "entries[1].account_id"),
    ((EntrySpec("alice", D, 5, "BRL"), EntrySpec("bob", CR, 3, "BRL"), EntrySpec("alice", CR, 2, "BRL")),
     "entries[2].account_id"),
])
def test_account_on_both_sides_is_refused_and_not_stored_under_the_id(
        funded: Harness, entries: tuple[EntrySpec, ...], field: str) -> None:
    before = [acct(funded, a) for a in ("alice", "bob")]
    refused = funded.one(CreateTransaction("t", entries))
    assert refused.code is C.accounts_must_be_different
    assert dict(refused.details) == {"account_id": "alice", "field": field}
    assert [acct(funded, a) for a in ("alice", "bob")] == before
    with funded.store.reader() as r:
        assert r.transaction("t") is None
    assert funded.one(transfer("t", "alice", "bob", 5)).ok  # the id was never taken


def test_accounts_repeated_on_one_side_only_are_accepted(funded: Harness) -> None:
    tx = CreateTransaction("t", (EntrySpec("alice", D, 3, "BRL"), EntrySpec("bob", CR, 4, "BRL"),
                                 EntrySpec("alice", D, 2, "BRL"), EntrySpec("bob", CR, 1, "BRL")))
    assert funded.one(tx).ok
    assert (acct(funded, "alice").balance, acct(funded, "bob").balance) == (9_995, 5)


def test_an_entry_applies_under_the_rules_of_the_version_it_was_written_with(funded: Harness) -> None:
    """A self-transfer accepted before the rule existed (a version-1 entry) is applied again the same
    way by a replica that replays or catches up on that log; a version-2 entry refuses it."""
    old = bytes([1]) + encode_requests([Request(funded.now_ns + 1, transfer("old", "alice", "alice", 5))])[1:]
    funded.index += 1
    [accepted] = funded.store.apply_entry(funded.index, old) or []
    assert isinstance(accepted, Result) and accepted.ok
    assert funded.one(transfer("new", "alice", "alice", 5)).code is C.accounts_must_be_different


def test_an_entry_of_an_unknown_rules_version_stops_the_replica_unapplied(funded: Harness) -> None:
    before = funded.store.fingerprint()
    newer = bytes([codec.VERSION + 1]) + encode_requests([Request(1, transfer("t", "alice", "bob", 5))])[1:]
    with pytest.raises(codec.UnknownVersion):
        funded.store.apply_entry(funded.index + 1, newer)
    assert funded.store.fingerprint() == before


def test_retry_of_successful_transaction_returns_first_outcome(funded: Harness) -> None:
    first = funded.one(transfer("t", "alice", "bob", 5))
    again = funded.one(transfer("t", "alice", "bob", 5))
    assert again.ok and again.replayed and again.record == first.record
    assert acct(funded, "bob").balance == 5


def test_retry_of_rejected_transaction_returns_same_rejection(funded: Harness) -> None:
    assert funded.one(transfer("t", "alice", "carol", 5)).code is C.account_not_found
    open_account(funded, "carol")
    again = funded.one(transfer("t", "alice", "carol", 5))
    assert again.code is C.account_not_found and again.replayed
    with funded.store.reader() as r:
        assert r.transaction("t").code is C.account_not_found


def test_same_id_with_other_payload_is_idempotency_key_reused(funded: Harness) -> None:
    funded.one(transfer("t", "alice", "bob", 5))
    assert funded.one(transfer("t", "alice", "bob", 6)).code is C.idempotency_key_reused
    assert acct(funded, "bob").balance == 5


def test_metadata_key_order_does_not_change_the_payload(funded: Harness) -> None:
    funded.one(transfer("t", "alice", "bob", 5, metadata={"a": 1, "b": {"c": 2, "d": 3}}))
    again = funded.one(transfer("t", "alice", "bob", 5, metadata={"b": {"d": 3, "c": 2}, "a": 1}))
    assert again.ok and again.replayed


def test_hold_counts_as_pending_and_reduces_available(funded: Harness) -> None:
    assert funded.one(transfer("h", "alice", "bob", 4_000, pending=True)).ok
    a = acct(funded, "alice")
    assert (a.balance, a.available, a.debits_pending) == (10_000, 6_000, 4_000)
    assert funded.one(transfer("t", "alice", "bob", 6_001)).code is C.exceeds_credits


def test_post_in_full_moves_the_hold_to_posted(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 4_000, pending=True))
    post = funded.one(PostPending("h:post", "h"))
    assert post.ok and post.record.pending_id == "h"
    a = acct(funded, "alice")
    assert (a.balance, a.available, a.debits_pending) == (6_000, 6_000, 0)
    with funded.store.reader() as r:
        hold = r.transaction("h")
    assert (hold.status, hold.resolved_by) == ("posted", "h:post")


def test_partial_post_releases_the_remainder(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 4_000, pending=True))
    assert funded.one(PostPending("h:post", "h", 1_000)).ok
    a, b = acct(funded, "alice"), acct(funded, "bob")
    assert (a.balance, a.debits_pending, b.balance, b.credits_pending) == (9_000, 0, 1_000, 0)


def test_partial_post_above_the_hold_is_refused(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 4_000, pending=True))
    assert funded.one(PostPending("p", "h", 4_001)).code is C.amount_exceeds_pending


def test_partial_post_needs_uniform_entry_amounts(funded: Harness) -> None:
    open_account(funded, "carol", normal=CR)
    hold = CreateTransaction("h", (EntrySpec("alice", D, 30, "BRL"), EntrySpec("bob", CR, 10, "BRL"),
                                   EntrySpec("carol", CR, 20, "BRL")), pending=True)
    assert funded.one(hold).ok
    assert funded.one(PostPending("p", "h", 5)).code is C.partial_amount_not_allowed


def test_void_releases_the_hold(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 4_000, pending=True))
    assert funded.one(VoidPending("h:void", "h")).ok
    a = acct(funded, "alice")
    assert (a.balance, a.available, a.seq) == (10_000, 10_000, 3)


@pytest.mark.parametrize(("first", "second", "code"), [
    (PostPending("p1", "h"), PostPending("p2", "h"), C.pending_already_posted),
    (VoidPending("v1", "h"), PostPending("p2", "h"), C.pending_already_voided),
    (PostPending("p1", "h"), VoidPending("v2", "h"), C.pending_already_posted),
])
def test_a_hold_resolves_once(funded: Harness, first: PostPending, second: PostPending,
                              code: C) -> None:
    funded.one(transfer("h", "alice", "bob", 10, pending=True))
    assert funded.one(first).ok
    assert funded.one(second).code is code


def test_post_of_unknown_or_non_pending_transaction_is_refused(funded: Harness) -> None:
    assert funded.one(PostPending("p", "nope")).code is C.pending_not_found
    assert funded.one(VoidPending("v", "fund")).code is C.transaction_not_pending


def test_hold_expires_when_a_later_command_passes_its_deadline(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 4_000, pending=True, timeout_seconds=30))
    funded.advance(29)
    funded.one(CreateAccount("x", "BRL"))
    assert acct(funded, "alice").debits_pending == 4_000
    funded.advance(2)
    assert funded.one(PostPending("p", "h")).code is C.pending_expired
    a = acct(funded, "alice")
    assert (a.available, a.debits_pending, a.seq) == (10_000, 0, 3)
    with funded.store.reader() as r:
        assert r.transaction("h").status == "expired"
        assert r.events(0, 100)[-1].type == "transaction.expired"
        assert verify_store(r) == []


def test_posted_hold_never_expires(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 10, pending=True, timeout_seconds=1))
    funded.one(PostPending("p", "h"))
    funded.advance(5)
    funded.one(CreateAccount("x", "BRL"))
    with funded.store.reader() as r:
        assert r.transaction("h").status == "posted"


def test_reversal_mirrors_every_entry(funded: Harness) -> None:
    funded.one(transfer("t", "alice", "bob", 700))
    rev = funded.one(ReverseTransaction("t:reverse", "t"))
    assert rev.ok and rev.record.reverses == "t"
    assert [e.direction for e in rev.record.entries] == [CR, D]
    assert (acct(funded, "alice").balance, acct(funded, "bob").balance) == (10_000, 0)
    with funded.store.reader() as r:
        assert r.transaction("t").reversed_by == "t:reverse"


def test_second_reversal_is_already_reversed(funded: Harness) -> None:
    funded.one(transfer("t", "alice", "bob", 700))
    funded.one(ReverseTransaction("r1", "t"))
    assert funded.one(ReverseTransaction("r2", "t")).code is C.already_reversed


def test_only_posted_transactions_can_be_reversed(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 5, pending=True))
    assert funded.one(ReverseTransaction("r", "h")).code is C.transaction_not_posted
    assert funded.one(ReverseTransaction("r2", "nope")).code is C.transaction_not_found


def test_reversal_respects_account_limits(funded: Harness) -> None:
    funded.one(transfer("t", "bob", "alice", 50))  # bob (no limits) goes negative
    funded.one(transfer("drain", "alice", "bank", 10_050))
    assert funded.one(ReverseTransaction("r", "t")).code is C.exceeds_credits


def test_atomic_batch_applies_all_or_nothing(funded: Harness) -> None:
    batch = Batch((transfer("a1", "alice", "bob", 5), transfer("a2", "alice", "ghost", 5),
                   transfer("a3", "alice", "bob", 5)), atomic=True)
    results = funded.batch(batch)
    assert [r.code for r in results] == [C.linked_event_failed, C.account_not_found,
                                         C.linked_event_failed]
    assert acct(funded, "bob").balance == 0
    with funded.store.reader() as r:
        assert r.transaction("a1") is None and r.transaction("a2") is None
    fixed = Batch((transfer("a1", "alice", "bob", 5), transfer("a3", "alice", "bob", 5)), atomic=True)
    assert all(r.ok for r in funded.batch(fixed))
    assert acct(funded, "bob").balance == 10


def test_commands_around_atomic_batches_in_one_entry_all_land(funded: Harness) -> None:
    """An atomic batch writes through recording cursors; the commands after it in the same entry write
    through the plain ones again, whether the batch was kept or taken back."""
    failing = Batch((transfer("f1", "alice", "bob", 1), transfer("f2", "alice", "ghost", 1)), atomic=True)
    passing = Batch((transfer("p1", "alice", "bob", 2), transfer("p2", "alice", "bob", 3)), atomic=True)
    outcomes = funded.apply(transfer("before", "alice", "bob", 10), failing,
                            transfer("between", "alice", "bob", 20), passing,
                            transfer("after", "alice", "bob", 40))
    assert [o.code for o in outcomes if not isinstance(o, list)] == [C.ok, C.ok, C.ok]
    assert [r.code for r in outcomes[1]] == [C.linked_event_failed, C.account_not_found]
    assert all(r.ok for r in outcomes[3])
    assert acct(funded, "bob").balance == 10 + 20 + 2 + 3 + 40
    assert acct(funded, "bob").seq == 5
    with funded.store.reader() as r:
        assert r.transaction("f1") is None
        assert all(r.transaction(t) is not None for t in ("before", "between", "p1", "p2", "after"))
        assert verify_store(r) == []


def _tables(ledger: Harness) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every record of every sub-database but the shard state."""
    with ledger.store.env.begin() as txn:
        return {name: list(txn.cursor(db=db)) for name, db in ledger.store.dbs._asdict().items()
                if name != "meta"}


def test_a_dropped_atomic_batch_leaves_every_table_as_it_was(funded: Harness) -> None:
    """Each kind of write a batch can make (a new account, entries, a held transfer and its deadline,
    a post that drops a deadline and rewrites a hold, a reversal, idempotency records, events) is
    taken back when its last command fails."""
    funded.one(transfer("hold", "alice", "bob", 30, pending=True, timeout_seconds=60))
    funded.one(transfer("paid", "alice", "bob", 20))
    before = _tables(funded)
    failing = Batch((CreateAccount("carol", "BRL", CR), transfer("c1", "alice", "carol", 5),
                     transfer("h2", "alice", "carol", 5, pending=True, timeout_seconds=60),
                     PostPending("post", "hold"), ReverseTransaction("undo", "paid"),
                     transfer("c2", "carol", "bob", 1), transfer("bad", "alice", "ghost", 1)),
                    atomic=True)
    results = funded.batch(failing)
    assert results[-1].code is C.account_not_found
    assert {r.code for r in results[:-1]} == {C.linked_event_failed}
    assert _tables(funded) == before
    assert funded.one(PostPending("post", "hold")).ok  # the hold is still pending, its deadline kept
    with funded.store.reader() as r:
        assert verify_store(r) == []


def test_rows_touched_by_a_dropped_batch_or_a_rejected_command_stay_as_committed(
        funded: Harness) -> None:
    """The store keeps decoded account rows between entries; what a dropped atomic batch or a
    rejected command did to them in memory must not reach a later entry."""
    failing = Batch((transfer("f1", "alice", "bob", 1), transfer("f2", "alice", "ghost", 1)), atomic=True)
    outcomes = funded.apply(failing, transfer("over", "alice", "bob", 1_000_000))
    assert outcomes[1].code == C.exceeds_credits
    assert funded.one(transfer("next", "alice", "bob", 7)).ok
    assert (acct(funded, "bob").balance, acct(funded, "bob").seq) == (7, 1)
    assert (acct(funded, "alice").balance, acct(funded, "alice").seq) == (10_000 - 7, 2)
    with funded.store.reader() as r:
        assert verify_store(r) == []


def test_an_account_in_many_transfers_of_one_entry_is_stored_once_with_all_of_them(
        funded: Harness) -> None:
    """Rows are written to the accounts table after the entry's last request, not per transfer."""
    outcomes = funded.apply(*(transfer(f"hot{i}", "alice", "bob", i + 1) for i in range(40)),
                            CreateAccount("late", "BRL", CR), transfer("to-late", "bob", "late", 5))
    assert all(isinstance(o, Result) and o.ok for o in outcomes)
    bob = acct(funded, "bob")
    assert (bob.balance, bob.seq) == (sum(range(1, 41)) - 5, 41)
    assert (acct(funded, "late").balance, acct(funded, "late").seq) == (5, 1)
    with funded.store.reader() as r:
        assert verify_store(r) == []


def test_atomic_batch_sees_its_own_earlier_commands(ledger: Harness) -> None:
    batch = Batch((CreateAccount("x", "BRL"), CreateAccount("y", "BRL"), transfer("t", "x", "y", 3)),
                  atomic=True)
    assert all(r.ok for r in ledger.batch(batch))


def test_independent_batch_applies_each_on_its_own(funded: Harness) -> None:
    batch = Batch((transfer("b1", "alice", "bob", 5), transfer("b2", "alice", "ghost", 5)))
    assert [r.code for r in funded.batch(batch)] == [C.ok, C.account_not_found]
    assert acct(funded, "bob").balance == 5


def test_entry_at_or_below_applied_index_is_skipped(funded: Harness) -> None:
    index, payload = funded.log[-1]
    before = funded.store.fingerprint()
    assert funded.store.apply_entry(index, payload) is None
    assert funded.store.fingerprint() == before
    assert acct(funded, "alice").balance == 10_000


def test_undecodable_entry_advances_index_without_changes(funded: Harness) -> None:
    before = acct(funded, "alice")
    assert funded.store.apply_entry(funded.index + 1, b"\x01\xc1garbage") == []
    assert funded.store.applied_index() == funded.index + 1
    assert acct(funded, "alice") == before


def test_timestamps_never_go_backwards(funded: Harness) -> None:
    funded.now_ns -= 10**12  # a new leader with a clock behind the old one
    tx = funded.one(transfer("t", "alice", "bob", 1)).record
    with funded.store.reader() as r:
        assert tx.timestamp > r.transaction("fund").timestamp


def test_outbox_offsets_are_dense_and_typed(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 5, pending=True))
    funded.one(VoidPending("v", "h"))
    funded.one(transfer("t", "alice", "bob", 5))
    funded.one(ReverseTransaction("r", "t"))
    with funded.store.reader() as r:
        events = r.events(0, 100)
        assert [e.offset for e in events] == list(range(1, len(events) + 1))
        assert [e.type for e in events][-4:] == ["transaction.pending", "transaction.voided",
                                                "transaction.posted", "transaction.reversed"]
        assert [e.offset for e in r.events(3, 2)] == [4, 5]


def test_statement_pages_in_both_orders(funded: Harness) -> None:
    for i in range(5):
        funded.one(transfer(f"t{i}", "alice", "bob", 1))
    with funded.store.reader() as r:
        page, nxt = r.entries("alice", limit=4)
        assert [e.seq for e in page] == [1, 2, 3, 4] and nxt == 4
        page, nxt = r.entries("alice", after_seq=nxt, limit=4)
        assert [e.seq for e in page] == [5, 6] and nxt is None
        page, nxt = r.entries("alice", order="desc", limit=4)
        assert [e.seq for e in page] == [6, 5, 4, 3] and nxt == 3
        page, nxt = r.entries("alice", order="desc", before_seq=nxt, limit=4)
        assert [e.seq for e in page] == [2, 1] and nxt is None
        assert [e.balance_after for e in r.entries("alice")[0]] == [10_000, 9_999, 9_998, 9_997,
                                                                   9_996, 9_995]


def test_statement_by_time_range(funded: Harness) -> None:
    stamps = []
    for i in range(4):
        funded.advance(10)
        stamps.append(funded.one(transfer(f"t{i}", "alice", "bob", 1)).record.timestamp)
    with funded.store.reader() as r:
        page, _ = r.entries("alice", from_ns=stamps[1], to_ns=stamps[2])
        assert [e.transaction_id for e in page] == ["t1", "t2"]
        page, _ = r.entries("alice", from_ns=stamps[1], order="desc", limit=1)
        assert [e.transaction_id for e in page] == ["t3"]


def test_point_in_time_balance_needs_history(ledger: Harness) -> None:
    open_account(ledger, "src")
    open_account(ledger, "hist", int(AccountFlag.history), normal=CR)
    stamps = [ledger.one(transfer(f"t{i}", "src", "hist", 100)).record.timestamp for i in range(3)]
    with ledger.store.reader() as r:
        assert r.balance("hist", at_seq=2).to_json()["balance"] == 200
        assert r.balance("hist", at_ns=stamps[0]).to_json()["balance"] == 100
        assert r.balance("hist", at_ns=stamps[0] - 1).to_json()["balance"] == 0
        assert r.balance("hist").to_json()["balance"] == 300
        with pytest.raises(QueryError) as err:
            r.balance("src", at_seq=1)
        assert err.value.code == "history_not_enabled"


def test_balance_of_unknown_account_is_account_not_found(ledger: Harness) -> None:
    with ledger.store.reader() as r, pytest.raises(QueryError) as err:
        r.balance("ghost")
    assert err.value.code == "account_not_found"


def test_same_log_gives_same_fingerprint_and_bytes(funded: Harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from raftledger.statemachine.store import LedgerStore

    funded.one(transfer("h", "alice", "bob", 5, pending=True, timeout_seconds=1))
    funded.advance(2)
    funded.one(transfer("t", "alice", "bob", 5))
    replica = LedgerStore(str(tmp_path / "replica.lmdb"), map_size=2**30)
    for index, payload in funded.log:
        replica.apply_entry(index, payload)
    assert replica.fingerprint() == funded.store.fingerprint()
    with replica.reader() as a, funded.store.reader() as b:
        assert a.payload_digest() == b.payload_digest()
    replica.close()


def test_store_grows_its_map_instead_of_failing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from raftledger.statemachine.store import LedgerStore

    small = LedgerStore(str(tmp_path / "small.lmdb"), map_size=256 * 1024)
    ledger = Harness(small)
    open_account(ledger, "a")
    open_account(ledger, "b")
    for i in range(300):
        assert ledger.one(transfer(f"t{i}", "a", "b", 1, metadata={"pad": "x" * 1000})).ok
    assert small.env.info()["map_size"] > 256 * 1024
    small.close()


def test_store_grows_its_map_when_an_atomic_batch_fills_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The full map must reach the store's retry: taking the batch back first would fail on LMDB's
    failed transaction and hide it."""
    from raftledger.statemachine.store import LedgerStore

    small = LedgerStore(str(tmp_path / "small.lmdb"), map_size=256 * 1024)
    ledger = Harness(small)
    open_account(ledger, "a")
    open_account(ledger, "b")
    big = Batch(tuple(transfer(f"t{i}", "a", "b", 1, metadata={"pad": "x" * 1000})
                      for i in range(300)), atomic=True)
    assert all(r.ok for r in ledger.batch(big))
    assert small.env.info()["map_size"] > 256 * 1024
    assert (acct(ledger, "b").credits_posted, acct(ledger, "b").seq) == (300, 300)
    small.close()


def test_retry_of_a_void_returns_the_void_as_created(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 5, pending=True))
    first = funded.one(VoidPending("v", "h"))
    again = funded.one(VoidPending("v", "h"))
    assert again.replayed and again.record == first.record and again.record.status == "voided"


def test_retry_of_a_hold_after_it_was_posted_returns_it_as_created(funded: Harness) -> None:
    first = funded.one(transfer("h", "alice", "bob", 5, pending=True))
    funded.one(PostPending("p", "h"))
    again = funded.one(transfer("h", "alice", "bob", 5, pending=True))
    assert again.replayed and again.record == first.record and again.record.status == "pending"


def test_holds_still_expire_after_the_store_is_reopened(funded: Harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from raftledger.statemachine.store import LedgerStore

    funded.one(transfer("h", "alice", "bob", 4_000, pending=True, timeout_seconds=30))
    path = funded.store.path
    funded.store.close()
    reopened = LedgerStore(path, map_size=2**30)
    again = Harness(reopened, start_ns=funded.now_ns)
    again.index = funded.index
    again.advance(31)
    again.one(CreateAccount("x", "BRL"))
    with reopened.reader() as r:
        assert r.transaction("h").status == "expired"
        assert r.account("alice").debits_pending == 0
    reopened.close()



# ---- expiry on an idle shard: ExpireHolds carries only a timestamp -----------------------------------


def test_expire_holds_after_the_deadline_expires_the_hold(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 4_000, pending=True, timeout_seconds=30))
    before = _tables(funded)
    funded.advance(31)
    result = funded.one(ExpireHolds())
    assert (result.code, result.id, result.record, result.replayed) == (C.ok, "", None, False)
    a, b = acct(funded, "alice"), acct(funded, "bob")
    assert (a.available, a.debits_pending, b.credits_pending) == (10_000, 0, 0)
    after = _tables(funded)
    assert after["idempotency"] == before["idempotency"] and after["expiries"] == []
    with funded.store.reader() as r:
        assert r.transaction("h").status == "expired"
        new_events = r.events(len(before["outbox"]), 1000)
        assert [(e.type, e.data["id"]) for e in new_events] == [("transaction.expired", "h")]
        assert verify_store(r) == []


def test_expire_holds_before_the_deadline_changes_only_the_timestamp(funded: Harness) -> None:
    funded.one(transfer("h", "alice", "bob", 4_000, pending=True, timeout_seconds=30))
    funded.advance(29)
    tables, stamp = _tables(funded), funded.store.last_timestamp()
    assert funded.one(ExpireHolds()).ok
    assert _tables(funded) == tables
    assert funded.store.last_timestamp() == funded.now_ns > stamp
    with funded.store.reader() as r:
        assert r.transaction("h").status == "pending"


def test_expire_holds_applied_on_two_fresh_stores_gives_the_same_fingerprint(
        funded: Harness, tmp_path) -> None:  # type: ignore[no-untyped-def]
    funded.one(transfer("h1", "alice", "bob", 5, pending=True, timeout_seconds=1))
    funded.one(transfer("h2", "alice", "bob", 7, pending=True, timeout_seconds=60))
    funded.apply(ExpireHolds())
    funded.advance(2)
    funded.apply(ExpireHolds(), transfer("t", "alice", "bob", 1), ExpireHolds())
    replicas = [LedgerStore(str(tmp_path / f"replica{i}.lmdb"), map_size=2**30) for i in range(2)]
    for replica in replicas:
        for index, payload in funded.log:
            replica.apply_entry(index, payload)
    try:
        assert replicas[0].fingerprint() == replicas[1].fingerprint() == funded.store.fingerprint()
        with replicas[0].reader() as a, replicas[1].reader() as b:
            assert a.payload_digest() == b.payload_digest()
            assert a.transaction("h1").status == "expired" and a.transaction("h2").status == "pending"
    finally:
        for replica in replicas:
            replica.close()


def test_earliest_hold_deadline_is_the_next_hold_to_expire(funded: Harness) -> None:
    def earliest() -> int | None:
        with funded.store.reader() as r:
            return r.earliest_hold_deadline()

    assert earliest() is None
    funded.one(transfer("forever", "alice", "bob", 1, pending=True))  # no timeout: no deadline
    late = funded.one(transfer("late", "alice", "bob", 1, pending=True, timeout_seconds=20)).record
    soon = funded.one(transfer("soon", "alice", "bob", 1, pending=True, timeout_seconds=10)).record
    assert earliest() == soon.expires_at == soon.timestamp + 10 * 10**9
    funded.now_ns = soon.expires_at - 1000  # the next request is timestamped at the deadline itself
    funded.one(ExpireHolds())
    assert earliest() == late.expires_at
    funded.one(PostPending("p", "late"))
    assert earliest() is None
