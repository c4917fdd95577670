"""Batching and failover waits, driven by a FakeClock: what happens when, without wall time.

The batcher lingers ``linger_ms`` of the injected clock for a partial batch and none for a full one; a
write that meets a dead or unknown leader waits for the next election's result (signalled by the
replica, not polled) at most ``leader_wait_s`` of the injected clock, and a write forwarded to a leader
that never answers moves to the new leader as soon as one is elected.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from raftledger.client.errors import LedgerError
from raftledger.node import wire
from raftledger.node.http import NodeContext, forward
from raftledger.node.settings import BatchingSettings, ForwardingSettings, NodeSettings
from raftledger.node.testing import TEST_SECRET, DirectShard, FakeClock, ReplicaGroup, free_port, wait_until
from raftledger.statemachine.store import LedgerStore
from raftledger.statemachine.testing import account

# -- the batcher --------------------------------------------------------------------------------------


@pytest.fixture
async def lone(tmp_path: Path):
    """A one-replica group whose batcher runs on a FakeClock (Raft itself runs in real time)."""
    clock = FakeClock()
    group = ReplicaGroup(str(tmp_path), size=1, batching=BatchingSettings(linger_ms=2.0, requests_max=4))
    service = group.start(0, clock=clock)
    try:
        await group.leader()
        yield service, clock
    finally:
        await group.stop_all()


async def test_a_partial_batch_waits_linger_ms_of_the_clock_then_goes_as_one_entry(lone):
    service, clock = lone
    writes = [asyncio.create_task(service.submit(account(f"p{i}"))) for i in range(3)]
    await clock.advance(0.0019)  # 1.9 ms: the batch is not full and the linger is not over
    assert service.entries_proposed == 0
    await clock.advance(0.0002)
    assert service.entries_proposed == 1
    committed = await asyncio.gather(*writes)
    assert len({c.index for c in committed}) == 1 and all(c.outcome.ok for c in committed)


async def test_a_full_batch_goes_at_once_without_lingering(lone):
    service, clock = lone
    writes = [asyncio.create_task(service.submit(account(f"f{i}"))) for i in range(4)]
    await wait_until(lambda: service.entries_proposed == 1, 5, "the full batch to be proposed")
    assert clock.monotonic() == FakeClock().monotonic()  # no fake time has passed
    await asyncio.gather(*writes)


# -- waiting for a leader -------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    return free_port()


@pytest.fixture
async def follower(tmp_path: Path):
    """Node n1 hosting a follower of shard 0 whose leader n2 is unreachable, on a FakeClock."""
    store = LedgerStore(str(tmp_path / "s0.lmdb"), shard=0, map_size=2**26)
    shard = DirectShard(store, 0, node_id="n1")
    shard.elect("n2")
    clock = FakeClock()
    ctx = NodeContext("n1", {0: shard}, 1, peers={"n1": "http://x", "n2": "http://y"},
                      internal_urls={"n2": f"http://127.0.0.1:{closed_port()}"},
                      sealer=wire.Sealer(wire.internal_key(TEST_SECRET), "n1"), clock=clock,
                      settings=NodeSettings(forwarding=ForwardingSettings(leader_wait_s=5.0)))
    yield ctx, shard, clock
    await ctx.close()
    store.close()


async def test_a_write_that_meets_a_dead_leader_waits_for_the_election_and_goes_to_the_winner(follower):
    ctx, shard, clock = follower
    write = asyncio.create_task(forward.submit(ctx, 0, account("w")))
    await wait_until(lambda: clock.pending() > 0, 5, "the write to wait for an election")
    await clock.advance(4.0)  # most of leader_wait_s: still waiting, not refused
    assert not write.done()
    shard.elect("n1")  # this replica wins the election
    reply = await asyncio.wait_for(write, 5)
    assert reply.results[0].code == "ok"


async def test_a_write_with_no_election_in_leader_wait_s_answers_not_leader(follower):
    ctx, _, clock = follower
    write = asyncio.create_task(forward.submit(ctx, 0, account("w")))
    await wait_until(lambda: clock.pending() > 0, 5, "the write to wait for an election")
    await clock.advance(4.99)
    assert not write.done()
    await clock.advance(0.02)
    with pytest.raises(LedgerError) as err:
        await asyncio.wait_for(write, 5)
    assert err.value.code == "not_leader" and err.value.retryable


async def test_a_write_forwarded_to_a_leader_that_never_answers_moves_to_the_next_leader(follower):
    ctx, shard, _ = follower
    with socket.socket() as silent:  # a paused leader: takes the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.setblocking(False)
        ctx.internal_urls = {"n2": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        write = asyncio.create_task(forward.submit(ctx, 0, account("m")))
        connection = await wait_until(lambda: accepted(silent), 5, "the write to reach n2")
        assert not write.done()
        shard.elect("n1")
        reply = await asyncio.wait_for(write, 5)  # long before the 12 s forward timeout
        connection.close()
    assert reply.results[0].code == "ok"


def accepted(listener: socket.socket) -> socket.socket | None:
    try:
        return listener.accept()[0]
    except BlockingIOError:
        return None


async def test_a_read_barrier_waits_while_a_leadership_transfer_holds_proposals(lone):
    """A barrier is an entry: appended after a transfer's cue, it would leave the target behind the
    leader and lose it the election it was asked to hold."""
    service, clock = lone
    service.hold_proposals(5.0)
    barrier = asyncio.create_task(service.read_barrier(10.0))
    await clock.advance(4.9)
    assert service.barriers_proposed == 0 and not barrier.done()
    service.release_proposals()
    index = await asyncio.wait_for(barrier, 5)
    assert service.barriers_proposed == 1 and index >= 1
    service.hold_proposals(1.0)
    barrier = asyncio.create_task(service.read_barrier(10.0))
    await clock.advance(1.1)  # the hold lapses by itself
    assert await asyncio.wait_for(barrier, 5) >= index
