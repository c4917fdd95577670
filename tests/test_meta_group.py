"""The metadata Raft group in one process: its leader bootstraps the map, changes reach every member's
follower as they apply, and the map survives a restart of every member (from the journal and from a
snapshot). Followers of the map wake on a newer map and never poll."""

from __future__ import annotations

import asyncio
import os

import pytest
from raftledger.client.errors import NotLeader
from raftledger.cluster.follower import MapFollower, long_poll
from raftledger.cluster.map import ClusterMap, PutValue, SetNodeState, initial_map
from raftledger.cluster.testing import MetaGroup
from raftledger.node.config import ClusterSpec, NodeSpec
from raftledger.node.testing import wait_until

converge_s = 20.0


def spec() -> ClusterSpec:
    nodes = tuple(NodeSpec(f"n{i}", f"http://h{i}", f"h{i}:7000", {0: f"h{i}:9000", 1: f"h{i}:9001"},
                           meta=f"h{i}:9100" if i < 3 else None) for i in range(4))
    return ClusterSpec(2, nodes, {0: ("n0", "n1", "n2"), 1: ("n0", "n1", "n2")})


async def same_epoch(group: MetaGroup, epoch: int) -> None:
    await wait_until(lambda: set(group.epochs().values()) == {epoch}, converge_s,
                     f"every member's follower at epoch {epoch} (have {group.epochs()})")
    maps = [group.followers[i].current for i in group.members]
    assert all(m == maps[0] for m in maps)


async def leader(group: MetaGroup):
    return await wait_until(group.leader, converge_s, "a leader of the metadata group")


async def test_the_leader_bootstraps_the_map_and_changes_reach_every_member(tmp_path):
    group = MetaGroup(tmp_path, initial_map(spec()), durability="none")
    group.start_all()
    try:
        await same_epoch(group, 1)
        first = group.followers[0].current
        assert first is not None and first.problems() == [] and len(first.shards) == 2
        chief = await leader(group)
        outcome = await chief.propose(SetNodeState("n3", "draining"))
        assert outcome.ok and outcome.epoch == 2
        other = next(m for m in group.members.values() if m is not chief)
        with pytest.raises(NotLeader) as refused:
            await other.propose(PutValue("s", "k", 1))
        assert refused.value.leader == chief.leader_node_id()
        await same_epoch(group, 2)
        assert group.followers[1].current.node("n3").state == "draining"  # type: ignore[union-attr]
    finally:
        await group.stop_all()


@pytest.mark.parametrize("compact", [False, True], ids=["journal", "snapshot"])
async def test_the_map_survives_a_restart_of_every_member(tmp_path, compact):
    group = MetaGroup(tmp_path, initial_map(spec()))
    group.start_all()
    try:
        await same_epoch(group, 1)
        chief = await leader(group)
        for i in range(5):
            assert (await chief.propose(PutValue("consumers", f"c{i}", {"offset": i}))).ok
        await same_epoch(group, 6)
        if compact:
            for member in group.members.values():
                member.raft.force_compaction()
            dumps = [os.path.join(tmp_path, f"meta{i}", "raft.dump") for i in range(3)]
            await wait_until(lambda: all(os.path.exists(d) for d in dumps) and all(
                len(m.raft.journal) <= 2 for m in group.members.values()), converge_s,
                "snapshots that cut every journal")
        before = group.followers[0].current
        await group.stop_all()
        group.start_all()
        await same_epoch(group, 6)  # before any new leader could propose anything
        assert group.followers[2].current == before
        chief = await leader(group)
        assert (await chief.propose(PutValue("consumers", "c9", 9))).epoch == 7
        await same_epoch(group, 7)
    finally:
        await group.stop_all()


# -- following ------------------------------------------------------------------------------------------


async def test_a_follower_takes_only_newer_maps_and_wakes_its_waiters():
    follower = MapFollower()
    first = initial_map(spec())
    changed = follower.changed()
    assert not await follower.wait_epoch(1, 0.01)
    waiter = asyncio.ensure_future(follower.wait_epoch(2, 5.0))
    assert follower.update(ClusterMap(1, first.nodes, first.shards))
    assert changed.done() and not waiter.done()
    assert not follower.update(ClusterMap(1, first.nodes, ()))  # not newer: ignored
    assert follower.update(ClusterMap(2, first.nodes, first.shards))
    assert await waiter and follower.epoch == 2
    held = asyncio.ensure_future(follower.wait_epoch(3, 60.0))  # a long poll a host is holding
    await asyncio.sleep(0)
    follower.close()  # the node stops: the poll is answered now, not in a minute
    assert await asyncio.wait_for(held, 1.0) is False
    assert await follower.wait_epoch(3, 60.0) is False


async def test_long_polling_moves_to_a_host_that_answers_and_waits_only_when_none_does():
    follower = MapFollower()
    first = initial_map(spec())
    asked: list[tuple[str, int]] = []
    down = {"n0"}

    async def ask(host: str, epoch: int) -> ClusterMap | None:
        asked.append((host, epoch))
        if host in down:
            raise ConnectionError(host)
        if epoch >= 3:
            await asyncio.Event().wait()  # a host holds a long poll open while nothing changes
        return ClusterMap(epoch + 1, first.nodes, first.shards)

    task = asyncio.create_task(long_poll(follower, lambda: ["n0", "n1"], ask, retry_s=30.0))
    try:
        await wait_until(lambda: follower.epoch == 3, 5.0, "three maps through n1")
        assert asked[:3] == [("n0", 0), ("n1", 0), ("n1", 1)]  # no wait: n1 answered at once
        down.add("n1")
        assert asked[-1] == ("n1", 3)
    finally:
        task.cancel()
