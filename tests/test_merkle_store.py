"""The transaction tree as the state machine keeps it in LMDB, against the reference over its leaves."""

from __future__ import annotations

from pathlib import Path

from raftledger.cluster import audit
from raftledger.statemachine import merkle
from raftledger.statemachine.codec import encode_requests
from raftledger.statemachine.commands import (
    Batch,
    PostPending,
    Request,
    ReverseTransaction,
    VoidPending,
)
from raftledger.statemachine.store import LedgerStore
from raftledger.statemachine.testing import Harness, account, transfer
from test_merkle import ref_consistency, ref_mth, ref_path


def leaves_of(ledger: Harness) -> list[bytes]:
    with ledger.store.reader() as r:
        size = r.state().tree_size
        return [r.leaf(i) for i in range(size)]


def funded(ledger: Harness) -> None:
    ledger.apply(account("bank"), account("alice"), account("bob"))
    assert ledger.one(transfer("fund", "bank", "alice", 10_000, metadata={"b": 1, "a": [2]})).ok


def test_every_record_kind_becomes_one_leaf_in_apply_order(ledger: Harness) -> None:
    funded(ledger)
    assert ledger.one(transfer("hold", "alice", "bob", 300, pending=True)).ok
    assert ledger.one(PostPending("hold:post", "hold", 200)).ok
    assert ledger.one(transfer("hold2", "alice", "bob", 50, pending=True)).ok
    assert ledger.one(VoidPending("hold2:void", "hold2")).ok
    assert ledger.one(ReverseTransaction("fund:reverse", "fund")).ok
    assert ledger.one(transfer("exp", "bank", "bob", 7, pending=True, timeout_seconds=1)).ok
    ledger.advance(5)
    assert ledger.one(transfer("late", "bank", "bob", 1)).ok  # expires "exp" first
    assert not ledger.one(transfer("fund", "bank", "alice", 9)).ok  # a conflicting reuse: no leaf
    assert not ledger.one(transfer("nope", "ghost", "bob", 9)).ok  # a rejection: no leaf
    leaves = [audit.parse_leaf(leaf) for leaf in leaves_of(ledger)]
    assert [(f["id"], f["status"]) for f in leaves] == [
        ("fund", "posted"), ("hold", "pending"), ("hold:post", "posted"), ("hold2", "pending"),
        ("hold2:void", "voided"), ("fund:reverse", "posted"), ("exp", "pending"), ("exp", "expired"),
        ("late", "posted")]
    fund = leaves[0]
    with ledger.store.reader() as r:
        stored = r.transaction("fund")
        assert r.leaf_indexes("exp") == [6, 7]
        assert r.leaf_indexes("ex") == []
    assert [(e["account_id"], e["direction"], e["amount"], e["seq"], e["hash"]) for e in fund["entries"]] \
        == [(e.account_id, e.direction.value, e.amount, e.seq, e.hash.hex()) for e in stored.entries]
    assert leaves[2]["pending_id"] == "hold" and leaves[5]["reverses"] == "fund"


def test_stored_tree_matches_reference_at_every_size(ledger: Harness) -> None:
    funded(ledger)
    for i in range(40):
        ledger.apply(*(transfer(f"t{i}.{j}", "alice", "bob", 1 + j) for j in range(i % 4 + 1)))
    leaves = leaves_of(ledger)
    assert len(leaves) == 1 + sum(i % 4 + 1 for i in range(40))
    with ledger.store.reader() as r:
        for n in range(len(leaves) + 1):
            size, root, ts = r.tree_head(n)
            assert root == ref_mth(leaves[:n])
            assert ts == (audit.parse_leaf(leaves[n - 1])["timestamp"] if n else 0)
        n = len(leaves)
        for m in range(0, n, 7):
            assert r.inclusion_proof(m, n) == ref_path(m, leaves[:n])
            assert r.consistency_proof(m, n) == ref_consistency(m, leaves[:n])


def test_dropped_atomic_batch_leaves_tree_untouched(ledger: Harness) -> None:
    funded(ledger)
    before = leaves_of(ledger)
    with ledger.store.reader() as r:
        root = r.tree_head()[1]
    results = ledger.batch(Batch((transfer("a1", "bank", "bob", 5), transfer("a2", "ghost", "bob", 5)),
                                 atomic=True))
    assert not results[1].ok
    assert leaves_of(ledger) == before
    with ledger.store.reader() as r:
        assert r.tree_head()[1] == root and r.leaf_indexes("a1") == []
    assert ledger.batch(Batch((transfer("a1", "bank", "bob", 5),), atomic=True))[0].ok
    assert len(leaves_of(ledger)) == len(before) + 1


def test_entries_of_older_rules_add_no_leaf_and_store_reopens(tmp_path: Path) -> None:
    store = LedgerStore(str(tmp_path / "s.lmdb"), map_size=2**28)
    ledger = Harness(store)
    funded(ledger)
    payload = bytearray(encode_requests([Request(ledger.now_ns + 10, transfer("old", "bank", "bob", 3))]))
    payload[0] = 4  # proposed under RULES_FEED, before the tree
    ledger.index += 1
    assert store.apply_entry(ledger.index, bytes(payload))[0].ok
    with store.reader() as r:
        assert r.state().tree_size == 1 and r.leaf_indexes("old") == []
    store.close()
    reopened = LedgerStore(str(tmp_path / "s.lmdb"), map_size=2**28)
    with reopened.reader() as r:
        assert r.tree_head()[0] == 1
        assert r.tree_head()[1] == merkle.leaf_hash(r.leaf(0))
    reopened.close()


def test_store_audit_finds_a_tampered_tree_or_transaction(ledger: Harness) -> None:
    from raftledger.statemachine.audit import verify_store
    from raftledger.statemachine.layout import pack_transaction, unpack_transaction

    funded(ledger)
    assert ledger.one(transfer("t1", "alice", "bob", 40)).ok
    store = ledger.store
    with store.reader() as r:
        assert verify_store(r) == []
    with store.env.begin(write=True) as txn:  # the same amount moved on both sides: still balanced
        tx = unpack_transaction(txn.get(b"t1", db=store.dbs.transactions))
        entries = tuple(type(e)(e.account_id, e.direction, 41, e.currency, e.seq, e.hash) for e in tx.entries)
        txn.put(b"t1", pack_transaction(type(tx)(tx.id, tx.status, entries, tx.code, tx.metadata,
                                                 tx.timestamp)), db=store.dbs.transactions)
        txn.put(merkle.node_key(0, 0), b"\0" * 32, db=store.dbs.merkle)
    with store.reader() as r:
        problems = verify_store(r)
    assert any("t1: record differs from its leaf" in p for p in problems)
    assert any("node 0/0" in p for p in problems)
