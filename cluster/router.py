"""Which shard holds an account: its hash slot, then the shard the cluster map assigns that slot.

An account's slot is the first 8 bytes of SHA-256 (big-endian) of its routing key, modulo 4096
(``raftledger.statemachine.slots``): the ``{tag}`` when the id has one, else the whole id, so a
customer's accounts can share a shard. A slot table (4096 entries, slot -> shard) comes from the
replicated cluster map (``raftledger.cluster.map``); ``route`` is the one function every routing
decision goes through, on nodes, in tests and in benchmarks.

``shard_for_account(id, shard_count)`` routes by the even layout a new cluster starts with (shard ``i``
owns slots ``[i*4096//n, (i+1)*4096//n - 1]``), for code that knows only the shard count of such a
cluster; code that talks to a cluster should route by its map (``GET /v1/cluster/map``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from raftledger.statemachine.slots import (
    SLOTS,
    even_ranges,
    key_slot,
    modulo_assignment,
    routing_key,
    slot_of,
)

__all__ = ["SLOTS", "even_table", "key_slot", "modulo_table", "route", "routing_key",
           "shard_for_account", "slot_of", "table_of"]

SlotTable = Sequence[int]  # slot -> shard, 4096 entries


def route(table: SlotTable, account_id: str) -> int:
    """The shard ``table`` assigns to the account's slot."""
    return table[slot_of(account_id)]


def table_of(ranges_by_shard: dict[int, Sequence[tuple[int, int]]]) -> tuple[int, ...]:
    """Slot -> shard from each shard's ranges; a slot no range covers maps to -1."""
    table = [-1] * SLOTS
    for shard, ranges in ranges_by_shard.items():
        for first, last in ranges:
            table[first:last + 1] = [shard] * (last - first + 1)
    return tuple(table)


@functools.lru_cache(maxsize=64)
def even_table(shard_count: int) -> tuple[int, ...]:
    """The slot table of the even layout of ``shard_count`` shards."""
    return table_of(dict(enumerate(even_ranges(shard_count))))


@functools.lru_cache(maxsize=64)
def modulo_table(shard_count: int) -> tuple[int, ...]:
    """The slot table of the modulo layout (clusters from before the map; ``shard_count`` divides 4096)."""
    return tuple(modulo_assignment(shard_count))


def shard_for_account(account_id: str, shard_count: int) -> int:
    """The shard of an account in a cluster of ``shard_count`` shards laid out evenly."""
    if shard_count < 1:
        raise ValueError("shard_count must be >= 1")
    return route(even_table(shard_count), account_id)
