"""The membership commands as an operator runs them (``raftledger cluster ...`` in a subprocess)
against a real local cluster of node processes, like the one ``raftledger up`` starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from raftledger.cluster import launcher
from raftledger.cluster.map import StartReplicaChange, encode_command
from raftledger.cluster.testing import LocalCluster, wait_until
from raftledger.node import secret, wire
from raftledger.node.settings import NodeSettings, SnapshotSettings
from raftledger.node.testing import pair_on_shard, transfer_body

pytestmark = pytest.mark.slow

cli_timeout_s = 240.0
writes_max = 3000
write_attempts_max = 20
converge_timeout_s = 90.0
compaction_entries = 64
healthy_contact_ms = 2000 * 1.6  # node/http/membership.py: 2 x raft.election_timeout_max_s


def cli(cluster: LocalCluster, *args: str, expect: int = 0) -> Any:
    """``raftledger cluster ARGS --json`` for this cluster's data dir: its exit status must be
    ``expect``; returns its JSON document."""
    out = subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", "cluster", *args, "--json",
                          "--data-dir", cluster.data_dir],
                         capture_output=True, text=True, timeout=cli_timeout_s)
    assert out.returncode == expect, (out.returncode, out.stdout, out.stderr)
    return json.loads(out.stdout)


def cli_text(cluster: LocalCluster, *args: str) -> str:
    """``raftledger cluster ARGS`` as a person runs it: what it prints (it must succeed)."""
    out = subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", "cluster", *args,
                          "--data-dir", cluster.data_dir], capture_output=True, text=True,
                         timeout=cli_timeout_s, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, (out.stdout, out.stderr)
    return out.stdout


def api(cluster: LocalCluster, method: str, path: str, body: Any = None, node: str = "n0") -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    status, _, answer = launcher.http_request(method, cluster.urls[node] + path, data, timeout_s=30.0,
                                               token=cluster.admin_token)
    return status, answer


def cluster_map(cluster: LocalCluster, node: str = "n0") -> dict[str, Any]:
    status, body = api(cluster, "GET", "/v1/cluster/map", node=node)
    assert status == 200, body
    return dict(body)


def replicas_of(cluster: LocalCluster, shard: int, node: str = "n0") -> list[str]:
    return next(s["replicas"] for s in cluster_map(cluster, node)["shards"] if s["id"] == shard)


@pytest.fixture
def local(tmp_path) -> Iterator[LocalCluster]:
    """Three nodes, two shards, logs compacted every few entries (a new replica starts from a
    snapshot); nodes that ``add-node`` started are stopped by their recorded pid."""
    settings = NodeSettings(snapshots=SnapshotSettings(log_compaction_entries_min=compaction_entries))
    with LocalCluster(tmp_path / "data", nodes=3, shards=2, durability="none",
                      settings=settings, credentials=True) as cluster:
        try:
            yield cluster
        finally:
            plan = launcher.load_plan(cluster.data_dir)
            for node_id, pid in (plan.pids if plan else {}).items():
                if node_id not in cluster.procs:
                    launcher.stop_pid(pid, launcher.node_config_path(plan, node_id))  # type: ignore[arg-type]


class Writer:
    """Transfers on shard 0 through every node in turn until stopped (at most ``writes_max``); each
    one retried with its id until it is acknowledged (at most ``write_attempts_max`` times)."""

    def __init__(self, cluster: LocalCluster, debit: str, credit: str) -> None:
        self.cluster, self.debit, self.credit = cluster, debit, credit
        self.tag = debit.split(":", 1)[1]
        self.acknowledged: list[str] = []
        self.unexpected: list[tuple[str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        for i in range(writes_max):
            if self.stop.is_set():
                return
            txid = f"w{i}:{self.tag}"
            for attempt in range(write_attempts_max):
                node = sorted(self.cluster.urls)[(i + attempt) % len(self.cluster.urls)]
                try:
                    status, _ = api(self.cluster, "POST", "/v1/transactions",
                                    transfer_body(txid, self.debit, self.credit, 7), node)
                except OSError:
                    continue
                if status in (200, 201):
                    self.acknowledged.append(txid)
                    break
                if status != 503:  # only "not now" may be retried; anything else fails the test
                    self.unexpected.append((txid, status))
                    return

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(120)

    def wait_for(self, count: int) -> None:
        wait_until(lambda: len(self.acknowledged) >= count or not self.thread.is_alive(), 60,
                   f"{count} acknowledged writes")


def converged(cluster: LocalCluster, shard: int, nodes: list[str]) -> tuple[int, str]:
    """Every listed replica at the same commit index and fingerprint, nothing left to apply."""
    def same() -> tuple[int, str] | None:
        statuses = [(cluster.status(n) or {}).get("shards", {}).get(str(shard)) for n in nodes]
        if any(s is None for s in statuses):
            return None
        prints = {(s["fingerprint"]["index"], s["fingerprint"]["chain"]) for s in statuses}
        if len(prints) == 1 and len({s["commit_index"] for s in statuses}) == 1 and \
                {s["lag"] for s in statuses} == {0}:
            return prints.pop()
        return None
    return wait_until(same, converge_timeout_s, f"shard {shard} on {nodes} to converge")


def recorded_on(cluster: LocalCluster, node: str, shard: int, txid: str) -> str | None:
    status, answer = cluster.call(node, f"/shards/{shard}/transaction", {"id": txid})
    assert status == 200, answer
    record = answer["record"]
    return None if record is None else str(record["status"])


def test_a_fourth_node_and_replica_join_under_load_and_a_removed_replica_stops_serving(local):
    debit, credit = pair_on_shard(0, 2, "load")
    for account, normal in ((debit, "debit"), (credit, "credit")):
        created, _ = api(local, "POST", "/v1/accounts", {"id": account, "currency": "BRL", "normal": normal})
        assert created == 201
    with Writer(local, debit, credit) as writer:
        writer.wait_for(20)
        added = cli(local, "add-node")
        assert added["id"] == "n3" and added["url"].startswith("http://127.0.0.1:")
        assert any(n["id"] == "n3" and n["state"] == "up" for n in cluster_map(local)["nodes"])
        local.plan = launcher.load_plan(local.data_dir)  # n3's addresses, for the checks below
        with open(os.path.join(local.data_dir, "cluster.json")) as f:
            recorded = {n["id"]: n for n in json.load(f)["nodes"]}
        assert recorded["n3"]["pid"] == added["pid"] and recorded["n3"]["http"] == added["url"]
        writer.wait_for(len(writer.acknowledged) + 3 * compaction_entries)
        joined = cli(local, "add-replica", "0", "n3")
        assert joined["state"] == "done" and joined["caught_up"]
        assert joined["applied_index"] >= joined["target_index"] > 0
        assert replicas_of(local, 0) == ["n0", "n1", "n2", "n3"]
        assert local.status("n3")["shards"]["0"]["snapshots_installed"] >= 1  # then the log
        leader = local.leader(0)
        writer.wait_for(len(writer.acknowledged) + 20)
        removed = cli(local, "remove-replica", "0", leader)  # the leader's own: it hands over first
        assert removed["state"] == "done" and removed["leader"] != leader
        writer.wait_for(len(writer.acknowledged) + 20)
        assert writer.thread.is_alive(), "the writes went on through every change"
    remaining = replicas_of(local, 0)
    assert leader not in remaining and "n3" in remaining and len(remaining) == 3
    assert len(writer.acknowledged) >= 80 and not writer.unexpected, writer.unexpected
    converged(local, 0, remaining)
    for node in remaining:
        missing = [t for t in writer.acknowledged if recorded_on(local, node, 0, t) != "posted"]
        assert not missing, (node, missing[:5])
    totals = {n: local.totals(n, 0)["currencies"]["BRL"] for n in remaining}
    assert len({json.dumps(t, sort_keys=True) for t in totals.values()}) == 1, totals
    assert "0" not in local.status(leader)["shards"]  # the removed replica stopped serving shard 0
    status, answer = local.call(leader, "/shards/0/totals")
    assert status == 404 and answer["error"]["code"] == "not_found"
    set_aside = [d for d in os.listdir(os.path.join(local.data_dir, leader))
                 if d.startswith("shard-0.removed-")]
    assert len(set_aside) == 1 and not os.path.exists(os.path.join(local.data_dir, leader, "shard-0"))
    status, balance = api(local, "GET", f"/v1/accounts/{credit}/balance", node=leader)  # served via a host
    assert status == 200 and balance["credits_posted"] == 7 * len(writer.acknowledged)
    shown = cli(local, "status")
    shard0 = next(s for s in shown["shards"] if s["id"] == 0)
    assert [r["node"] for r in shard0["replicas"]] == remaining and shard0["change"] is None
    assert all(r["reachable"] and r["lag"] == 0 for r in shard0["replicas"])
    assert {r["role"] for r in shard0["replicas"]} == {"leader", "follower"}
    assert shard0["slot_ranges"] == [[0, 2047]] and shown["epoch"] == cluster_map(local)["epoch"]


def test_refusals_answer_stable_codes_and_change_nothing(local):
    epoch = cluster_map(local)["epoch"]
    for args, code in ((("add-replica", "0", "n9"), "node_not_found"),
                       (("remove-replica", "0", "n9"), "node_not_found"),
                       (("add-replica", "7", "n1"), "not_found"),
                       (("add-replica", "0", "n1"), None),  # already a replica: nothing to do
                       (("remove-node", "n0"), "no_free_meta_host")):
        if code is None:
            assert cli(local, *args)["state"] == "done"
            continue
        answer = cli(local, *args, expect=1)
        assert answer["error"]["message"].startswith(code), (args, answer)
    assert cluster_map(local)["epoch"] == epoch
    bad = [("POST", "/v1/shards/0/replicas", {"nod": "n1"}, 400, "unknown_field"),
           ("POST", "/v1/shards/0/replicas", {"node": "bad id!"}, 400, "invalid_field"),
           ("POST", "/v1/shards/0/replicas", [1], 400, "invalid_field"),
           ("POST", "/v1/shards/x/replicas", {"node": "n1"}, 404, "not_found"),
           ("DELETE", "/v1/shards/0/replicas/n1?force=maybe", None, 400, "invalid_query"),
           ("DELETE", "/v1/shards/1/replicas/n9", None, 404, "node_not_found"),
           ("POST", "/v1/cluster/nodes", {"id": "n1", "url": "http://127.0.0.1:1", "internal": "h:1",
                                          "raft_host": "h:2"}, 409, "node_exists"),
           ("POST", "/v1/cluster/nodes", {"id": "x1", "url": local.urls["n2"], "internal": "h:1",
                                          "raft_host": "h:2"}, 409, "address_in_use"),
           ("POST", "/v1/cluster/nodes", {"id": "x1", "url": "http://127.0.0.1:1", "internal": "h:1",
                                          "raft_host": "h:2", "raft": {"0": "h:3"}}, 400, "invalid_field"),
           ("POST", "/v1/cluster/nodes", {"id": "x1", "url": "ftp://h:1", "internal": "h:1",
                                          "raft_host": "h:2"}, 400, "invalid_field"),
           ("DELETE", "/v1/cluster/nodes/n1", None, 409, "node_hosts_replicas"),
           ("DELETE", "/v1/cluster/nodes/n9", None, 404, "node_not_found")]
    for method, path, body, status, code in bad:
        got, answer = api(local, method, path, body)
        assert (got, answer["error"]["code"]) == (status, code), (method, path, answer)
    assert cluster_map(local)["epoch"] == epoch


def test_a_change_left_half_done_blocks_others_and_is_finished_by_sending_it_again(local):
    """As after a crash between the map step and the Raft step: the map already dropped n2 from
    shard 1 (so n2 stopped its replica), Raft still counts it."""
    body = encode_command(StartReplicaChange(1, "n2", adding=False))
    status, outcome = local.call("n0", "/meta/propose", body)
    assert status == 200 and outcome["ok"], outcome
    wait_until(lambda: "1" not in (local.status("n2") or {"shards": {"1": 0}})["shards"], 30,
               "n2 to stop its replica of shard 1")
    refused = cli(local, "remove-replica", "1", "n1", expect=1)
    assert refused["error"]["message"].startswith("change_in_progress"), refused
    got, answer = api(local, "POST", "/v1/shards/1/replicas", {"node": "n0"})
    assert got == 409 and answer["error"]["code"] == "change_in_progress"
    assert answer["error"]["details"] == {"shard": 1, "op": "remove", "node": "n2"}
    done = cli(local, "remove-replica", "1", "n2")  # the same command again finishes it
    assert done["replicas"] == ["n0", "n1"]
    shown = next(s for s in cli(local, "status")["shards"] if s["id"] == 1)
    assert shown["change"] is None and [r["node"] for r in shown["replicas"]] == ["n0", "n1"]
    converged(local, 1, ["n0", "n1"])
    # It may come back, and an add left half-done is finished the same way: the map names n2 again,
    # n2 starts an empty replica that waits for the group, which does not count it yet.
    status, outcome = local.call("n0", "/meta/propose", encode_command(StartReplicaChange(1, "n2", True)))
    assert status == 200 and outcome["ok"], outcome
    wait_until(lambda: "1" in (local.status("n2") or {"shards": {}})["shards"], 30,
               "n2 to start an empty replica of shard 1")
    leader = local.leader(1)
    _, view = local.call(leader, "/shards/1/membership", {"op": "view"})
    assert sorted(m["node"] for m in view["members"]) == ["n0", "n1"]
    again = cli(local, "add-replica", "1", "n2")
    assert again["state"] == "done" and replicas_of(local, 1) == ["n0", "n1", "n2"]
    converged(local, 1, ["n0", "n1", "n2"])


def test_a_remove_that_would_leave_no_healthy_majority_is_refused_unless_forced(local):
    leader = local.leader(1)
    followers = [n for n in ("n0", "n1", "n2") if n != leader]
    local.pause(followers[0])
    try:
        def stale() -> bool:  # what the leader decides by: how long ago the follower answered it
            status, view = local.call(leader, "/shards/1/membership", {"op": "view"})
            ages = {m["node"]: m["contact_age_ms"] for m in view["members"]} if status == 200 else {}
            return (ages.get(followers[0]) or 0) > healthy_contact_ms
        wait_until(stale, 30, f"{leader} to see {followers[0]} silent")
        refused = cli(local, "remove-replica", "1", followers[1], expect=1)
        assert refused["error"]["message"].startswith("quorum_at_risk"), refused
        assert replicas_of(local, 1, leader) == ["n0", "n1", "n2"]
        gone = cli(local, "remove-replica", "1", followers[0])  # the unresponsive one may go
        assert gone["replicas"] == [n for n in ("n0", "n1", "n2") if n != followers[0]]
    finally:
        local.resume(followers[0])


def test_remove_node_moves_its_replicas_stops_it_and_the_cluster_refuses_it_afterwards(local):
    added = cli(local, "add-node")
    shown = cli_text(local, "add-replica", "1", added["id"])
    assert f"shard 1: replica on {added['id']} caught up" in shown and "and votes" in shown
    assert cli(local, "remove-replica", "1", "n2")["replicas"] == ["n0", "n1", added["id"]]
    gone = cli(local, "remove-node", added["id"])
    assert gone["state"] == "removed" and gone["stopped"]
    assert gone["steps"] == [{"shard": 1, "moved_to": "n2"}]  # the one up node without shard 1
    assert replicas_of(local, 1) == ["n0", "n1", "n2"]
    assert not launcher.is_running(added["pid"])
    with open(os.path.join(local.data_dir, "cluster.json")) as f:
        assert added["id"] not in {n["id"] for n in json.load(f)["nodes"]}
    node = next(n for n in cluster_map(local)["nodes"] if n["id"] == added["id"])
    assert node["state"] == "removed"
    again, answer = api(local, "POST", "/v1/cluster/nodes", {
        "id": added["id"], "url": "http://127.0.0.1:1", "internal": "127.0.0.1:2",
        "raft_host": "127.0.0.1:3"})
    assert (again, answer["error"]["code"]) == (409, "node_removed")
    status, refusal = _internal_as(local, added["id"], "n0", "/status")
    assert status == 403 and refusal["error"]["details"]["reason"] == "node_removed"
    assert cli(local, "add-node")["id"] == "n4"  # a removed node's id is never handed out again
    table = cli_text(local, "status")
    assert "removed" in table and "leader" in table and "2048-4095" in table


def _internal_as(cluster: LocalCluster, sender: str, node: str, path: str) -> tuple[int, Any]:
    """A request to ``node``'s internal listener sealed with the cluster's secret as ``sender``."""
    sealer = wire.Sealer(wire.internal_key(secret.load(cluster.plan.secret_file)), sender)
    sealed = sealer.seal_request("POST", wire.PREFIX + path, None)
    url = f"http://{cluster.plan.cluster.node(node).internal}{wire.PREFIX}{path}"
    request = urllib.request.Request(url, data=sealed.body, method="POST", headers=sealed.headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, exc.headers, exc.read()
    return status, sealer.open_answer(sealed, status, headers, body)
