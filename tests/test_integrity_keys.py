"""A node's signing keys: made once, kept private, rotated with the old public key kept."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from raftledger.node import keys


def test_first_start_makes_a_key_that_later_starts_reuse(tmp_path: Path) -> None:
    ring = keys.load_or_create(str(tmp_path), "n0", 10)
    path = tmp_path / keys.KEYS_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    [record] = ring.public_records()
    raw = bytes.fromhex(record["public_key"])
    assert record["key_id"] == hashlib.sha256(raw).digest()[:8].hex() == ring.current_id
    assert (record["valid_from"], record["retired_at"], record["algorithm"]) == (10, None, "ed25519")
    again = keys.load_or_create(str(tmp_path), "n0", 99)
    assert again.public_records() == ring.public_records()
    key_id, signature = again.sign(b"message")
    assert key_id == record["key_id"]
    Ed25519PublicKey.from_public_bytes(raw).verify(signature, b"message")


def test_rotation_retires_the_old_key_and_survives_a_restart(tmp_path: Path) -> None:
    ring = keys.load_or_create(str(tmp_path), "n0", 10)
    old = ring.current_id
    new = ring.rotate(20)
    assert new != old and ring.sign(b"m")[0] == new
    reloaded = keys.load_or_create(str(tmp_path), "n0", 30)
    records = reloaded.public_records()
    assert [(r["key_id"], r["valid_from"], r["retired_at"]) for r in records] == [(old, 10, 20),
                                                                                   (new, 20, None)]
    assert reloaded.sign(b"m")[0] == new
    assert (tmp_path / keys.KEYS_FILE).read_text().count("seed") == 1  # the retired key's seed is gone


def test_a_damaged_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    keys.load_or_create(str(tmp_path), "n0", 10)
    (tmp_path / keys.KEYS_FILE).write_text("{not json")
    with pytest.raises(keys.KeyFileError):
        keys.load_or_create(str(tmp_path), "n0", 10)
    assert (tmp_path / keys.KEYS_FILE).read_text() == "{not json"


def test_published_lists_every_node_key_from_the_map_section() -> None:
    sections = {keys.MAP_SECTION: {"n1": [{"key_id": "b"}], "n0": [{"key_id": "a"}, {"key_id": "c"}]}}
    assert [(k["node"], k["key_id"]) for k in keys.published(sections)] == [("n0", "a"), ("n0", "c"),
                                                                          ("n1", "b")]
    assert keys.published({}) == []


def test_publication_is_remembered_until_the_next_rotation(tmp_path: Path) -> None:
    ring = keys.load_or_create(str(tmp_path), "n0", 10)
    records = ring.public_records()
    ring.mark_published(records)
    assert keys.load_or_create(str(tmp_path), "n0", 11).published
    ring.rotate(20)
    ring.mark_published(records)  # read before the rotation: not what the ring holds now
    reloaded = keys.load_or_create(str(tmp_path), "n0", 21)
    assert not reloaded.published and len(reloaded.public_records()) == 2
