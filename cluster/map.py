"""The replicated cluster map: what every node must agree on, and the commands that change it.

The map holds every node (id, public URL, internal address, Raft addresses, state), every shard
(replica set, the epoch at which its replicas or slots last changed, its slot ranges) and, through
those ranges, the owner of each of the 4096 hash slots (``table``: slot -> shard). Its ``epoch``
increases by one with every change. ``sections`` is a generic section -> key -> value store for what
later work records in the map (API token hashes, feed consumers' settings): ``PutValue`` sets or
removes one value, and a section of its own needs no new command. Sections are never shown publicly.

The map lives in the metadata Raft group (``raftledger.cluster.meta``): a command is msgpack
(``encode_command``), applied by the pure ``apply`` on every member in log order, so the log alone
decides. Commands:

- ``Bootstrap(map)``: the first map, derived from the node files (``initial_map``); applies only to
  an empty map (epoch 0), so every host may propose it and only the first one counts.
- ``PutNode(node)``: add a node or replace its addresses.
- ``SetNodeState(node, state)``: ``up`` | ``draining`` | ``removed``.
- ``SetReplicas(shard, replicas)``: a shard's replica set (a new shard id starts with no slots).
- ``AssignSlots(first, last, shard)``: the slots ``first..last`` belong to ``shard`` from now on.
- ``PutValue(section, key, value)``: one value of a section (``None`` removes it).
- ``StartReplicaChange(shard, node, adding)``: the first step of adding or removing one replica
  (``raftledger.node.http.membership``): the replica set changes at once and the shard records the
  change as in progress (``ShardEntry.change``) until ``FinishReplicaChange(shard, node)``. While one
  is in progress, a change naming another node is refused: one membership change at a time per
  shard, as Raft itself requires. A change naming the same node replaces it (an add undone by a
  remove, or the reverse).
- ``StartMetaChange(node, adding)`` / ``FinishMetaChange(node, then_remove)``: the same two steps for
  the metadata group itself (``meta_members``, ``meta_change``). Finishing an add may start the
  removal of another member in the same command (``then_remove``): a move of a member (add the new
  one, then remove the old) is recorded in the map at every moment, so sending it again finishes it.

Nodes: ``PutNode`` refuses a node that was removed (its id is never reused) and addresses another
node uses; ``SetNodeState(node, "removed")`` is refused while the node hosts a replica or a member of
the metadata group.

**The metadata group's members** are ``meta_members`` (node ids), not every node with a ``meta``
address: a node's ``meta`` is the Raft address it hosts a member on *when* it is one, and a node that
joined with one may take a member later. Maps written before members were recorded name none; they
read as "every node with a ``meta`` address that is not removed", which is what they meant.

``Attributed(command, actor, at)`` wraps any of them with who asked for it (``tok_<id>`` for a
bearer token, ``node:<id>`` for a node acting on its own, ``secret:<sender>`` for a tool holding the
cluster secret) and when (ns, the proposer's clock, so every member records the same): the
metadata group's audit trail (``audit_record``; docs/feed.md, "The audit trail") is built from it.

A command that cannot apply (an unknown node, a range outside the slots...) is refused with a reason,
changes nothing and keeps the epoch. A shard whose replicas or slots change takes the new epoch as
its own, which is what its leader compares with the slots its store holds (``SetSlots``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import msgpack
from raftledger.node.config import ClusterSpec
from raftledger.statemachine.slots import (
    SLOTS,
    even_ranges,
    modulo_assignment,
    ranges_of,
    ranges_problem,
)

from .router import route, table_of

NODE_UP = "up"
NODE_DRAINING = "draining"
NODE_REMOVED = "removed"
NODE_STATES = (NODE_UP, NODE_DRAINING, NODE_REMOVED)
LAYOUT_EVEN = "even"
LAYOUT_MODULO = "modulo"
SLOT_LAYOUTS = (LAYOUT_EVEN, LAYOUT_MODULO)

Range = tuple[int, int]


class MapError(ValueError):
    """A map or a map command that is malformed (not a refusal: those are outcomes)."""


@dataclass(frozen=True, slots=True)
class NodeEntry:
    id: str
    url: str  # public HTTP API
    internal: str  # "host:port" of the node-to-node listener
    raft: tuple[tuple[int, str], ...] = ()  # (shard, "host:port"), by shard
    meta: str | None = None  # its metadata group Raft address, if it hosts a member
    state: str = NODE_UP

    def raft_address(self, shard: int) -> str | None:
        return dict(self.raft).get(shard)


@dataclass(frozen=True, slots=True)
class ShardEntry:
    id: int
    replicas: tuple[str, ...]
    epoch: int  # the map epoch at which its replicas or slots last changed
    slot_ranges: tuple[Range, ...] = ()
    change: str = ""  # a membership change in progress: "add:<node>" or "remove:<node>"

    def change_of(self, node_id: str) -> str | None:
        """``add`` or ``remove`` when the change in progress names ``node_id``."""
        return change_of(self.change, node_id)


def change_of(change: str, node_id: str) -> str | None:
    """``add`` or ``remove`` when ``change`` (``"<op>:<node>"``, or empty) names ``node_id``."""
    op, _, node = change.partition(":")
    return op if change and node == node_id else None


@dataclass(frozen=True, slots=True)
class ClusterMap:
    epoch: int = 0
    nodes: tuple[NodeEntry, ...] = ()
    shards: tuple[ShardEntry, ...] = ()
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    meta_members: tuple[str, ...] = ()  # the metadata group's members (node ids)
    meta_change: str = ""  # its membership change in progress: "add:<node>" or "remove:<node>"
    table: tuple[int, ...] = field(init=False, repr=False, compare=False)  # slot -> shard (-1: none)

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", table_of({s.id: s.slot_ranges for s in self.shards}))

    @property
    def empty(self) -> bool:
        return self.epoch == 0

    def shard_of(self, account_id: str) -> int:
        """The shard that owns the account's slot (-1 when no shard does)."""
        return route(self.table, account_id)

    def shard(self, shard_id: int) -> ShardEntry | None:
        return next((s for s in self.shards if s.id == shard_id), None)

    def node(self, node_id: str) -> NodeEntry | None:
        return next((n for n in self.nodes if n.id == node_id), None)

    def meta_hosts(self) -> list[NodeEntry]:
        """The nodes hosting a member of the metadata group, in ``meta_members`` order."""
        nodes = [self.node(i) for i in self.meta_members]
        return [n for n in nodes if n is not None and n.meta and n.state != NODE_REMOVED]

    def meta_addresses(self) -> dict[str, str]:
        """Metadata group Raft address -> node id, of every node that names one."""
        return {n.meta: n.id for n in self.nodes if n.meta}

    def problems(self) -> list[str]:
        """What makes this map unusable for routing (empty when every slot has exactly one owner)."""
        problems = [f"shard {s.id}: {p}" for s in self.shards if (p := ranges_problem(s.slot_ranges))]
        owners = [0] * SLOTS
        for s in self.shards:
            for first, last in s.slot_ranges:
                for slot in range(max(first, 0), min(last, SLOTS - 1) + 1):
                    owners[slot] += 1
        unowned = sum(1 for n in owners if n == 0)
        shared = sum(1 for n in owners if n > 1)
        if unowned or shared:
            problems.append(f"{unowned} slots have no shard and {shared} more than one")
        return problems

    # -- views -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """``GET /v1/cluster/map`` (API.md); addresses and sections stay inside the cluster."""
        return {"epoch": self.epoch, "slots": SLOTS,
                "nodes": [{"id": n.id, "url": n.url, "state": n.state} for n in self.nodes],
                "shards": [_shard_json(s) for s in self.shards]}

    def to_wire(self) -> dict[str, Any]:
        """Everything, as plain data (msgpack between nodes, in snapshots and in Bootstrap)."""
        return {"epoch": self.epoch,
                "nodes": [[n.id, n.url, n.internal, [list(r) for r in n.raft], n.meta, n.state]
                          for n in self.nodes],
                "shards": [[s.id, list(s.replicas), s.epoch, [list(r) for r in s.slot_ranges],
                            s.change] for s in self.shards],
                "sections": {k: dict(v) for k, v in self.sections.items()},
                "meta_group": [list(self.meta_members), self.meta_change]}

    @classmethod
    def from_wire(cls, raw: Any) -> ClusterMap:
        try:
            nodes = tuple(NodeEntry(str(i), str(u), str(a), tuple((int(s), str(r)) for s, r in raft),
                                    None if m is None else str(m), str(st))
                          for i, u, a, raft, m, st in raw["nodes"])
            shards = tuple(ShardEntry(int(i), tuple(str(r) for r in reps), int(e),
                                      tuple((int(a), int(b)) for a, b in ranges),
                                      str(change[0]) if change else "")
                           for i, reps, e, ranges, *change in raw["shards"])
            sections = {str(k): dict(v) for k, v in raw.get("sections", {}).items()}
            group = raw.get("meta_group")
            if group is None:  # written before members were recorded (module docstring)
                members = tuple(n.id for n in nodes if n.meta and n.state != NODE_REMOVED)
                meta_change = ""
            else:
                members, meta_change = tuple(str(m) for m in group[0]), str(group[1])
            return cls(int(raw["epoch"]), nodes, shards, sections, members, meta_change)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MapError(f"malformed map: {exc!r}") from None

    def pack(self) -> bytes:
        packed: bytes = msgpack.packb(self.to_wire())
        return packed

    @classmethod
    def unpack(cls, data: bytes) -> ClusterMap:
        return cls.from_wire(msgpack.unpackb(data, strict_map_key=False))


EMPTY = ClusterMap()


def _shard_json(shard: ShardEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"id": shard.id, "replicas": list(shard.replicas), "epoch": shard.epoch,
                           "slot_ranges": [list(r) for r in shard.slot_ranges]}
    if shard.change:
        op, _, node = shard.change.partition(":")
        out["change"] = {"op": op, "node": node}
    return out


def layout_ranges(shards: int, layout: str) -> list[tuple[Range, ...]]:
    """Per shard, its slot ranges in ``layout`` (``even`` or ``modulo``)."""
    if layout == LAYOUT_EVEN:
        return even_ranges(shards)
    if layout == LAYOUT_MODULO:
        assignment = modulo_assignment(shards)
        return [ranges_of(assignment, s) for s in range(shards)]
    raise MapError(f"slot layout must be one of {SLOT_LAYOUTS}, not {layout!r}")


def initial_map(spec: ClusterSpec) -> ClusterMap:
    """The map a cluster starts with, from the ``[cluster]`` section every node file carries (its
    epoch is 0: ``Bootstrap`` makes it 1)."""
    nodes = tuple(NodeEntry(n.id, n.http, n.internal, tuple(sorted(n.raft.items())), n.meta)
                  for n in spec.nodes)
    ranges = layout_ranges(spec.shards, spec.slot_layout)
    shards = tuple(ShardEntry(s, tuple(spec.replicas(s)), 0, ranges[s]) for s in range(spec.shards))
    return ClusterMap(0, nodes, shards, meta_members=tuple(n.id for n in spec.meta_hosts()))


# -- commands --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bootstrap:
    map: ClusterMap


@dataclass(frozen=True, slots=True)
class PutNode:
    node: NodeEntry


@dataclass(frozen=True, slots=True)
class SetNodeState:
    node: str
    state: str


@dataclass(frozen=True, slots=True)
class SetReplicas:
    shard: int
    replicas: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AssignSlots:
    first: int
    last: int
    shard: int


@dataclass(frozen=True, slots=True)
class PutValue:
    section: str
    key: str
    value: Any  # msgpack-able; None removes the key


@dataclass(frozen=True, slots=True)
class StartReplicaChange:
    shard: int
    node: str
    adding: bool


@dataclass(frozen=True, slots=True)
class FinishReplicaChange:
    shard: int
    node: str


@dataclass(frozen=True, slots=True)
class StartMetaChange:
    node: str
    adding: bool


@dataclass(frozen=True, slots=True)
class FinishMetaChange:
    node: str
    then_remove: str = ""  # a member whose removal starts in the same step (a move's second half)


@dataclass(frozen=True, slots=True)
class Attributed:
    """A command with who asked for it and when (ns): what the audit trail records."""

    command: PlainCommand
    actor: str
    at: int


PlainCommand: TypeAlias = (Bootstrap | PutNode | SetNodeState | SetReplicas | AssignSlots | PutValue
                           | StartReplicaChange | FinishReplicaChange | StartMetaChange
                           | FinishMetaChange)
MapCommand: TypeAlias = PlainCommand | Attributed
TOKENS_SECTION = "tokens"  # cluster.tokens.SECTION (which imports nothing of the map)


def audit_record(command: MapCommand) -> tuple[str, dict[str, Any]] | None:
    """The audit event (type, data) of an applied command: never a secret nor a token's hash, and
    of a section other than the tokens' only its name and key (its values may be secrets)."""
    plain = command.command if isinstance(command, Attributed) else command
    if isinstance(plain, Bootstrap):
        return "cluster.bootstrapped", {"nodes": [n.id for n in plain.map.nodes],
                                        "shards": [s.id for s in plain.map.shards]}
    if isinstance(plain, PutNode):
        return "node.registered", {"node": plain.node.id, "url": plain.node.url,
                                   "internal": plain.node.internal}
    if isinstance(plain, SetNodeState):
        return "node.state_changed", {"node": plain.node, "state": plain.state}
    if isinstance(plain, SetReplicas):
        return "shard.replicas_set", {"shard": plain.shard, "replicas": list(plain.replicas)}
    if isinstance(plain, AssignSlots):
        return "shard.slots_assigned", {"shard": plain.shard, "first": plain.first, "last": plain.last}
    if isinstance(plain, StartReplicaChange):
        kind = "replica.adding" if plain.adding else "replica.removing"
        return kind, {"shard": plain.shard, "node": plain.node}
    if isinstance(plain, FinishReplicaChange):
        return "replica.change_finished", {"shard": plain.shard, "node": plain.node}
    if isinstance(plain, StartMetaChange):
        return ("meta.adding" if plain.adding else "meta.removing"), {"node": plain.node}
    if isinstance(plain, FinishMetaChange):
        return "meta.change_finished", {"node": plain.node, "then_remove": plain.then_remove or None}
    if plain.section == TOKENS_SECTION:
        if plain.value is None:
            return "token.revoked", {"token": plain.key}
        shown = {k: plain.value.get(k) for k in ("name", "role", "account_patterns", "expires_at",
                                                  "rate_per_s")} if isinstance(plain.value, dict) else {}
        return "token.created", {"token": plain.key, **shown}
    return ("config.removed" if plain.value is None else "config.set"), {"section": plain.section,
                                                                          "key": plain.key}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a command did: ``ok`` and the map's epoch after it, or why it was refused."""

    ok: bool
    epoch: int
    reason: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"ok": self.ok, "epoch": self.epoch, "reason": self.reason}


class _Refused(Exception):
    pass


def apply(current: ClusterMap, command: MapCommand) -> tuple[ClusterMap, Outcome]:
    """The map after ``command`` (pure); a refused command returns ``current`` unchanged."""
    epoch = current.epoch + 1
    if isinstance(command, Attributed):
        command = command.command
    try:
        if isinstance(command, Bootstrap):
            if not current.empty:
                raise _Refused(f"the map exists (epoch {current.epoch})")
            changed = _bootstrap(command.map, epoch)
        elif isinstance(command, PutNode):
            changed = _put_node(current, command.node)
        elif isinstance(command, SetNodeState):
            changed = _set_node_state(current, command.node, command.state)
        elif isinstance(command, SetReplicas):
            changed = _set_replicas(current, command.shard, command.replicas, epoch)
        elif isinstance(command, AssignSlots):
            changed = _assign_slots(current, command, epoch)
        elif isinstance(command, StartReplicaChange):
            changed = _start_replica_change(current, command, epoch)
        elif isinstance(command, FinishReplicaChange):
            changed = _finish_replica_change(current, command)
        elif isinstance(command, StartMetaChange):
            changed = _start_meta_change(current, command.node, command.adding)
        elif isinstance(command, FinishMetaChange):
            changed = _finish_meta_change(current, command)
        else:
            changed = _put_value(current, command)
    except _Refused as refused:
        return current, Outcome(False, current.epoch, str(refused))
    return dataclasses.replace(changed, epoch=epoch), Outcome(True, epoch)


def _bootstrap(first: ClusterMap, epoch: int) -> ClusterMap:
    problems = first.problems()
    if problems:
        raise _Refused("; ".join(problems))
    return dataclasses.replace(first, shards=tuple(dataclasses.replace(s, epoch=epoch)
                                                   for s in first.shards))


def node_addresses(node: NodeEntry) -> list[str]:
    """Every host:port a node listens on (its public URL's included)."""
    public = node.url.split("://", 1)[-1].rstrip("/")
    return [public, node.internal, *(a for _, a in node.raft), *([node.meta] if node.meta else [])]


def _put_node(current: ClusterMap, node: NodeEntry) -> ClusterMap:
    if not node.id or node.state not in NODE_STATES:
        raise _Refused(f"node {node.id!r} with state {node.state!r}")
    known = current.node(node.id)
    if known is not None and known.state == NODE_REMOVED and node.state != NODE_REMOVED:
        raise _Refused(f"node {node.id!r} was removed; a removed node's id is never used again")
    others = [n for n in current.nodes if n.id != node.id]
    taken = {a: n.id for n in others for a in node_addresses(n)}
    clashes = sorted(a for a in set(node_addresses(node)) if a in taken)
    if clashes:
        raise _Refused(f"node {node.id!r}: addresses {clashes} belong to node {taken[clashes[0]]!r}")
    return dataclasses.replace(current, nodes=tuple(sorted([*others, node], key=lambda n: n.id)))


def _set_node_state(current: ClusterMap, node_id: str, state: str) -> ClusterMap:
    node = current.node(node_id)
    if node is None:
        raise _Refused(f"no node {node_id!r}")
    if state not in NODE_STATES:
        raise _Refused(f"state must be one of {NODE_STATES}, not {state!r}")
    if state == NODE_REMOVED:
        hosted = [s.id for s in current.shards if node_id in s.replicas]
        if hosted:
            raise _Refused(f"node {node_id!r} still hosts replicas of shards {hosted}")
        if node_id in current.meta_members or change_of(current.meta_change, node_id):
            raise _Refused(f"node {node_id!r} hosts a member of the metadata group")
    return _put_node(current, dataclasses.replace(node, state=state))


def _set_replicas(current: ClusterMap, shard_id: int, replicas: tuple[str, ...],
                  epoch: int) -> ClusterMap:
    unknown = [r for r in replicas if (n := current.node(r)) is None or n.state == NODE_REMOVED]
    if unknown or not replicas or len(set(replicas)) != len(replicas) or shard_id < 0:
        raise _Refused(f"shard {shard_id}: replicas {list(replicas)} (unknown or removed: {unknown})")
    shard = current.shard(shard_id) or ShardEntry(shard_id, (), epoch)
    return _with_shards(current, [dataclasses.replace(shard, replicas=replicas, epoch=epoch)])


def _start_replica_change(current: ClusterMap, command: StartReplicaChange,
                          epoch: int) -> ClusterMap:
    shard = current.shard(command.shard)
    if shard is None:
        raise _Refused(f"no shard {command.shard}")
    node_id = command.node
    if shard.change and shard.change_of(node_id) is None:
        raise _Refused(f"shard {shard.id}: change {shard.change} is in progress")
    if command.adding:
        node = current.node(node_id)
        if node is None or node.state != NODE_UP:
            raise _Refused(f"node {node_id!r} is not an up node of the map")
        if node.raft_address(shard.id) is None:
            raise _Refused(f"node {node_id!r} has no Raft address for shard {shard.id}")
        replicas = shard.replicas if node_id in shard.replicas else (*shard.replicas, node_id)
    else:
        if node_id not in shard.replicas and shard.change_of(node_id) is None:
            raise _Refused(f"node {node_id!r} is not a replica of shard {shard.id}")
        replicas = tuple(r for r in shard.replicas if r != node_id)
        if not replicas:
            raise _Refused(f"node {node_id!r} holds the last replica of shard {shard.id}")
    change = f"{'add' if command.adding else 'remove'}:{node_id}"
    return _with_shards(current, [dataclasses.replace(shard, replicas=replicas, epoch=epoch,
                                                      change=change)])


def _finish_replica_change(current: ClusterMap, command: FinishReplicaChange) -> ClusterMap:
    shard = current.shard(command.shard)
    if shard is None or shard.change_of(command.node) is None:
        raise _Refused(f"shard {command.shard}: no change of node {command.node!r} in progress")
    return _with_shards(current, [dataclasses.replace(shard, change="")])


def _start_meta_change(current: ClusterMap, node_id: str, adding: bool) -> ClusterMap:
    if current.meta_change and change_of(current.meta_change, node_id) is None:
        raise _Refused(f"the metadata group's change {current.meta_change} is in progress")
    members = current.meta_members
    if adding:
        node = current.node(node_id)
        if node is None or node.state != NODE_UP:
            raise _Refused(f"node {node_id!r} is not an up node of the map")
        if not node.meta:
            raise _Refused(f"node {node_id!r} has no metadata group Raft address")
        members = members if node_id in members else (*members, node_id)
    else:
        if node_id not in members and change_of(current.meta_change, node_id) is None:
            raise _Refused(f"node {node_id!r} is not a member of the metadata group")
        members = tuple(m for m in members if m != node_id)
        if not members:
            raise _Refused(f"node {node_id!r} holds the metadata group's last member")
    change = f"{'add' if adding else 'remove'}:{node_id}"
    return dataclasses.replace(current, meta_members=members, meta_change=change)


def _finish_meta_change(current: ClusterMap, command: FinishMetaChange) -> ClusterMap:
    if change_of(current.meta_change, command.node) is None:
        raise _Refused(f"no change of node {command.node!r} in the metadata group is in progress")
    finished = dataclasses.replace(current, meta_change="")
    if not command.then_remove:
        return finished
    return _start_meta_change(finished, command.then_remove, adding=False)


def _assign_slots(current: ClusterMap, command: AssignSlots, epoch: int) -> ClusterMap:
    first, last = command.first, command.last
    problem = ranges_problem(((first, last),))
    if problem is not None:
        raise _Refused(problem)
    target = current.shard(command.shard)
    if target is None:
        raise _Refused(f"no shard {command.shard}")
    changed = []
    for shard in current.shards:
        kept = _without(shard.slot_ranges, first, last)
        if shard.id == command.shard:
            kept = _merged([*kept, (first, last)])
        if kept != shard.slot_ranges:
            changed.append(dataclasses.replace(shard, slot_ranges=kept, epoch=epoch))
    return _with_shards(current, changed)


def _put_value(current: ClusterMap, command: PutValue) -> ClusterMap:
    if not command.section or not command.key:
        raise _Refused("a section and a key are required")
    sections = {k: dict(v) for k, v in current.sections.items()}
    values = sections.setdefault(command.section, {})
    if command.value is None:
        values.pop(command.key, None)
    else:
        values[command.key] = command.value
    return dataclasses.replace(current, sections={k: v for k, v in sections.items() if v})


def _with_shards(current: ClusterMap, changed: list[ShardEntry]) -> ClusterMap:
    by_id = {s.id: s for s in current.shards} | {s.id: s for s in changed}
    return dataclasses.replace(current, shards=tuple(by_id[i] for i in sorted(by_id)))


def _without(ranges: tuple[Range, ...], first: int, last: int) -> tuple[Range, ...]:
    out: list[Range] = []
    for a, b in ranges:
        if b < first or a > last:
            out.append((a, b))
            continue
        if a < first:
            out.append((a, first - 1))
        if b > last:
            out.append((last + 1, b))
    return tuple(out)


def _merged(ranges: list[Range]) -> tuple[Range, ...]:
    out: list[Range] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


# -- encoding (msgpack: [tag, fields...]) ----------------------------------------------------------

TAG_BOOTSTRAP = 1
TAG_PUT_NODE = 2
TAG_SET_NODE_STATE = 3
TAG_SET_REPLICAS = 4
TAG_ASSIGN_SLOTS = 5
TAG_PUT_VALUE = 6
TAG_START_REPLICA_CHANGE = 7
TAG_FINISH_REPLICA_CHANGE = 8
TAG_ATTRIBUTED = 9
TAG_START_META_CHANGE = 10
TAG_FINISH_META_CHANGE = 11


def _node_wire(node: NodeEntry) -> list[Any]:
    return [node.id, node.url, node.internal, [list(r) for r in node.raft], node.meta, node.state]


def command_to_wire(command: MapCommand) -> list[Any]:
    if isinstance(command, Attributed):
        return [TAG_ATTRIBUTED, command_to_wire(command.command), command.actor, command.at]
    if isinstance(command, Bootstrap):
        return [TAG_BOOTSTRAP, command.map.to_wire()]
    if isinstance(command, PutNode):
        return [TAG_PUT_NODE, _node_wire(command.node)]
    if isinstance(command, SetNodeState):
        return [TAG_SET_NODE_STATE, command.node, command.state]
    if isinstance(command, SetReplicas):
        return [TAG_SET_REPLICAS, command.shard, list(command.replicas)]
    if isinstance(command, AssignSlots):
        return [TAG_ASSIGN_SLOTS, command.first, command.last, command.shard]
    if isinstance(command, StartReplicaChange):
        return [TAG_START_REPLICA_CHANGE, command.shard, command.node, command.adding]
    if isinstance(command, FinishReplicaChange):
        return [TAG_FINISH_REPLICA_CHANGE, command.shard, command.node]
    if isinstance(command, StartMetaChange):
        return [TAG_START_META_CHANGE, command.node, command.adding]
    if isinstance(command, FinishMetaChange):
        return [TAG_FINISH_META_CHANGE, command.node, command.then_remove]
    return [TAG_PUT_VALUE, command.section, command.key, command.value]


def command_from_wire(raw: Any) -> MapCommand:
    """A map command; raises MapError for anything else."""
    try:
        tag, *fields = raw
        if tag == TAG_ATTRIBUTED:
            inner = command_from_wire(fields[0])
            if isinstance(inner, Attributed):
                raise TypeError("an attributed command wraps a plain one")
            return Attributed(inner, _text(fields[1]), _whole(fields[2]))
        if tag == TAG_BOOTSTRAP:
            return Bootstrap(ClusterMap.from_wire(fields[0]))
        if tag == TAG_PUT_NODE:
            node = ClusterMap.from_wire({"epoch": 0, "nodes": [fields[0]], "shards": []}).nodes[0]
            return PutNode(node)
        if tag == TAG_SET_NODE_STATE:
            return SetNodeState(_text(fields[0]), _text(fields[1]))
        if tag == TAG_SET_REPLICAS:
            return SetReplicas(_whole(fields[0]), tuple(_text(r) for r in fields[1]))
        if tag == TAG_ASSIGN_SLOTS:
            return AssignSlots(_whole(fields[0]), _whole(fields[1]), _whole(fields[2]))
        if tag == TAG_PUT_VALUE:
            return PutValue(_text(fields[0]), _text(fields[1]), fields[2])
        if tag == TAG_START_REPLICA_CHANGE:
            if not isinstance(fields[2], bool):
                raise TypeError("adding must be a boolean")
            return StartReplicaChange(_whole(fields[0]), _text(fields[1]), fields[2])
        if tag == TAG_FINISH_REPLICA_CHANGE:
            return FinishReplicaChange(_whole(fields[0]), _text(fields[1]))
        if tag == TAG_START_META_CHANGE:
            if not isinstance(fields[1], bool):
                raise TypeError("adding must be a boolean")
            return StartMetaChange(_text(fields[0]), fields[1])
        if tag == TAG_FINISH_META_CHANGE:
            return FinishMetaChange(_text(fields[0]), _text(fields[1]))
    except (TypeError, ValueError, IndexError) as exc:
        raise MapError(f"malformed map command: {exc!r}") from None
    raise MapError(f"unknown map command {raw!r:.80}")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, not {type(value).__name__}")
    return value


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, not {type(value).__name__}")
    return value


def encode_command(command: MapCommand) -> bytes:
    packed: bytes = msgpack.packb(command_to_wire(command))
    return packed


def decode_command(data: bytes) -> MapCommand:
    try:
        raw = msgpack.unpackb(data, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise MapError(f"undecodable map command: {exc}") from None
    return command_from_wire(raw)
