"""The cluster map on real node processes: every node serves the same map, a node outside the metadata
group follows its changes, shards refuse what they do not own, upgraded clusters keep their accounts,
and the map survives a restart of every node."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import urllib.parse
from typing import Any

import pytest
from raftledger.cluster import launcher
from raftledger.cluster.launcher import wait_until
from raftledger.cluster.map import AssignSlots, MapCommand, PutValue, SetNodeState, encode_command
from raftledger.cluster.router import modulo_table, route
from raftledger.cluster.testing import LocalCluster
from raftledger.node import secret
from raftledger.node.replica import ReplicaService
from raftledger.node.runtime import replica_settings
from raftledger.node.settings import MetaSettings, NodeSettings
from raftledger.node.testing import account_body, ids_on_shard, transfer_body
from raftledger.node.testing import wait_until as wait_until_async
from raftledger.statemachine import codec
from raftledger.statemachine.slots import slot_of
from raftledger.statemachine.testing import account, transfer

pytestmark = pytest.mark.slow

propose_timeout_s = 30.0


def quoted(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def propose(cluster: LocalCluster, node: str, command: MapCommand) -> dict[str, Any]:
    """A map change sent to ``node``'s internal listener (which takes it to the group's leader)."""
    def attempt() -> dict[str, Any] | None:
        try:
            status, answer = cluster.call(node, "/meta/propose", encode_command(command))
        except (OSError, launcher.LaunchError):
            return None
        return answer if status == 200 else None
    outcome: dict[str, Any] = wait_until(attempt, propose_timeout_s, f"{command} applied")
    assert outcome["ok"], outcome
    return outcome


def maps(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    found = {}
    for node in cluster.node_ids:
        status, body = cluster.get(node, "/v1/cluster/map")
        assert status == 200, (node, body)
        found[node] = body
    return found


def covered_once(cluster_map: dict[str, Any]) -> bool:
    owners = [0] * cluster_map["slots"]
    for shard in cluster_map["shards"]:
        for first, last in shard["slot_ranges"]:
            for slot in range(first, last + 1):
                owners[slot] += 1
    return owners == [1] * 4096


def test_every_node_serves_the_same_map_with_every_slot_owned_once(tmp_path):
    with LocalCluster(tmp_path, nodes=3, shards=3, durability="none") as cluster:
        seen = maps(cluster)
        assert len({json.dumps(m, sort_keys=True) for m in seen.values()}) == 1, seen
        first = seen["n0"]
        assert first["epoch"] >= 1 and first["slots"] == 4096 and covered_once(first)
        assert [s["id"] for s in first["shards"]] == [0, 1, 2]
        assert {n["id"]: n["state"] for n in first["nodes"]} == {"n0": "up", "n1": "up", "n2": "up"}
        for node in cluster.node_ids:
            status, body = cluster.get(node, "/readyz")
            assert status == 200 and body["map"]["epoch"] == first["epoch"], body
            assert cluster.status(node)["meta"]["epoch"] == first["epoch"]  # every node hosts it


def test_a_node_outside_the_metadata_group_follows_a_change_of_the_map(tmp_path):
    settings = NodeSettings(meta=MetaSettings(long_poll_s=60.0))  # a change must not wait for it
    with LocalCluster(tmp_path, nodes=4, shards=2, durability="none", settings=settings) as cluster:
        assert cluster.plan.cluster.node("n3").meta is None
        assert cluster.status("n3")["meta"] is None
        before = maps(cluster)["n3"]["epoch"]
        started = time.monotonic()
        outcome = propose(cluster, "n3", SetNodeState("n3", "draining"))  # via n3, to the leader
        assert outcome["epoch"] == before + 1

        def followed() -> dict[str, Any] | None:
            status, body = cluster.get("n3", "/v1/cluster/map")
            return body if status == 200 and body["epoch"] == before + 1 else None
        seen = wait_until(followed, 30.0, "n3 to follow the change")
        assert time.monotonic() - started < 30.0  # woken by the change, not by the poll's timeout
        assert {n["id"]: n["state"] for n in seen["nodes"]}["n3"] == "draining"
        assert {m["epoch"] for m in maps(cluster).values()} == {before + 1}


def test_a_misrouted_command_is_refused_and_writes_follow_slots_that_moved(tmp_path):
    with LocalCluster(tmp_path, nodes=3, shards=2, durability="none") as cluster:
        epoch = maps(cluster)["n0"]["epoch"]
        foreign = ids_on_shard(1, 2, "planted")[0]
        leader = cluster.leader(0)
        status, answer = cluster.call(leader, "/shards/0/submit", [codec.encode_command(account(foreign))])
        assert status == 200
        [refused] = answer["replies"]
        assert refused["error"]["code"] == "wrong_shard", refused
        assert refused["error"]["details"]["epoch"] == epoch
        assert cluster.totals(leader, 0)["accounts"] == 0
        # Move the slot of a new account from shard 1 to shard 0: the map, then both shards' slots.
        moved = ids_on_shard(1, 2, "moved")[0]
        slot = slot_of(moved)
        outcome = propose(cluster, "n1", AssignSlots(slot, slot, 0))

        def followed() -> bool:
            statuses = [cluster.status(n) for n in cluster.node_ids]
            return all(s is not None and s["map_epoch"] == outcome["epoch"] for s in statuses) and all(
                info["slots_epoch"] == outcome["epoch"] for s in statuses for info in s["shards"].values()
                if info["role"] == "leader")
        wait_until(followed, 30.0, "every node and both shards at the new epoch")
        for node in cluster.node_ids:
            status, body = cluster.get(node, "/v1/cluster/map")
            assert status == 200 and covered_once(body)
        status, body = launcher.http_json("POST", cluster.urls["n2"] + "/v1/accounts",
                                          json.dumps(account_body(moved)).encode())
        assert status == 201 and body["shard"] == 0, body
        status, answer = cluster.call(cluster.leader(1), "/shards/1/submit",
                                      [codec.encode_command(account(moved))])
        assert answer["replies"][0]["error"]["code"] == "wrong_shard"
        assert cluster.totals(cluster.leader(1), 1)["accounts"] == 0


def test_the_metadata_group_survives_a_restart_of_every_node_with_its_epoch(tmp_path):
    cluster = LocalCluster(tmp_path, nodes=3, shards=2)
    try:
        cluster.start()
        for i in range(3):
            outcome = propose(cluster, f"n{i}", PutValue("consumers", f"c{i}", {"offset": i}))
        epoch = outcome["epoch"]
        assert {m["epoch"] for m in maps(cluster).values()} == {epoch}
        cluster.stop_all()
        cluster.start()
        assert {m["epoch"] for m in maps(cluster).values()} == {epoch}  # nothing was bootstrapped again
        assert all(cluster.status(n)["meta"]["epoch"] == epoch for n in cluster.node_ids)
        assert propose(cluster, "n2", PutValue("consumers", "c9", 9))["epoch"] == epoch + 1
    finally:
        cluster.close()


# -- upgrades ------------------------------------------------------------------------------------------


async def write_before_the_map(plan: launcher.Plan, accounts: dict[int, list[str]]) -> None:
    """What a cluster of the release before the map left: each shard's replicas (journal and store,
    no slots) holding accounts routed by sha256 % shards, and one transfer per shard."""
    cluster_secret = secret.load(plan.secret_file)
    for shard, ids in accounts.items():
        await write_shard(plan, shard, ids, cluster_secret)


async def write_shard(plan: launcher.Plan, shard: int, ids: list[str], cluster_secret: bytes) -> None:
    services = [ReplicaService(dataclasses.replace(
        replica_settings(plan.node_config(n.id), shard, cluster_secret), slots_required=False), n.id)
        for n in plan.cluster.nodes]
    try:
        leader = await wait_until_async(
            lambda: next((s for s in services if s.is_leader()), None), 30.0, "a leader")
        for account_id in ids:
            assert (await leader.submit(account(account_id))).outcome.ok
        assert (await leader.submit(transfer(f"t{shard}", ids[0], ids[1], 7))).outcome.ok
        await wait_until_async(lambda: len({s.fingerprint() for s in services}) == 1, 30.0,
                               "replicas converged")
    finally:
        for service in services:
            await service.close()


def pre_map_plan(plan: launcher.Plan, version: int) -> dict[str, Any]:
    """The plan as cluster.json of ``version`` (1: before internal listeners, 2: before the map)."""
    raw = plan.to_json()
    raw["version"] = version
    del raw["slot_layout"]
    for node in raw["nodes"]:
        del node["meta"]
        if version == 1:
            del node["internal"]
    if version == 1:
        del raw["secret_file"]
    return raw


@pytest.mark.parametrize("version", [1, 2])
def test_an_upgraded_cluster_keeps_its_accounts_where_they_were(tmp_path, version):
    shards = 2
    plan = launcher.new_plan(str(tmp_path), nodes=3, shards=shards, durability="none", port_base=None)
    plan.sealer()  # the secret the replicas' Raft keys come from
    table = modulo_table(shards)  # sha256 % 2: how the release before the map routed
    ids = [f"old{i}:{{t{i}}}" for i in range(12)]
    accounts = {s: [i for i in ids if route(table, i) == s] for s in range(shards)}
    assert all(len(a) >= 2 for a in accounts.values())
    asyncio.run(write_before_the_map(plan, accounts))
    with open(os.path.join(tmp_path, launcher.CLUSTER_FILE), "w") as f:
        json.dump(pre_map_plan(plan, version), f)
    with LocalCluster(tmp_path, resume=True) as cluster:
        assert cluster.plan.cluster.slot_layout == "modulo"
        assert [n.meta is not None for n in cluster.plan.cluster.nodes] == [True, True, True]
        for node, seen in maps(cluster).items():
            assert covered_once(seen) and len(seen["shards"][0]["slot_ranges"]) == 2048, node
        for shard, owned in accounts.items():
            for account_id in owned:
                for node in cluster.node_ids:
                    status, body = cluster.get(node, f"/v1/accounts/{quoted(account_id)}")
                    assert status == 200 and body["shard"] == shard, (node, account_id, body)
            status, body = cluster.get("n1", f"/v1/accounts/{quoted(owned[1])}/balance")
            assert body["debits_posted"] + body["credits_posted"] == 7, body
            body_ = transfer_body(f"after{shard}", owned[1], owned[0], 3, "BRL")
            status, body = launcher.http_json("POST", cluster.urls["n2"] + "/v1/transactions",
                                              json.dumps(body_).encode())
            assert status == 201 and body["shards"] == [shard], body
    with open(os.path.join(tmp_path, launcher.CLUSTER_FILE)) as f:
        assert json.load(f)["version"] == launcher.PLAN_VERSION
