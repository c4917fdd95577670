"""One replica of one shard: a PySyncObj Raft member over the ledger state machine.

``ShardReplica`` (a ``SyncObj``) owns the tick thread: it appends, replicates and applies Raft entries.
Each entry is one encoded batch of requests (``codec.encode_requests``) and is applied with one LMDB write
transaction through ``LedgerStore.apply_entry``. ``ReplicaService`` is the asyncio side and implements
``raftledger.node.service.ShardService``: a group-commit batcher that turns requests arriving close
together into one entry, assigns leader timestamps, bounds its queue, and hands PySyncObj callbacks (which
run on the tick thread) back to the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import msgpack
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON
from pysyncobj.monotonic import monotonic as raft_clock
from raftledger.statemachine import codec
from raftledger.statemachine.commands import AnyCommand, Batch, CreateTransaction, ExpireHolds, Request
from raftledger.statemachine.records import Outcome
from raftledger.statemachine.store import LedgerStore

from . import journal as journal_mod
from .applier import Applier
from .service import Committed, NotLeader, OutcomeUnknown, Overloaded, Unavailable
from .snapshot import Snapshotter, StoreSlot
from .transport import SecureTransport

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

# Group commit on the leader: one Raft entry carries at most this many requests / bytes, and the batcher
# waits at most linger_ms after the first queued request for more to arrive.
batch_requests_max = 1000
batch_bytes_max = 1 << 20
linger_ms = 2.0
# Bounds on the asyncio side: queued requests not yet proposed, entries proposed but not yet applied.
requests_queued_max = 50_000
entries_inflight_max = 16
commit_timeout_s = 10.0
overloaded_retry_after_s = 0.5
drain_timeout_s = 5.0
command_overhead_bytes = 48  # size_hint: tags, flags, timestamps, msgpack headers
entry_overhead_bytes = 16
drain_poll_s = 0.01
# How often the leader looks for holds past their deadline on a shard with nothing else to apply.
expiry_check_interval_s = 0.5
# Raft timing (seconds) and PySyncObj queues.
append_entries_period_s = 0.05
election_timeout_min_s = 0.8
election_timeout_max_s = 1.6
# A shard's preferred replica (ClusterSpec.preferred_leader) times out before any other can, so it
# usually wins the election: leaders, which do the batching and take the writes, spread over the nodes.
preferred_election_timeout_min_s = 0.4
preferred_election_timeout_max_s = 0.7
leader_fallback_timeout_s = 3.0
connection_timeout_s = 3.0
connection_retry_s = 0.3
raft_commands_queued_max = 1000
append_entries_bytes_max = 8 << 20
snapshot_chunk_bytes = 1 << 20
log_compaction_entries_min = 5000
log_compaction_interval_s = 300.0
# PySyncObj compacts by entry count or time; its journal also keeps every entry in memory, and entries
# are batches of up to batch_bytes_max, so compact as well once the journal holds this many bytes.
log_compaction_bytes_max = 64 << 20
# Hand the applier at most about this many payload bytes per tick (at least one entry), and nothing while
# this many entries wait for it, so the tick thread stays free for heartbeats, acks and elections.
apply_bytes_per_tick_max = 256 << 10
apply_backlog_entries_max = 32

SendObserver = Callable[[Any, dict], None]


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    """Everything one shard replica needs to start; built from the node config (or by tests)."""

    shard: int
    self_address: str  # "host:port" of this replica's Raft endpoint
    partner_addresses: tuple[str, ...]
    directory: str  # holds the LMDB generations, the journal and the dump
    # The shard's Raft key (``transport.shard_key`` of the cluster secret): every Raft connection is
    # authenticated and encrypted with it, so nobody without the secret can join, vote or listen.
    raft_key: bytes = field(repr=False)
    durability: str = journal_mod.DURABILITY_FSYNC
    address_to_node: dict[str, str] = field(default_factory=dict)
    log_compaction_entries_min: int = log_compaction_entries_min
    log_compaction_interval_s: float = log_compaction_interval_s
    log_compaction_bytes_max: int = log_compaction_bytes_max
    batch_requests_max: int = batch_requests_max
    batch_bytes_max: int = batch_bytes_max
    linger_ms: float = linger_ms
    preferred_leader: bool = False
    on_flush: journal_mod.FlushObserver | None = None  # tests: record flush order
    on_meta: journal_mod.MetaObserver | None = None  # tests: record term/vote writes
    on_send: SendObserver | None = None  # tests: record network sends

    @property
    def sync(self) -> bool:
        return self.durability == journal_mod.DURABILITY_FSYNC

    @property
    def election_timeout_s(self) -> tuple[float, float]:
        if self.preferred_leader:
            return preferred_election_timeout_min_s, preferred_election_timeout_max_s
        return election_timeout_min_s, election_timeout_max_s


class ShardReplica(SyncObj):
    """The Raft member. Its replicated method applies one batch payload to the store."""

    def __init__(self, settings: ReplicaSettings, *, retire: Callable[[Any], None] | None = None,
                 on_applied: Callable[[int], None] | None = None,
                 on_fsync: journal_mod.FsyncObserver | None = None,
                 on_leader_change: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._on_leader_change = on_leader_change
        self._seen_leader: tuple[Any, int] | None = None  # (leader node, term) last reported
        os.makedirs(settings.directory, exist_ok=True)
        self.slot = StoreSlot(settings.directory, settings.shard, sync=settings.sync, retire=retire)
        self.applier = Applier(self.slot, on_applied)
        dump_file = os.path.join(settings.directory, "raft.dump")
        self.snapshotter = Snapshotter(self.slot, dump_file, self.applier, sync=settings.sync)
        self.snapshotter.on_installed = self._postpone_election
        journal_file = os.path.join(settings.directory, "raft.journal")
        journal_mod.register(journal_file, journal_mod.JournalOptions(
            settings.durability, settings.on_flush, settings.on_meta, on_fsync))
        self.raft_key = settings.raft_key  # read by SecureTransport
        super().__init__(settings.self_address, list(settings.partner_addresses),
                         self._conf(settings, journal_file, dump_file),
                         transportClass=SecureTransport)

    def _conf(self, s: ReplicaSettings, journal_file: str, dump_file: str) -> SyncObjConf:
        return SyncObjConf(
            journalFile=journal_file, fullDumpFile=dump_file,
            serializer=self.snapshotter.serialize, deserializer=self.snapshotter.deserialize,
            serializeChecker=self.snapshotter.check, useFork=False,
            appendEntriesUseBatch=False, appendEntriesPeriod=append_entries_period_s,
            raftMinTimeout=s.election_timeout_s[0], raftMaxTimeout=s.election_timeout_s[1],
            leaderFallbackTimeout=leader_fallback_timeout_s, connectionTimeout=connection_timeout_s,
            connectionRetryTime=connection_retry_s, commandsQueueSize=raft_commands_queued_max,
            appendEntriesBatchSizeBytes=append_entries_bytes_max,
            logCompactionBatchSize=snapshot_chunk_bytes,
            logCompactionMinEntries=s.log_compaction_entries_min,
            logCompactionMinTime=s.log_compaction_interval_s,
            sendBufferSize=1 << 20, recvBufferSize=1 << 20, bindAddress=s.self_address,
            onStateChanged=self._state_changed,
            # Membership changes must be enabled on every member from the start to be usable later.
            dynamicMembershipChange=True,
        )

    def _postpone_election(self) -> None:
        """Installing a large snapshot keeps the tick thread busy for seconds; the leader's messages
        wait unread meanwhile. Restart the election timer so this follower does not depose a healthy
        leader the moment it is done."""
        self._SyncObj__raftElectionDeadline = (  # type: ignore[attr-defined]
            raft_clock() + self._SyncObj__generateRaftTimeout())  # type: ignore[attr-defined]

    def _state_changed(self, old: int, new: int) -> None:
        names = ("follower", "candidate", "leader")
        log.info("shard %d: %s -> %s (term %d)", self.settings.shard, names[old], names[new],
                 self.raftCurrentTerm)

    @property
    def journal(self) -> journal_mod.DurableJournal:
        return self._SyncObj__raftLog  # type: ignore[attr-defined]

    @property
    def store(self) -> LedgerStore:
        return self.slot.current

    @replicated
    def apply_batch(self, payload: bytes) -> int:
        """Hand one committed entry to the applier and return its log index. PySyncObj increments
        raftLastApplied after this returns, so the entry is raftLastApplied + 1 (it passes no index)."""
        index = self.raftLastApplied + 1
        self.applier.submit(index, payload)
        return index

    def _SyncObj__getEntries(self, fromIDx, count=None, maxSizeBytes=None):  # noqa: N802, N803, ANN001
        """PySyncObj's private entry reader. Only its apply loop asks for more than two entries by
        count (commit checks ask for 1, compaction for 2, replication by bytes): slice that one by
        bytes, and hand nothing over while the applier is ``apply_backlog_entries_max`` behind."""
        if count is not None and count > 2 and maxSizeBytes is None:
            if self.applier.backlog() >= apply_backlog_entries_max:
                return []
            maxSizeBytes = apply_bytes_per_tick_max
        return SyncObj._SyncObj__getEntries(self, fromIDx, count, maxSizeBytes)

    def raft_applied_index(self) -> int:
        """Last log index whose effects are in the store (no-op entries never reach the store)."""
        if self.applier.backlog() == 0:
            return max(self.raftLastApplied, self.applier.processed)
        return self.applier.processed

    def before_send(self, node: Any, message: dict) -> None:
        """Every message leaves after the journal entries it may vouch for are on disk."""
        self.journal.flush_if_dirty()
        if self.settings.on_send is not None:
            self.settings.on_send(node, message)

    def _checkCommandsToApply(self) -> None:  # noqa: N802 (PySyncObj's name)
        super()._checkCommandsToApply()
        if not self.settings.partner_addresses and self.journal.last_index > self.raftCommitIndex:
            # A one-member group commits at the top of the next tick; no peer reply will wake the
            # poller, so wake it instead of idling for a whole autoTickPeriod.
            self._SyncObj__pipeNotifier.notify()  # type: ignore[attr-defined]

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802, N803 (PySyncObj's name)
        # The leader counts itself towards commit at the top of a tick: make its entries durable first.
        self.journal.flush_if_dirty()
        if self.journal.bytes_held > self.settings.log_compaction_bytes_max and \
                not self.snapshotter.busy:
            self.forceLogCompaction()
        super()._onTick(timeToWait)
        if self._on_leader_change is not None:
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
            self._on_leader_change()  # type: ignore[misc]

    # -- read-only views for the service (plain attribute reads, safe from another thread) -----------
    def leader_address(self) -> str | None:
        leader = self._getLeader()
        return None if leader is None else leader.address

    def leader_contact_monotonic(self) -> float:
        return self._SyncObj__transport.last_append_entries  # type: ignore[attr-defined]

    def majority_contact_age_s(self) -> float | None:
        """On the leader: seconds since a majority (itself included) last answered it. A leader cut
        off from its majority keeps leading until leaderFallbackTimeout; this shows how stale it is."""
        needed = (len(self.otherNodes) + 1) // 2  # followers that make a majority with the leader
        if needed == 0:
            return 0.0
        try:
            responses = sorted(dict(self._SyncObj__lastResponseTime).values(), reverse=True)
        except RuntimeError:  # resized by the tick thread while copying
            return None
        if len(responses) < needed:
            return None
        return max(0.0, raft_clock() - responses[needed - 1])

    def close(self) -> None:
        """Stop the tick thread (flushing the journal), finish applying, then close the store."""
        self.destroy_synchronous()
        self.applier.close()
        self.snapshotter.close()
        self.slot.close()


@dataclass(slots=True)
class _Queued:
    command: AnyCommand
    size: int
    future: asyncio.Future
    queued_at: float  # time.monotonic() when submitted


def size_hint(command: AnyCommand) -> int:
    """About the encoded size of a command, without encoding it (the batch is encoded once)."""
    if isinstance(command, Batch):
        return sum(size_hint(c) for c in command.commands) + command_overhead_bytes
    size = command_overhead_bytes + len(command.id)
    if isinstance(command, CreateTransaction):
        size += sum(len(e.account_id) + len(e.currency) + entry_overhead_bytes for e in command.entries)
    metadata = getattr(command, "metadata", None)
    if metadata:
        size += len(msgpack.packb(metadata, default=str))
    return size


def fail_reason_error(reason: int, leader: str | None) -> Unavailable:
    """Map a PySyncObj FAIL_REASON to the service's retryable errors."""
    if reason in (FAIL_REASON.NOT_LEADER, FAIL_REASON.MISSING_LEADER):
        return NotLeader(f"not the leader (reason {reason})", leader=leader)
    if reason == FAIL_REASON.QUEUE_FULL:
        return Overloaded("raft queue full", retry_after_s=overloaded_retry_after_s)
    return OutcomeUnknown(f"outcome unknown (reason {reason}); retry with the same id")


class ReplicaService:
    """``ShardService`` for one replica: batcher + read helpers, living on one asyncio loop."""

    def __init__(self, settings: ReplicaSettings, node_id: str,
                 loop: asyncio.AbstractEventLoop | None = None,
                 metrics: Metrics | None = None) -> None:
        """``metrics``: the node's ``Metrics``; batches, queue depth, fsyncs and leader changes of
        this shard are reported to it."""
        self.shard = settings.shard
        self.node_id = node_id
        self.settings = settings
        self.metrics = metrics
        self.loop = loop or asyncio.get_running_loop()
        self._queue: deque[_Queued] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._inflight = asyncio.Semaphore(entries_inflight_max)
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._waiter_seq = itertools.count()
        self._want_applied = False
        self._inflight_count = 0
        self._last_ts = 0
        self._ts_term = -1
        self._accepting = True
        self.entries_proposed = 0
        self._next_leader: asyncio.Future[None] = self.loop.create_future()
        on_fsync = None if metrics is None else partial(metrics.observe_fsync, self.shard)
        self.replica = ShardReplica(settings, retire=self._retire, on_applied=self._applied_threadsafe,
                                    on_fsync=on_fsync, on_leader_change=self._leader_changed_threadsafe)
        self._tasks = [self.loop.create_task(self._batcher(), name=f"batcher-{self.shard}"),
                       self.loop.create_task(self._expire_holds(), name=f"expiry-{self.shard}")]

    # -- ShardService -------------------------------------------------------------------------------
    @property
    def store(self) -> LedgerStore:
        return self.replica.store

    def is_leader(self) -> bool:
        return bool(self.replica._isLeader())

    def leader_node_id(self) -> str | None:
        address = self.replica.leader_address()
        if address is None:
            return None
        return self.settings.address_to_node.get(address, address)

    def applied_index(self) -> int:
        return self.replica.store.applied_index()

    def leader_changed(self) -> asyncio.Future[None]:
        return self._next_leader

    def _leader_changed_threadsafe(self) -> None:  # tick thread
        if self.metrics is not None:
            self.metrics.leader_changed(self.shard)
        with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._leader_changed)

    def _leader_changed(self) -> None:
        changed, self._next_leader = self._next_leader, self.loop.create_future()
        changed.set_result(None)

    def leader_contact_age_ms(self) -> float | None:
        if self.is_leader():
            return 0.0
        last = self.replica.leader_contact_monotonic()
        return None if not last else (time.monotonic() - last) * 1000.0

    def majority_contact_age_ms(self) -> float | None:
        """On the leader: milliseconds since a majority last answered it (None elsewhere). Unlike
        ``leader_contact_age_ms`` (0 on a leader) it grows on a leader cut off from its followers."""
        if not self.is_leader():
            return None
        age_s = self.replica.majority_contact_age_s()
        return None if age_s is None else age_s * 1000.0

    async def submit(self, command: AnyCommand) -> Committed:
        if not self._accepting:
            raise Unavailable("node is shutting down")
        if not self.is_leader():
            raise NotLeader(f"shard {self.shard}: not the leader", leader=self.leader_node_id())
        if len(self._queue) >= requests_queued_max:
            raise Overloaded(f"shard {self.shard}: queue full", retry_after_s=overloaded_retry_after_s)
        size = size_hint(command)
        future: asyncio.Future = self.loop.create_future()
        self._queue.append(_Queued(command, size, future, time.monotonic()))
        self._queued_bytes += size
        self._wake.set()
        timer = self.loop.call_later(commit_timeout_s, self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future) -> None:
        if not future.done():
            future.set_exception(OutcomeUnknown(
                f"shard {self.shard}: no commit within {commit_timeout_s}s; retry with the same id"))

    async def wait_applied(self, index: int, timeout_s: float) -> bool:
        if self.applied_index() >= index:
            return True
        future: asyncio.Future = self.loop.create_future()
        heapq.heappush(self._waiters, (index, next(self._waiter_seq), future))
        self._want_applied = True
        if self.applied_index() >= index:  # applied between the check and the registration
            self._release_waiters(self.applied_index())
        try:
            await asyncio.wait_for(future, timeout_s)
            return True
        except TimeoutError:
            return self.applied_index() >= index

    async def read_barrier(self, timeout_s: float) -> int:
        if not self.is_leader():
            raise NotLeader(f"shard {self.shard}: not the leader", leader=self.leader_node_id())
        future: asyncio.Future = self.loop.create_future()

        def on_result(result: Any, reason: int) -> None:  # tick thread
            self.loop.call_soon_threadsafe(self._settle_barrier, future, result, reason)
            # The barrier needs only the index: it is committed once PySyncObj calls back.

        self.replica.apply_batch(codec.encode_requests([]), callback=on_result)
        try:
            return int(await asyncio.wait_for(future, timeout_s))
        except TimeoutError:
            raise Unavailable(f"shard {self.shard}: read barrier timed out") from None

    def _settle_barrier(self, future: asyncio.Future, result: Any, reason: int) -> None:
        if future.done():
            return
        if reason == FAIL_REASON.SUCCESS and result is not None:
            future.set_result(result)
        else:
            future.set_exception(fail_reason_error(reason, self.leader_node_id()))

    def status(self) -> dict[str, Any]:
        r = self.replica
        commit, applied = r.raftCommitIndex, self.applied_index()
        raft_applied = r.raft_applied_index()
        return {"shard": self.shard, "node": self.node_id,
                "role": "leader" if self.is_leader() else "follower",
                "term": r.raftCurrentTerm, "commit_index": commit, "applied_index": applied,
                "lag": max(0, commit - raft_applied), "leader": self.leader_node_id(),
                "journal_entries": len(r.journal), "snapshots_installed": r.snapshotter.installed,
                "snapshots_written": r.snapshotter.completed,
                "leader_contact_age_ms": self.leader_contact_age_ms(),
                "majority_contact_age_ms": self.majority_contact_age_ms()}

    def fingerprint(self) -> tuple[int, str]:
        return self.replica.store.fingerprint()

    # -- batcher ------------------------------------------------------------------------------------
    async def _batcher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._inflight.acquire()
                self._inflight_count += 1
                await self._linger()
                batch = self._take_batch()
                self._report_queue_depth()
                self._propose(batch)

    async def _linger(self) -> None:
        """Give a partial batch up to linger_ms to fill; a full one goes at once."""
        deadline = time.monotonic() + self.settings.linger_ms / 1000.0
        while len(self._queue) < self.settings.batch_requests_max and \
                self._queued_bytes < self.settings.batch_bytes_max:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _report_queue_depth(self) -> None:
        """Requests still waiting once a batch is taken (0 when the batcher keeps up)."""
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.shard, len(self._queue))

    def _take_batch(self) -> list[_Queued]:
        batch: list[_Queued] = []
        size = 0
        limit_n, limit_b = self.settings.batch_requests_max, self.settings.batch_bytes_max
        while self._queue and len(batch) < limit_n and (not batch or size + self._queue[0].size <= limit_b):
            item = self._queue.popleft()
            self._queued_bytes -= item.size
            size += item.size
            if not item.future.done():  # the caller gave up before it was proposed: drop it
                batch.append(item)
        return batch

    def _propose(self, batch: list[_Queued]) -> None:
        if not batch:
            self._release_inflight()
            return
        futures = [item.future for item in batch]
        if not self.is_leader():
            self._settle(futures, None, FAIL_REASON.NOT_LEADER)
            return
        requests = [Request(self._next_timestamp(), item.command) for item in batch]
        self.replica.apply_batch(codec.encode_requests(requests), callback=self._callback(futures))
        self.entries_proposed += 1
        if self.metrics is not None:
            self.metrics.observe_batch(self.shard, len(batch), time.monotonic() - batch[0].queued_at)

    def _next_timestamp(self) -> int:
        """Monotonic per shard: max(last + 1, wall clock), re-read from the store on a new term."""
        term = self.replica.raftCurrentTerm
        if term != self._ts_term:
            # A new term: earlier leaders' timestamps are in the store once everything committed so
            # far is applied; until then, keep re-reading it.
            if self.replica.raft_applied_index() >= self.replica.raftCommitIndex:
                self._ts_term = term
            self._last_ts = max(self._last_ts, self.store.last_timestamp())
        self._last_ts = max(self._last_ts + 1, time.time_ns())
        return self._last_ts

    def _callback(self, futures: list[asyncio.Future]) -> Callable[[Any, int], None]:
        def on_result(index: Any, reason: int) -> None:  # tick thread
            if reason != FAIL_REASON.SUCCESS:
                self.loop.call_soon_threadsafe(self._settle, futures, None, reason)
                return

            def on_applied(outcomes: list[Outcome] | None) -> None:  # apply thread
                self.loop.call_soon_threadsafe(self._settle, futures, (index, outcomes), reason)
            self.replica.applier.notify(index, on_applied)
        return on_result

    def _release_inflight(self) -> None:
        self._inflight_count -= 1
        self._inflight.release()

    def _settle(self, futures: list[asyncio.Future], result: Any, reason: int) -> None:
        self._release_inflight()
        if reason == FAIL_REASON.SUCCESS and result is not None and result[1] is not None:
            index, outcomes = result
            if len(outcomes) == len(futures):
                self._resolve(futures, index, outcomes)
                return
            reason = FAIL_REASON.UNKNOWN_OUTCOME
        if reason == FAIL_REASON.SUCCESS:
            reason = FAIL_REASON.UNKNOWN_OUTCOME  # applied before (store skipped it): result unknown
        leader = self.leader_node_id()
        for future in futures:
            if not future.done():
                future.set_exception(fail_reason_error(reason, leader))

    @staticmethod
    def _resolve(futures: list[asyncio.Future], index: int, outcomes: list[Outcome]) -> None:
        for future, outcome in zip(futures, outcomes, strict=True):
            if not future.done():
                future.set_result(Committed(outcome=outcome, index=index))

    # -- holds on an idle shard ----------------------------------------------------------------------
    async def _expire_holds(self) -> None:
        """On the leader: once the earliest hold's deadline has passed and no request is on its way
        (any request would expire it when applied), propose ``ExpireHolds``, timestamped like any
        request, so the hold is released on every replica at the same point of the log."""
        while True:
            await asyncio.sleep(expiry_check_interval_s)  # a timer: the passing of time is the event
            if not (self._accepting and self.is_leader()) or self._queue or self._inflight_count:
                continue
            with self.store.reader() as reader:
                deadline = reader.earliest_hold_deadline()
            if deadline is not None and deadline <= time.time_ns():
                with contextlib.suppress(Unavailable):
                    await self.submit(ExpireHolds())

    # -- applied-index waiters ------------------------------------------------------------------------
    def _applied_threadsafe(self, index: int) -> None:  # tick thread
        if self._want_applied:
            self.loop.call_soon_threadsafe(self._release_waiters, index)

    def _release_waiters(self, index: int) -> None:
        while self._waiters and self._waiters[0][0] <= index:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(True)
        self._want_applied = bool(self._waiters)

    def _retire(self, close: Callable[[], None]) -> None:
        """Close a replaced store on the loop thread, between callbacks, where no reader holds it."""
        try:
            self.loop.call_soon_threadsafe(close)
        except RuntimeError:  # loop closed
            close()

    # -- shutdown -------------------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> None:
        """Stop accepting, let queued and in-flight batches finish (bounded)."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while (self._queue or self._inflight_count) and time.monotonic() < deadline:
            await asyncio.sleep(drain_poll_s)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Unavailable("node is shutting down"))
        self._queue.clear()
        self._report_queue_depth()
        self._wake.set()

    async def close(self) -> None:
        if self._accepting:
            await self.drain(drain_timeout_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.to_thread(self.replica.close)
