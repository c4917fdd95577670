"""One replica of one shard: the ledger store under a Raft member, and the asyncio side that feeds it.

``ReplicaService`` implements ``raftledger.node.service.ShardService``. It owns the shard's store
(``StoreSlot``), the apply thread (``Applier``), the snapshot hooks (``Snapshotter``) and the Raft
member (``raft.RaftMember``, the PySyncObj boundary), and runs a group-commit batcher on the event loop:
requests arriving close together become one Raft entry (``codec.encode_requests``), each with a leader
timestamp; the queue is bounded; results come back from the apply thread through
``call_soon_threadsafe``. Every wait reads the injected ``Clock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import msgpack
from raftledger.client.errors import NotLeader, OutcomeUnknown, Overloaded, Unavailable
from raftledger.statemachine import codec
from raftledger.statemachine.commands import (
    AnyCommand,
    Batch,
    CreateTransaction,
    ExpireHolds,
    Request,
    SetSlots,
)
from raftledger.statemachine.records import Outcome
from raftledger.statemachine.store import LedgerStore

from .applier import Applier
from .clock import SYSTEM_CLOCK, Clock, ProposalHold
from .fingerprints import FingerprintHistory
from .raft import MemberHooks, MemberSettings, RaftMember
from .service import Committed
from .settings import BatchingSettings
from .snapshot import Snapshotter
from .store_slot import StoreSlot

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

command_overhead_bytes = 48  # size_hint: tags, flags, timestamps, msgpack headers
entry_overhead_bytes = 16


@dataclass(frozen=True, slots=True)
class ReplicaSettings(MemberSettings):
    """Everything one shard replica needs to start; built from the node config (or by tests)."""

    address_to_node: dict[str, str] = field(default_factory=dict)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    # A node's shards take no client command before their store holds slots from the cluster map
    # (a shard without slots accepts every account); tests of a bare group leave it off.
    slots_required: bool = False


@dataclass(slots=True)
class _Queued:
    command: AnyCommand
    size: int
    future: asyncio.Future
    queued_at: float  # clock.monotonic() when submitted


def size_hint(command: AnyCommand) -> int:
    """About the encoded size of a command, without encoding it (the batch is encoded once)."""
    if isinstance(command, Batch):
        return sum(size_hint(c) for c in command.commands) + command_overhead_bytes
    if isinstance(command, SetSlots):
        return command_overhead_bytes + 8 * len(command.ranges)
    size = command_overhead_bytes + len(command.id)
    if isinstance(command, CreateTransaction):
        size += sum(len(e.account_id) + len(e.currency) + entry_overhead_bytes for e in command.entries)
    metadata = getattr(command, "metadata", None)
    if metadata:
        size += len(msgpack.packb(metadata, default=str))
    return size


class ReplicaService:
    """``ShardService`` for one replica: batcher + read helpers, living on one asyncio loop."""

    def __init__(self, settings: ReplicaSettings, node_id: str,
                 loop: asyncio.AbstractEventLoop | None = None,
                 metrics: Metrics | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        """``metrics``: the node's ``Metrics``; batches, queue depth, fsyncs and leader changes of
        this shard are reported to it."""
        self.shard = settings.shard
        self.node_id = node_id
        self.settings = settings
        self.batching = settings.batching
        self.metrics = metrics
        self.clock = clock
        self.loop = loop or asyncio.get_running_loop()
        self._queue: deque[_Queued] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._inflight = asyncio.Semaphore(self.batching.entries_in_flight_max)
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._waiter_seq = itertools.count()
        self._want_applied = False
        self._inflight_count = 0
        self._last_ts = 0
        self._ts_term = -1
        self._accepting = True
        self._hold = ProposalHold(clock, self.is_leader)  # a leadership transfer (hold_proposals)
        self.entries_proposed = 0
        self.barriers_proposed = 0  # read barriers (empty entries), not counted in entries_proposed
        self._next_leader: asyncio.Future[None] = self.loop.create_future()
        self._store_leases = 0  # worker-thread readers of the store (``store_lease``)
        self._closes_deferred: list[Callable[[], None]] = []
        self.slot = StoreSlot(settings.directory, self.shard, sync=settings.sync, retire=self._retire,
                              reserve_ahead_min_bytes=settings.snapshots.disk_reserve_min_bytes)
        self.fingerprints = FingerprintHistory(self.slot.current.fingerprint())
        self.applier = Applier(self.slot, self._applied_threadsafe)
        self.snapshotter = Snapshotter(self.slot, settings.dump_file, self.applier, sync=settings.sync,
                                       settings=settings.snapshots)
        self.raft = RaftMember(settings, MemberHooks(
            apply=self.applier.submit, apply_backlog=self.applier.backlog,
            snapshot_serialize=self.snapshotter.serialize,
            snapshot_deserialize=self.snapshotter.deserialize,
            snapshot_check=self.snapshotter.check, snapshot_busy=lambda: self.snapshotter.busy,
            on_leader_change=self._leader_changed_threadsafe,
            on_fsync=None if metrics is None else partial(metrics.observe_fsync, self.shard)),
            overloaded_retry_after_s=self.batching.overloaded_retry_after_s)
        self.snapshotter.on_installed = self._snapshot_installed
        self._tasks = [self.loop.create_task(self._batcher(), name=f"batcher-{self.shard}"),
                       self.loop.create_task(self._expire_holds(), name=f"expiry-{self.shard}")]

    # -- ShardService -------------------------------------------------------------------------------
    @property
    def store(self) -> LedgerStore:
        return self.slot.current

    @contextlib.contextmanager
    def store_lease(self) -> Iterator[LedgerStore]:
        """The current store, kept open until the block ends even if a snapshot install replaces it
        meanwhile: for reads on worker threads (an audit, a backup copy), which the loop thread's
        close of a replaced store would pull out from under them. Taken and left on the loop thread."""
        self._store_leases += 1
        try:
            yield self.store
        finally:
            self._store_leases -= 1
            if not self._store_leases:
                closes, self._closes_deferred = self._closes_deferred, []
                for close in closes:
                    close()

    def is_leader(self) -> bool:
        return self.raft.is_leader()

    def leader_node_id(self) -> str | None:
        address = self.raft.leader_address()
        if address is None:
            return None
        return self.settings.address_to_node.get(address, address)

    def applied_index(self) -> int:
        return self.store.applied_index()

    def raft_applied_index(self) -> int:
        """Last log index whose effects are in the store (PySyncObj's own no-op entries never reach
        the store: while nothing waits for the apply thread, the member's last applied counts)."""
        if self.applier.backlog() == 0:
            return max(self.raft.last_applied, self.applier.processed)
        return self.applier.processed

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
        last = self.raft.leader_contact_monotonic()
        return None if not last else (self.clock.monotonic() - last) * 1000.0

    def majority_contact_age_ms(self) -> float | None:
        """On the leader: milliseconds since a majority last answered it (None elsewhere). Unlike
        ``leader_contact_age_ms`` (0 on a leader) it grows on a leader cut off from its followers."""
        if not self.is_leader():
            return None
        age_s = self.raft.majority_contact_age_s()
        return None if age_s is None else age_s * 1000.0

    async def submit(self, command: AnyCommand) -> Committed:
        if not self._accepting:
            raise Unavailable(message="node is shutting down")
        if not self.is_leader():
            raise NotLeader(message=f"shard {self.shard}: not the leader", leader=self.leader_node_id())
        if self.settings.slots_required and not isinstance(command, SetSlots | ExpireHolds) \
                and self.store.slots()[0] == 0:
            raise Unavailable(message=f"shard {self.shard}: its slots from the cluster map are not "
                                      "applied yet", retry_after_s=0.5)
        if len(self._queue) >= self.batching.requests_queued_max:
            raise Overloaded(message=f"shard {self.shard}: queue full",
                             retry_after_s=self.batching.overloaded_retry_after_s)
        size = size_hint(command)
        future: asyncio.Future = self.loop.create_future()
        self._queue.append(_Queued(command, size, future, self.clock.monotonic()))
        self._queued_bytes += size
        self._wake.set()
        timer = self.clock.call_later(self.batching.commit_timeout_s, partial(self._expire, future))
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future) -> None:
        if not future.done():
            future.set_exception(OutcomeUnknown(
                message=f"shard {self.shard}: no commit within {self.batching.commit_timeout_s}s; "
                        "retry with the same id"))

    async def wait_applied(self, index: int, timeout_s: float) -> bool:
        if self.applied_index() >= index:
            return True
        future: asyncio.Future = self.loop.create_future()
        heapq.heappush(self._waiters, (index, next(self._waiter_seq), future))
        self._want_applied = True
        if self.applied_index() >= index:  # applied between the check and the registration
            self._release_waiters(self.applied_index())
        await self.clock.wait(future, timeout_s)
        return self.applied_index() >= index

    async def read_barrier(self, timeout_s: float) -> int:
        """The index a linearizable read waits for: an empty entry, committed; an entry too, so it
        waits while a leadership transfer holds proposals (``ProposalHold``)."""
        await self._hold.wait()
        if not self.is_leader():
            raise NotLeader(message=f"shard {self.shard}: not the leader", leader=self.leader_node_id())
        self.barriers_proposed += 1
        future: asyncio.Future[int] = self.loop.create_future()

        def committed(index: int | None, error: Unavailable | None) -> None:  # tick thread
            # The barrier needs only the index: it is committed once the member calls back.
            self.loop.call_soon_threadsafe(_settle_future, future, index, error)

        self.raft.propose(codec.encode_requests([]), committed)
        if not await self.clock.wait(future, timeout_s):
            future.cancel()
            raise Unavailable(message=f"shard {self.shard}: read barrier timed out")
        return future.result()

    def status(self) -> dict[str, Any]:
        raft = self.raft
        commit, applied = raft.commit_index, self.applied_index()
        return {"shard": self.shard, "node": self.node_id,
                "role": "leader" if self.is_leader() else "follower",
                "term": raft.term, "commit_index": commit, "applied_index": applied,
                "raft_applied_index": self.raft_applied_index(),
                "lag": max(0, commit - self.raft_applied_index()), "leader": self.leader_node_id(),
                "journal_entries": len(raft.journal), "snapshots_installed": self.snapshotter.installed,
                "snapshots_written": self.snapshotter.completed,
                "leader_contact_age_ms": self.leader_contact_age_ms(),
                "majority_contact_age_ms": self.majority_contact_age_ms(),
                "raft_connections_refused": sum(raft.transport_refusals().values()),
                "slots_epoch": self.store.slots()[0]}

    def fingerprint(self) -> tuple[int, str]:
        return self.store.fingerprint()

    # -- batcher ------------------------------------------------------------------------------------
    async def _batcher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._inflight.acquire()
                self._inflight_count += 1
                await self._linger()
                await self._hold.wait()
                batch = self._take_batch()
                self._report_queue_depth()
                self._propose(batch)

    async def _linger(self) -> None:
        """Give a partial batch up to linger_ms to fill; a full one goes at once."""
        deadline = self.clock.monotonic() + self.batching.linger_ms / 1000.0
        while len(self._queue) < self.batching.requests_max and \
                self._queued_bytes < self.batching.bytes_max:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            if not await self.clock.wait(self._wake.wait(), remaining):
                return

    def hold_proposals(self, seconds: float) -> None:
        """Propose no new entry for ``seconds`` or until ``release_proposals`` (``ProposalHold``)."""
        self._hold.hold(seconds)

    def release_proposals(self) -> None:
        self._hold.release()

    def _report_queue_depth(self) -> None:
        """Requests still waiting once a batch is taken (0 when the batcher keeps up)."""
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.shard, len(self._queue))

    def _take_batch(self) -> list[_Queued]:
        batch: list[_Queued] = []
        size = 0
        limit_n, limit_b = self.batching.requests_max, self.batching.bytes_max
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
            self._settle(futures, None, None, NotLeader(message=f"shard {self.shard}: not the leader",
                                                        leader=self.leader_node_id()))
            return
        requests = [Request(self._next_timestamp(), item.command) for item in batch]
        self.raft.propose(codec.encode_requests(requests), self._committed(futures))
        self.entries_proposed += 1
        if self.metrics is not None:
            self.metrics.observe_batch(self.shard, len(batch), self.clock.monotonic() - batch[0].queued_at)

    def _next_timestamp(self) -> int:
        """Monotonic per shard: max(last + 1, wall clock), re-read from the store on a new term."""
        term = self.raft.term
        if term != self._ts_term:
            # A new term: earlier leaders' timestamps are in the store once everything committed so
            # far is applied; until then, keep re-reading it.
            if self.raft_applied_index() >= self.raft.commit_index:
                self._ts_term = term
            self._last_ts = max(self._last_ts, self.store.last_timestamp())
        self._last_ts = max(self._last_ts + 1, self.clock.time_ns())
        return self._last_ts

    def _committed(self, futures: list[asyncio.Future]) -> Callable[[int | None, Unavailable | None], None]:
        def committed(index: int | None, error: Unavailable | None) -> None:  # tick thread
            if index is None:
                self.loop.call_soon_threadsafe(self._settle, futures, None, None, error)
                return

            def on_applied(outcomes: list[Outcome] | None) -> None:  # apply thread
                self.loop.call_soon_threadsafe(self._settle, futures, index, outcomes, None)
            self.applier.notify(index, on_applied)
        return committed

    def _release_inflight(self) -> None:
        self._inflight_count -= 1
        self._inflight.release()

    def _settle(self, futures: list[asyncio.Future], index: int | None,
                outcomes: list[Outcome] | None, error: Unavailable | None) -> None:
        self._release_inflight()
        if index is not None and outcomes is not None and len(outcomes) == len(futures):
            for future, outcome in zip(futures, outcomes, strict=True):
                if not future.done():
                    future.set_result(Committed(outcome=outcome, index=index))
            return
        if error is None:  # applied before (the store skipped it): its results are unknown here
            error = OutcomeUnknown(message=f"shard {self.shard}: outcome unknown; retry with the same id")
        for future in futures:
            if not future.done():
                future.set_exception(error)

    # -- holds on an idle shard ----------------------------------------------------------------------
    async def _expire_holds(self) -> None:
        """On the leader: once the earliest hold's deadline has passed and no request is on its way
        (any request would expire it when applied), propose ``ExpireHolds``, timestamped like any
        request, so the hold is released on every replica at the same point of the log."""
        while True:
            await self.clock.sleep(self.batching.expiry_check_interval_s)  # the passing of time is the event
            if not (self._accepting and self.is_leader()) or self._queue or self._inflight_count:
                continue
            with self.store.reader() as reader:
                deadline = reader.earliest_hold_deadline()
            if deadline is not None and deadline <= self.clock.time_ns():
                with contextlib.suppress(Unavailable):
                    await self.submit(ExpireHolds())

    # -- applied-index waiters ------------------------------------------------------------------------
    def _snapshot_installed(self) -> None:  # tick thread, the applier idle
        self.fingerprints.reset(self.store.fingerprint())
        self.raft.postpone_election()

    def _applied_threadsafe(self, index: int) -> None:  # apply thread
        self.fingerprints.record(self.store.fingerprint())
        if self._want_applied:
            self.loop.call_soon_threadsafe(self._release_waiters, index)

    def _release_waiters(self, index: int) -> None:
        while self._waiters and self._waiters[0][0] <= index:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(True)
        self._want_applied = bool(self._waiters)

    def _retire(self, close: Callable[[], None]) -> None:
        """Close a replaced store on the loop thread, between callbacks, where no reader holds it
        (once the last worker-thread lease is left, if one is held)."""
        try:
            self.loop.call_soon_threadsafe(self._close_unleased, close)
        except RuntimeError:  # loop closed
            close()

    def _close_unleased(self, close: Callable[[], None]) -> None:
        if self._store_leases:
            self._closes_deferred.append(close)
        else:
            close()

    # -- shutdown -------------------------------------------------------------------------------------
    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop accepting, let queued and in-flight batches finish (bounded)."""
        self._accepting = False
        timeout_s = self.batching.drain_timeout_s if timeout_s is None else timeout_s
        deadline = self.clock.monotonic() + timeout_s
        while (self._queue or self._inflight_count) and self.clock.monotonic() < deadline:
            await self.clock.sleep(drain_poll_s)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Unavailable(message="node is shutting down"))
        self._queue.clear()
        self._report_queue_depth()
        self._wake.set()

    async def close(self) -> None:
        if self._accepting:
            await self.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.to_thread(self._close_threads)

    def _close_threads(self) -> None:
        """Stop the tick thread (flushing the journal), finish applying, then close the store."""
        self.raft.close()
        self.applier.close()
        self.snapshotter.close()
        self.slot.close()


drain_poll_s = 0.01  # shutdown only: how often drain looks at what is still queued


def _settle_future(future: asyncio.Future, value: Any, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
