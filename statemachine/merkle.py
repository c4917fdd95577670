"""A Merkle tree of RFC 6962 / RFC 9162 shape, stored as the roots of its complete subtrees.

  leaf hash     = SHA-256(0x00 || leaf bytes)
  interior hash = SHA-256(0x01 || left || right)
  empty root    = SHA-256("")

Storage: node (level, index) is the root of the complete subtree over leaves
[index * 2^level, (index + 1) * 2^level). Appending leaf n stores its hash at (0, n) and, for each
trailing one bit of n, the parent that it completes: O(log n) hashes, two writes on average. A node
is keyed by the leaf that completed it, then its level (``node_key``), so every write of an append
lands after every stored key: LMDB appends instead of searching the tree for the place. Every
subtree that RFC 9162's algorithms need for a tree of any size m <= n is either complete (one stored
node) or ends at m, and those are nested, so a root or a proof at any earlier size reads O(log n)
stored nodes (``SubtreeHashes`` computes each right-edge subtree once).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any, Final

import msgpack

from .codec import DIRECTION_BYTE, canonical
from .records import Transaction

NODE_KEY: Final = struct.Struct(">QB")  # the last leaf of the subtree, its level
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

NodeReader = Callable[[int, int], bytes]  # (level, index) -> the stored hash of that complete subtree
NodeWriter = Callable[[int, int, bytes], None]


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def node_key(level: int, index: int) -> bytes:
    """The key of node (level, index): the index of its last leaf, then its level (both ascending
    over an append's writes)."""
    return NODE_KEY.pack(((index + 1) << level) - 1, level)


def largest_power_below(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2): where RFC 9162 splits a tree."""
    return 1 << ((n - 1).bit_length() - 1)


def append(size: int, leaf: bytes, read: NodeReader, write: NodeWriter) -> None:
    """Store leaf number ``size`` (the tree had ``size`` leaves) and the subtrees it completes."""
    digest = leaf_hash(leaf)
    write(0, size, digest)
    level, index = 0, size
    while index & 1:
        digest = node_hash(read(level, index - 1), digest)
        level += 1
        index >>= 1
        write(level, index, digest)


class SubtreeHashes:
    """The hash of any subtree of the tree of ``size`` leaves, from the stored complete subtrees."""

    def __init__(self, size: int, read: NodeReader) -> None:
        self.size = size
        self.read = read
        self.edge: dict[int, bytes] = {}  # start -> hash of leaves [start, size): the right edge

    def of(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a subtree of this tree: complete, or ending at ``size``."""
        count = end - start
        if count & (count - 1) == 0 and start % count == 0:
            level = count.bit_length() - 1
            return self.read(level, start >> level)
        if end != self.size:
            raise ValueError(f"[{start}, {end}) is not a subtree of a tree of {self.size}")
        cached = self.edge.get(start)
        if cached is None:
            k = largest_power_below(count)
            cached = node_hash(self.of(start, start + k), self.of(start + k, end))
            self.edge[start] = cached
        return cached

    def root(self) -> bytes:
        return EMPTY_ROOT if self.size == 0 else self.of(0, self.size)

    def inclusion_path(self, index: int) -> list[bytes]:
        """RFC 9162 2.1.3: the audit path of leaf ``index``, leaf side first."""
        if not 0 <= index < self.size:
            raise ValueError(f"leaf {index} is not in a tree of {self.size}")
        path: list[bytes] = []
        start, end = 0, self.size
        while end - start > 1:
            k = largest_power_below(end - start)
            if index < start + k:
                path.append(self.of(start + k, end))
                end = start + k
            else:
                path.append(self.of(start, start + k))
                start += k
        path.reverse()
        return path

    def consistency_proof(self, first: int) -> list[bytes]:
        """RFC 9162 2.1.4: proof that the tree of ``first`` leaves is a prefix of this one."""
        if not 0 <= first <= self.size:
            raise ValueError(f"{first} is not a size up to {self.size}")
        if first in (0, self.size):
            return []
        proof: list[bytes] = []
        start, end, whole = 0, self.size, True  # SUBPROOF(m, D[start:end], b)
        m = first
        while True:
            count = end - start
            if m == count:
                if not whole:
                    proof.append(self.of(start, end))
                break
            k = largest_power_below(count)
            if m <= k:
                proof.append(self.of(start + k, end))
                end = start + k
            else:
                proof.append(self.of(start, start + k))
                start, m, whole = start + k, m - k, False
        proof.reverse()
        return proof


# ---- leaves: the canonical record of a transaction as this shard applied it (docs/integrity.md) ----

LEAF_VERSION: Final = 1
LEAF_RECORD: Final = 1  # a transaction this shard applied: created, posted, voided, reversed, expired,
#                         or a cross-shard transaction's entries finished here
LEAF_DECISION: Final = 2  # a cross-shard transaction's record at its home (the commit point)
LEAF_LEG: Final = 3  # this shard's holds of a cross-shard transaction, placed by its prepare
LEAF_STATUS: Final = {"pending": 0, "posted": 1, "voided": 2, "expired": 3}
LEAF_HEAD: Final = struct.Struct(">BBQ")  # version, kind, timestamp
LEAF_ENTRY: Final = struct.Struct(">BQ")  # direction, amount
LEAF_SEQ: Final = struct.Struct(">Q")
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")


EMPTY_METADATA: Final = U32.pack(1) + b"\x80"  # msgpack of {}


def _text(out: bytearray, value: str) -> None:
    data = value.encode()
    out += U16.pack(len(data))
    out += data


def transaction_leaf(kind: int, tx: Transaction, packb: Callable[[Any], bytes] = msgpack.packb) -> bytes:
    """The leaf bytes of ``tx`` (byte for byte in docs/integrity.md); the same on every replica."""
    out = bytearray(LEAF_HEAD.pack(LEAF_VERSION, kind, tx.timestamp))
    _text(out, tx.id)
    out.append(LEAF_STATUS[tx.status])
    _text(out, tx.pending_id or "")
    _text(out, tx.reverses or "")
    _text(out, tx.code)
    out += U32.pack(tx.timeout_seconds)
    out.append(len(tx.shards))
    for shard in tx.shards:
        out += U16.pack(shard)
    out += U16.pack(len(tx.entries))
    for e in tx.entries:
        _text(out, e.account_id)
        out += LEAF_ENTRY.pack(DIRECTION_BYTE[e.direction], e.amount)
        _text(out, e.currency)
        out += LEAF_SEQ.pack(e.seq)
        out += e.hash
    if tx.metadata:
        metadata = packb(canonical(tx.metadata))
        out += U32.pack(len(metadata))
        out += metadata
    else:
        out += EMPTY_METADATA
    return bytes(out)


def leaf_timestamp(leaf: bytes) -> int:
    value: int = LEAF_HEAD.unpack_from(leaf)[2]
    return value


def leaf_id_key(transaction_id: str, index: int) -> bytes:
    """A key of the leaf_ids table: the id, a NUL (no id has one), the leaf index."""
    return transaction_id.encode() + b"\x00" + LEAF_SEQ.pack(index)
