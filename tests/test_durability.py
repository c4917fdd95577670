"""Durability order: nothing leaves a replica before the journal entries and term/vote it depends on."""

from __future__ import annotations

import asyncio
import os
import threading

from raftledger.node.files import write_file_durably
from raftledger.node.raft import (
    DurableJournal,
    JournalOptions,
    Observers,
    without_known_tail,
    without_snapshot_commit,
)
from raftledger.node.settings import DURABILITY_FSYNC, DURABILITY_NONE
from raftledger.node.testing import ReplicaGroup
from raftledger.statemachine.testing import account, transfer


class Recorder:
    """Per-replica event log: ('flush', idx), ('meta', term), ('send', kind, depends_on_idx, term)."""

    def __init__(self) -> None:
        self.events: dict[int, list[tuple]] = {}
        self.lock = threading.Lock()

    def _add(self, i: int, event: tuple) -> None:
        with self.lock:
            self.events.setdefault(i, []).append(event)

    def on_flush(self, i: int):
        return lambda idx: self._add(i, ("flush", idx))

    def on_meta(self, i: int):
        return lambda term, vote: self._add(i, ("meta", term))

    def on_send(self, i: int):
        def send(node, message):
            kind = message["type"]
            depends = 0
            if kind == "append_entries" and message.get("entries"):
                depends = message["entries"][-1][1]
            elif kind == "next_node_idx" and message["success"]:
                depends = message["next_node_idx"] - 1
            self._add(i, ("send", kind, depends, message.get("term", 0)))
        return send


def violations(events: list[tuple]) -> list[tuple]:
    flushed, term_on_disk, bad = 0, 0, []
    for event in events:
        if event[0] == "flush":
            flushed = max(flushed, event[1])
        elif event[0] == "meta":
            term_on_disk = max(term_on_disk, event[1])
        else:
            _, kind, depends, term = event
            if depends > flushed:
                bad.append(("entry not flushed", event, flushed))
            if kind in ("request_vote", "response_vote") and term > term_on_disk:
                bad.append(("term not durable", event, term_on_disk))
    return bad


async def test_no_send_depends_on_an_unflushed_entry_or_term(tmp_path):
    rec = Recorder()
    group = ReplicaGroup(str(tmp_path), observers=lambda i: Observers(
        on_flush=rec.on_flush(i), on_meta=rec.on_meta(i), on_send=rec.on_send(i)))
    group.start_all()
    try:
        leader = await group.leader()
        await leader.submit(account("a"))
        await leader.submit(account("b"))
        for wave in range(10):
            await asyncio.gather(*(leader.submit(transfer(f"t{wave}.{i}", "a", "b", 1))
                                   for i in range(20)))
        await group.converged()
    finally:
        await group.stop_all()
    sends = [e for evs in rec.events.values() for e in evs if e[0] == "send" and e[2] > 1]
    assert len(sends) > 20, "the test must observe replication traffic"
    for i, events in rec.events.items():
        assert violations(events) == [], f"replica {i}"


def test_flushes_are_grouped_per_appended_batch(tmp_path):
    flushed: list[int] = []
    journal = DurableJournal(str(tmp_path / "j"), JournalOptions(DURABILITY_FSYNC, flushed.append))
    for idx in range(1, 101):
        journal.add(b"\x00cmd", idx, 1)
    assert journal.flush_if_dirty() and not journal.flush_if_dirty()
    assert flushed == [100]


def test_journal_flush_is_an_fdatasync_of_the_journal_file(tmp_path, monkeypatch):
    """Not ``mmap.flush``: on CPython 3.11 its msync holds the GIL and stalls the whole node. The
    journal's file grows (and PySyncObj reopens it) along the way: the flush follows it."""
    path = str(tmp_path / "j")
    journal = DurableJournal(path, JournalOptions())
    synced: list[str] = []
    fdatasync = os.fdatasync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", recording)
    for idx in range(1, 4):
        journal.add(b"\x00" + bytes(200_000), idx, 1)  # past the initial size: the file grows
        assert journal.flush_if_dirty()
    assert synced == [os.path.realpath(path)] * 3


def test_journal_counts_the_bytes_it_holds_through_truncation_and_compaction(tmp_path):
    journal = DurableJournal(str(tmp_path / "j"), JournalOptions(DURABILITY_NONE))

    def held() -> int:
        return sum(len(entry[0]) for entry in journal[:])

    for idx in range(1, 11):
        journal.add(b"\x00" + bytes(idx * 10), idx, 1)
    assert journal.bytes_held == held() == sum(1 + i * 10 for i in range(1, 11))
    journal.deleteEntriesFrom(7)  # a follower drops the entries from the 8th on
    assert journal.bytes_held == held() and journal.last_index == 7
    journal.deleteEntriesTo(3)  # compaction drops the first three
    assert journal.bytes_held == held() and len(journal) == 4
    reopened = DurableJournal(str(tmp_path / "j"), JournalOptions(DURABILITY_NONE))
    assert reopened.bytes_held == journal.bytes_held


def test_journal_and_meta_survive_reopen(tmp_path):
    path = str(tmp_path / "j")
    journal = DurableJournal(path, JournalOptions())
    journal.add(b"\x00a", 1, 1)
    journal.add(b"\x00b", 2, 3)
    journal.setCurrentTerm(3, "n2")
    journal.flush_if_dirty()
    reopened = DurableJournal(path, JournalOptions())
    assert [e[1] for e in reopened[:]] == [1, 2]
    assert (reopened.getCurrentTerm(), reopened.getVotedForNodeId()) == (3, "n2")


def test_durable_write_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "m")
    write_file_durably(path, b"x")
    write_file_durably(path, b"y")
    with open(path, "rb") as f:
        assert f.read() == b"y"
    assert os.listdir(tmp_path) == ["m"]


def journal_of(tmp_path, terms: list[int]) -> DurableJournal:
    journal = DurableJournal(str(tmp_path / "j"), JournalOptions(durability=DURABILITY_NONE))
    for idx, term in enumerate(terms, start=1):
        journal.add(b"c%d" % idx, idx, term)
    return journal


def append_entries(prev: int, prev_term: int, term: int, entries: list[tuple[bytes, int, int]]) -> dict:
    return {"type": "append_entries", "term": term, "commit_index": 1, "prevLogIdx": prev,
            "prevLogTerm": prev_term, "entries": entries}


def test_a_resend_of_entries_held_from_the_same_leader_truncates_nothing(tmp_path):
    journal = journal_of(tmp_path, [1, 2, 2, 2, 2, 2])  # entries 1..6; 2..6 from the leader of term 2
    resend = append_entries(2, 2, 2, [(b"c3", 3, 2), (b"c4", 4, 2)])  # ends at 4, before the log does
    taken = without_known_tail(resend, journal, 2)
    assert (taken["prevLogIdx"], taken["prevLogTerm"], taken["entries"]) == (6, 2, [])
    heartbeat = without_known_tail(append_entries(3, 2, 2, []), journal, 2)
    assert (heartbeat["prevLogIdx"], heartbeat["entries"]) == (6, [])
    longer = append_entries(4, 2, 2, [(b"c5", 5, 2), (b"c6", 6, 2), (b"c7", 7, 2)])
    taken = without_known_tail(longer, journal, 2)
    assert (taken["prevLogIdx"], taken["entries"]) == (6, [(b"c7", 7, 2)])  # only what is new


def test_entries_that_may_conflict_go_to_pysyncobj_unchanged(tmp_path):
    journal = journal_of(tmp_path, [1, 1, 1, 1])  # the last entry is from an older leader
    message = append_entries(2, 1, 3, [(b"x3", 3, 3)])
    assert without_known_tail(message, journal, 3) is message  # a conflict: PySyncObj truncates
    at_end = append_entries(4, 1, 1, [(b"c5", 5, 1)])
    assert without_known_tail(at_end, journal, 1) is at_end  # nothing held past prevLogIdx
    stale = append_entries(2, 1, 1, [])
    assert without_known_tail(stale, journal, 2) is stale  # an older term: PySyncObj ignores it
    part = {**append_entries(2, 1, 1, []), "transmission": "start", "data": b""}
    assert without_known_tail(part, journal, 1) is part


def test_a_snapshot_part_never_raises_the_commit_index():
    part = {"type": "append_entries", "term": 3, "commit_index": 40, "serialized": b"part"}
    assert without_snapshot_commit(part, 12) == {**part, "commit_index": 12}  # its own log is unchecked
    assert without_snapshot_commit(part, 40) is part
    checked = append_entries(20, 3, 3, [(b"x21", 21, 3)])  # the consistency check comes first
    assert without_snapshot_commit({**checked, "commit_index": 40}, 12)["commit_index"] == 40
