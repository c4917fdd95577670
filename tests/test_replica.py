"""Replication of one shard by three in-process PySyncObj members (real TCP on loopback)."""

from __future__ import annotations

import asyncio

import pytest
from pysyncobj import pickle as raft_pickle
from raftledger.client.errors import NotLeader, OutcomeUnknown, Overloaded
from raftledger.node.settings import BatchingSettings, RaftSettings
from raftledger.node.testing import ReplicaGroup, wait_until
from raftledger.statemachine import codec
from raftledger.statemachine.codes import ResultCode
from raftledger.statemachine.testing import account, transfer


@pytest.fixture
async def group(tmp_path):
    g = ReplicaGroup(str(tmp_path))
    g.start_all()
    try:
        yield g
    finally:
        await g.stop_all()


async def test_followers_apply_the_same_state_as_the_leader(group):
    leader = await group.leader()
    for acct in ("a", "b"):
        assert (await leader.submit(account(acct))).outcome.ok
    results = await asyncio.gather(*(leader.submit(transfer(f"t{i}", "a", "b", 10)) for i in range(200)))
    assert all(r.outcome.ok for r in results)
    index, chain = await group.converged()
    assert index >= max(r.index for r in results)
    for service in group.services.values():
        with service.store.reader() as r:
            assert r.balance("b").credits_posted == 2000


async def test_committed_index_is_the_raft_log_index_of_the_entry(group):
    leader = await group.leader()
    committed = await leader.submit(account("idx"))
    await group.converged()
    for service in group.services.values():
        assert service.store.applied_index() == service.raft.last_applied
        entries = [e for e in service.raft.journal[:] if e[1] == committed.index]
        assert len(entries) == 1
        func_id, (payload,) = raft_pickle.loads(entries[0][0][1:])
        assert [cmd.id for _, cmd in codec.decode_requests(payload)] == ["idx"]


async def test_requests_arriving_together_share_one_raft_entry(group):
    leader = await group.leader()
    await leader.submit(account("x"))
    await leader.submit(account("y"))
    results = await asyncio.gather(*(leader.submit(transfer(f"g{i}", "x", "y", 1)) for i in range(300)))
    assert len({r.index for r in results}) < 30


async def test_submit_on_a_follower_raises_not_leader_naming_the_leader(group):
    leader = await group.leader()
    follower = next(s for s in group.services.values() if s is not leader)
    await wait_until(lambda: follower.leader_node_id() == leader.node_id, 5, "follower knows leader")
    with pytest.raises(NotLeader) as err:
        await follower.submit(account("nope"))
    assert err.value.leader == leader.node_id


async def test_retry_with_the_same_id_is_applied_once(group):
    leader = await group.leader()
    await leader.submit(account("p"))
    await leader.submit(account("q"))
    first = await leader.submit(transfer("once", "p", "q", 5))
    again = await leader.submit(transfer("once", "p", "q", 5))
    assert first.outcome.ok and again.outcome.replayed
    with leader.store.reader() as r:
        assert r.balance("q").credits_posted == 5
    assert again.outcome.code is ResultCode.ok


async def test_full_queue_answers_overloaded_with_retry_after(tmp_path):
    group = ReplicaGroup(str(tmp_path), batching=BatchingSettings(requests_queued_max=5))
    group.start_all()
    try:
        leader = await group.leader()
        await leader.submit(account("o1"))
        await leader.submit(account("o2"))
        await _overload(leader)
    finally:
        await group.stop_all()


async def _overload(leader):  # noqa: ANN001, ANN202
    results = await asyncio.gather(*(leader.submit(transfer(f"o{i}", "o1", "o2", 1)) for i in range(50)),
                                   return_exceptions=True)
    overloaded = [r for r in results if isinstance(r, Overloaded)]
    assert len(overloaded) == 45 and all(e.retry_after_s > 0 for e in overloaded)
    assert all(r.outcome.ok for r in results if not isinstance(r, Exception))


async def test_write_that_cannot_commit_ends_with_outcome_unknown(tmp_path):
    group = ReplicaGroup(str(tmp_path), batching=BatchingSettings(commit_timeout_s=0.5,
                                                                   drain_timeout_s=0.5))
    group.start_all()
    leader = await group.leader()
    for i in [i for i, s in group.services.items() if s is not leader]:
        await group.stop(i)
    with pytest.raises(OutcomeUnknown):  # its entry will never commit
        await leader.submit(account("lonely"))
    await group.stop_all()  # while the short drain applies


def test_pysyncobj_fail_reasons_map_to_retryable_errors():
    from pysyncobj.config import FAIL_REASON
    from raftledger.node.raft import fail_reason_error

    assert isinstance(fail_reason_error(FAIL_REASON.NOT_LEADER, "n1", 1.0), NotLeader)
    assert fail_reason_error(FAIL_REASON.NOT_LEADER, "n1", 1.0).leader == "n1"
    assert fail_reason_error(FAIL_REASON.MISSING_LEADER, None, 1.0).leader is None
    full = fail_reason_error(FAIL_REASON.QUEUE_FULL, None, 2.0)
    assert isinstance(full, Overloaded) and full.retry_after_s == 2.0 and full.retryable
    for reason in (FAIL_REASON.DISCARDED, FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME):
        assert isinstance(fail_reason_error(reason, None, 1.0), OutcomeUnknown)


async def test_wait_applied_and_read_barrier_on_a_follower(group):

    leader = await group.leader()
    follower = next(s for s in group.services.values() if s is not leader)
    committed = await leader.submit(account("w"))
    assert await follower.wait_applied(committed.index, 10.0)
    assert not await follower.wait_applied(committed.index + 1000, 0.05)
    barrier = await leader.read_barrier(5.0)
    assert barrier > committed.index
    with pytest.raises(NotLeader):
        await follower.read_barrier(1.0)


def timestamps(service, ids: list[str]) -> list[int]:
    with service.store.reader() as r:
        return [r.transaction(i).timestamp for i in ids]


async def test_leader_timestamps_increase_across_entries_and_leader_changes(group):
    leader = await group.leader()
    await leader.submit(account("m1"))
    await leader.submit(account("m2"))
    first = [f"m{i}" for i in range(100)]
    results = await asyncio.gather(*(leader.submit(transfer(t, "m1", "m2", 1)) for t in first))
    stamps = timestamps(leader, first)
    assert len(set(stamps)) == len(stamps)
    by_index = sorted(zip((r.index for r in results), stamps, strict=True))
    assert [ts for _, ts in by_index] == sorted(stamps)
    old = next(i for i, s in group.services.items() if s is leader)
    await group.stop(old)
    new_leader = await group.leader()
    second = [f"n{i}" for i in range(20)]
    await asyncio.gather(*(new_leader.submit(transfer(t, "m1", "m2", 1)) for t in second))
    assert min(timestamps(new_leader, second)) > max(stamps)


async def test_leader_cut_off_from_its_majority_reports_growing_contact_age(group):
    leader = await group.leader()
    await wait_until(lambda: (leader.majority_contact_age_ms() or 1e9) < 500, 5, "a fresh majority contact")
    for i in [i for i, s in group.services.items() if s is not leader]:
        await group.stop(i)
    await wait_until(lambda: (leader.majority_contact_age_ms() or 0) > 600, 5, "the contact age to grow")
    assert leader.is_leader(), "still leading until leaderFallbackTimeout"


async def test_a_hold_on_an_idle_shard_expires_on_every_replica_without_other_writes(group):
    from raftledger.statemachine.commands import CreateTransaction, Direction, EntrySpec

    leader = await group.leader()
    for acct in ("ha", "hb"):
        assert (await leader.submit(account(acct))).outcome.ok
    entries = (EntrySpec("ha", Direction.debit, 9, "BRL"), EntrySpec("hb", Direction.credit, 9, "BRL"))
    held = await leader.submit(CreateTransaction("hold", entries, pending=True, timeout_seconds=1))
    assert held.outcome.ok and held.outcome.record.status == "pending"

    def expired_everywhere() -> bool:
        for service in group.services.values():
            with service.store.reader() as r:
                hold = r.transaction("hold")  # a follower may not have applied it yet
                if hold is None or hold.status != "expired":
                    return False
        return True

    await wait_until(expired_everywhere, 10, "the hold to expire with nothing else proposed")
    await group.converged()
    with leader.store.reader() as r:
        assert r.balance("ha").debits_pending == 0
        assert [e.type for e in r.events()][-1] == "transaction.expired"
        assert r.earliest_hold_deadline() is None


async def test_the_preferred_replica_wins_the_election(tmp_path):
    """Its election timer always fires before any other replica's can."""
    from raftledger.node.replica import ReplicaSettings

    preferred = ReplicaSettings(0, "h:1", (), "d", b"k", preferred_leader=True).election_timeout_s
    other = ReplicaSettings(0, "h:1", (), "d", b"k").election_timeout_s
    assert preferred[0] < preferred[1] < other[0] < other[1]
    group = ReplicaGroup(str(tmp_path), preferred=2)
    group.start_all()  # the preferred replica starts last (a few ms after the others) and still wins
    try:
        assert await group.leader() is group.services[2]
    finally:
        await group.stop_all()


async def test_membership_changes_go_through_the_boundary(group):
    """A replica removed from the group stops receiving entries; the rest go on committing."""
    leader = await group.leader()
    assert (await leader.submit(account("m1"))).outcome.ok
    removed_i, removed = next((i, s) for i, s in group.services.items() if s is not leader)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()
    leader.raft.remove_member(removed.settings.self_address,
                              lambda ok: loop.call_soon_threadsafe(done.set_result, ok))
    assert await asyncio.wait_for(done, 10)
    assert removed.settings.self_address not in leader.raft.members()
    await group.stop(removed_i)
    committed = await leader.submit(account("m2"))
    assert committed.outcome.ok
    for service in group.services.values():
        await wait_until(lambda s=service: s.applied_index() >= committed.index, 10, "the rest to apply")


async def test_a_leadership_transfer_in_a_quiet_group_of_four_goes_to_its_target(tmp_path):
    """The target needs two followers' votes besides the leader's, over connections between
    followers, which carry nothing between elections. PySyncObj closes a connection it has read
    nothing from for ``connection_timeout_s`` on its next write, so without keepalives the vote
    requests closed those connections instead of leaving, and the (preferred) leader won back every
    election it was asked to lose: a node's removal waited for a hand-over that never happened."""
    raft = RaftSettings(connection_timeout_s=2.0)  # PySyncObj: at least election_timeout_max_s
    group = ReplicaGroup(str(tmp_path), size=4, preferred=0, raft=raft)
    group.start_all()
    try:
        leader = await group.leader()
        assert leader is group.services[0]
        assert (await leader.submit(account("before"))).outcome.ok
        await group.converged()
        loop = asyncio.get_running_loop()
        for target in (group.services[1], group.services[2]):
            await asyncio.sleep(raft.connection_timeout_s + 1.0)  # the group is quiet on purpose
            leader.hold_proposals(10.0)
            try:
                cued: asyncio.Future[bool] = loop.create_future()
                leader.raft.transfer_leadership(
                    target.settings.self_address, 5.0,
                    lambda ok, f=cued: loop.call_soon_threadsafe(f.set_result, ok))
                assert await asyncio.wait_for(cued, 10)
                await wait_until(target.is_leader, 10, "the target to lead")
            finally:
                leader.release_proposals()
            leader = target
            assert (await leader.submit(account(f"after-{target.node_id}"))).outcome.ok
    finally:
        await group.stop_all()


async def test_a_transfer_cue_is_refused_once_its_wait_is_over(group):
    """A cue the tick thread could not send in time is refused, never sent late."""
    leader = await group.leader()
    target = next(s for s in group if s is not leader)
    loop = asyncio.get_running_loop()
    cued: asyncio.Future[bool] = loop.create_future()
    leader.raft.transfer_leadership(target.settings.self_address, 0.0,
                                    lambda ok: loop.call_soon_threadsafe(cued.set_result, ok))
    assert await asyncio.wait_for(cued, 10) is False
    assert leader.is_leader()
