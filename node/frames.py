"""Raft frames between the replicas of a shard: a handshake, then AES-GCM frames under per-connection keys.

The connection code that uses them lives in the PySyncObj boundary (``node/raft.py``); this module
holds only the bytes:

- Each side of a connection first sends ``hello``: ``HELLO_MAGIC`` and 32 random bytes. Both derive the
  connection's two keys (one per direction) with HKDF from the shard's Raft key and both random values,
  so keys are fresh per connection and a recorded connection cannot be replayed into another.
- Every message is then a frame: a 4-byte big-endian length and AES-256-GCM ciphertext whose nonce is
  the frame's number in its direction, so frames cannot be reordered, repeated or dropped unseen.
- A connection that has sent nothing for a while sends ``KEEPALIVE``, a message the receiving
  connection drops: PySyncObj closes a connection it has read nothing from for
  ``connection_timeout_s``, and checks only when it writes, so between two followers, which talk only
  in an election, the first vote request of an election closed the connection instead of leaving.
  (PySyncObj ignores a message of unknown type, so a replica without this drops it too.)
- Nothing is unpickled before its frame authenticates (``Session.open``), and what is unpickled may
  hold only plain data: the unpickler resolves no class or function at all.
- Messages are not compressed: on the networks a ledger runs on, compressing every entry cost more CPU
  than the bytes it saved (zlib level 3, both ways: ~50 µs for a 16 KB append; AES-GCM seal and
  open: ~3 µs; docs/performance.md).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import secret as secret_mod

HELLO_MAGIC = b"RLRAFT01"
NONCE_BYTES = 32
HELLO = struct.Struct(f">{len(HELLO_MAGIC)}s{NONCE_BYTES}s")
LENGTH = struct.Struct(">I")
TAG_BYTES = 16
KEEPALIVE = {"type": "keepalive"}
# A peer that has not authenticated yet sends its address or a utility command: a few bytes.
unauthenticated_frame_bytes_max = 64 << 10


class DataOnlyUnpickler(pickle.Unpickler):
    """Plain data only (dict, list, tuple, str, bytes, numbers, None): every class is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def loads(data: bytes) -> Any:
    return DataOnlyUnpickler(io.BytesIO(data)).load()


def dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def shard_key(cluster_secret: bytes, shard: int) -> bytes:
    """The Raft key of one shard: a peer of another shard's group cannot talk to this one."""
    return secret_mod.derive(cluster_secret, f"raft shard {shard}")


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def hello(nonce: bytes) -> bytes:
    return HELLO.pack(HELLO_MAGIC, nonce)


def peer_nonce(hello_bytes: bytes) -> bytes | None:
    """The peer's nonce, or None if what it sent is not our hello."""
    magic, nonce = HELLO.unpack(hello_bytes)
    return nonce if magic == HELLO_MAGIC else None


class Session:
    """The two AES-GCM keys of one connection and its frame counters."""

    __slots__ = ("_seal", "_open", "_sent", "_received")

    def __init__(self, key: bytes, client_nonce: bytes, server_nonce: bytes, outgoing: bool) -> None:
        keys = secret_mod.derive(key, "raft connection", salt=client_nonce + server_nonce, length=64)
        to_server, to_client = AESGCM(keys[:32]), AESGCM(keys[32:])
        self._seal, self._open = (to_server, to_client) if outgoing else (to_client, to_server)
        self._sent = 0
        self._received = 0

    def seal(self, data: bytes) -> bytes:
        """A whole frame: length and ciphertext."""
        self._sent += 1
        sealed = self._seal.encrypt(self._sent.to_bytes(12, "big"), data, None)
        return LENGTH.pack(len(sealed)) + sealed

    def open(self, sealed: bytes) -> bytes | None:
        """The plaintext of the next frame, or None if it was not sealed with this connection's key,
        in this order."""
        self._received += 1
        try:
            return self._open.decrypt(self._received.to_bytes(12, "big"), sealed, None)
        except InvalidTag:
            return None
