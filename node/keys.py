"""A node's Ed25519 signing keys: the current one signs tree heads, retired ones stay published.

Kept in ``<data_dir>/signing-keys.json`` (mode 0600, replaced atomically): every key the node ever had,
with its public half, ``valid_from`` and ``retired_at`` (ns), the private seed of the current one
only (a retired key never signs again), and whether the cluster map was seen holding these records
(``published``: a restarted node does not propose them again; a member of the metadata group replays
older maps first, and would otherwise see them missing and change the map for nothing). A key's id
is the hex of the first 8 bytes of SHA-256 of its raw public key. The public records are published
in the cluster map's ``keys`` section under the node's id, so every node serves ``GET /v1/keys`` for
all of them (docs/integrity.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .files import fsync_dir

KEYS_FILE = "signing-keys.json"
MAP_SECTION = "keys"  # cluster map section: node id -> its public key records
ALGORITHM = "ed25519"


class KeyFileError(Exception):
    """The key file cannot be read as written by this module."""


def key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).digest()[:8].hex()


def _raw_public(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_seed(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())


@dataclass
class KeyRing:
    path: str
    node_id: str
    current: Ed25519PrivateKey
    records: list[dict[str, Any]]  # public records, oldest first; the last is the current key's
    published: bool = False  # the cluster map was seen holding exactly these records
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def current_id(self) -> str:
        return str(self.records[-1]["key_id"])

    def sign(self, message: bytes) -> tuple[str, bytes]:
        """(key id, signature) by the current key."""
        with self.lock:
            return self.current_id, self.current.sign(message)

    def public_records(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.records]

    def rotate(self, now_ns: int) -> str:
        """A new current key; the old one is retired at ``now_ns`` (its seed is dropped)."""
        with self.lock:
            fresh = Ed25519PrivateKey.generate()
            records = [dict(r) for r in self.records]
            records[-1]["retired_at"] = now_ns
            records.append(_record(fresh, now_ns))
            _write(self.path, fresh, records, False)
            self.current, self.records, self.published = fresh, records, False
            return self.current_id

    def mark_published(self, records: list[dict[str, Any]]) -> None:
        """The map holds ``records``: remember it, unless the ring changed since they were read."""
        with self.lock:
            if records == self.records and not self.published:
                _write(self.path, self.current, self.records, True)
                self.published = True


def _record(private: Ed25519PrivateKey, valid_from: int) -> dict[str, Any]:
    public = _raw_public(private)
    return {"key_id": key_id(public), "algorithm": ALGORITHM, "public_key": public.hex(),
            "valid_from": valid_from, "retired_at": None}


def _write(path: str, current: Ed25519PrivateKey, records: list[dict[str, Any]], published: bool) -> None:
    """Like ``files.write_file_durably``, but the file is created with mode 0600: it holds a secret."""
    data = json.dumps({"current_seed": _raw_seed(current).hex(), "keys": records, "published": published},
                      indent=1).encode()
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def load_or_create(data_dir: str, node_id: str, now_ns: int) -> KeyRing:
    """The node's key ring, made with a first key when the data dir has none."""
    path = os.path.join(data_dir, KEYS_FILE)
    if not os.path.exists(path):
        os.makedirs(data_dir, exist_ok=True)
        private = Ed25519PrivateKey.generate()
        records = [_record(private, now_ns)]
        _write(path, private, records, False)
        return KeyRing(path, node_id, private, records)
    os.chmod(path, 0o600)
    try:
        with open(path) as f:
            raw = json.load(f)
        private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw["current_seed"]))
        records = list(raw["keys"])
        published = raw.get("published") is True
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{path}: {exc}") from exc
    if not records or records[-1].get("key_id") != key_id(_raw_public(private)):
        raise KeyFileError(f"{path}: the current key is not the last one listed")
    return KeyRing(path, node_id, private, records, published)


def published(sections: Any) -> list[dict[str, Any]]:
    """Every node's public key records from a cluster map's sections, as ``GET /v1/keys`` lists them."""
    listed: list[dict[str, Any]] = []
    for node_id, records in sorted(dict(sections.get(MAP_SECTION, {})).items()):
        for record in records:
            listed.append({"node": node_id, **dict(record)})
    return listed
