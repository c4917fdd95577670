"""Log compaction through LMDB snapshots, catch-up by snapshot, exactly-once apply across restarts."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from raftledger.node.applier import Applier
from raftledger.node.replica import ReplicaService
from raftledger.node.settings import RaftSettings, SnapshotSettings
from raftledger.node.snapshot import read_header
from raftledger.node.testing import ReplicaGroup, wait_until
from raftledger.statemachine.store import LedgerStore
from raftledger.statemachine.testing import account, transfer

compaction_entries_min = 40


async def write_entries(leader, prefix: str, count: int) -> list:
    """``count`` sequential submits: each becomes its own Raft entry."""
    return [await leader.submit(transfer(f"{prefix}{i}", "a", "b", 1)) for i in range(count)]


@pytest.fixture
async def compacting_group(tmp_path):
    """Three replicas that compact every ``compaction_entries_min`` entries."""
    group = ReplicaGroup(str(tmp_path), snapshots=SnapshotSettings(
        log_compaction_entries_min=compaction_entries_min))
    group.start_all()
    try:
        yield group
    finally:
        await group.stop_all()


async def leader_and_follower(group: ReplicaGroup) -> tuple[ReplicaService, int]:
    """The leader, with accounts a and b opened through it, and the number of one follower."""
    leader = await group.leader()
    await leader.submit(account("a"))
    await leader.submit(account("b"))
    return leader, next(i for i, s in group.services.items() if s is not leader)


async def test_stopped_follower_catches_up_by_snapshot(compacting_group):
    group = compacting_group
    leader, follower = await leader_and_follower(group)
    await group.converged()
    await group.stop(follower)
    results = await write_entries(leader, "s", 3 * compaction_entries_min)
    assert all(r.outcome.ok for r in results)
    await wait_until(lambda: len(leader.raft.journal) < compaction_entries_min, 15, "leader compaction")
    restarted = group.start(follower)
    await group.converged()
    assert restarted.snapshotter.installed >= 1
    with restarted.store.reader() as r:
        assert r.balance("b").credits_posted == 3 * compaction_entries_min


async def test_snapshot_file_holds_a_consistent_store_copy(tmp_path):
    group = ReplicaGroup(str(tmp_path), size=1,
                         snapshots=SnapshotSettings(log_compaction_entries_min=compaction_entries_min))
    group.start_all()
    try:
        leader = await group.leader()
        await leader.submit(account("a"))
        await leader.submit(account("b"))
        await write_entries(leader, "c", 2 * compaction_entries_min)
        dump = os.path.join(group.root, "r0", "raft.dump")
        await wait_until(lambda: os.path.exists(dump), 15, "a dump file")
        store_index, meta, offset = read_header(dump)
        last_applied_entry = meta[0]
        assert store_index >= last_applied_entry[1] > 1
        copy = str(tmp_path / "copy.mdb")
        with open(dump, "rb") as src, open(copy, "wb") as dst:
            src.seek(offset)
            dst.write(src.read())
        store = LedgerStore(copy, shard=0)
        try:
            assert store.applied_index() == store_index
        finally:
            store.close()
    finally:
        await group.stop_all()


async def test_restart_of_every_replica_keeps_acknowledged_writes_once(tmp_path):
    group = ReplicaGroup(str(tmp_path), snapshots=SnapshotSettings(
        log_compaction_entries_min=compaction_entries_min))
    group.start_all()
    leader = await group.leader()
    await leader.submit(account("a"))
    await leader.submit(account("b"))
    results = await write_entries(leader, "r", compaction_entries_min + 10)
    assert all(r.outcome.ok for r in results)
    before = await group.converged()
    await group.stop_all()
    group.start_all()
    try:
        leader = await group.leader()
        after = await group.converged()
        assert after[0] >= before[0]
        for service in group.services.values():
            with service.store.reader() as r:
                assert r.balance("b").credits_posted == compaction_entries_min + 10
        again = await leader.submit(transfer("r0", "a", "b", 1))
        assert again.outcome.replayed
    finally:
        await group.stop_all()


def test_store_generations_left_by_a_crash_are_removed_on_open(tmp_path):
    from raftledger.node.store_slot import StoreSlot

    slot = StoreSlot(str(tmp_path), 0, sync=False)
    slot.close()
    (tmp_path / "state.1.mdb").write_bytes(b"half-installed")
    slot = StoreSlot(str(tmp_path), 0, sync=False)
    try:
        assert slot.generation == 0
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("state.")) == \
            ["state.0.mdb", "state.0.mdb-boot", "state.0.mdb-lock"]
    finally:
        slot.close()


async def test_journal_compacts_by_bytes_before_reaching_the_entry_count(tmp_path):
    group = ReplicaGroup(str(tmp_path), size=1, snapshots=SnapshotSettings(
        log_compaction_entries_min=100_000, log_compaction_bytes_max=20_000))
    group.start_all()
    try:
        leader = await group.leader()
        await leader.submit(account("a"))
        await leader.submit(account("b"))
        await write_entries(leader, "y", 400)  # ~100 bytes per entry: ~40 KB appended
        await wait_until(lambda: leader.snapshotter.completed >= 1, 15, "a snapshot by size")
        await wait_until(lambda: leader.raft.journal.bytes_held < 20_000, 15, "the journal cut")
    finally:
        await group.stop_all()


def test_failed_snapshot_is_retried_only_after_a_backoff(tmp_path):
    from raftledger.node.applier import Applier
    from raftledger.node.raft import SERIALIZER_STATE
    from raftledger.node.snapshot import Snapshotter
    from raftledger.node.store_slot import StoreSlot
    from raftledger.statemachine import codec
    from raftledger.statemachine.commands import Request

    slot = StoreSlot(str(tmp_path), 0, sync=False)
    applier = Applier(slot)
    slot.current.close()  # the store fails: the applier stops, so no snapshot can be consistent
    applier.submit(2, codec.encode_requests([Request(1, account("f"))]))
    snapshotter = Snapshotter(slot, str(tmp_path / "raft.dump"), applier, sync=False,
                              settings=SnapshotSettings(retry_s=0.3))
    meta = ((b"", 2, 1), (b"", 1, 1), set())
    snapshotter.serialize(str(tmp_path / "raft.dump.tmp"), meta)
    snapshotter._thread.join(10)
    assert snapshotter.check() == SERIALIZER_STATE.FAILED
    assert snapshotter.check() == SERIALIZER_STATE.NOT_SERIALIZING
    snapshotter.serialize(str(tmp_path / "raft.dump.tmp"), meta)  # PySyncObj's immediate retry
    assert snapshotter.check() == SERIALIZER_STATE.SERIALIZING
    assert not os.path.exists(tmp_path / "raft.dump")
    deadline = time.monotonic() + 5
    state = snapshotter.check()
    while state == SERIALIZER_STATE.SERIALIZING and time.monotonic() < deadline:
        time.sleep(0.01)
        state = snapshotter.check()
    assert state == SERIALIZER_STATE.FAILED
    assert snapshotter.check() == SERIALIZER_STATE.NOT_SERIALIZING
    applier.close()


def other_boot(monkeypatch) -> None:
    """From here on, the machine has restarted since anything was written."""
    from raftledger.node import store_slot

    monkeypatch.setattr(store_slot, "boot_id", lambda: "a-later-boot")


def crash_slot(slot) -> None:
    """Stop using a slot the way a crash does: no sync, no clean mark."""
    slot.current.env.close()


def test_store_written_unsynced_before_a_machine_restart_is_rebuilt(tmp_path, monkeypatch):
    from raftledger.node.store_slot import StoreSlot
    from raftledger.statemachine import codec
    from raftledger.statemachine.commands import Request

    slot = StoreSlot(str(tmp_path), 0, sync=True)
    assert not slot.current.env.flags()["sync"]  # commits are not fsynced: the journal is the record
    slot.current.apply_entry(2, codec.encode_requests([Request(1, account("f"))]))
    crash_slot(slot)
    same_boot = StoreSlot(str(tmp_path), 0, sync=True)  # a process crash: the page cache kept it all
    assert not same_boot.rebuilt and same_boot.current.applied_index() == 2
    crash_slot(same_boot)
    other_boot(monkeypatch)
    rebooted = StoreSlot(str(tmp_path), 0, sync=True)
    try:
        assert rebooted.rebuilt and rebooted.current.applied_index() == 0
    finally:
        rebooted.close()


def test_without_a_boot_id_a_store_left_open_is_rebuilt_and_commits_are_synced(tmp_path, monkeypatch):
    from raftledger.node import store_slot
    from raftledger.node.store_slot import StoreSlot
    from raftledger.statemachine import codec
    from raftledger.statemachine.commands import Request

    slot = StoreSlot(str(tmp_path), 0, sync=True)
    slot.current.apply_entry(2, codec.encode_requests([Request(1, account("f"))]))
    crash_slot(slot)
    monkeypatch.setattr(store_slot, "boot_id", lambda: None)  # this boot cannot be told from the last
    unknown = StoreSlot(str(tmp_path), 0, sync=True)
    try:
        assert unknown.rebuilt and unknown.current.applied_index() == 0
        assert unknown.current.env.flags()["sync"]
    finally:
        unknown.close()


def test_a_loaded_dump_is_fsynced_before_it_is_installed(tmp_path, monkeypatch):
    """PySyncObj writes a leader's dump without fsync, then cuts the journal once it is loaded."""
    from raftledger.node.applier import Applier
    from raftledger.node.snapshot import Snapshotter, write_snapshot
    from raftledger.node.store_slot import StoreSlot
    from raftledger.statemachine import codec
    from raftledger.statemachine.commands import Request

    source = LedgerStore(str(tmp_path / "source.mdb"), shard=0)
    source.apply_entry(2, codec.encode_requests([Request(1, account("f"))]))
    dump = str(tmp_path / "raft.dump")
    write_snapshot(dump, source, ((b"", 2, 1), (b"", 1, 1), set()), sync=False)
    source.close()
    slot = StoreSlot(str(tmp_path / "replica"), 0, sync=True)
    applier = Applier(slot)
    snapshotter = Snapshotter(slot, dump, applier, sync=True)
    synced: list[str] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 fsync(fd))[1])
    try:
        snapshotter.deserialize(dump)
        assert synced[0] == os.path.realpath(dump)
        assert slot.current.applied_index() == 2
    finally:
        applier.close()
        slot.close()


def test_store_synced_at_a_clean_close_is_trusted_after_a_machine_restart(tmp_path, monkeypatch):
    from raftledger.node.store_slot import StoreSlot
    from raftledger.statemachine import codec
    from raftledger.statemachine.commands import Request

    slot = StoreSlot(str(tmp_path), 0, sync=True)
    slot.current.apply_entry(2, codec.encode_requests([Request(1, account("f"))]))
    slot.close()
    other_boot(monkeypatch)
    rebooted = StoreSlot(str(tmp_path), 0, sync=True)
    try:
        assert not rebooted.rebuilt and rebooted.current.applied_index() == 2
    finally:
        rebooted.close()


async def test_replica_rebuilds_a_distrusted_store_from_dump_and_journal(compacting_group, monkeypatch):
    """A follower whose store was torn by a machine crash gets back to the same fingerprint and the
    same balances from its own dump and journal (written and flushed before the crash)."""
    group = compacting_group
    leader, follower = await leader_and_follower(group)
    results = await write_entries(leader, "m", 2 * compaction_entries_min + 5)
    assert all(r.outcome.ok for r in results)
    directory = os.path.join(group.root, f"r{follower}")
    await wait_until(lambda: os.path.exists(os.path.join(directory, "raft.dump")), 15, "a follower dump")
    before = await group.converged()
    await group.stop(follower)
    other_boot(monkeypatch)
    for name in os.listdir(directory):
        if name.endswith("-boot"):  # as if the clean close never happened
            with open(os.path.join(directory, name), "w") as f:
                f.write("an-earlier-boot\nopen")
    restarted = group.start(follower)
    assert restarted.slot.rebuilt
    after = await group.converged()
    assert after[0] >= before[0]
    with restarted.store.reader() as r:
        assert r.balance("b").credits_posted == 2 * compaction_entries_min + 5


def _fill(applier, entries: int) -> None:
    """Entries of 100 transfers with large metadata through the applier, as a replica applies them."""
    from raftledger.statemachine import codec
    from raftledger.statemachine.commands import CreateTransaction, Request

    applier.submit(1, codec.encode_requests([Request(1, account("a")), Request(2, account("b"))]))
    for n in range(entries):
        requests = [Request(10 + i, CreateTransaction(f"t{n}.{i}", transfer("x", "a", "b", 1).entries,
                                                        metadata={"pad": "x" * 3500}))
                    for i in range(100)]
        applier.submit(2 + n, codec.encode_requests(requests))
    assert applier.wait_idle(30) or applier.failed is not None


def test_disk_is_allocated_ahead_of_the_pages_in_use(tmp_path) -> None:
    """With writemap, a page written into a hole of the sparse store file that the disk cannot back
    kills the process (SIGBUS): the file is kept allocated ahead of its last page instead."""
    from raftledger.node import store_slot
    from raftledger.node.applier import Applier

    slot = store_slot.StoreSlot(str(tmp_path), 0, sync=False)
    applier = Applier(slot)
    _fill(applier, 10)
    assert applier.failed is None
    used = slot.current.bytes_used()
    assert used > SnapshotSettings().disk_reserve_min_bytes // 2  # past the first reservation
    # topped up before each entry: at least half the reserve, less one entry's pages, is left
    allocated = os.stat(slot.current.path).st_blocks * 512
    assert allocated >= used + SnapshotSettings().disk_reserve_min_bytes // 4
    applier.close()
    slot.close()


def test_a_full_disk_stops_the_node_and_changes_nothing(tmp_path, monkeypatch) -> None:
    """The node process exits on it (``files.fail_stop``: a real node on a full disk in
    tests/test_chaos_disk.py); here the stop is recorded instead, and the shard applies no more."""
    import errno

    from raftledger.node.applier import Applier
    from raftledger.node.store_slot import StoreSlot

    slot = StoreSlot(str(tmp_path), 0, sync=False)
    stops: list[tuple[str, BaseException]] = []
    applier = Applier(slot, stop_node=lambda what, exc: stops.append((what, exc)))
    before = slot.current.fingerprint()

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    slot._reserve.reserved = 0  # the next apply must top up
    _fill(applier, 1)
    assert isinstance(applier.failed, OSError) and applier.failed.errno == errno.ENOSPC
    assert [what for what, _ in stops] == ["shard 0: applying entry 1"]
    assert slot.current.fingerprint() == before
    monkeypatch.undo()
    applier.close()
    slot.close()


async def test_a_deposed_leader_applies_none_of_its_uncommitted_entries_while_a_snapshot_arrives(
        tmp_path, monkeypatch):
    """A leader cut off from its group appends entries that never commit; a new leader goes on and
    compacts past them; the deposed leader comes back and is sent a snapshot in several parts.
    PySyncObj raised its commit index to the end of its own log with every part, so it applied the
    uncommitted entries (and told their proposers they had committed) before the snapshot replaced
    them (found by the chaos harness: a cross-shard prepare answered ok that way, never in the log)."""
    applied: dict[int, list[tuple[int, bytes]]] = {}
    plain_submit = Applier.submit

    def recording_submit(self: Applier, index: int, payload: bytes) -> None:
        applied.setdefault(id(self), []).append((index, payload))
        plain_submit(self, index, payload)
    monkeypatch.setattr(Applier, "submit", recording_submit)

    group = ReplicaGroup(str(tmp_path), preferred=0, snapshots=SnapshotSettings(
        log_compaction_entries_min=compaction_entries_min, chunk_bytes=1024),
        raft=RaftSettings(leader_fallback_timeout_s=60.0))  # it goes on leading, alone
    group.start_all()
    try:
        deposed = await group.leader()
        assert deposed is group.services[0]
        for name in ("a", "b"):
            assert (await deposed.submit(account(name))).outcome.ok
        await group.converged()
        await group.stop(1)
        await group.stop(2)
        before = deposed.raft.journal[-1][1]
        ghosts = [asyncio.create_task(deposed.submit(account(f"ghost-{i}"))) for i in range(3)]
        await wait_until(lambda: deposed.raft.journal[-1][1] > before, 15, "the ghosts in its log")
        ghosts_end = deposed.raft.journal[-1][1]
        await group.stop(0)
        await asyncio.gather(*ghosts, return_exceptions=True)
        group.start(1)
        group.start(2)
        leader = await group.leader()
        results = await write_entries(leader, "s", 3 * compaction_entries_min)
        assert all(r.outcome.ok for r in results)
        await wait_until(lambda: leader.raft.journal[0][1] > ghosts_end, 15, "compaction past the ghosts")
        back = group.start(0)
        await group.converged()
        assert back.snapshotter.installed >= 1
        seen = [index for index, payload in applied.get(id(back.applier), []) if b"ghost-" in payload]
        assert not seen, f"uncommitted entries applied at {seen}"
        with back.store.reader() as r:
            assert r.account("ghost-0") is None
            assert r.balance("b").credits_posted == 3 * compaction_entries_min
    finally:
        await group.stop_all()
