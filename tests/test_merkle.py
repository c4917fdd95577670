"""The stored Merkle tree against a straightforward RFC 6962 reference, and its proofs against the
auditor's independent verifier (cluster/audit.py)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftledger.cluster import audit
from raftledger.statemachine import merkle

SIZE_MAX = 300


def ref_mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, literally."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return ref_path(m, leaves[:k]) + [ref_mth(leaves[k:])]
    return ref_path(m - k, leaves[k:]) + [ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [ref_mth(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return ref_subproof(m, leaves[:k], whole) + [ref_mth(leaves[k:])]
    return ref_subproof(m - k, leaves[k:], False) + [ref_mth(leaves[:k])]


def ref_consistency(m: int, leaves: list[bytes]) -> list[bytes]:
    return [] if m in (0, len(leaves)) else ref_subproof(m, leaves, True)


class DictTree:
    """The store's node table, as a dict; counts reads and hashes written."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[int, int], bytes] = {}
        self.size = 0
        self.reads = 0

    def read(self, level: int, index: int) -> bytes:
        self.reads += 1
        return self.nodes[(level, index)]

    def write(self, level: int, index: int, digest: bytes) -> None:
        assert (level, index) not in self.nodes
        self.nodes[(level, index)] = digest

    def add(self, leaf: bytes) -> None:
        merkle.append(self.size, leaf, self.read, self.write)
        self.size += 1

    def at(self, size: int) -> merkle.SubtreeHashes:
        return merkle.SubtreeHashes(size, self.read)


LEAVES = [f"leaf {i}".encode() * (i % 3 + 1) for i in range(SIZE_MAX + 1)]


@pytest.fixture(scope="module")
def tree() -> DictTree:
    t = DictTree()
    for leaf in LEAVES:
        t.add(leaf)
    return t


def test_root_at_every_size_matches_reference(tree: DictTree) -> None:
    for n in range(SIZE_MAX + 1):
        assert tree.at(n).root() == ref_mth(LEAVES[:n]), n


def test_empty_root_is_hash_of_nothing(tree: DictTree) -> None:
    assert tree.at(0).root() == hashlib.sha256(b"").digest() == merkle.EMPTY_ROOT


def test_append_stores_only_complete_subtrees_and_costs_log_hashes() -> None:
    t = DictTree()
    for n, leaf in enumerate(LEAVES[:257]):
        before = len(t.nodes)
        t.add(leaf)
        written = len(t.nodes) - before
        assert written == 1 + (n + 1 & -(n + 1)).bit_length() - 1  # the leaf and one per trailing one
    assert len(t.nodes) == 2 * 257 - bin(257).count("1")


def test_inclusion_every_leaf_of_small_trees(tree: DictTree) -> None:
    for n in range(1, 70):
        for m in range(n):
            path = tree.at(n).inclusion_path(m)
            assert path == ref_path(m, LEAVES[:n]), (m, n)
            root = audit.root_from_inclusion(m, n, merkle.leaf_hash(LEAVES[m]), path)
            assert root == ref_mth(LEAVES[:n])


def test_consistency_every_pair_of_small_trees(tree: DictTree) -> None:
    for n in range(0, 70):
        for m in range(0, n + 1):
            proof = tree.at(n).consistency_proof(m)
            assert proof == ref_consistency(m, LEAVES[:n]), (m, n)
            audit.verify_consistency(m, n, ref_mth(LEAVES[:m]), ref_mth(LEAVES[:n]), proof)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_inclusion_and_consistency_at_any_size(tree: DictTree, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, SIZE_MAX))
    m = data.draw(st.integers(0, n - 1))
    first = data.draw(st.integers(0, n))
    view = tree.at(n)
    tree.reads = 0
    path = view.inclusion_path(m)
    assert tree.reads <= 2 * n.bit_length() + 2  # O(log n) stored nodes per proof
    assert path == ref_path(m, LEAVES[:n])
    proof = tree.at(n).consistency_proof(first)
    assert proof == ref_consistency(first, LEAVES[:n])
    audit.verify_consistency(first, n, ref_mth(LEAVES[:first]), ref_mth(LEAVES[:n]), proof)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_verifier_rejects_altered_proofs(tree: DictTree, data: st.DataObject) -> None:
    n = data.draw(st.integers(2, SIZE_MAX))
    m = data.draw(st.integers(0, n - 1))
    path = tree.at(n).inclusion_path(m)
    root = ref_mth(LEAVES[:n])
    i = data.draw(st.integers(0, len(path) - 1))
    bad = [*path[:i], hashlib.sha256(path[i]).digest(), *path[i + 1:]]
    with pytest.raises(audit.AuditFailed):
        if audit.root_from_inclusion(m, n, merkle.leaf_hash(LEAVES[m]), bad) != root:
            raise audit.AuditFailed("root differs")
    first = data.draw(st.integers(1, n - 1))
    proof = tree.at(n).consistency_proof(first)
    forged = ref_mth([*LEAVES[:first - 1], b"forged"])  # another history of the same size
    with pytest.raises(audit.AuditFailed):
        audit.verify_consistency(first, n, forged, root, proof)
    with pytest.raises(audit.AuditFailed):
        audit.verify_consistency(first, n, ref_mth(LEAVES[:first]), root, proof[:-1])
    with pytest.raises(audit.AuditFailed):  # truncated: the second tree is shorter than the first
        audit.verify_consistency(n, first, root, ref_mth(LEAVES[:first]), proof)


def test_sizes_outside_the_tree_are_refused(tree: DictTree) -> None:
    with pytest.raises(ValueError):
        tree.at(5).inclusion_path(5)
    with pytest.raises(ValueError):
        tree.at(5).consistency_proof(6)
