"""The apply thread: log order, results behind their entry, and a store failure stops it without skipping."""

from __future__ import annotations

import threading

from raftledger.node.applier import Applier
from raftledger.node.store_slot import StoreSlot
from raftledger.statemachine import codec
from raftledger.statemachine.commands import CreateAccount, Request

wait_s = 10.0


def entry(account_id: str) -> bytes:
    return codec.encode_requests([Request(1, CreateAccount(id=account_id, currency="USD"))])


def test_entries_apply_in_order_and_notify_gets_its_entrys_outcomes(tmp_path):
    slot = StoreSlot(str(tmp_path), 0, sync=False)
    applier = Applier(slot)
    seen: dict[int, list] = {}
    done = threading.Event()
    for index in range(2, 12):
        applier.submit(index, entry(f"a{index}"))
        applier.notify(index, lambda outcomes, i=index: seen.__setitem__(i, outcomes))
    applier.notify(11, lambda _: done.set())
    assert done.wait(wait_s) and applier.wait_idle(wait_s)
    assert [seen[i][0].id for i in range(2, 12)] == [f"a{i}" for i in range(2, 12)]
    assert slot.current.applied_index() == 11 == applier.processed
    applier.close()
    slot.close()


def test_replayed_entry_at_or_below_applied_index_changes_nothing(tmp_path):
    slot = StoreSlot(str(tmp_path), 0, sync=False)
    applier = Applier(slot)
    applier.submit(2, entry("x"))
    assert applier.wait_processed(2, wait_s)
    before = slot.current.fingerprint()
    outcomes: list = []
    applier.submit(2, entry("y"))
    applier.notify(2, outcomes.append)
    applier.close()
    assert outcomes == [None] and slot.current.fingerprint() == before
    slot.close()


def test_store_failure_stops_applying_and_never_skips_an_entry(tmp_path):
    slot = StoreSlot(str(tmp_path), 0, sync=False)
    applier = Applier(slot)
    applier.submit(2, entry("ok"))
    assert applier.wait_processed(2, wait_s)
    slot.current.close()  # the environment is gone: the next apply raises inside LMDB
    applier.submit(3, entry("lost"))
    applier.submit(4, entry("later"))
    assert not applier.wait_processed(3, wait_s)
    assert applier.failed is not None and applier.processed == 2
    applier.close()
