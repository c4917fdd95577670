"""Which shard holds an account: a stable hash of the account id, or of its ``{tag}`` alone.

The hash is the first 8 bytes of SHA-256 (big-endian), never Python's ``hash()``, so every node
and every process agrees. An id containing ``{tag}`` (the first ``{`` and the next ``}``, non-empty
between) is routed by the tag only, so a customer's accounts can share a shard. This is the fixed
shard map; the router work generalises it (resharding, explicit placement) behind this function.
"""

from __future__ import annotations

import functools
import hashlib

# Recently routed account ids: a SHA-256 per account of every write was a tenth of a node's request
# handling; a bounded cache keeps hot accounts free.
routes_cached_max = 1 << 16


def routing_key(account_id: str) -> str:
    """The part of the id that is hashed: the ``{tag}`` when present, else the whole id."""
    start = account_id.find("{")
    if start >= 0:
        end = account_id.find("}", start + 1)
        if end > start + 1:
            return account_id[start + 1:end]
    return account_id


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


@functools.lru_cache(maxsize=routes_cached_max)
def shard_for_account(account_id: str, shard_count: int) -> int:
    if shard_count < 1:
        raise ValueError("shard_count must be >= 1")
    return key_hash(routing_key(account_id)) % shard_count
