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

GENESIS_PREFIX = b"raftledger/account/v1\0"
SHARD_GENESIS = b"\0" * 32

_U16 = struct.Struct(">H")


def _str(value: str) -> bytes:
    data = value.encode()
    return _U16.pack(len(data)) + data


def genesis(account_id: str) -> bytes:
    return hashlib.sha256(GENESIS_PREFIX + account_id.encode()).digest()


def entry_bytes(account_id: str, seq: int, transaction_id: str, direction: int, amount: int,
                currency: str, status: int, balance_after: int, timestamp: int,
                released: int) -> bytes:
    return b"".join((
        _str(account_id), seq.to_bytes(8, "big"), _str(transaction_id), bytes((direction,)),
        amount.to_bytes(8, "big"), _str(currency), bytes((status,)),
        balance_after.to_bytes(16, "big", signed=True), timestamp.to_bytes(8, "big"),
        released.to_bytes(8, "big"),
    ))


def chain(prev: bytes, data: bytes) -> bytes:
    return hashlib.sha256(prev + data).digest()


def shard_chain(prev: bytes, index: int, payload: bytes, codes: bytes) -> bytes:
    return hashlib.sha256(
        prev + index.to_bytes(8, "big") + hashlib.sha256(payload).digest()
        + hashlib.sha256(codes).digest()
    ).digest()
