"""The change feed in the state machine: what events carry, durable consumer offsets and compaction,
against a real LMDB store (the HTTP side is in test_feed_http.py, real clusters in test_feed_cluster.py)."""

from __future__ import annotations

from typing import Any

from raftledger.statemachine import codec
from raftledger.statemachine.audit import verify_store
from raftledger.statemachine.codec import encode_requests
from raftledger.statemachine.codes import ResultCode as C
from raftledger.statemachine.commands import (
    Batch,
    CompactFeed,
    CreateAccount,
    Direction,
    PostPending,
    Request,
    SetFeedOffset,
)
from raftledger.statemachine.records import Result
from raftledger.statemachine.testing import Harness, transfer

NS = 1_000_000_000


def events(ledger: Harness, after: int = 0) -> list[dict[str, Any]]:
    with ledger.store.reader() as r:
        return [e.to_json(0) for e in r.events(after, 10_000)]


def balances(event: dict[str, Any]) -> dict[str, tuple[int, int, int, int, int]]:
    return {b["account_id"]: (b["debits_posted"], b["credits_posted"], b["debits_pending"],
                              b["credits_pending"], b["balance"]) for b in event["data"]["balances"]}


def bounds(ledger: Harness) -> tuple[int, int]:
    with ledger.store.reader() as r:
        return r.feed_bounds()


def opened(ledger: Harness) -> Harness:
    for account_id, normal in (("bank", Direction.debit), ("alice", Direction.credit),
                               ("bob", Direction.credit)):
        assert ledger.one(CreateAccount(account_id, "BRL", normal)).ok
    return ledger


def test_transaction_event_carries_each_accounts_balances_right_after_it(ledger: Harness) -> None:
    opened(ledger)
    assert ledger.one(transfer("t1", "bank", "alice", 100)).ok
    assert ledger.one(transfer("t2", "bank", "alice", 50)).ok
    first, second = events(ledger)[3:]
    assert first["data"]["id"] == "t1" and second["data"]["id"] == "t2"
    # not the current balances: those of the moment each event happened
    assert balances(first) == {"bank": (100, 0, 0, 0, 100), "alice": (0, 100, 0, 0, 100)}
    assert balances(second) == {"bank": (150, 0, 0, 0, 150), "alice": (0, 150, 0, 0, 150)}
    assert [b["seq"] for b in second["data"]["balances"]] == [2, 2]


def test_events_of_one_entry_each_see_the_balances_of_their_own_moment(ledger: Harness) -> None:
    opened(ledger)
    ledger.apply(transfer("t1", "bank", "alice", 10), transfer("t2", "bank", "alice", 20),
                 Batch((transfer("t3", "alice", "bob", 5),), atomic=True))
    t1, t2, t3 = events(ledger)[3:]
    assert balances(t1)["alice"][4] == 10 and balances(t2)["alice"][4] == 30
    assert balances(t3) == {"alice": (5, 30, 0, 0, 25), "bob": (0, 5, 0, 0, 5)}


def test_hold_post_and_expiry_events_carry_pending_and_posted_balances(ledger: Harness) -> None:
    opened(ledger)
    assert ledger.one(transfer("h1", "bank", "alice", 70, pending=True)).ok
    assert ledger.one(PostPending("h1:post", "h1", 30)).ok
    assert ledger.one(transfer("h2", "bank", "bob", 9, pending=True, timeout_seconds=1)).ok
    ledger.advance(2)
    assert ledger.one(transfer("t", "bank", "alice", 1)).ok  # its request expires h2 first
    by_type = {(e["type"], e["data"]["id"]): e for e in events(ledger)}
    assert balances(by_type["transaction.pending", "h1"])["alice"] == (0, 0, 0, 70, 0)
    assert balances(by_type["transaction.posted", "h1:post"])["alice"] == (0, 30, 0, 0, 30)
    expired = by_type["transaction.expired", "h2"]
    assert balances(expired)["bob"] == (0, 0, 0, 0, 0)
    assert expired["timestamp"] > by_type["transaction.pending", "h2"]["timestamp"]


def test_a_failed_atomic_batch_leaves_no_event_and_offsets_stay_dense(ledger: Harness) -> None:
    opened(ledger)
    ledger.apply(Batch((transfer("a", "bank", "alice", 1), transfer("b", "bank", "nobody", 1)),
                       atomic=True))
    assert ledger.one(transfer("c", "bank", "alice", 2)).ok
    offsets = [e["offset"] for e in events(ledger)]
    assert offsets == [1, 2, 3, 4] and events(ledger)[-1]["data"]["id"] == "c"
    with ledger.store.reader() as r:
        assert verify_store(r) == []


def test_consumer_offset_is_stored_between_the_floor_and_the_last_event(ledger: Harness) -> None:
    opened(ledger)
    assert ledger.one(SetFeedOffset("billing", 2)).ok
    too_far = ledger.one(SetFeedOffset("billing", 4))
    assert too_far.code is C.feed_offset_out_of_range
    assert dict(too_far.details) == {"offset": 4, "first": 1, "last": 3}
    assert ledger.one(SetFeedOffset("billing", 0)).ok  # rewinding to the start is allowed
    assert ledger.one(SetFeedOffset("bad name!", 1)).code is C.invalid_id
    with ledger.store.reader() as r:
        assert r.consumer("billing") is not None and r.consumer("billing")[0] == 0  # type: ignore[index]
    removed = ledger.one(SetFeedOffset("billing", remove=True))
    assert removed.ok and removed.details["removed"] is True
    with ledger.store.reader() as r:
        assert r.consumers() == {}


def test_compaction_keeps_what_a_consumer_has_not_passed(ledger: Harness) -> None:
    opened(ledger)
    for i in range(5):
        assert ledger.one(transfer(f"t{i}", "bank", "alice", 1)).ok
    assert ledger.one(SetFeedOffset("slow", 4)).ok
    ledger.advance(10)
    result = ledger.one(CompactFeed(through=8, age_min_ns=5 * NS))
    assert result.ok and dict(result.details) == {"first": 5, "removed": 4}
    assert bounds(ledger) == (5, 8)
    assert [e["offset"] for e in events(ledger)] == [5, 6, 7, 8]
    assert ledger.one(SetFeedOffset("late", 1)).code is C.feed_offset_out_of_range
    assert ledger.one(SetFeedOffset("late", 4)).ok  # the floor minus one: everything held is ahead
    with ledger.store.reader() as r:
        assert verify_store(r) == []


def test_compaction_keeps_events_younger_than_the_minimum_age(ledger: Harness) -> None:
    opened(ledger)
    ledger.advance(100)
    assert ledger.one(transfer("young", "bank", "alice", 1)).ok
    ledger.advance(30)
    result = ledger.one(CompactFeed(through=100, age_min_ns=60 * NS))
    assert dict(result.details) == {"first": 4, "removed": 3}
    ledger.advance(60)
    assert dict(ledger.one(CompactFeed(100, 60 * NS)).details) == {"first": 5, "removed": 1}
    assert bounds(ledger) == (5, 4) and events(ledger) == []
    assert ledger.one(transfer("next", "bank", "alice", 1)).ok
    assert [e["offset"] for e in events(ledger)] == [5]
    with ledger.store.reader() as r:
        assert verify_store(r) == []


def test_the_auditor_notices_a_hole_in_the_held_events(ledger: Harness) -> None:
    opened(ledger)
    with ledger.store.env.begin(write=True) as txn:
        txn.delete((2).to_bytes(8, "big"), db=ledger.store.dbs.outbox)
    with ledger.store.reader() as r:
        assert any(p.startswith("outbox:") for p in verify_store(r))


def test_feed_commands_in_an_entry_of_older_rules_apply_as_invalid(ledger: Harness) -> None:
    opened(ledger)
    old = bytes([3]) + encode_requests([Request(ledger.now_ns + 1, SetFeedOffset("c", 1)),
                                        Request(ledger.now_ns + 2, transfer("t", "bank", "alice", 1))])[1:]
    ledger.index += 1
    outcomes = ledger.store.apply_entry(ledger.index, old) or []
    assert isinstance(outcomes[0], Result) and outcomes[0].code is C.invalid_command
    last = events(ledger)[-1]
    assert last["data"]["id"] == "t" and "balances" not in last["data"]  # written as rules 3 wrote it


def test_feed_commands_round_trip_through_the_codec() -> None:
    for command in (SetFeedOffset("billing", 17), SetFeedOffset("x", 0, remove=True), CompactFeed(9, 5)):
        assert codec.decode_command(codec.encode_command(command)) == command
    assert isinstance(codec.command_from_wire([codec.TAG_SET_FEED_OFFSET, "c", "1", False]), codec.Invalid)
    batch = codec.command_from_wire([codec.TAG_BATCH, False, [[codec.TAG_COMPACT_FEED, 1, 1]]])
    assert isinstance(batch, codec.Invalid)  # never inside a Batch


def test_the_auditor_notices_an_event_whose_balances_are_not_its_entries(ledger: Harness) -> None:
    opened(ledger)
    assert ledger.one(transfer("t1", "bank", "alice", 100)).ok
    assert ledger.one(transfer("t2", "bank", "alice", 50)).ok
    with ledger.store.reader() as r:
        assert verify_store(r) == []
    key = (4).to_bytes(8, "big")  # t1's event: claim alice had 101 after it
    with ledger.store.env.begin(write=True) as txn:
        value = bytearray(txn.get(key, db=ledger.store.dbs.outbox))
        value[-40:-32] = (101).to_bytes(8, "big")  # alice's record is last; its credits_posted, low half
        txn.put(key, bytes(value), db=ledger.store.dbs.outbox)
    with ledger.store.reader() as r:
        assert any(p.startswith("event 4: alice") for p in verify_store(r))
