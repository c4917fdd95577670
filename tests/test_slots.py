"""Hash slots: the slot of an id, the standard layouts, and a shard's state machine refusing accounts of
slots it does not own (``SetSlots``, ``wrong_shard``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from raftledger.cluster.router import even_table, modulo_table, route, shard_for_account
from raftledger.statemachine import codec, slots
from raftledger.statemachine.codes import ResultCode
from raftledger.statemachine.commands import Batch, SetSlots
from raftledger.statemachine.slots import (
    SLOTS,
    even_ranges,
    modulo_assignment,
    ranges_of,
    ranges_problem,
    slot_count,
    slot_of,
)
from raftledger.statemachine.store import LedgerStore
from raftledger.statemachine.testing import Harness, account, transfer

IDS = [f"acct-{i}" for i in range(2000)] + [f"c{i}:{{t{i % 37}}}" for i in range(500)]


def oracle_slot(account_id: str) -> int:
    """API.md's rule, written again: the tag between the first { and the next }, else the id."""
    key = account_id
    if "{" in account_id:
        start = account_id.index("{")
        end = account_id.find("}", start + 1)
        if end > start + 1:
            key = account_id[start + 1:end]
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 4096


# -- slots and layouts ----------------------------------------------------------------------------------


def test_the_slot_of_an_id_is_the_api_rule_and_accounts_of_one_tag_share_it():
    assert SLOTS == 4096
    assert [slot_of(i) for i in IDS] == [oracle_slot(i) for i in IDS]
    assert slot_of("alice:{u42}") == slot_of("bob:{u42}") == oracle_slot("u42")
    assert slot_of("a{}b") == oracle_slot("a{}b")


def test_the_slot_cache_stays_bounded():
    bound = slots.slots_cached_max
    for i in range(bound + 10):
        slot_of(f"bounded-{i}")
    assert len(slots._cache) <= bound


@pytest.mark.parametrize("shards", [1, 2, 3, 7, 64, 1000, 4096])
def test_an_even_layout_covers_every_slot_once_in_one_range_per_shard(shards):
    layout = even_ranges(shards)
    assert len(layout) == shards and all(len(r) == 1 for r in layout)
    covered = [s for (first, last), in layout for s in range(first, last + 1)]
    assert covered == list(range(SLOTS))
    sizes = {slot_count(r) for r in layout}
    assert max(sizes) - min(sizes) <= 1
    table = even_table(shards)
    assert all(table[s] == i for i, ((first, last),) in enumerate(layout) for s in (first, last))


@pytest.mark.parametrize("shards", [1, 2, 4, 8, 1024])
def test_the_modulo_layout_routes_as_sha256_modulo_the_shard_count_did(shards):
    def before_the_map(account_id: str) -> int:  # the router of earlier releases
        start = account_id.find("{")
        key = account_id
        if start >= 0 and account_id.find("}", start + 1) > start + 1:
            key = account_id[start + 1:account_id.find("}", start + 1)]
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % shards

    assignment = modulo_assignment(shards)
    assert all(route(modulo_table(shards), i) == before_the_map(i) for i in IDS)
    per_shard = [ranges_of(assignment, s) for s in range(shards)]
    assert sum(slot_count(r) for r in per_shard) == SLOTS
    assert all(ranges_problem(r) is None for r in per_shard)


def test_a_modulo_layout_needs_a_shard_count_that_divides_4096():
    with pytest.raises(ValueError, match="divides 4096"):
        modulo_assignment(3)
    with pytest.raises(ValueError):
        even_ranges(0)


def test_shard_for_account_routes_by_the_even_layout():
    assert all(shard_for_account(i, 3) == route(even_table(3), i) == oracle_slot(i) * 3 // 4096
               for i in IDS[:200])


def test_ranges_must_be_within_the_slots_ascending_and_disjoint():
    assert ranges_problem(((0, 10), (11, 4095))) is None
    assert ranges_problem(()) is None
    assert "within" in (ranges_problem(((0, 4096),)) or "")
    assert "within" in (ranges_problem(((5, 4),)) or "")
    assert "overlaps" in (ranges_problem(((0, 10), (10, 20))) or "")
    assert "overlaps" in (ranges_problem(((20, 30), (0, 10))) or "")


# -- SetSlots in the state machine --------------------------------------------------------------------


def test_set_slots_round_trips_through_the_codec_and_never_rides_in_a_batch():
    command = SetSlots(3, ((0, 99), (200, 4095)))
    assert codec.decode_command(codec.encode_command(command)) == command
    inside = [codec.TAG_BATCH, False, [codec.command_to_wire(command)]]
    assert isinstance(codec.command_from_wire(inside), codec.Invalid)
    assert isinstance(codec.command_from_wire([codec.TAG_SET_SLOTS, 1, [[0]]]), codec.Invalid)
    assert isinstance(codec.command_from_wire([codec.TAG_SET_SLOTS, True, []]), codec.Invalid)


def half(ledger: Harness, epoch: int = 1, first: int = 0, last: int = 2047) -> None:
    [result] = ledger.apply(SetSlots(epoch, ((first, last),)))
    assert result.code is ResultCode.ok  # type: ignore[union-attr]


def mine_and_foreign(prefix: str, first: int = 0, last: int = 2047) -> tuple[str, str, str]:
    mine = [i for i in (f"{prefix}{n}" for n in range(500)) if first <= slot_of(i) <= last]
    foreign = [i for i in (f"{prefix}x{n}" for n in range(500)) if not first <= slot_of(i) <= last]
    return mine[0], mine[1], foreign[0]


def test_without_slots_a_shard_accepts_every_account(ledger):
    assert ledger.store.slots() == (0, ())
    assert all(ledger.one(account(i)).ok for i in IDS[:50])


def test_a_misrouted_account_or_transaction_is_refused_and_nothing_is_stored(ledger):
    a, b, foreign = mine_and_foreign("m")
    assert ledger.one(account(a)).ok and ledger.one(account(b)).ok
    half(ledger)
    before = ledger.store.fingerprint()[1]
    refused = ledger.one(account(foreign))
    assert refused.code is ResultCode.wrong_shard
    assert refused.details == {"epoch": 1, "accounts": [foreign]}
    moved = ledger.one(transfer("t-foreign", a, foreign, 5))
    assert moved.code is ResultCode.wrong_shard and moved.details["accounts"] == [foreign]
    with ledger.store.reader() as reader:
        assert reader.account(foreign) is None
        assert reader.transaction("t-foreign") is None  # not even a stored rejection
        assert reader.account(a).seq == 0  # type: ignore[union-attr]
        assert [e.type for e in reader.events()] == ["account.created"] * 2  # nothing else
    assert ledger.store.fingerprint()[1] != before  # the refusals are in the shard chain
    # Nothing was recorded under the id: once the slots say so, the same transaction applies.
    assert ledger.one(transfer("t-mine", a, b, 5)).ok


def test_an_atomic_batch_with_a_misrouted_command_applies_nothing(ledger):
    a, b, foreign = mine_and_foreign("b")
    half(ledger)
    results = ledger.batch(Batch((account(a), account(b), account(foreign)), atomic=True))
    assert [r.code for r in results] == [ResultCode.linked_event_failed] * 2 + [ResultCode.wrong_shard]
    with ledger.store.reader() as reader:
        assert reader.account(a) is None


def test_slots_apply_only_with_a_newer_epoch_and_survive_a_reopen(tmp_path: Path):
    store = LedgerStore(str(tmp_path / "s.lmdb"), map_size=2**26)
    ledger = Harness(store)
    half(ledger, epoch=5)
    [older] = ledger.apply(SetSlots(4, ((0, 4095),)))
    assert older.details == {"epoch": 5, "applied": False}  # type: ignore[union-attr]
    [newer] = ledger.apply(SetSlots(6, ((2048, 4095),)))
    assert newer.details == {"epoch": 6, "applied": True}  # type: ignore[union-attr]
    [bad] = ledger.apply(SetSlots(7, ((10, 4096),)))
    assert bad.code is ResultCode.invalid_command  # type: ignore[union-attr]
    assert store.slots() == (6, ((2048, 4095),))
    with store.reader() as reader:
        assert reader.slots() == (6, ((2048, 4095),))
    store.close()
    reopened = LedgerStore(str(tmp_path / "s.lmdb"), map_size=2**26)
    try:
        assert reopened.slots() == (6, ((2048, 4095),))
        _, _, foreign = mine_and_foreign("r", 2048, 4095)
        assert Harness(reopened).one(account(foreign)).code is ResultCode.wrong_shard
    finally:
        reopened.close()


def test_replicas_applying_the_same_log_of_slots_reach_the_same_state(tmp_path: Path):
    first = Harness(LedgerStore(str(tmp_path / "a.lmdb"), map_size=2**26))
    a, b, foreign = mine_and_foreign("d")
    first.apply(account(a), account(foreign))
    half(first, epoch=2)
    first.apply(account(b), transfer("t1", a, foreign, 1), transfer("t2", a, b, 1))
    first.apply(SetSlots(3, ((0, 4095),)))
    first.apply(transfer("t1", a, foreign, 1))
    second = Harness(LedgerStore(str(tmp_path / "b.lmdb"), map_size=2**26))
    for index, payload in first.log:
        second.store.apply_entry(index, payload)
    stores = [first.store, second.store]
    try:
        assert len({s.fingerprint() for s in stores}) == 1
        digests = set()
        for s in stores:
            with s.reader() as reader:
                digests.add(reader.payload_digest())
                assert reader.transaction("t1") is not None and reader.transaction("t2") is not None
        assert len(digests) == 1
    finally:
        for s in stores:
            s.close()
