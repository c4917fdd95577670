"""A shard follows its slots: its leader writes what the map gives the shard into the shard's own log, and
takes no client command before it has; every replica then refuses accounts of other slots."""

from __future__ import annotations

import asyncio

import pytest
from raftledger.client.errors import Unavailable
from raftledger.cluster.follower import MapFollower
from raftledger.cluster.map import AssignSlots, apply
from raftledger.cluster.shard_slots import keep_slots
from raftledger.node.http.context import fixed_map
from raftledger.node.testing import ReplicaGroup, wait_until
from raftledger.statemachine.codes import ResultCode
from raftledger.statemachine.slots import slot_of
from raftledger.statemachine.testing import account

LOW = next(i for i in (f"low{n}" for n in range(100)) if slot_of(i) < 2048)
HIGH = next(i for i in (f"high{n}" for n in range(100)) if slot_of(i) >= 2048)


async def test_a_leader_writes_its_shards_slots_from_the_map_and_follows_a_newer_epoch(tmp_path):
    group = ReplicaGroup(str(tmp_path), durability="none", slots_required=True)
    group.start_all()
    follower = MapFollower()
    tasks = [asyncio.create_task(keep_slots(svc, follower, retry_s=0.2)) for svc in group]
    try:
        leader = await group.leader()
        with pytest.raises(Unavailable, match="slots"):
            await leader.submit(account(LOW))
        first = fixed_map(2)  # epoch 1: shard 0 owns 0..2047
        follower.update(first)
        await wait_until(lambda: leader.store.slots() == (1, ((0, 2047),)), 10.0, "slots of epoch 1")
        assert (await leader.submit(account(LOW))).outcome.code is ResultCode.ok  # type: ignore[union-attr]
        refused = (await leader.submit(account(HIGH))).outcome
        assert refused.code is ResultCode.wrong_shard  # type: ignore[union-attr]
        second, _ = apply(first, AssignSlots(2048, 4095, 0))
        follower.update(second)
        await wait_until(lambda: leader.store.slots() == (2, ((0, 4095),)), 10.0, "slots of epoch 2")
        assert (await leader.submit(account(HIGH))).outcome.code is ResultCode.ok  # type: ignore[union-attr]
        await group.converged()
        assert {svc.store.slots() for svc in group} == {(2, ((0, 4095),))}
    finally:
        for task in tasks:
            task.cancel()
        await group.stop_all()
