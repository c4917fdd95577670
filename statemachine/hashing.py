"""Hash chains: per account over its entries, per shard over applied log entries.

An outside verifier recomputes them from a statement alone, so the byte form is spelled out here:

  genesis(account)  = SHA-256(b"raftledger/account/v1\\0" + account id)
  hash_n            = SHA-256(hash_{n-1} + entry_bytes)
  entry_bytes       = str(account) + u64(seq) + str(transaction id) + u8(direction: 0 debit, 1 credit)
                      + u64(amount) + str(currency) + u8(status: 0 pending, 1 posted, 2 voided, 3 expired)
                      + i128(balance_after) + u64(timestamp ns) + u64(released)
  str(x)            = u16(len(utf-8 bytes)) + utf-8 bytes; integers are big-endian.

  shard chain_i     = SHA-256(chain_{i-1} + u64(index) + SHA-256(payload) + SHA-256(result codes))
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

GENESIS_PREFIX: Final = b"raftledger/account/v1\0"
SHARD_GENESIS: Final = b"\0" * 32



def genesis(account_id: str) -> bytes:
    return hashlib.sha256(GENESIS_PREFIX + account_id.encode()).digest()


_entry_formats: dict[tuple[int, int, int], struct.Struct] = {}


def entry_bytes(account_id: str, seq: int, transaction_id: str, direction: int, amount: int,
                currency: str, status: int, balance_after: int, timestamp: int,
                released: int) -> bytes:
    a, t, c = account_id.encode(), transaction_id.encode(), currency.encode()
    shape = (len(a), len(t), len(c))
    fmt = _entry_formats.get(shape)
    if fmt is None:
        fmt = _entry_formats[shape] = struct.Struct(f">H{shape[0]}sQH{shape[1]}sBQH{shape[2]}sB16sQQ")
    return fmt.pack(shape[0], a, seq, shape[1], t, direction, amount, shape[2], c, status,
                    balance_after.to_bytes(16, "big", signed=True), timestamp, released)


def chain(prev: bytes, data: bytes) -> bytes:
    return hashlib.sha256(prev + data).digest()


def shard_chain(prev: bytes, index: int, payload: bytes, codes: bytes) -> bytes:
    return hashlib.sha256(
        prev + index.to_bytes(8, "big") + hashlib.sha256(payload).digest()
        + hashlib.sha256(codes).digest()
    ).digest()
