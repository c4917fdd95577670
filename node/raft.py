"""The PySyncObj boundary: every use of PySyncObj's internals lives here, written for 0.3.17 only.

The rest of ``node/`` sees ``RaftMember``, a small interface of its own: ``propose`` a payload,
``apply`` committed entries (a hook), leader changes (a hook, on the tick thread), ``status``,
``add_member`` / ``remove_member``, and the snapshot hooks PySyncObj calls. Everything below reaches into
PySyncObj's name-mangled attributes or overrides its private methods, so this module refuses to import
under any other PySyncObj version (``pyproject.toml`` pins it too): an upgrade must be read against
each override before "acknowledged ⇒ durable" can be trusted again.

What is overridden, and why:

- **The journal** (``DurableJournal``, installed through ``pysyncobj.syncobj.createJournal``):
  PySyncObj's ``FileJournal`` appends through an mmap and never flushes per entry, and writes its meta
  (term, vote, commit index) with write + rename, no fsync. Raft needs a follower's entries on disk
  before it answers ``append_entries``, the leader's before it counts itself, term and vote before a
  vote leaves. The journal marks itself dirty on append; ``flush_if_dirty`` (one ``fdatasync`` for
  everything appended since) runs before every message sent and at the top of every tick; the meta is
  written with write, fsync, rename, fsync(dir). Its file is an mmap that PySyncObj grows with
  ``ftruncate``: sparse, so a page the disk cannot back would kill the node with SIGBUS. The journal
  allocates the file (``posix_fallocate``) before the map grows over it, so a full disk fails the
  allocation instead; any failed write or flush of the journal or its meta fail-stops the node
  (``files.fail_stop``): going on could count an entry that is not on disk.
- **The transport** (``SecureTransport``, ``SecureConnection``, ``GuardedServer``): PySyncObj unpickles
  every frame it receives; ours authenticates and decrypts every frame first (``node/frames.py``),
  bounds connections that have not authenticated, binds the replica's own address only, survives a
  full descriptor table, and keeps quiet connections alive (PySyncObj closes one it has read nothing
  from for ``connection_timeout_s`` on its next write: the first vote request between two followers).
- **The member** (``_Member``, a ``SyncObj``): the replicated method hands entries to the apply thread;
  the private entry reader slices the apply loop's reads by bytes and stops while the apply thread is
  behind; a one-member group wakes its poller after appending; each tick flushes first, compacts the
  log by bytes held, and reports a newly known (leader, term); installing a snapshot restarts the
  election timer; a leadership transfer's cue leaves from the tick thread; a part of a snapshot never
  raises the commit index (``without_snapshot_commit``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pysyncobj.syncobj as _syncobj
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE
from pysyncobj.journal import FileJournal, MetaStorer
from pysyncobj.journal import createJournal as _original_create_journal
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.pickle import dumps as _meta_dumps
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.transport import TCPTransport
from pysyncobj.version import VERSION as _INSTALLED
from raftledger.client.errors import NotLeader, OutcomeUnknown, Overloaded, Unavailable

from . import frames
from .dial import dial_address
from .files import fail_stop, fsync_dir, write_file_durably
from .settings import DURABILITY_FSYNC, RaftSettings, SnapshotSettings

PYSYNCOBJ_VERSION = "0.3.17"
if _INSTALLED != PYSYNCOBJ_VERSION:
    raise ImportError(f"raftledger.node.raft was written for PySyncObj {PYSYNCOBJ_VERSION} and reaches "
                      f"into its internals; {_INSTALLED} is installed (pip install "
                      f"pysyncobj=={PYSYNCOBJ_VERSION})")

__all__ = ["SERIALIZER_STATE", "MemberHooks", "MemberSettings", "Observers", "RaftMember",
           "DurableJournal", "JournalOptions"]

log = logging.getLogger(__name__)

listen_backlog = 128  # PySyncObj listens with a backlog of 5
accepts_per_event_max = 64  # a flood is accepted (and turned away) quickly, not one per tick
accept_pause_s = 0.5  # after EMFILE/ENFILE, before accepting again
refusal_log_interval_s = 60.0
keepalives_per_timeout = 3  # a quiet connection sends a keepalive every connection_timeout_s / this
socket_buffer_bytes = 1 << 20
ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

FlushObserver = Callable[[int], None]
MetaObserver = Callable[[int, object], None]
FsyncObserver = Callable[[float], None]
SendObserver = Callable[[Any, dict], None]


# -- settings and hooks ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observers:
    """Tests record what the member does, in order."""

    on_flush: FlushObserver | None = None  # the last log index each journal flush covered
    on_meta: MetaObserver | None = None  # (term, vote) once they are on disk
    on_send: SendObserver | None = None  # every message, just before it is sent


@dataclass(frozen=True, slots=True)
class MemberSettings:
    """One replica's place in its shard's Raft group."""

    shard: int  # a data shard, or a negative id for the metadata group (cluster.meta.META_GROUP)
    self_address: str  # "host:port" of this replica's Raft endpoint
    partner_addresses: tuple[str, ...]
    directory: str  # holds the journal, its meta and the snapshot dump
    # The shard's Raft key (``frames.shard_key`` of the cluster secret): every Raft connection is
    # authenticated and encrypted with it, so nobody without the secret can join, vote or listen.
    raft_key: bytes = field(repr=False)
    durability: str = DURABILITY_FSYNC
    preferred_leader: bool = False
    raft: RaftSettings = field(default_factory=RaftSettings)
    snapshots: SnapshotSettings = field(default_factory=SnapshotSettings)
    observers: Observers = field(default_factory=Observers)
    # A replica joining a running group stands for no election before it has heard from a leader:
    # its members refuse its connections until the group adds it, and an empty replica that kept
    # raising its term meanwhile would depose the leader the moment it is added (no pre-vote here).
    await_leader: bool = False

    @property
    def sync(self) -> bool:
        return self.durability == DURABILITY_FSYNC

    @property
    def election_timeout_s(self) -> tuple[float, float]:
        r = self.raft
        if self.preferred_leader:
            return r.preferred_election_timeout_min_s, r.preferred_election_timeout_max_s
        return r.election_timeout_min_s, r.election_timeout_max_s

    @property
    def journal_file(self) -> str:
        return os.path.join(self.directory, "raft.journal")

    @property
    def dump_file(self) -> str:
        return os.path.join(self.directory, "raft.dump")


@dataclass(frozen=True, slots=True)
class MemberHooks:
    """What the member calls; all on its tick thread."""

    apply: Callable[[int, bytes], None]  # a committed entry: its log index and payload
    apply_backlog: Callable[[], int]  # entries handed to ``apply`` and not applied yet
    snapshot_serialize: Callable[[str, Any], None]
    snapshot_deserialize: Callable[[str], Any]
    snapshot_check: Callable[[], int]  # a SERIALIZER_STATE
    snapshot_busy: Callable[[], bool]
    on_leader_change: Callable[[], None] | None = None  # a newly known (leader, term)
    on_fsync: FsyncObserver | None = None  # seconds each journal flush took


Committed = Callable[[int | None, Unavailable | None], None]


def fail_reason_error(reason: int, leader: str | None, retry_after_s: float) -> Unavailable:
    """A PySyncObj FAIL_REASON as an error of the tree."""
    if reason in (FAIL_REASON.NOT_LEADER, FAIL_REASON.MISSING_LEADER):
        return NotLeader(message=f"not the leader (reason {reason})", leader=leader)
    if reason == FAIL_REASON.QUEUE_FULL:
        return Overloaded(message="raft queue full", retry_after_s=retry_after_s)
    return OutcomeUnknown(message=f"outcome unknown (reason {reason}); retry with the same id")


# -- the member ----------------------------------------------------------------------------------------


class RaftMember:
    """One replica of a shard's Raft group, as the rest of the node sees it."""

    def __init__(self, settings: MemberSettings, hooks: MemberHooks, *,
                 overloaded_retry_after_s: float = 1.0) -> None:
        self.settings = settings
        self._overloaded_retry_after_s = overloaded_retry_after_s
        os.makedirs(settings.directory, exist_ok=True)
        register_journal(settings.journal_file, JournalOptions(
            settings.durability, settings.observers.on_flush, settings.observers.on_meta, hooks.on_fsync))
        self._member = _Member(settings, hooks)

    # -- writes -----------------------------------------------------------------------------------------
    def propose(self, payload: bytes, on_committed: Committed) -> None:
        """Append ``payload`` (on the leader); ``on_committed(index, None)`` once it is committed, or
        ``(None, error)``; called on the tick thread."""

        def callback(index: Any, reason: int) -> None:
            if reason == FAIL_REASON.SUCCESS and index is not None:
                on_committed(int(index), None)
            else:
                on_committed(None, fail_reason_error(reason, self.leader_address(),
                                                     self._overloaded_retry_after_s))

        self._member.apply_batch(payload, callback=callback)

    # -- views (plain attribute reads, safe from another thread) ----------------------------------------
    def is_leader(self) -> bool:
        return bool(self._member._isLeader())

    def leader_address(self) -> str | None:
        leader = self._member._getLeader()
        return None if leader is None else str(leader.address)

    @property
    def term(self) -> int:
        return int(self._member.raftCurrentTerm)

    @property
    def commit_index(self) -> int:
        return int(self._member.raftCommitIndex)

    @property
    def last_applied(self) -> int:
        """The last entry handed to ``apply`` (or skipped as PySyncObj's own no-op)."""
        return int(self._member.raftLastApplied)

    @property
    def journal(self) -> DurableJournal:
        return self._member.journal

    def leader_contact_monotonic(self) -> float:
        """``time.monotonic()`` of the last append_entries from a leader (0.0: never)."""
        return self._member.transport.last_append_entries

    def majority_contact_age_s(self) -> float | None:
        """On the leader: seconds since a majority (itself included) last answered it. A leader cut
        off from its majority keeps leading until leader_fallback_timeout_s; this shows how stale."""
        return self._member.majority_contact_age_s()

    def transport_refusals(self) -> dict[str, int]:
        """Connections refused before they authenticated, by reason."""
        return dict(self._member.transport.refused)

    # -- operations ----------------------------------------------------------------------------------------
    def force_compaction(self) -> None:
        self._member.forceLogCompaction()

    def postpone_election(self) -> None:
        self._member.postpone_election()

    def add_member(self, address: str, done: Callable[[bool], None]) -> None:
        """Start a membership change adding ``address`` (one change at a time, on the leader);
        ``done(ok)`` once it is committed or refused. PySyncObj puts the new configuration in force
        when the entry is appended, and refuses (``ok`` False) a change while the previous one is
        uncommitted, before the new leader's no-op is applied, or one that changes nothing."""
        self._member.addNodeToCluster(address, callback=lambda _, reason: done(
            reason == FAIL_REASON.SUCCESS))

    def remove_member(self, address: str, done: Callable[[bool], None]) -> None:
        """As ``add_member``; a leader cannot remove itself (transfer its leadership first)."""
        self._member.removeNodeFromCluster(address, callback=lambda _, reason: done(
            reason == FAIL_REASON.SUCCESS))

    def transfer_leadership(self, address: str | None, wait_s: float, done: Callable[[bool], None]) -> None:
        """On the leader: ask ``address`` (None: the most caught-up connected follower) to start an
        election now (Raft's TimeoutNow), on the tick thread once every entry proposed before is in
        the log (``_Member.cue_transfer``). ``done(True)`` means only that the cue was sent; refused
        when the target is not fully caught up, or not asked within ``wait_s``."""
        self._member.cue_transfer(address, raft_clock() + wait_s, done)

    def members(self) -> list[str]:
        """This replica and the partners it currently knows."""
        return [self.settings.self_address, *(n.address for n in self._member.otherNodes)]

    def follower_contacts(self) -> dict[str, tuple[float | None, int]]:
        """On the leader: per follower address, seconds since it last answered (None: never, since
        this replica leads) and the last log index known to match the leader's."""
        return self._member.follower_contacts()

    def close(self) -> None:
        """Stop the tick thread (the journal is flushed first)."""
        self._member.destroy_synchronous()


class _Member(SyncObj):
    def __init__(self, settings: MemberSettings, hooks: MemberHooks) -> None:
        self.settings = settings
        self.hooks = hooks
        self._seen_leader: tuple[Any, int] | None = None  # (leader node, term) last reported
        self._awaiting_leader = settings.await_leader
        self._transfers: deque[tuple[str | None, float, Callable[[bool], None]]] = deque()
        self.raft_key = settings.raft_key  # read by SecureTransport
        super().__init__(settings.self_address, list(settings.partner_addresses), self._conf(),
                         transportClass=SecureTransport)

    def _conf(self) -> SyncObjConf:
        s, r, snap, hooks = self.settings, self.settings.raft, self.settings.snapshots, self.hooks
        low, high = s.election_timeout_s
        return SyncObjConf(
            journalFile=s.journal_file, fullDumpFile=s.dump_file,
            serializer=hooks.snapshot_serialize, deserializer=hooks.snapshot_deserialize,
            serializeChecker=hooks.snapshot_check, useFork=False,
            appendEntriesUseBatch=False, appendEntriesPeriod=r.heartbeat_period_s,
            raftMinTimeout=low, raftMaxTimeout=high, leaderFallbackTimeout=r.leader_fallback_timeout_s,
            connectionTimeout=r.connection_timeout_s, connectionRetryTime=r.connection_retry_s,
            commandsQueueSize=r.commands_queued_max, appendEntriesBatchSizeBytes=r.append_entries_bytes_max,
            logCompactionBatchSize=snap.chunk_bytes, logCompactionMinEntries=snap.log_compaction_entries_min,
            logCompactionMinTime=snap.log_compaction_interval_s,
            sendBufferSize=socket_buffer_bytes, recvBufferSize=socket_buffer_bytes,
            bindAddress=s.self_address, onStateChanged=self._state_changed,
            # Membership changes must be enabled on every member from the start to be usable later.
            dynamicMembershipChange=True,
        )

    @property
    def journal(self) -> DurableJournal:
        return self._SyncObj__raftLog  # type: ignore[attr-defined, no-any-return]

    @property
    def transport(self) -> SecureTransport:
        return self._SyncObj__transport  # type: ignore[attr-defined, no-any-return]

    def follower_contacts(self) -> dict[str, tuple[float | None, int]]:
        if not self._isLeader():
            return {}
        try:
            answered = dict(self._SyncObj__lastResponseTime)  # type: ignore[attr-defined]
            matched = dict(self._SyncObj__raftMatchIndex)  # type: ignore[attr-defined]
            others = list(self.otherNodes)
        except RuntimeError:  # resized by the tick thread while copying
            return {}
        now = raft_clock()
        return {n.address: (None if n not in answered else max(0.0, now - answered[n]),
                            int(matched.get(n, 0))) for n in others}

    def postpone_election(self) -> None:
        """Installing a large snapshot keeps the tick thread busy for seconds; the leader's messages
        wait unread meanwhile, and PySyncObj has no pre-vote. Restart the election timer so this
        follower does not depose a healthy leader the moment it is done."""
        self._SyncObj__raftElectionDeadline = (  # type: ignore[attr-defined]
            raft_clock() + self._SyncObj__generateRaftTimeout())  # type: ignore[attr-defined]

    def _state_changed(self, old: int, new: int) -> None:
        names = ("follower", "candidate", "leader")
        shard = self.settings.shard
        group = f"shard {shard}" if shard >= 0 else "metadata group"  # cluster.meta.META_GROUP
        log.info("%s: %s -> %s (term %d)", group, names[old], names[new], self.raftCurrentTerm)

    @replicated
    def apply_batch(self, payload: bytes) -> int:
        """Hand one committed entry over and return its log index. PySyncObj increments
        raftLastApplied after this returns, so the entry is raftLastApplied + 1 (it passes no index)."""
        index = self.raftLastApplied + 1
        self.hooks.apply(index, payload)
        return index

    def _SyncObj__getEntries(self, fromIDx, count=None, maxSizeBytes=None):  # noqa: N802, N803, ANN001
        """PySyncObj's private entry reader. Only its apply loop asks for more than two entries by
        count (commit checks ask for 1, compaction for 2, replication by bytes): slice that one by
        bytes, and hand nothing over while the apply thread is ``apply_backlog_entries_max`` behind."""
        if count is not None and count > 2 and maxSizeBytes is None:
            if self.hooks.apply_backlog() >= self.settings.raft.apply_backlog_entries_max:
                return []
            maxSizeBytes = self.settings.raft.apply_bytes_per_tick_max
        return SyncObj._SyncObj__getEntries(self, fromIDx, count, maxSizeBytes)

    def _SyncObj__onMessageReceived(self, node: Any, message: dict) -> None:  # noqa: N802 (PySyncObj's)
        if message.get("type") == "append_entries":
            message = without_known_tail(message, self.journal, self.raftCurrentTerm)
            message = without_snapshot_commit(message, self.raftCommitIndex)
        SyncObj._SyncObj__onMessageReceived(self, node, message)  # type: ignore[attr-defined]

    def before_send(self, node: Any, message: dict) -> None:
        """Every message leaves after the journal entries it may vouch for are on disk."""
        self.journal.flush_if_dirty()
        if self.settings.observers.on_send is not None:
            self.settings.observers.on_send(node, message)

    def cue_transfer(self, address: str | None, deadline: float, done: Callable[[bool], None]) -> None:
        """Queue a leadership transfer for the tick thread (PySyncObj's ``transferLeadership`` reads
        the tick thread's state and writes to its connections)."""
        self._transfers.append((address, deadline, done))
        self._SyncObj__pipeNotifier.notify()  # type: ignore[attr-defined]

    def _send_transfer_cues(self) -> None:
        """On the tick thread, once every proposal queued before the transfer is in the log: the cue
        checks that the target matches the leader's log, and an entry appended after it would leave
        the target behind, to lose the election it was cued to win (the leader holds new proposals
        meanwhile, ``ProposalHold``)."""
        while self._transfers:
            if self._SyncObj__commandsQueue._FastQueue__queue:  # type: ignore[attr-defined]
                return  # appended on the next tick
            address, deadline, done = self._transfers.popleft()
            if raft_clock() >= deadline:
                done(False)
                continue
            self.transferLeadership(address, callback=lambda _, reason, done=done: done(
                reason == FAIL_REASON.SUCCESS))

    def _checkCommandsToApply(self) -> None:  # noqa: N802 (PySyncObj's name)
        super()._checkCommandsToApply()
        self._send_transfer_cues()
        if not self.otherNodes and self.journal.last_index > self.raftCommitIndex:
            # A one-member group commits at the top of the next tick; no peer reply will wake the
            # poller, so wake it instead of idling for a whole autoTickPeriod.
            self._SyncObj__pipeNotifier.notify()  # type: ignore[attr-defined]

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802, N803 (PySyncObj's name)
        # The leader counts itself towards commit at the top of a tick: make its entries durable first.
        self.journal.flush_if_dirty()
        if self.journal.bytes_held > self.settings.snapshots.log_compaction_bytes_max and \
                not self.hooks.snapshot_busy():
            self.forceLogCompaction()
        if self._awaiting_leader:
            if self._SyncObj__raftLeader is None:  # type: ignore[attr-defined]
                self.postpone_election()
            else:
                self._awaiting_leader = False
        super()._onTick(timeToWait)
        if self.hooks.on_leader_change is not None:
            self._note_leader()

    def _note_leader(self) -> None:
        """Report each newly known (leader, term): an election won, by this replica or another.
        Two attribute reads and a compare per tick; the hook runs only on a change."""
        leader = self._SyncObj__raftLeader  # type: ignore[attr-defined]
        if leader is None:
            return
        seen = self._seen_leader
        term = self.raftCurrentTerm
        if seen is None or seen[0] is not leader or seen[1] != term:
            self._seen_leader = (leader, term)
            self.hooks.on_leader_change()  # type: ignore[misc]

    def majority_contact_age_s(self) -> float | None:
        needed = (len(self.otherNodes) + 1) // 2  # followers that make a majority with the leader
        if needed == 0:
            return 0.0
        try:
            responses = sorted(dict(self._SyncObj__lastResponseTime).values(),  # type: ignore[attr-defined]
                               reverse=True)
        except RuntimeError:  # resized by the tick thread while copying
            return None
        if len(responses) < needed:
            return None
        return max(0.0, raft_clock() - responses[needed - 1])


def without_known_tail(message: dict, journal: Any, current_term: int) -> dict:
    """An append_entries as PySyncObj should take it: without truncating entries this follower holds
    from the same leader.

    PySyncObj deletes every entry after ``prevLogIdx`` before appending the message's, even when they
    are the very same entries (a resend after a lost or late reply, a heartbeat from behind). When the
    message ends before this follower's log does, that drops entries it already acknowledged, which
    the leader keeps counting towards commits (its match index never goes down): a majority it
    believes holds an entry may not, and the entry can be lost with the leader (the chaos harness's
    logs showed "truncating already-applied log entries" many times a minute). Raft deletes only on
    a conflict. When this follower's last entry carries the message's term, it came from that leader
    through its consistency check, so the whole log up to it is the leader's (Log Matching): the
    message is taken from the end of that log, with only the entries beyond it (none for a resend,
    whose reply then names the whole log). Transmissions of one large entry in parts, and any other
    case, go through unchanged."""
    if "prevLogIdx" not in message or "transmission" in message or message["term"] < current_term:
        return message
    last = journal[-1] if len(journal) else None
    if last is None or last[1] <= message["prevLogIdx"] or last[2] != message["term"]:
        return message
    known = last[1] - message["prevLogIdx"]
    return {**message, "prevLogIdx": last[1], "prevLogTerm": last[2],
            "entries": list(message.get("entries", ()))[known:]}


def without_snapshot_commit(message: dict, commit_index: int) -> dict:
    """A part of a snapshot (an append_entries without ``prevLogIdx``) as PySyncObj should take it:
    without moving this follower's commit index.

    PySyncObj sets the commit index to min(the leader's, the end of this follower's log) on every
    message, and a snapshot part passes no consistency check of that log: a follower that led an
    older term and still held entries of it that were never committed applied them as committed
    while the snapshot arrived, and its callbacks told the clients that had proposed them so, before
    the snapshot replaced the state they had changed. (Found by the chaos harness: a cross-shard
    prepare "applied" that way on a deposed leader was answered ok, the coordinator decided commit,
    and every replica of that shard then stopped at the commit of a leg it had never prepared.)
    The commit index moves on with the first append_entries after the snapshot is loaded, through
    its consistency check."""
    if "prevLogIdx" in message or message["commit_index"] <= commit_index:
        return message
    return {**message, "commit_index": commit_index}


# -- the journal ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JournalOptions:
    durability: str = DURABILITY_FSYNC
    on_flush: FlushObserver | None = None
    on_meta: MetaObserver | None = None
    on_fsync: FsyncObserver | None = None


journal_record_overhead = 4 + 16 + 4  # FileJournal's record: size, (index, term), command, size


class DurableMetaStorer(MetaStorer):
    """Term, vote and commit index written with write + fsync + rename + fsync(dir)."""

    def storeMeta(self, meta: dict) -> None:  # noqa: N802 (PySyncObj's name)
        write_file_durably(self.getPath(), _meta_dumps(meta))


class DurableJournal(FileJournal):
    """``FileJournal`` whose appends are flushed in groups and whose meta is fsynced."""

    def __init__(self, journal_file: str, options: JournalOptions) -> None:
        existed = os.path.exists(journal_file)
        super().__init__(journal_file)
        self._options = options
        self._sync = options.durability == DURABILITY_FSYNC
        self._dirty = False
        self._last_index = self[-1][1] if len(self) else 0
        self.bytes_held = sum(len(entry[0]) for entry in self[:])  # entries kept in memory
        self._lock = threading.Lock()
        self.flush_count = 0
        self._name = os.path.basename(os.path.dirname(os.path.abspath(journal_file)))
        self._allocated = 0  # bytes of the file known to be allocated on disk
        try:
            self._allocate(len(self._mapped()._ResizableFile__mm))  # an older journal may be sparse
        except OSError as exc:
            fail_stop(f"{self._name}: allocating the Raft journal", exc)
        if self._sync:
            # Replace the name-mangled storer FileJournal made: same file, durable writes.
            self._FileJournal__metaStorer = DurableMetaStorer(journal_file + ".meta")
            if not existed:
                self._flush_file()
                fsync_dir(os.path.dirname(os.path.abspath(journal_file)))

    def add(self, command, idx, term):  # noqa: ANN001 (PySyncObj's signature)
        try:
            self._allocate_for(len(command))
            super().add(command, idx, term)
        except Exception as exc:  # PySyncObj would log it and go on with the entry in memory only
            fail_stop(f"{self._name}: appending entry {idx} to the Raft journal", exc)
        self._last_index = idx
        self.bytes_held += len(command)
        self._dirty = True

    def clear(self):
        super().clear()
        self.bytes_held = 0
        self._dirty = True

    def deleteEntriesFrom(self, entryFrom):  # noqa: N802, N803
        """Followers call this whenever the leader resends entries they hold (often, under load):
        only the removed tail is counted, never the whole journal."""
        self.bytes_held -= sum(len(entry[0]) for entry in self[entryFrom:])
        super().deleteEntriesFrom(entryFrom)
        self._last_index = self[-1][1] if len(self) else 0
        self._dirty = True

    def setCurrentTerm(self, term, votedForNodeId):  # noqa: N802, N803, ANN001 (PySyncObj's name)
        try:
            super().setCurrentTerm(term, votedForNodeId)  # stores the meta synchronously
        except OSError as exc:
            fail_stop(f"{self._name}: storing term {term} and vote in the Raft meta", exc)
        if self._options.on_meta is not None:
            self._options.on_meta(term, votedForNodeId)

    def onOneSecondTimer(self) -> None:  # noqa: N802 (PySyncObj's name)
        try:
            super().onOneSecondTimer()  # stores the commit index when it moved
        except OSError as exc:
            fail_stop(f"{self._name}: storing the commit index in the Raft meta", exc)

    def flush_if_dirty(self) -> bool:
        """One fdatasync for everything appended since the last flush; True if it flushed."""
        if not self._dirty:
            return False
        took = -1.0
        with self._lock:
            self._dirty = False
            if self._sync:
                started = time.perf_counter()
                try:
                    self._flush_file()
                except OSError as exc:  # never retried: the kernel may have dropped the pages (fsyncgate)
                    fail_stop(f"{self._name}: fdatasync of the Raft journal", exc)
                took = time.perf_counter() - started
            self.flush_count += 1
        if took >= 0 and self._options.on_fsync is not None:
            self._options.on_fsync(took)
        if self._options.on_flush is not None:
            self._options.on_flush(self._last_index)
        return True

    @property
    def last_index(self) -> int:
        return self._last_index

    def _mapped(self) -> Any:
        """PySyncObj's ``ResizableFile`` (the file object and the map it holds are looked up each
        time: it reopens them when it grows the file)."""
        return self._FileJournal__journalFile

    def _allocate_for(self, command_bytes: int) -> None:
        """Allocate what the next record needs (size, index and term, the command, size again) and
        grow the map over it as ``ResizableFile.write`` would, before PySyncObj writes through the
        map. (PySyncObj sizes by ``mmap.size()``, the file's size: the file and the map grow together.)"""
        end = self._FileJournal__currentOffset + command_bytes + journal_record_overhead
        if end <= self._allocated:
            return
        mapped = self._mapped()
        size = len(mapped._ResizableFile__mm)
        if end > size:
            size = max(int(size * mapped._ResizableFile__resizeFactor), end)
        self._allocate(size)

    def _allocate(self, size: int) -> None:
        mapped = self._mapped()
        os.posix_fallocate(mapped._ResizableFile__f.fileno(), 0, size)
        if size > len(mapped._ResizableFile__mm):
            mapped._ResizableFile__mm.resize(size)
        self._allocated = size

    def _flush_file(self) -> None:
        """fdatasync of the journal's file. PySyncObj's ``flush`` is ``mmap.flush``, whose msync holds
        the GIL on CPython 3.11 and so froze every thread of the node for each flush (0.3 ms to
        several ms); on Linux msync(MS_SYNC) of a shared mapping is an fdatasync of the file, and
        ``os.fdatasync`` lets the other threads run meanwhile."""
        os.fdatasync(self._mapped()._ResizableFile__f.fileno())


_journal_options: dict[str, JournalOptions] = {}
_journal_options_lock = threading.Lock()


def register_journal(journal_file: str, options: JournalOptions) -> None:
    """Make the next SyncObj built with ``journalFile=journal_file`` use a DurableJournal."""
    _syncobj.createJournal = _create_journal
    with _journal_options_lock:
        _journal_options[os.path.abspath(journal_file)] = options


def _create_journal(journalFile: str | None = None):  # noqa: ANN202, N803 (PySyncObj's signature)
    if journalFile is not None:
        with _journal_options_lock:
            options = _journal_options.get(os.path.abspath(journalFile))
        if options is not None:
            return DurableJournal(journalFile, options)
    return _original_create_journal(journalFile)


# -- the transport -------------------------------------------------------------------------------------


class SecureConnection(TcpConnection):
    """A PySyncObj connection whose frames are sealed (``node/frames.py``)."""

    def __init__(self, key: bytes, raft: RaftSettings, on_refused: Callable[[str], None],
                 **kwargs: Any) -> None:
        self._key = key
        self._raft = raft
        self._on_refused = on_refused
        self._outgoing = kwargs.get("socket") is None
        self._reset_session()
        self.opened_at = self.sent_at = raft_clock()
        super().__init__(**kwargs)
        if not self._outgoing:
            self._say_hello()

    def _reset_session(self) -> None:
        self._nonce = frames.new_nonce()
        self._session: frames.Session | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self.authenticated = False

    def _say_hello(self) -> None:
        self._TcpConnection__writeBuffer += frames.hello(self._nonce)

    def connect(self, host: str, port: int) -> bool:  # PySyncObj's signature
        self._reset_session()
        self.opened_at = raft_clock()
        host, dialed_port = dial_address(f"{host}:{port}").rsplit(":", 1)
        connected = super().connect(host, int(dialed_port))
        if connected:
            self._say_hello()  # written once the socket is connected
        return bool(connected)

    def disconnect(self) -> None:
        self._reset_session()
        super().disconnect()

    def send(self, message: Any) -> None:
        data = frames.dumps(message)
        session = self._session
        if session is None:  # the peer's hello has not arrived: keep it until the keys exist
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > self._raft.frame_bytes_max:
                self.disconnect()
            return
        self._TcpConnection__writeBuffer += session.seal(data)
        self.sent_at = raft_clock()
        self._TcpConnection__trySendBuffer()

    def keep_alive(self, now: float, quiet_s: float) -> None:
        """Send ``frames.KEEPALIVE`` when nothing was sent for ``quiet_s``, so the peer reads
        something and this side checks, in the write, that the peer still sends too."""
        if self._session is not None and self.state == CONNECTION_STATE.CONNECTED and \
                now - self.sent_at >= quiet_s:
            self.send(frames.KEEPALIVE)

    def _refuse(self, reason: str) -> None:
        self._on_refused(reason)
        self.disconnect()

    def _start_session(self, hello: bytes) -> None:
        peer_nonce = frames.peer_nonce(hello)
        if peer_nonce is None:
            self._refuse("not a raftledger raft peer")
            return
        client, server = (self._nonce, peer_nonce) if self._outgoing else (peer_nonce, self._nonce)
        session = self._session = frames.Session(self._key, client, server, self._outgoing)
        held, self._held, self._held_bytes = self._held, [], 0
        if held:
            self._TcpConnection__writeBuffer += b"".join(session.seal(data) for data in held)
            self.sent_at = raft_clock()
            self._TcpConnection__trySendBuffer()

    def _TcpConnection__processParseMessage(self) -> Any:  # noqa: N802 (overrides PySyncObj's parser)
        """The next authenticated message but keepalives, or None (not enough bytes yet, or the
        connection closed)."""
        while (message := self._next_message()) == frames.KEEPALIVE:
            pass
        return message

    def _next_message(self) -> Any:
        if self._session is None:
            buffer = self._TcpConnection__readBuffer
            if len(buffer) < frames.HELLO.size:
                return None
            self._TcpConnection__readBuffer = buffer[frames.HELLO.size:]
            self._start_session(buffer[:frames.HELLO.size])
            if self._session is None:
                return None
        buffer = self._TcpConnection__readBuffer
        if len(buffer) < frames.LENGTH.size:
            return None
        (length,) = frames.LENGTH.unpack_from(buffer)
        bound = self._raft.frame_bytes_max if self.authenticated else frames.unauthenticated_frame_bytes_max
        if not frames.TAG_BYTES <= length <= bound:
            self._refuse(f"frame of {length} bytes")
            return None
        end = frames.LENGTH.size + length
        if len(buffer) < end:
            return None
        sealed, self._TcpConnection__readBuffer = buffer[frames.LENGTH.size:end], buffer[end:]
        data = self._session.open(sealed)
        if data is None:
            self._refuse("frame failed authentication (wrong cluster secret?)")
            return None
        self.authenticated = True
        try:
            return frames.loads(data)
        except Exception:  # an authenticated peer sent what a peer never sends
            self._refuse("authenticated frame is not plain data")
            return None


class GuardedServer(TcpServer):
    """PySyncObj's listener, accepting ``SecureConnection`` and surviving a full descriptor table."""

    def __init__(self, make_connection: Callable[[socket.socket], SecureConnection],
                 *args: Any, **kwargs: Any) -> None:
        self._make_connection = make_connection
        self._paused_until = 0.0
        self._bind_failure_logged_at = -refusal_log_interval_s
        super().__init__(*args, **kwargs)

    def bind(self) -> None:
        """As PySyncObj's, which retries a failed bind every second without a word: a replica whose
        port another process holds takes no part in its group, so say so (once a minute)."""
        try:
            super().bind()
        except OSError as exc:
            now = raft_clock()
            if now - self._bind_failure_logged_at >= refusal_log_interval_s:
                self._bind_failure_logged_at = now
                log.error("raft %s:%s: cannot listen (%s); this replica takes no part in its group until "
                          "it can", self._TcpServer__host, self._TcpServer__port, exc)
            raise
        self._TcpServer__socket.listen(listen_backlog)

    def _TcpServer__onNewConnection(self, descr: int, event: int) -> None:  # noqa: N802
        if event & POLL_EVENT_TYPE.READ:
            for _ in range(accepts_per_event_max):
                if not self._accept_one():
                    break
        if event & POLL_EVENT_TYPE.ERROR:
            self.unbind()

    def _accept_one(self) -> bool:
        try:
            sock, _ = self._TcpServer__socket.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno not in ACCEPT_EXHAUSTED:
                raise
            self._pause(exc)
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._TcpServer__sendBufferSize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._TcpServer__recvBufferSize)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self._TcpServer__onNewConnectionCallback(self._make_connection(sock))
        return True

    def _pause(self, exc: OSError) -> None:
        """The poller is level-triggered: a pending connection that cannot be accepted would wake the
        tick thread at once, forever. Stop listening for a moment instead."""
        log.warning("raft listener: cannot accept (%s); pausing %.1fs", os.strerror(exc.errno or 0),
                    accept_pause_s)
        self._TcpServer__poller.unsubscribe(self._TcpServer__fileno)
        self._paused_until = raft_clock() + accept_pause_s

    def resume_if_due(self) -> None:
        if self._paused_until and raft_clock() >= self._paused_until and \
                self._TcpServer__fileno is not None:
            self._paused_until = 0.0
            self._TcpServer__poller.subscribe(self._TcpServer__fileno, self._TcpServer__onNewConnection,
                                              POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)


class SecureTransport(TCPTransport):
    """PySyncObj's TCP transport over ``SecureConnection``; the member passes ``raft_key`` and
    ``before_send`` (the journal flush) as attributes set before its own init."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:  # noqa: N803
        self._key: bytes = syncObj.raft_key
        self._raft: RaftSettings = syncObj.settings.raft
        self._before_send: Callable[[Any, Any], None] = syncObj.before_send
        self.last_append_entries = 0.0
        self.refused: dict[str, int] = {}
        self._refusals_logged_at = -refusal_log_interval_s
        super().__init__(syncObj, selfNode, otherNodes)

    def _new_connection(self, **kwargs: Any) -> SecureConnection:
        conf = self._syncObj.conf
        return SecureConnection(self._key, self._raft, self._count_refusal, poller=self._syncObj._poller,
                                timeout=conf.connectionTimeout, sendBufferSize=conf.sendBufferSize,
                                recvBufferSize=conf.recvBufferSize, keepalive=conf.tcp_keepalive,
                                **kwargs)

    def _count_refusal(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        now = raft_clock()
        if now - self._refusals_logged_at >= refusal_log_interval_s:
            self._refusals_logged_at = now
            log.warning("raft %s: refused a connection: %s (refusals so far: %s)",
                        self._selfNode.address if self._selfNode else "?", reason, self.refused)

    def _createServer(self) -> None:  # noqa: N802 (PySyncObj's name)
        """Listen on this replica's own Raft address, never on every interface."""
        conf = self._syncObj.conf
        host, port = (conf.bindAddress or self._selfNode.address).rsplit(":", 1)
        self._server = GuardedServer(
            lambda sock: self._new_connection(socket=sock), self._syncObj._poller, host, port,
            onNewConnection=self._onNewIncomingConnection, sendBufferSize=conf.sendBufferSize,
            recvBufferSize=conf.recvBufferSize, connectionTimeout=conf.connectionTimeout)

    def addNode(self, node: Any) -> None:  # noqa: N802 (PySyncObj's name)
        """As PySyncObj's, with a ``SecureConnection`` for the nodes this one dials."""
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conn = self._new_connection()
            conn.setOnConnectedCallback(lambda: self._onOutgoingConnected(conn))
            conn.setOnMessageReceivedCallback(lambda message: self._onMessageReceived(node, message))
            conn.setOnDisconnectedCallback(lambda: self._onDisconnected(conn))
            self._connections[node] = conn

    def _onNewIncomingConnection(self, conn: SecureConnection) -> None:  # noqa: N802
        if len(self._unknownConnections) >= self._raft.unauthenticated_connections_max:
            oldest = min(self._unknownConnections, key=lambda c: c.opened_at)
            self._count_refusal("pushed out by newer connections before authenticating")
            oldest.disconnect()
            self._unknownConnections.discard(oldest)
        super()._onNewIncomingConnection(conn)

    def _onTick(self) -> None:  # noqa: N802 (PySyncObj's name)
        super()._onTick()
        now, quiet_s = raft_clock(), self._raft.connection_timeout_s / keepalives_per_timeout
        for conn in list(self._connections.values()):
            conn.keep_alive(now, quiet_s)
        if isinstance(self._server, GuardedServer):
            self._server.resume_if_due()
        if self._unknownConnections:
            self._drop_slow_handshakes()

    def _drop_slow_handshakes(self) -> None:
        deadline = raft_clock() - self._raft.handshake_timeout_s
        for conn in list(self._unknownConnections):
            if conn.state == CONNECTION_STATE.DISCONNECTED:
                self._unknownConnections.discard(conn)
            elif conn.opened_at < deadline:
                self._count_refusal("no authenticated frame in time")
                conn.disconnect()

    def send(self, node: Any, message: Any) -> bool:
        self._before_send(node, message)
        return bool(super().send(node, message))

    def setOnMessageReceivedCallback(self, callback: Any) -> None:  # noqa: N802 (PySyncObj's name)
        """Note the last append_entries from a leader (for staleness bounds) on the way in."""
        if callback is None:
            super().setOnMessageReceivedCallback(None)
            return

        def received(node: Any, message: Any) -> None:
            if message.get("type") == "append_entries":
                self.last_append_entries = time.monotonic()
            callback(node, message)

        super().setOnMessageReceivedCallback(received)


# -- restoring a group from a backup ---------------------------------------------------------------

restored_log_index_min = 2  # PySyncObj's dump names two entries: the last applied and the one before


def restored_dump_meta(applied_index: int, member_addresses: list[str]) -> tuple[Any, ...]:
    """PySyncObj's part of a dump file for a group started from a backup (``cluster/backup.py``).

    A dump's meta is ``(last applied entry, the entry before, the members)``, each entry
    ``(command, index, term)`` (``SyncObj.__tryLogCompaction``). Loading it makes the log start right
    after ``applied_index``, so the first entry the new group commits is above what the restored
    store holds (the store skips entries at or below its applied index). The entries are PySyncObj
    no-ops of term 0, the term a fresh journal starts at: every member of the new group loads the
    same two, and the first election (term 1) proceeds as in a new cluster.
    """
    index = max(applied_index, restored_log_index_min)
    no_op = _syncobj._bchr(_syncobj._COMMAND_TYPE.NO_OP)
    members = {_syncobj.TCPNode(address) for address in member_addresses}
    return (no_op, index, 0), (no_op, index - 1, 0), members
