"""Hash slots: which of the 4096 slots an account id falls in, and the standard ways to lay slots out.

An account's slot is ``int.from_bytes(sha256(key)[:8], "big") % SLOTS``, where ``key`` is the UTF-8 of
the id's hash tag when it has one (the text between the first ``{`` and the next ``}``, non-empty),
else of the whole id (``routing_key``). Every node, every replica and every client computes it the same
way, never with Python's ``hash()``. The cluster map (``raftledger.cluster.map``) assigns slot ranges to
shards; a shard's state machine is told its ranges (``SetSlots``) and refuses accounts of other slots.

Ranges are inclusive ``(first, last)`` pairs. Two layouts exist:

- ``even_ranges(n)``: shard ``i`` owns one contiguous range, ``[i*4096//n, (i+1)*4096//n - 1]``.
- ``modulo_assignment(n)``: slot ``s`` belongs to shard ``s % n`` — exactly the shard that
  ``sha256 % n`` routing chose before the map existed, when ``n`` divides 4096.

``slot_of`` runs for every account of every command on every replica's apply path, so it keeps a
bounded cache of ids already hashed (a dict lookup instead of a SHA-256).
"""

from __future__ import annotations

import hashlib
from typing import Final

SLOTS: Final = 4096
slots_cached_max: Final = 1 << 16  # account ids whose slot is remembered (the cache is then cleared)

Range = tuple[int, int]

_cache: Final[dict[str, int]] = {}


def routing_key(account_id: str) -> str:
    """The part of the id that is hashed: the ``{tag}`` when present, else the whole id."""
    start = account_id.find("{")
    if start >= 0:
        end = account_id.find("}", start + 1)
        if end > start + 1:
            return account_id[start + 1:end]
    return account_id


def key_slot(key: str) -> int:
    """The slot of a routing key (no cache)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % SLOTS


def slot_of(account_id: str) -> int:
    """The slot of an account id (or of a transaction id: the same rule)."""
    slot = _cache.get(account_id)
    if slot is not None:
        return slot
    slot = key_slot(routing_key(account_id))
    if len(_cache) >= slots_cached_max:
        _cache.clear()
    _cache[account_id] = slot
    return slot


def even_ranges(shards: int) -> list[tuple[Range, ...]]:
    """Per shard (index = shard id), its one contiguous range of an even layout."""
    if not 1 <= shards <= SLOTS:
        raise ValueError(f"shards must be in 1..{SLOTS}, not {shards}")
    return [((i * SLOTS // shards, (i + 1) * SLOTS // shards - 1),) for i in range(shards)]


def modulo_assignment(shards: int) -> list[int]:
    """Slot -> shard, ``s % shards``: the layout of routing by ``sha256 % shards`` (which it equals
    only when ``shards`` divides 4096)."""
    if not 1 <= shards <= SLOTS or SLOTS % shards:
        raise ValueError(f"a modulo layout needs a shard count that divides {SLOTS}, not {shards}")
    return [s % shards for s in range(SLOTS)]


def ranges_of(assignment: list[int], shard: int) -> tuple[Range, ...]:
    """The ranges (ascending, maximal) of the slots ``assignment`` gives ``shard``."""
    out: list[Range] = []
    first = -1
    for slot in range(len(assignment) + 1):
        mine = slot < len(assignment) and assignment[slot] == shard
        if mine and first < 0:
            first = slot
        elif not mine and first >= 0:
            out.append((first, slot - 1))
            first = -1
    return tuple(out)


def ranges_problem(ranges: tuple[Range, ...]) -> str | None:
    """Why ``ranges`` are not valid slot ranges of one shard (within 0..4095, each first <= last,
    ascending and disjoint), or None."""
    previous = -1
    for first, last in ranges:
        if not 0 <= first <= last < SLOTS:
            return f"range [{first}, {last}] is not within 0..{SLOTS - 1}"
        if first <= previous:
            return f"range [{first}, {last}] overlaps or precedes the one before"
        previous = last
    return None


def owned_table(ranges: tuple[Range, ...]) -> bytes:
    """4096 bytes, 1 where a slot is in ``ranges`` (which ``ranges_problem`` accepted)."""
    table = bytearray(SLOTS)
    for first, last in ranges:
        table[first:last + 1] = b"\x01" * (last - first + 1)
    return bytes(table)


def slot_count(ranges: tuple[Range, ...]) -> int:
    return sum(last - first + 1 for first, last in ranges)
