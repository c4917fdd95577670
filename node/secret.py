"""The cluster secret: one random key file per cluster, from which every node-to-node key is derived.

Raft connections and the internal protocol are authenticated and encrypted with keys derived from it
(HKDF-SHA256, a different ``info`` per purpose), so a key of one purpose is useless for another and
the secret itself never travels. ``raftledger up`` generates it into the data directory; a node file
names it with ``secret_file``. The file holds 64 hex digits (32 random bytes); a node refuses to
start when others (users outside the file's owner and group) may read it, or its group may write it.
"""

from __future__ import annotations

import os
import secrets
import stat

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

secret_bytes = 32
KEY_BYTES = 32


class SecretError(ValueError):
    """The secret file is missing, malformed or readable by others."""


def generate(path: str) -> None:
    """Write a new secret to ``path`` (mode 0600); an existing file is never overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(secret_bytes) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SecretError(f"secret_file {path}: cannot read: {exc.strerror}") from None
    with os.fdopen(fd) as f:
        mode = os.fstat(f.fileno()).st_mode
        text = f.read(1024).strip()
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise SecretError(f"secret_file {path}: open to other users (mode {stat.S_IMODE(mode):o}); "
                          f"run: chmod 600 {path}")
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"secret_file {path}: not hex digits") from None
    if len(secret) < secret_bytes:
        raise SecretError(f"secret_file {path}: {len(secret)} bytes; at least {secret_bytes} are needed")
    return secret


def derive(secret: bytes, purpose: str, salt: bytes | None = None, length: int = KEY_BYTES) -> bytes:
    """A key for one purpose (``raft shard 0``, ``internal``...); ``salt`` makes it per connection."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt,
                info=b"raftledger/v1/" + purpose.encode()).derive(secret)
