"""Membership of the metadata group (the cluster map's own Raft group): its rules in the map, and a
member moved off an original node of a real local cluster under write load, through a restart of
every node."""

from __future__ import annotations

import json
from typing import Any

import pytest
from raftledger.cluster import launcher
from raftledger.cluster.map import (
    ClusterMap,
    FinishMetaChange,
    NodeEntry,
    PutNode,
    SetNodeState,
    StartMetaChange,
    apply,
    decode_command,
    encode_command,
)
from raftledger.cluster.testing import LocalCluster, wait_until
from raftledger.node.testing import pair_on_shard
from test_admin_cli import Writer, api, cli, local, recorded_on  # noqa: F401 (local: a fixture)

# -- the rules (pure) ------------------------------------------------------------------------------


def _map(*extra: NodeEntry) -> ClusterMap:
    nodes = tuple(NodeEntry(f"n{i}", f"http://h:{i}", f"h:1{i}", ((0, f"h:2{i}"),), f"h:3{i}")
                  for i in range(3)) + extra
    return ClusterMap(1, nodes, (), {}, ("n0", "n1", "n2"))


def _ok(current: ClusterMap, command: Any) -> ClusterMap:
    new, outcome = apply(current, command)
    assert outcome.ok, outcome
    return new


def _refused(current: ClusterMap, command: Any) -> str:
    new, outcome = apply(current, command)
    assert not outcome.ok and new == current
    return outcome.reason


def test_a_move_is_recorded_in_the_map_at_every_step():
    spare = NodeEntry("n3", "http://h:3", "h:13", ((0, "h:23"),), "h:33")
    current = _map(spare)
    adding = _ok(current, StartMetaChange("n3", adding=True))
    assert adding.meta_members == ("n0", "n1", "n2", "n3") and adding.meta_change == "add:n3"
    assert "in progress" in _refused(adding, StartMetaChange("n1", adding=False))
    removing = _ok(adding, FinishMetaChange("n3", then_remove="n1"))
    assert removing.meta_members == ("n0", "n2", "n3") and removing.meta_change == "remove:n1"
    assert [n.id for n in removing.meta_hosts()] == ["n0", "n2", "n3"]
    assert "metadata group" in _refused(removing, SetNodeState("n1", "removed"))
    done = _ok(removing, FinishMetaChange("n1"))
    assert done.meta_change == "" and _ok(done, SetNodeState("n1", "removed")).node("n1").state == "removed"
    assert "hosts a member" in _refused(done, SetNodeState("n0", "removed"))


def test_only_an_up_node_with_a_meta_address_joins_and_the_last_member_never_leaves():
    no_address = NodeEntry("n3", "http://h:3", "h:13", ((0, "h:23"),))
    current = _map(no_address)
    assert "no metadata group Raft address" in _refused(current, StartMetaChange("n3", adding=True))
    assert "not an up node" in _refused(current, StartMetaChange("n9", adding=True))
    assert "not a member" in _refused(current, StartMetaChange("n3", adding=False))
    alone = ClusterMap(1, current.nodes, (), {}, ("n0",))
    assert "last member" in _refused(alone, StartMetaChange("n0", adding=False))
    assert "no change" in _refused(current, FinishMetaChange("n0"))


def test_meta_commands_and_members_survive_their_encodings_and_older_maps_read_as_they_meant():
    for command in (StartMetaChange("n3", True), StartMetaChange("n1", False),
                    FinishMetaChange("n3", "n1"), FinishMetaChange("n1")):
        assert decode_command(encode_command(command)) == command
    moved = _ok(_map(NodeEntry("n3", "http://h:3", "h:13", (), "h:33")), StartMetaChange("n3", True))
    assert ClusterMap.unpack(moved.pack()) == moved
    older = moved.to_wire()
    del older["meta_group"]  # a map written before members were recorded
    read = ClusterMap.from_wire(older)
    assert read.meta_members == ("n0", "n1", "n2", "n3") and read.meta_change == ""
    registered = _ok(_map(), PutNode(NodeEntry("n3", "http://h:3", "h:13", (), "h:33")))
    assert registered.meta_members == ("n0", "n1", "n2")  # an address is no membership


# -- a real cluster ----------------------------------------------------------------------------------

class Staying:
    """The cluster as the writer sees it: the nodes that stay."""

    def __init__(self, cluster: LocalCluster, nodes: list[str]) -> None:
        self.urls = {n: cluster.urls[n] for n in nodes}
        self.admin_token = cluster.admin_token


def meta_roles(cluster: LocalCluster, nodes: list[str]) -> dict[str, str | None]:
    return {n: ((cluster.status(n) or {}).get("meta") or {}).get("role") for n in nodes}


def meta_leader(cluster: LocalCluster, nodes: list[str]) -> str:
    return wait_until(lambda: next((n for n, r in meta_roles(cluster, nodes).items() if r == "leader"),
                                   None), 60, "a leader of the metadata group")


def meta_of(cluster: LocalCluster, node: str) -> dict[str, Any]:
    status, body = api(cluster, "GET", "/v1/cluster", node=node)
    assert status == 200, body
    return dict(body["meta"])


@pytest.mark.slow
def test_the_meta_leaders_node_is_replaced_under_load_and_the_new_membership_survives_a_full_restart(
        local):  # noqa: F811 (the fixture of test_admin_cli)
    originals = ["n0", "n1", "n2"]
    leaving = meta_leader(local, originals)
    staying = [n for n in originals if n != leaving]
    debit, credit = pair_on_shard(0, 2, "meta")
    for account, normal in ((debit, "debit"), (credit, "credit")):
        created, _ = api(local, "POST", "/v1/accounts", {"id": account, "currency": "BRL", "normal": normal},
                         node=staying[0])
        assert created == 201
    with Writer(Staying(local, staying), debit, credit) as writer:  # type: ignore[arg-type]
        writer.wait_for(20)
        added = cli(local, "add-node")["id"]
        assert added == "n3"
        local.plan = launcher.load_plan(local.data_dir)  # n3's addresses, for the checks below
        gone = cli(local, "remove-node", leaving)
        assert gone["state"] == "removed" and gone["stopped"], gone
        assert gone["meta"] == {"moved_to": added, "members": [*staying, added]}, gone
        writer.wait_for(len(writer.acknowledged) + 20)
        assert writer.thread.is_alive(), "the writes went on through every change"
    assert len(writer.acknowledged) >= 40 and not writer.unexpected, writer.unexpected
    members = [*staying, added]
    assert meta_of(local, staying[0]) == {"members": members, "change": None}
    assert meta_leader(local, members) in members
    assert (local.status(added) or {})["meta"]["epoch"] == (local.status(staying[0]) or {})["map_epoch"]
    # The map still changes: a replica of shard 1 leaves the new node and comes back.
    assert cli(local, "remove-replica", "1", added)["state"] == "done"
    assert cli(local, "add-replica", "1", added)["state"] == "done"

    plan = launcher.load_plan(local.data_dir)
    assert plan is not None and sorted(n.id for n in plan.cluster.nodes) == sorted(members)
    local.close()
    for node_id, pid in plan.pids.items():
        if node_id == added:
            launcher.stop_pid(pid, launcher.node_config_path(plan, node_id))
    with LocalCluster(local.data_dir, resume=True, credentials=True) as again:
        assert meta_of(again, added) == {"members": members, "change": None}
        assert meta_leader(again, members) in members
        assert cli(again, "move-meta", "--from", staying[0], expect=1)["error"]["message"].startswith(
            "no_free_meta_host")
        missing = [t for t in writer.acknowledged if recorded_on(again, added, 0, t) != "posted"]
        assert not missing, missing[:5]
        status, balance = api(again, "GET", f"/v1/accounts/{credit}/balance", node=added)
        assert status == 200 and balance["credits_posted"] == 7 * len(writer.acknowledged)
        assert cli(again, "remove-replica", "1", added)["state"] == "done"  # commits after the restart


@pytest.mark.slow
def test_a_move_with_no_free_node_is_refused_and_one_left_half_done_is_finished_by_sending_it_again(
        local):  # noqa: F811 (the fixture of test_admin_cli)
    epoch = json.dumps(meta_of(local, "n0"))
    got, answer = api(local, "POST", "/v1/cluster/meta/move", {"from": "n1"})
    assert (got, answer["error"]["code"]) == (409, "no_free_meta_host"), answer
    assert "add a node first" in answer["error"]["message"]
    for body, status, code in (({"from": "n9"}, 404, "node_not_found"), ({"to": "n1"}, 400, "missing_field"),
                               ({"from": "n1", "shrink": "yes"}, 400, "invalid_field"),
                               ({"from": "n1", "to": "n2"}, 409, "already_a_meta_member")):
        got, answer = api(local, "POST", "/v1/cluster/meta/move", body)
        assert (got, answer["error"]["code"]) == (status, code), (body, answer)
    assert json.dumps(meta_of(local, "n0")) == epoch
    added = cli(local, "add-node")["id"]
    # As after a crash between the map's step and Raft's: the map names the new member already.
    status, outcome = local.call("n0", "/meta/propose", encode_command(StartMetaChange(added, True)))
    assert status == 200 and outcome["ok"], outcome
    plan = launcher.load_plan(local.data_dir)
    assert plan is not None
    wait_until(lambda: (launcher.node_status(plan, added) or {}).get("meta") is not None, 60,
               f"{added} to start a member that waits")
    got, answer = api(local, "POST", "/v1/cluster/meta/move", {"from": "n2", "to": "n1"})
    assert (got, answer["error"]["code"]) == (409, "change_in_progress"), answer
    done = cli(local, "move-meta", "--from", "n2")  # goes on with the add in progress, then removes
    assert done["state"] == "done" and done["to"] == added and done["members"] == ["n0", "n1", added]
    assert meta_of(local, "n1")["change"] is None
    wait_until(lambda: (local.status("n2") or {}).get("meta", 0) is None, 60, "n2 to stop its member")
    got, answer = api(local, "POST", "/v1/cluster/meta/move", {"from": "n2"})
    assert (got, answer["error"]["code"]) == (404, "not_a_meta_member"), answer
    back = cli(local, "move-meta", "--from", added, "--to", "n2")  # and back: n2's member starts empty
    assert back["members"] == ["n0", "n1", "n2"]
    assert cli(local, "remove-node", added)["meta"] is None  # the free node goes: none is left
    shrunk = cli(local, "move-meta", "--from", "n2", "--shrink")
    assert shrunk["to"] is None and shrunk["members"] == ["n0", "n1"]
