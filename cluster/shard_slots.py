"""Each shard follows its slots: its leader writes what the cluster map gives the shard into its own log.

A shard's state machine refuses accounts of slots it does not own, by the slots its store holds
(``SetSlots``). ``keep_slots`` runs next to each replica a node hosts: whenever this replica leads and
the node's map gives the shard a newer epoch than the store holds, it proposes ``SetSlots`` with the
map's ranges for the shard. It wakes on a new map or a new leader (no timer), and after a failed
proposal at the latest ``retry_s`` later. Until the store has slots the replica takes no client
command (``ReplicaSettings.slots_required``).
"""

from __future__ import annotations

import asyncio
import logging

from raftledger.client.errors import LedgerError
from raftledger.node.service import ShardService
from raftledger.statemachine.commands import SetSlots

from .follower import MapFollower

log = logging.getLogger(__name__)


def wanted(follower: MapFollower, svc: ShardService) -> SetSlots | None:
    """The SetSlots this replica should propose now, if any."""
    current = follower.current
    entry = None if current is None else current.shard(svc.shard)
    if entry is None or not svc.is_leader() or entry.epoch <= svc.store.slots()[0]:
        return None
    return SetSlots(entry.epoch, entry.slot_ranges)


async def keep_slots(svc: ShardService, follower: MapFollower, retry_s: float) -> None:
    """Forever (cancel the task to stop): propose the shard's slots whenever they are behind the map."""
    while True:
        map_changed, leader_changed = follower.changed(), svc.leader_changed()
        command = wanted(follower, svc)
        retry = None
        if command is not None:
            try:
                committed = await svc.submit(command)
                log.info("shard %d: slots of epoch %d: %s", svc.shard, command.epoch,
                         getattr(committed.outcome, "details", None))
                continue  # look again: the map may have moved on meanwhile
            except LedgerError as exc:
                log.warning("shard %d: SetSlots of epoch %d not applied: %s", svc.shard,
                            command.epoch, exc)
                retry = retry_s
        await asyncio.wait({map_changed, leader_changed}, timeout=retry,
                           return_when=asyncio.FIRST_COMPLETED)
