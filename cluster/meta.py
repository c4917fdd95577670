"""The metadata Raft group: the cluster map, replicated like a shard, hosted by a few nodes.

The nodes the map names as its members (``ClusterMap.meta_members``; on a new cluster, the nodes
whose ``[[cluster.nodes]]`` entry names a ``meta`` Raft address) each run one member
(``MetaService``) through the same PySyncObj boundary as the data shards (``node/raft.py``): the same
durable journal, and the same sealed transport under a key of its own (``frames.shard_key`` of the
secret for ``META_GROUP``, which is no data shard's id). Its log carries map commands
(``raftledger.cluster.map``); every member applies them in order, on the tick thread (they are small),
to the map it holds, and hands each new map to the node's ``MapFollower``.

- **Bootstrap.** While the map is empty, the group's leader proposes the map derived from the node
  files (``initial_map`` of ``[cluster]``); the command applies only to an empty map, so a second
  proposal (a new leader that had not applied the first yet) changes nothing.
- **Members change** the way a shard's replicas do (``node/http/membership.py``, ``move_meta``): the
  map first names the new member, whose node starts an empty member that waits to be contacted
  (``member_settings`` from the map); the leader adds its address; a member leaving is handed the
  leadership away from first, dropped by the map (its node stops it and follows the map by long
  polls from then on), then removed by the leader. A node finds its partners after a restart from
  the map it saved, not from its node file.
- **Changes** are proposed on the leader (``propose``); other nodes reach it over the internal
  protocol (``/internal/v1/meta/propose``). A proposal answers once its entry is applied here, with
  the command's outcome and the map's epoch.
- **The audit trail**: every applied change is also an event (``map.audit_record``: who, when,
  what; never a secret) with a dense offset, the same on every member. Members keep the last
  ``audit_events_kept_max`` of them (``AuditTrail``); the feed serves them as its reserved shard
  ``AUDIT_FEED`` (docs/feed.md, "The audit trail").
- **Snapshots** hold the whole map and the audit events kept: PySyncObj's dump file is ``MAGIC |
  applied index | length of PySyncObj's own meta | length of the map | that meta (pickle) | the map
  (msgpack) | the audit trail (msgpack)``, written on the tick thread (the state is small) and
  installed the same way on a member that catches up. Dumps of the first format (``RLMETA01``,
  without the length of the map nor a trail) are still read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
from raftledger.client.errors import LedgerError, NotLeader, OutcomeUnknown, Unavailable
from raftledger.node import frames
from raftledger.node.clock import SYSTEM_CLOCK, Clock, ProposalHold
from raftledger.node.config import NodeConfig
from raftledger.node.files import fsync_dir
from raftledger.node.raft import SERIALIZER_STATE, MemberHooks, MemberSettings, RaftMember
from raftledger.node.settings import MetaSettings

from .map import (
    EMPTY,
    Attributed,
    Bootstrap,
    ClusterMap,
    MapCommand,
    MapError,
    Outcome,
    apply,
    audit_record,
    decode_command,
)
from .map import encode_command as encode_map_command

log = logging.getLogger(__name__)

META_GROUP = -1  # the group's id wherever a shard id is expected (its Raft key, its logs)
META_DIR = "meta"  # the member's journal and dumps, under the node's data dir
AUDIT_FEED = META_GROUP  # the audit trail's shard id in the feed
MAGIC_V1 = b"RLMETA01"
HEADER_V1 = struct.Struct("<8sQI")  # magic, applied index, length of PySyncObj's meta
MAGIC = b"RLMETA02"
HEADER = struct.Struct("<8sQII")  # magic, applied index, lengths of PySyncObj's meta and of the map
BARRIER = b""  # an entry that applies as nothing (``read_barrier``)
outcomes_kept_max = 1024  # outcomes of applied entries kept for the proposals waiting on them
audit_events_kept_max = 10_000  # the audit trail's last events, held by every member


class AuditTrail:
    """The audit events of the applied log, offsets dense from 1; the last ``kept_max`` are held.
    Appended on the tick thread, read on the event loop: the caller holds the member's lock."""

    def __init__(self, kept_max: int = audit_events_kept_max) -> None:
        self.events: deque[dict[str, Any]] = deque(maxlen=kept_max)
        self.last = 0

    @property
    def first(self) -> int:
        """The first offset held (``last + 1`` when none is)."""
        return self.events[0]["offset"] if self.events else self.last + 1

    def record(self, command: MapCommand, epoch: int) -> None:
        found = audit_record(command)
        if found is None:
            return
        kind, data = found
        attributed = isinstance(command, Attributed)
        self.last += 1
        self.events.append({
            "id": f"{AUDIT_FEED}:{self.last}", "shard": AUDIT_FEED, "offset": self.last, "type": kind,
            "timestamp": command.at if attributed else 0,  # type: ignore[union-attr]
            "data": {**data, "actor": command.actor if attributed else None,  # type: ignore[union-attr]
                     "epoch": epoch}})

    def after(self, offset: int, limit: int) -> list[dict[str, Any]]:
        start = max(0, offset + 1 - self.first)
        return [self.events[i] for i in range(start, min(len(self.events), start + limit))]

    def to_wire(self) -> list[Any]:
        return [self.last, list(self.events)]

    @classmethod
    def from_wire(cls, raw: Any) -> AuditTrail:
        trail = cls()
        last, events = raw
        trail.last = int(last)
        trail.events.extend(events)
        return trail


def member_settings(config: NodeConfig, cluster_secret: bytes,
                    cluster_map: ClusterMap | None = None) -> MemberSettings:
    """This node's member of the metadata group, its partners as ``cluster_map`` names them (the
    map it saved, or the one that made it a member), else as the node files do (a new cluster). A
    member with no journal yet, started by a map, waits to be contacted by the group's leader."""
    directory = os.path.join(config.data_dir, META_DIR)
    if cluster_map is None:
        own = config.meta_address
        hosts = [(n.id, n.meta) for n in config.cluster.meta_hosts() if n.meta]
        fresh = False
    else:
        node = cluster_map.node(config.node_id)
        own = None if node is None else node.meta
        hosts = [(n.id, n.meta) for n in cluster_map.meta_hosts() if n.meta]
        fresh = not os.path.exists(os.path.join(directory, "raft.journal"))
    if own is None or config.node_id not in {i for i, _ in hosts}:
        raise ValueError(f"node {config.node_id} hosts no member of the metadata group")
    settings = config.settings
    return MemberSettings(
        shard=META_GROUP, self_address=own,
        partner_addresses=tuple(a for i, a in hosts if i != config.node_id),
        directory=directory, raft_key=frames.shard_key(cluster_secret, META_GROUP),
        durability=config.durability, preferred_leader=hosts[0][0] == config.node_id,
        raft=settings.raft, snapshots=settings.snapshots, await_leader=fresh)


def write_dump(path: str, applied_index: int, meta: Any, cluster_map: ClusterMap, sync: bool,
               trail: AuditTrail | None = None) -> None:
    meta_bytes = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    map_bytes = cluster_map.pack()
    trail_bytes: bytes = msgpack.packb((trail or AuditTrail()).to_wire())
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, applied_index, len(meta_bytes), len(map_bytes)) + meta_bytes
                + map_bytes + trail_bytes)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def read_dump(path: str) -> tuple[int, Any, ClusterMap, AuditTrail]:
    """(applied index, PySyncObj's meta, the map, the audit trail) of a dump."""
    with open(path, "rb") as f:
        data = f.read()
    magic = data[:len(MAGIC)]
    if magic == MAGIC_V1:
        _, applied_index, meta_len = HEADER_V1.unpack_from(data)
        meta = pickle.loads(data[HEADER_V1.size:HEADER_V1.size + meta_len])
        return applied_index, meta, ClusterMap.unpack(data[HEADER_V1.size + meta_len:]), AuditTrail()
    if magic != MAGIC:
        raise MapError(f"{path}: not a metadata group snapshot")
    _, applied_index, meta_len, map_len = HEADER.unpack_from(data)
    at = HEADER.size
    meta = pickle.loads(data[at:at + meta_len])
    cluster_map = ClusterMap.unpack(data[at + meta_len:at + meta_len + map_len])
    trail = AuditTrail.from_wire(msgpack.unpackb(data[at + meta_len + map_len:], strict_map_key=False))
    return applied_index, meta, cluster_map, trail


class MetaService:
    """This node's member of the metadata group: the map as applied here, and proposals to it."""

    def __init__(self, settings: MemberSettings, first_map: ClusterMap,
                 address_to_node: dict[str, str], on_map: Callable[[ClusterMap], object],
                 timeouts: MetaSettings | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        """``first_map``: what the leader bootstraps an empty group with; ``on_map`` receives every
        new map on the event loop."""
        self.settings = settings
        self.first_map = first_map
        self.address_to_node = address_to_node
        self.timeouts = timeouts or MetaSettings()
        self.loop = loop or asyncio.get_running_loop()
        self.clock = clock
        self._on_map = on_map
        self.map = EMPTY  # as applied here; replaced on the tick thread only
        self.applied_index = 0
        self.trail = AuditTrail()  # under _lock
        self._trail_changed: asyncio.Future[None] = self.loop.create_future()
        self._outcomes: dict[int, Outcome] = {}
        self._lock = threading.Lock()
        self._hold = ProposalHold(self.clock, self.is_leader)  # a leadership hand-over (hold_proposals)
        self._dump_state = SERIALIZER_STATE.NOT_SERIALIZING
        self._next_leader: asyncio.Future[None] = self.loop.create_future()
        self.raft = RaftMember(settings, MemberHooks(
            apply=self._apply, apply_backlog=lambda: 0, snapshot_serialize=self._serialize,
            snapshot_deserialize=self._deserialize, snapshot_check=self._check,
            snapshot_busy=lambda: self._dump_state != SERIALIZER_STATE.NOT_SERIALIZING,
            on_leader_change=self._leader_changed_threadsafe))
        self._tasks = [self.loop.create_task(self._bootstrap(), name="meta-bootstrap")]

    # -- applying (tick thread) -------------------------------------------------------------------
    def _apply(self, index: int, payload: bytes) -> None:
        if index <= self.applied_index:
            return
        if payload == BARRIER:  # changes nothing: committed is all a barrier needs
            self.applied_index = index
            return
        try:
            command = decode_command(payload)
        except MapError as exc:  # applied as a refusal, the same on every member
            new, outcome = self.map, Outcome(False, self.map.epoch, str(exc))
        else:
            new, outcome = apply(self.map, command)
        self.map, self.applied_index = new, index
        with self._lock:
            self._outcomes[index] = outcome
            if len(self._outcomes) > outcomes_kept_max:
                del self._outcomes[next(iter(self._outcomes))]
            if outcome.ok:
                self.trail.record(command, new.epoch)
        if outcome.ok:
            self._publish(new)

    def _publish(self, new: ClusterMap) -> None:
        self.address_to_node.update(new.meta_addresses())  # members that joined get names
        with contextlib.suppress(RuntimeError):  # loop closed: nobody follows any more
            self.loop.call_soon_threadsafe(self._on_map, new)
            self.loop.call_soon_threadsafe(self._trail_grew)

    def _trail_grew(self) -> None:
        grew, self._trail_changed = self._trail_changed, self.loop.create_future()
        grew.set_result(None)

    # -- the audit trail (event loop) -----------------------------------------------------------------
    def audit_page(self, after: int, limit: int) -> tuple[list[dict[str, Any]], int, int]:
        """(events after ``after``, the first offset held, the last one) as applied here; raises
        ``feed_compacted`` when events after ``after`` are no longer held."""
        with self._lock:
            first, last = self.trail.first, self.trail.last
            if after + 1 < first:
                raise LedgerError("feed_compacted", f"the audit trail holds events from offset {first} on",
                                  details={"shard": AUDIT_FEED, "after": after, "earliest_offset": first})
            return self.trail.after(after, limit), first, last

    async def wait_audit(self, last: int, timeout_s: float) -> None:
        """Until the trail passes ``last`` (or ``timeout_s``)."""
        if self.trail.last > last:
            return
        await self.clock.wait(self._trail_changed, timeout_s)

    # -- snapshots (tick thread; the state is small, so they are written inline) --------------------
    def _serialize(self, tmp_file: str, meta: Any) -> None:
        try:
            with self._lock:
                trail = AuditTrail.from_wire(self.trail.to_wire())
            write_dump(tmp_file, self.applied_index, meta, self.map, self.settings.sync, trail)
            state = SERIALIZER_STATE.SUCCESS
        except OSError:
            log.exception("metadata group: snapshot failed")
            state = SERIALIZER_STATE.FAILED
        with self._lock:
            self._dump_state = state

    def _check(self) -> int:
        """SUCCESS/FAILED once, then NOT_SERIALIZING; PySyncObj renamed the dump in place by now."""
        with self._lock:
            state, self._dump_state = self._dump_state, SERIALIZER_STATE.NOT_SERIALIZING
        if state == SERIALIZER_STATE.SUCCESS and self.settings.sync:
            fsync_dir(os.path.dirname(os.path.abspath(self.settings.dump_file)))
        return state

    def _deserialize(self, dump_file: str) -> Any:
        """Load a dump (ours at start, or the leader's): the map it holds replaces ours."""
        try:
            applied_index, meta, loaded, trail = read_dump(dump_file)
        except Exception:
            log.critical("metadata group: loading the snapshot %s failed", dump_file, exc_info=True)
            raise
        self.map, self.applied_index = loaded, applied_index
        with self._lock:
            self.trail = trail
        if not loaded.empty:
            self._publish(loaded)
        return meta

    # -- leadership ---------------------------------------------------------------------------------
    def is_leader(self) -> bool:
        return self.raft.is_leader()

    def leader_node_id(self) -> str | None:
        address = self.raft.leader_address()
        return None if address is None else self.address_to_node.get(address, address)

    def leader_changed(self) -> asyncio.Future[None]:
        """Resolves at the next newly known (leader, term); shared: never cancel it."""
        return self._next_leader

    def _leader_changed_threadsafe(self) -> None:  # tick thread
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._leader_changed)

    def _leader_changed(self) -> None:
        changed, self._next_leader = self._next_leader, self.loop.create_future()
        changed.set_result(None)

    async def _bootstrap(self) -> None:
        """While the map is empty, its leader proposes the first one."""
        while self.map.empty:
            changed = self.leader_changed()
            if not self.is_leader():
                await changed
                continue
            try:
                outcome = await self.propose(Bootstrap(self.first_map))
                log.info("metadata group: bootstrap %s", outcome)
                continue
            except LedgerError as exc:
                log.warning("metadata group: bootstrap not applied (%s); retrying", exc)
            await self.clock.wait(changed, self.timeouts.retry_s)

    # -- proposals (event loop) --------------------------------------------------------------------
    @property
    def shard(self) -> int:
        """The group's id where a shard's is expected (membership steps name it)."""
        return META_GROUP

    def hold_proposals(self, seconds: float) -> None:
        """Propose nothing new for ``seconds`` or until ``release_proposals`` (``ProposalHold``)."""
        self._hold.hold(seconds)

    def release_proposals(self) -> None:
        self._hold.release()

    async def read_barrier(self, timeout_s: float) -> int:
        """Commit an entry that changes nothing: everything appended before it is committed once it
        is (the log index of the barrier); an entry too, so it waits while a hand-over holds
        proposals. Raises NotLeader or Unavailable."""
        await self._hold.wait()
        if not self.is_leader():
            raise NotLeader(message="not the metadata group's leader", leader=self.leader_node_id())
        future: asyncio.Future[int] = self.loop.create_future()

        def committed(index: int | None, error: Unavailable | None) -> None:  # tick thread
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(_settle, future, index, error)

        self.raft.propose(BARRIER, committed)
        if not await self.clock.wait(future, timeout_s):
            raise Unavailable(message="metadata group: read barrier timed out")
        return future.result()

    async def propose(self, command: MapCommand) -> Outcome:
        """Apply ``command`` through this member, which must lead the group; its outcome once it is
        applied here. Raises NotLeader, Overloaded or OutcomeUnknown."""
        await self._hold.wait()
        if not self.is_leader():
            raise NotLeader(message="not the metadata group's leader", leader=self.leader_node_id())
        if not isinstance(command, Attributed):  # a change this node makes on its own
            own = self.address_to_node.get(self.settings.self_address, self.settings.self_address)
            command = Attributed(command, f"node:{own}", self.clock.time_ns())
        future: asyncio.Future[Outcome] = self.loop.create_future()

        def committed(index: int | None, error: Unavailable | None) -> None:  # tick thread
            with self._lock:
                outcome = None if index is None else self._outcomes.pop(index, None)
            failure = error or (OutcomeUnknown(message="map change applied, outcome not kept")
                                if outcome is None else None)
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(_settle, future, outcome, failure)

        self.raft.propose(encode_map_command(command), committed)
        if not await self.clock.wait(future, self.timeouts.propose_timeout_s):
            raise OutcomeUnknown(message="the map change was not applied in time")
        return future.result()

    # -- views and shutdown ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``raft_applied_index`` counts PySyncObj's own entries (a leader's no-op, membership
        changes), which never reach ``_apply``: what a new member's catch-up is measured by."""
        raft = self.raft
        return {"role": "leader" if self.is_leader() else "follower", "term": raft.term,
                "commit_index": raft.commit_index, "applied_index": self.applied_index,
                "raft_applied_index": raft.last_applied, "leader": self.leader_node_id(),
                "epoch": self.map.epoch}

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.to_thread(self.raft.close)


def _settle(future: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
