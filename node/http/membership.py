"""Membership: nodes that register and leave, replicas that are added and removed, and the cluster's status.

Public routes (API.md, "Cluster, placement and membership"):

- ``GET /v1/cluster`` — the map's epoch, nodes and slot ranges, and per shard every replica as it
  reports itself (role, term, commit and applied index, lag behind the leader's commit index, last
  contact with the leader) and the membership change in progress, if any.
- ``POST /v1/cluster/nodes`` — register a node (``PutNode``): 201, or 200 when it is registered
  already with the same addresses. ``DELETE /v1/cluster/nodes/{node}`` marks it removed (refused while
  it hosts replicas or a member of the metadata group); a removed node's id is never used again and
  the internal listener refuses its requests.
- ``POST /v1/shards/{s}/replicas {"node"}`` — add a replica; ``DELETE /v1/shards/{s}/replicas/{node}``
  remove one (409 ``quorum_at_risk`` unless ``?force=true``).
- ``POST /v1/cluster/meta/move {"from", "to"?, "shrink"?}`` — move a member of the metadata group
  (the cluster map) to another node: an add, then a remove, each ordered as below, the remove
  started by the same map command that finishes the add (``FinishMetaChange.then_remove``), so the
  map records the move at every step and the same request finishes it. Without ``to``, the node
  taking it is an up node with a ``meta`` address hosting no member; with none, 409
  ``no_free_meta_host`` (add a node first) unless ``shrink`` (the member just leaves, with the
  remove's quorum check).

**Order of a change, and why a retry finishes it.** Each change is two steps, the map's and Raft's:

- add: (1) the map names the node among the shard's replicas and records ``add:<node>`` as the
  shard's change in progress (``StartReplicaChange``); the node starts an empty replica that waits to
  be contacted; (2) the shard's leader adds the replica's Raft address (``RaftMember.add_member``),
  then sends it a snapshot and the log; (3) once its applied index reaches the leader's commit index
  of step 2 and it follows that leader, the map clears the change (``FinishReplicaChange``).
- remove: (0) if the replica leads, its leadership goes to a caught-up healthy replica first
  (PySyncObj cannot remove a leader's own replica); (1) the map drops it and records
  ``remove:<node>``: the node stops serving the shard at once; (2) the leader removes its address;
  (3) the map clears the change.

Every step checks before it acts (the map says it is done, the leader's members say it is done), so
a crash or a timeout anywhere leaves a state that sending the same request again finishes, and a
remove of the node being added (or the reverse) undoes it. While a change is in progress, a change
naming another node of that shard answers 409 ``change_in_progress``: Raft changes membership one
member at a time. An add answers 200 once the replica caught up; when the request's time runs out
first it answers 202 with the progress, and the same request waits again.

**Healthy** replicas are the leader and the followers that answered it within
``2 * raft.election_timeout_max_s``. A remove is refused when the healthy replicas left would not be a
majority of the group left (PySyncObj puts a configuration in force when its entry is appended, so
that group commits the change); an add when the healthy members would not be a majority of the
larger group (it would stall until the new replica caught up).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web
from raftledger.client.errors import LedgerError, NotLeader, Unavailable
from raftledger.cluster.map import (
    NODE_REMOVED,
    NODE_UP,
    ClusterMap,
    FinishMetaChange,
    FinishReplicaChange,
    MapCommand,
    NodeEntry,
    PutNode,
    SetNodeState,
    ShardEntry,
    StartMetaChange,
    StartReplicaChange,
    change_of,
    node_addresses,
)
from raftledger.cluster.meta import META_GROUP, MetaService
from raftledger.statemachine.slots import SLOTS

from ..service import ShardService
from .bodies import parse_meta_move, parse_new_node, parse_new_replica, parse_node_id
from .body import read_json
from .context import NodeContext, context_of
from .forward import call_peer, peer_statuses, propose_map, via_hosts
from .render import respond

membership_attempts_max = 20  # Raft refuses a change while the previous one (or a new leader's no-op)
membership_retry_s = 0.25     # is uncommitted: that many tries, that far apart
catch_up_poll_s = 0.2
transfer_wait_s = 10.0
hand_over_try_min_s = 2.0  # a hand-over gives each target at least this long to win its election
transfer_retry_s = 0.05  # between asks while a transfer's target catches up
request_margin_s = 3.0  # an add answers 202 this long before the request's own timeout


# -- helpers -----------------------------------------------------------------------------------------


def _force(request: web.Request) -> bool:
    raw = request.query.get("force", "false")
    if raw not in ("true", "false"):
        raise LedgerError("invalid_query", "force is true or false", details={"parameter": "force"})
    return raw == "true"


def _shard_entry(ctx: NodeContext, request: web.Request) -> ShardEntry:
    raw = request.match_info["shard"]
    entry = ctx.cluster_map.shard(int(raw)) if raw.isdigit() and len(raw) <= 6 else None
    if entry is None:
        raise LedgerError("not_found", f"no shard {raw[:20]!r}", details={"shard": raw[:20]})
    return entry


def _known_node(current: ClusterMap, node_id: str) -> NodeEntry:
    node = current.node(node_id)
    if node is None:
        raise LedgerError("node_not_found", f"no node {node_id!r} in the cluster map",
                          details={"node": node_id})
    return node


def _other_change(entry: ShardEntry, node_id: str) -> None:
    """409 while a change naming another node is in progress on the shard."""
    _no_other_change(entry.id, entry.change, node_id)


def _no_other_change(group: int, change: str, node_id: str) -> None:
    """409 while ``change`` (of a shard, or of the metadata group) names another node."""
    if change and change_of(change, node_id) is None:
        op, _, node = change.partition(":")
        name = "the metadata group" if group == META_GROUP else f"shard {group}"
        raise LedgerError("change_in_progress",
                          f"{name}: {op} of {node} is in progress; finish it (send it "
                          "again) or undo it first", details={"shard": group, "op": op, "node": node})


async def _propose(ctx: NodeContext, command: MapCommand) -> int:
    """Apply a map command; its epoch, once this node's map has it. A refusal is a 409: the one of a
    change that another request started meanwhile says so."""
    outcome = await propose_map(ctx, command)
    if not outcome.ok:
        await ctx.maps.wait_epoch(outcome.epoch, ctx.settings.forwarding.map_wait_s)
        if isinstance(command, StartReplicaChange):
            entry = ctx.cluster_map.shard(command.shard)
            if entry is not None:
                _other_change(entry, command.node)
        if isinstance(command, StartMetaChange):
            _no_other_change(META_GROUP, ctx.cluster_map.meta_change, command.node)
        raise LedgerError("map_change_refused", outcome.reason, details={"epoch": outcome.epoch})
    await ctx.maps.wait_epoch(outcome.epoch, ctx.settings.forwarding.map_wait_s)
    return outcome.epoch


async def _membership(ctx: NodeContext, shard: int, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` run by the group's leader (``leader_op``), wherever it runs: a shard's, or the
    metadata group's (``META_GROUP``)."""
    meta = shard == META_GROUP
    svc: Any = ctx.meta if meta else ctx.shards.get(shard)
    if svc is not None and svc.is_leader():
        return await leader_op(ctx, svc, payload)
    path = "/meta/membership" if meta else f"/shards/{shard}/membership"

    async def remote(node: str) -> dict[str, Any]:
        return dict(await call_peer(ctx, node, path, payload))

    hint = None if svc is None else svc.leader_node_id()
    if hint is not None and hint != ctx.node_id:
        with contextlib.suppress(NotLeader):
            return await remote(hint)
    group = [n.id for n in ctx.cluster_map.meta_hosts()] if meta else None
    return await via_hosts(ctx, shard, remote, group)


def _healthy(ctx: NodeContext, view: dict[str, Any]) -> set[str]:
    bound_ms = 2000.0 * ctx.settings.raft.election_timeout_max_s
    return {m["address"] for m in view["members"]
            if m["contact_age_ms"] is not None and m["contact_age_ms"] <= bound_ms}


def _quorum_check(ctx: NodeContext, view: dict[str, Any], removing: str | None) -> None:
    """409 ``quorum_at_risk`` (module docstring: what counts as healthy and as enough)."""
    members = {m["address"] for m in view["members"]}
    healthy = _healthy(ctx, view)
    if removing is None:
        left, needed = healthy, (len(members) + 1) // 2 + 1
    else:
        left, needed = healthy - {removing}, (len(members) - 1) // 2 + 1
    if len(left) < needed:
        names = {m["address"]: m["node"] for m in view["members"]}
        raise LedgerError("quorum_at_risk", f"{len(left)} healthy replicas would remain where "
                          f"{needed} are needed; repair the others first, or force it",
                          details={"healthy": sorted(names[a] for a in left), "needed": needed,
                                   "members": sorted(names.values())})


def _node_address(current: ClusterMap, node_id: str, shard: int) -> str:
    address = _known_node(current, node_id).raft_address(shard)
    if address is None:
        raise LedgerError("node_cannot_host", f"node {node_id} names no Raft address for shard {shard}",
                          details={"node": node_id, "shard": shard})
    return address


# -- the leader's side (internal: /internal/v1/shards/{shard}/membership) ---------------------------


def _raft(svc: ShardService) -> Any:
    raft = getattr(svc, "raft", None)
    if raft is None:
        raise LedgerError("unavailable", f"shard {svc.shard}: this replica has no Raft member")
    return raft


def view_of(ctx: NodeContext, svc: ShardService) -> dict[str, Any]:
    """The group as its leader sees it: members, how recently each answered, how far each matches."""
    raft = _raft(svc)
    names = dict(svc.address_to_node if isinstance(svc, MetaService)
                 else svc.settings.address_to_node)  # type: ignore[attr-defined]
    contacts = raft.follower_contacts()
    members = [{"address": raft.settings.self_address, "node": ctx.node_id, "contact_age_ms": 0.0,
                "match_index": raft.commit_index}]
    members += [{"address": a, "node": names.get(a, a),
                 "contact_age_ms": None if age is None else round(age * 1000.0, 1), "match_index": m}
                for a, (age, m) in sorted(contacts.items())]
    return {"leader": ctx.node_id, "term": raft.term, "commit_index": raft.commit_index,
            "members": members}


async def _raft_change(ctx: NodeContext, svc: ShardService, op: str, address: str) -> bool:
    """Add or remove one member through the PySyncObj boundary; False when it was so already.
    PySyncObj puts a configuration in force when its entry is appended: a read barrier (an entry
    committed after it) shows it committed when this call did not see it commit itself."""
    raft = _raft(svc)
    barrier_s = ctx.settings.batching.commit_timeout_s
    present = address in raft.members()
    if (op == "add") == present:
        await svc.read_barrier(barrier_s)
        return False
    loop = asyncio.get_running_loop()
    for _ in range(membership_attempts_max):
        if not svc.is_leader():
            raise NotLeader(leader=svc.leader_node_id())
        done: asyncio.Future[bool] = loop.create_future()

        def settled(ok: bool, done: asyncio.Future[bool] = done) -> None:  # tick thread
            loop.call_soon_threadsafe(_settle, done, ok)

        (raft.add_member if op == "add" else raft.remove_member)(address, settled)
        if await ctx.clock.wait(done, barrier_s) and done.result():
            return True
        if (op == "add") == (address in raft.members()):  # appended after all: once it commits
            await svc.read_barrier(barrier_s)
            return True
        await ctx.clock.sleep(membership_retry_s)  # the previous change or the leader's no-op commits
    raise LedgerError("unavailable", f"shard {svc.shard}: the Raft membership change was refused "
                      f"{membership_attempts_max} times; send the request again", retry_after_s=1.0)


def _settle(done: asyncio.Future[bool], ok: bool) -> None:
    if not done.done():
        done.set_result(ok)


async def _transfer(ctx: NodeContext, svc: ShardService, address: str | None, wait_s: float) -> bool:
    """Hand the shard's leadership to ``address`` (or the most caught-up follower). PySyncObj sends
    the target its cue only once its log matches the leader's, so the leader stops proposing for the
    while (``hold_proposals``), asks again until the target caught up, and lets go once it is deposed.
    True when the cue was sent; whether the target won is seen in the view."""
    raft = _raft(svc)
    replica: Any = svc  # a ReplicaService: it has a Raft member
    replica.hold_proposals(wait_s)
    try:
        end = ctx.clock.monotonic() + wait_s
        while not await _ask_transfer(ctx, raft, address, end - ctx.clock.monotonic()):
            if ctx.clock.monotonic() >= end:
                return False
            await ctx.clock.sleep(transfer_retry_s)  # the target is catching up: nothing is appended
        while svc.is_leader() and ctx.clock.monotonic() < end:  # the target's election, on its way
            await ctx.clock.sleep(transfer_retry_s)
        return True
    finally:
        replica.release_proposals()


async def _ask_transfer(ctx: NodeContext, raft: Any, address: str | None, wait_s: float) -> bool:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()
    raft.transfer_leadership(address, wait_s, lambda ok: loop.call_soon_threadsafe(_settle, done, ok))
    return bool(await ctx.clock.wait(done, wait_s) and done.result())


async def leader_op(ctx: NodeContext, svc: ShardService, payload: Any) -> dict[str, Any]:
    """``{"op": "view"}``, ``{"op": "add"|"remove", "address"}`` or ``{"op": "transfer", "address",
    "wait_s"?}`` on the shard's leader (NotLeader elsewhere, naming the leader when known)."""
    if not svc.is_leader():
        raise NotLeader(message=f"shard {svc.shard}: not the leader", leader=svc.leader_node_id())
    op = payload.get("op") if isinstance(payload, dict) else None
    address = payload.get("address") if isinstance(payload, dict) else None
    if op == "view":
        return view_of(ctx, svc)
    if op not in ("add", "remove", "transfer") or not isinstance(address, str | None) or \
            (op != "transfer" and address is None):
        raise LedgerError("malformed_body", "expected {op: view|add|remove|transfer, address}")
    if op == "transfer":
        wait_s = payload.get("wait_s", transfer_wait_s)
        if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or \
                not 0 < wait_s <= transfer_wait_s:
            raise LedgerError("malformed_body", f"wait_s is a number of seconds in (0, {transfer_wait_s}]")
        return {"sent": await _transfer(ctx, svc, address, float(wait_s))}
    changed = await _raft_change(ctx, svc, op, str(address))
    return {"changed": changed, **view_of(ctx, svc)}


# -- adding a replica ----------------------------------------------------------------------------------


async def add_replica(request: web.Request) -> web.Response:
    ctx = context_of(request)
    deadline = ctx.clock.monotonic() + ctx.settings.http.request_timeout_s - request_margin_s
    entry = _shard_entry(ctx, request)
    force = _force(request)
    node_id = parse_new_replica(await read_json(request))
    current = ctx.cluster_map
    node = _known_node(current, node_id)
    address = _node_address(current, node_id, entry.id)
    _other_change(entry, node_id)
    if entry.change_of(node_id) != "add" and node_id not in entry.replicas:
        if node.state != NODE_UP:
            raise LedgerError("node_not_up", f"node {node_id} is {node.state}", details={"node": node_id})
        view = await _membership(ctx, entry.id, {"op": "view"})
        if not force:
            _quorum_check(ctx, view, None)
        await _propose(ctx, StartReplicaChange(entry.id, node_id, adding=True))
    view = await _membership(ctx, entry.id, {"op": "add", "address": address})
    progress = await _caught_up(ctx, entry.id, node_id, view, deadline)
    if not progress["caught_up"]:
        return respond(request, 202, {"shard": entry.id, "node": node_id, "state": "catching_up",
                                      **progress, "replicas": _replicas(ctx, entry.id)})
    if _in_progress(ctx, entry.id, node_id) == "add":
        await _propose(ctx, FinishReplicaChange(entry.id, node_id))
    return respond(request, 200, {"shard": entry.id, "node": node_id, "state": "done", **progress,
                                  "replicas": _replicas(ctx, entry.id), "epoch": ctx.maps.epoch})


def _in_progress(ctx: NodeContext, shard: int, node_id: str) -> str | None:
    """The change of ``node_id`` the shard records as in progress, by this node's map now."""
    entry = ctx.cluster_map.shard(shard)
    return None if entry is None else entry.change_of(node_id)


def _replicas(ctx: NodeContext, shard: int) -> list[str]:
    entry = ctx.cluster_map.shard(shard)
    return [] if entry is None else list(entry.replicas)


async def _replica_status(ctx: NodeContext, node_id: str, shard: int) -> dict[str, Any] | None:
    """The replica's own report (the member's, for ``META_GROUP``); None when it cannot tell."""
    if node_id == ctx.node_id:
        if shard == META_GROUP:
            return None if ctx.meta is None else dict(ctx.meta.status())
        svc = ctx.shards.get(shard)
        return None if svc is None else _with_fingerprint(svc)
    try:
        answer = await call_peer(ctx, node_id, "/status", None, ctx.settings.internal.peer_status_timeout_s)
    except LedgerError:
        return None
    if not isinstance(answer, dict):
        return None
    found = answer.get("meta") if shard == META_GROUP else answer.get("shards", {}).get(str(shard))
    return dict(found) if isinstance(found, dict) else None


def _with_fingerprint(svc: ShardService) -> dict[str, Any]:
    index, chain = svc.fingerprint()
    return {**svc.status(), "fingerprint": {"index": index, "chain": chain}}


async def _caught_up(ctx: NodeContext, shard: int, node_id: str, view: dict[str, Any],
                     deadline: float) -> dict[str, Any]:
    """Wait (until ``deadline``) for the replica to apply the leader's commit index of ``view`` and
    to follow that leader: it then holds every entry committed before it joined, and votes."""
    target = int(view["commit_index"])
    while True:
        status = await _replica_status(ctx, node_id, shard)
        # PySyncObj's own entries (a leader's no-op, membership changes) never reach the store.
        applied = -1 if status is None else int(status.get("raft_applied_index", status["applied_index"]))
        caught_up = applied >= target and status is not None and status.get("leader") == view["leader"]
        if caught_up or ctx.clock.monotonic() >= deadline:
            break
        await ctx.clock.sleep(catch_up_poll_s)  # another process: polled, with a deadline
    return {"caught_up": caught_up, "applied_index": max(applied, 0), "target_index": target,
            "leader": view["leader"], "fingerprint": None if status is None else status.get("fingerprint")}


# -- removing a replica ------------------------------------------------------------------------------


async def remove_replica(request: web.Request) -> web.Response:
    ctx = context_of(request)
    entry = _shard_entry(ctx, request)
    force = _force(request)
    node_id = parse_node_id(request.match_info["node"], "", "node")
    current = ctx.cluster_map
    _known_node(current, node_id)
    _other_change(entry, node_id)
    if node_id not in entry.replicas and entry.change_of(node_id) != "remove":
        raise LedgerError("not_a_replica", f"node {node_id} hosts no replica of shard {entry.id}",
                          details={"node": node_id, "shard": entry.id})
    address = _node_address(current, node_id, entry.id)
    if entry.change_of(node_id) != "remove":
        if entry.replicas == (node_id,):
            raise LedgerError("last_replica", f"node {node_id} holds the last replica of shard "
                              f"{entry.id}", details={"node": node_id, "shard": entry.id})
        view = await _membership(ctx, entry.id, {"op": "view"})
        if not force:
            _quorum_check(ctx, view, address)
        if view["leader"] == node_id:
            await _hand_over(ctx, entry.id, node_id, view, force)
        await _propose(ctx, StartReplicaChange(entry.id, node_id, adding=False))
    view = await _remove_member(ctx, entry.id, node_id, address)
    if _in_progress(ctx, entry.id, node_id) == "remove":
        await _propose(ctx, FinishReplicaChange(entry.id, node_id))
    return respond(request, 200, {"shard": entry.id, "node": node_id, "state": "done",
                                  "replicas": _replicas(ctx, entry.id), "leader": view["leader"],
                                  "epoch": ctx.maps.epoch})


async def _hand_over(ctx: NodeContext, shard: int, leaving: str, view: dict[str, Any],
                     force: bool) -> None:
    """Move the shard's leadership off the replica being removed: to the healthy member that
    matches most, else the next one. A target that cannot win (its vote requests do not reach a
    majority, or it fell behind by the time they arrived) lets the leaving replica win again; asking
    it over and over would keep the removal from ever starting. A failed hand-over is a 503 (forced:
    the election after the leaving replica stops does it)."""
    healthy = _healthy(ctx, view)
    others = sorted((m for m in view["members"] if m["node"] != leaving and m["address"] in healthy),
                    key=lambda m: -m["match_index"])
    end = ctx.clock.monotonic() + transfer_wait_s
    for i, target in enumerate(others):  # what time is left, shared among the targets left
        wait_s = max(hand_over_try_min_s, (end - ctx.clock.monotonic()) / (len(others) - i))
        try_end = ctx.clock.monotonic() + wait_s
        with contextlib.suppress(LedgerError):
            await _membership(ctx, shard, {"op": "transfer", "address": target["address"], "wait_s": wait_s})
        while ctx.clock.monotonic() < try_end:
            with contextlib.suppress(LedgerError):
                if (await _membership(ctx, shard, {"op": "view"}))["leader"] != leaving:
                    return
            await ctx.clock.sleep(catch_up_poll_s)
    if not force:
        raise LedgerError("unavailable", f"shard {shard}: its leadership did not move off {leaving}; "
                          "send the request again", retry_after_s=1.0)


async def _remove_member(ctx: NodeContext, shard: int, node_id: str, address: str) -> dict[str, Any]:
    """The Raft step of a remove, on a leader other than the replica removed (which stopped once
    the map dropped it, so the rest elect one if it led)."""
    end = ctx.clock.monotonic() + ctx.settings.forwarding.leader_wait_s + transfer_wait_s
    while True:
        try:
            view = await _membership(ctx, shard, {"op": "view"})
            if view["leader"] != node_id:
                return await _membership(ctx, shard, {"op": "remove", "address": address})
        except Unavailable:
            if ctx.clock.monotonic() >= end:
                raise
        if ctx.clock.monotonic() >= end:
            raise LedgerError("unavailable", f"shard {shard}: no leader other than {node_id}; the "
                              "map no longer places it there: send the request again to finish",
                              retry_after_s=1.0)
        await ctx.clock.sleep(catch_up_poll_s)


# -- moving a member of the metadata group -----------------------------------------------------------


async def move_meta(request: web.Request) -> web.Response:
    """``POST /v1/cluster/meta/move``: the map's recorded change decides where a resent move goes on
    (module docstring): ``add:<to>`` finishes the add, then removes; ``remove:<from>`` finishes the
    remove."""
    ctx = context_of(request)
    deadline = ctx.clock.monotonic() + ctx.settings.http.request_timeout_s - request_margin_s
    force = _force(request)
    leaving, to, shrink = parse_meta_move(await read_json(request))
    current = ctx.cluster_map
    _known_node(current, leaving)
    change = current.meta_change
    if change_of(change, leaving) != "remove":
        if change.startswith("add:"):
            to = _resumed_add(change, leaving, to)
        elif leaving not in current.meta_members:
            raise LedgerError("not_a_meta_member", f"node {leaving} hosts no member of the metadata "
                              "group", details={"node": leaving})
        else:
            _no_other_change(META_GROUP, change, leaving)
            to = to or _free_meta_host(current, leaving, shrink)
        if to is not None:
            progress = await _add_meta_member(ctx, to, force, deadline)
            if not progress["caught_up"]:
                return respond(request, 202, {"from": leaving, "to": to, "state": "catching_up",
                                              **progress, "members": list(ctx.cluster_map.meta_members)})
        await _start_meta_removal(ctx, leaving, to, force)
    await _member_stopped(ctx, leaving)
    view = await _remove_member(ctx, META_GROUP, leaving, _meta_address(ctx.cluster_map, leaving))
    if change_of(ctx.cluster_map.meta_change, leaving) == "remove":
        await _propose(ctx, FinishMetaChange(leaving))
    return respond(request, 200, {"from": leaving, "to": to, "state": "done",
                                  "members": list(ctx.cluster_map.meta_members), "leader": view["leader"],
                                  "epoch": ctx.maps.epoch})


async def _member_stopped(ctx: NodeContext, leaving: str) -> None:
    """Wait (bounded: a dead node never answers) until the leaving member applied the map that
    drops it and stopped: it learns that entry's commit only from the leader, which stops
    contacting it once its address is removed, and it would otherwise stay a member that nobody
    contacts, holding a map that no longer advances."""
    end = ctx.clock.monotonic() + transfer_wait_s
    while ctx.clock.monotonic() < end:
        if await _replica_status(ctx, leaving, META_GROUP) is None:
            return
        await ctx.clock.sleep(catch_up_poll_s)  # another process: polled, with a deadline


def _resumed_add(change: str, leaving: str, to: str | None) -> str:
    """The node of the add in progress, which a move of ``leaving`` goes on with."""
    adding = change.partition(":")[2]
    if to not in (None, adding) or adding == leaving:
        _no_other_change(META_GROUP, change, to or leaving)
    return adding


def _free_meta_host(current: ClusterMap, leaving: str, shrink: bool) -> str | None:
    """An up node that names a metadata address and hosts no member; None (a shrink) only when
    asked for, else 409 ``no_free_meta_host``."""
    free = [n.id for n in current.nodes if n.state == NODE_UP and n.meta and n.id != leaving
            and n.id not in current.meta_members]
    if free:
        return free[0]
    if shrink:
        return None
    raise LedgerError("no_free_meta_host", f"no up node outside the metadata group can take node "
                      f"{leaving}'s member: add a node first (raftledger cluster add-node, or "
                      "raftledger node --join with a meta address), or shrink the group on purpose "
                      "(shrink: true, raftledger cluster move-meta --shrink)",
                      details={"node": leaving, "members": list(current.meta_members)})


def _meta_address(current: ClusterMap, node_id: str) -> str:
    address = _known_node(current, node_id).meta
    if address is None:
        raise LedgerError("node_cannot_host", f"node {node_id} names no metadata group Raft address",
                          details={"node": node_id, "shard": META_GROUP})
    return address


async def _add_meta_member(ctx: NodeContext, node_id: str, force: bool,
                           deadline: float) -> dict[str, Any]:
    """The add half of a move, as ``add_replica`` does it: the map names the member (its node
    starts one that waits), the leader adds its address, then wait until it caught up."""
    current = ctx.cluster_map
    node = _known_node(current, node_id)
    address = _meta_address(current, node_id)
    if change_of(current.meta_change, node_id) != "add":
        if node_id in current.meta_members:
            raise LedgerError("already_a_meta_member", f"node {node_id} hosts a member already",
                              details={"node": node_id})
        if node.state != NODE_UP:
            raise LedgerError("node_not_up", f"node {node_id} is {node.state}", details={"node": node_id})
        view = await _membership(ctx, META_GROUP, {"op": "view"})
        if not force:
            _quorum_check(ctx, view, None)
        await _propose(ctx, StartMetaChange(node_id, adding=True))
    view = await _membership(ctx, META_GROUP, {"op": "add", "address": address})
    return await _caught_up(ctx, META_GROUP, node_id, view, deadline)


async def _start_meta_removal(ctx: NodeContext, leaving: str, added: str | None, force: bool) -> None:
    """The map drops ``leaving`` (finishing the add of ``added`` in the same command), once the
    group's leadership is off it and, unless forced, the healthy members left are a majority."""
    view = await _membership(ctx, META_GROUP, {"op": "view"})
    if not force:
        _quorum_check(ctx, view, _meta_address(ctx.cluster_map, leaving))
    if view["leader"] == leaving:
        await _hand_over(ctx, META_GROUP, leaving, view, force)
    if added is None:
        await _propose(ctx, StartMetaChange(leaving, adding=False))
    else:
        await _propose(ctx, FinishMetaChange(added, then_remove=leaving))


# -- nodes -------------------------------------------------------------------------------------------


async def register_node(request: web.Request) -> web.Response:
    ctx = context_of(request)
    current = ctx.cluster_map
    node = parse_new_node(await read_json(request), len(current.shards))
    node_id = node.id
    known = current.node(node_id)
    if known is not None and known.state == NODE_REMOVED:
        raise LedgerError("node_removed", f"node {node_id} was removed; register it under a new id",
                          details={"node": node_id})
    if known is not None:
        if (known.url, known.internal, known.raft, known.meta) != \
                (node.url, node.internal, node.raft, node.meta):
            raise LedgerError("node_exists", f"node {node_id} is registered with other addresses",
                              details={"node": node_id})
        return respond(request, 200, _node_json(known, current.epoch), {"Idempotent-Replayed": "true"})
    taken = {a: n.id for n in current.nodes for a in node_addresses(n)}
    clashes = sorted(a for a in node_addresses(node) if a in taken)
    if clashes:
        raise LedgerError("address_in_use", f"{clashes[0]} belongs to node {taken[clashes[0]]}",
                          details={"addresses": clashes})
    epoch = await _propose(ctx, PutNode(node))
    return respond(request, 201, _node_json(node, epoch))


def _node_json(node: NodeEntry, epoch: int) -> dict[str, Any]:
    return {"id": node.id, "url": node.url, "internal": node.internal, "state": node.state,
            "raft": {str(s): a for s, a in node.raft}, "meta": node.meta, "epoch": epoch}


async def remove_node(request: web.Request) -> web.Response:
    ctx = context_of(request)
    node_id = parse_node_id(request.match_info["node"], "", "node")
    current = ctx.cluster_map
    node = _known_node(current, node_id)
    if node.state == NODE_REMOVED:
        return respond(request, 200, _node_json(node, current.epoch), {"Idempotent-Replayed": "true"})
    hosted = [s.id for s in current.shards if node_id in s.replicas or s.change_of(node_id)]
    if hosted:
        raise LedgerError("node_hosts_replicas", f"node {node_id} hosts replicas of shards {hosted}; "
                          "remove them first", details={"node": node_id, "shards": hosted})
    if node_id in current.meta_members or change_of(current.meta_change, node_id):
        raise LedgerError("node_hosts_meta", f"node {node_id} hosts a member of the metadata group; "
                          "move it first (POST /v1/cluster/meta/move, raftledger cluster move-meta)",
                          details={"node": node_id})
    epoch = await _propose(ctx, SetNodeState(node_id, NODE_REMOVED))
    return respond(request, 200, _node_json(ctx.cluster_map.node(node_id) or node, epoch))


# -- status ------------------------------------------------------------------------------------------


def _replica_row(node: str, status: dict[str, Any] | None, leader_commit: int | None) -> dict[str, Any]:
    if status is None:
        return {"node": node, "reachable": False}
    applied = int(status["applied_index"])
    handled = int(status.get("raft_applied_index", applied))  # with PySyncObj's own entries
    lag = int(status.get("lag", 0)) if leader_commit is None else max(0, leader_commit - handled)
    age = status.get("leader_contact_age_ms")
    return {"node": node, "reachable": True, "role": status["role"], "term": status["term"],
            "commit_index": status["commit_index"], "applied_index": applied, "lag": lag,
            "last_contact_ms": None if age is None else round(float(age), 1)}


def _shard_view(entry: ShardEntry, statuses: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    answers = {n: (s or {}).get(str(entry.id)) for n, s in statuses.items()}
    leaders = [n for n, s in answers.items() if s is not None and s["role"] == "leader"]
    leader = max(leaders, key=lambda n: answers[n]["term"], default=None)  # type: ignore[index]
    commit = None if leader is None else int(answers[leader]["commit_index"])  # type: ignore[index]
    rows = [_replica_row(n, answers.get(n), commit) for n in entry.replicas]
    op, _, node = entry.change.partition(":")
    return {"id": entry.id, "leader": leader, "epoch": entry.epoch,
            "slot_ranges": [list(r) for r in entry.slot_ranges], "commit_index": commit,
            "change": {"op": op, "node": node} if entry.change else None, "replicas": rows}


async def cluster_status(request: web.Request) -> web.Response:
    """``GET /v1/cluster``: the map and every replica's own report (asks every node, bounded)."""
    ctx = context_of(request)
    current = ctx.cluster_map
    statuses = await peer_statuses(ctx)
    nodes = [{"id": n.id, "url": n.url, "state": n.state, "meta": n.id in current.meta_members,
              "reachable": statuses.get(n.id) is not None} for n in current.nodes]
    op, _, changing = current.meta_change.partition(":")
    meta = {"members": list(current.meta_members),
            "change": {"op": op, "node": changing} if current.meta_change else None}
    return respond(request, 200, {"node": ctx.node_id, "epoch": current.epoch, "slots": SLOTS,
                                  "nodes": nodes, "meta": meta,
                                  "shards": [_shard_view(e, statuses) for e in current.shards]})
