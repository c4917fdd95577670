"""The audit trail: administrative changes (tokens, membership, the map) are events of the feed's
reserved shard -1, in order, with who asked (the token id) and when, never a secret."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from raftledger.client import LedgerError
from raftledger.cluster import tokens
from raftledger.cluster.launcher import wait_until
from raftledger.cluster.testing import LocalCluster

pytestmark = pytest.mark.slow

change_timeout_s = 120.0


def replicas(ledger, shard: int) -> list[str]:
    found = ledger.request("GET", "/v1/cluster/map")
    return next(s["replicas"] for s in found["shards"] if s["id"] == shard)


def audit_events(ledger) -> list[dict]:
    with ledger.subscribe(start=0, until_caught_up=True, audit=True) as events:
        return [{"id": e.id, "type": e.type, "timestamp": e.timestamp, "data": dict(e.data)}
                for e in events]


def test_token_and_replica_changes_appear_in_order_with_who_and_when(tmp_path):
    with LocalCluster(tmp_path, nodes=4, shards=1, durability="none", credentials=True) as cluster:
        admin_id = next(t["id"] for t in cluster.client().request("GET", "/v1/tokens")["tokens"])
        started_ns = time.time_ns()
        with cluster.client() as ledger:
            created = ledger.request("POST", "/v1/tokens", json={"name": "ops", "role": "reader"})
            ledger.request("DELETE", f"/v1/tokens/{created['id']}")
            ledger.request("DELETE", "/v1/shards/0/replicas/n3", idempotent=True)
            wait_until(lambda: "n3" not in replicas(ledger, 0), change_timeout_s, "n3 removed")
            ledger.request("POST", "/v1/shards/0/replicas", json={"node": "n3"}, idempotent=True)
            wait_until(lambda: "n3" in replicas(ledger, 0), change_timeout_s, "n3 added")
            finished_ns = time.time_ns()

            def settled() -> list[dict] | None:
                found = audit_events(ledger)
                return found if sum(e["type"] == "replica.change_finished" for e in found) == 2 else None
            trail = wait_until(settled, change_timeout_s, "both replica changes in the audit trail")

        offsets = [int(e["id"].split(":")[1]) for e in trail]
        assert offsets == list(range(1, len(trail) + 1)) and all(e["id"].startswith("-1:") for e in trail)
        assert trail[0]["type"] == "cluster.bootstrapped"
        first_token = next(e for e in trail if e["type"] == "token.created")
        assert first_token["data"]["role"] == "admin"  # made by `up` with the cluster secret
        assert first_token["data"]["actor"].startswith("secret:")
        ours = [e for e in trail if e["timestamp"] >= started_ns]
        assert [(e["type"], e["data"].get("token") or e["data"].get("node")) for e in ours] == [
            ("token.created", created["id"]), ("token.revoked", created["id"]),
            ("replica.removing", "n3"), ("replica.change_finished", "n3"),
            ("replica.adding", "n3"), ("replica.change_finished", "n3")]
        asked = [e for e in ours if e["type"] != "replica.change_finished"]
        assert all(e["data"]["actor"] == admin_id for e in asked), asked
        assert all(started_ns <= e["timestamp"] <= finished_ns for e in ours)
        assert ours[0]["data"]["name"] == "ops" and ours[0]["data"]["role"] == "reader"
        epochs = [e["data"]["epoch"] for e in trail]
        assert epochs == sorted(epochs)
        text = json.dumps(trail)
        assert created["token"] not in text and cluster.admin_token not in text
        assert tokens.hash_secret(created["token"]) not in text and "hash" not in text

        # A node hosting no member of the metadata group (n3) serves it too, by proxy; the same events.
        status, page = cluster.get("n3", "/v1/feed?shard=-1&after=0&limit=1000")
        assert status == 200 and [e["id"] for e in page["events"]][:len(trail)] == [e["id"] for e in trail]

        # Only admin and auditor tokens read it.
        with cluster.client() as ledger:
            reader = ledger.request("POST", "/v1/tokens", json={"name": "r", "role": "reader"})
            auditor = ledger.request("POST", "/v1/tokens", json={"name": "a", "role": "auditor"})
        with cluster.client(token=reader["token"]) as as_reader, pytest.raises(LedgerError) as refused:
            as_reader.request("GET", "/v1/feed", params={"shard": -1, "after": 0})
        assert refused.value.code == "forbidden"
        with cluster.client(token=auditor["token"]) as as_auditor:
            assert audit_events(as_auditor)[:len(trail)] == trail

        # raftledger feed replay --audit prints it.
        out = subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", "feed", "replay", "--audit",
                              "--json", "--data-dir", cluster.data_dir],
                             capture_output=True, text=True, timeout=change_timeout_s)
        assert out.returncode == 0, out.stderr
        printed = [json.loads(line) for line in out.stdout.splitlines()]
        assert [e["id"] for e in printed][:len(trail)] == [e["id"] for e in trail]


def test_attributed_commands_round_trip_and_apply_as_the_command_they_wrap():
    from raftledger.cluster.map import (
        EMPTY,
        Attributed,
        MapError,
        PutValue,
        apply,
        command_to_wire,
        decode_command,
        encode_command,
    )

    put = PutValue("tokens", "tok_1", {"hash": "h", "name": "n", "role": "reader"})
    wrapped = Attributed(put, "tok_admin", 1_700_000_000_000_000_000)
    assert decode_command(encode_command(wrapped)) == wrapped
    assert apply(EMPTY, wrapped) == apply(EMPTY, put)
    with pytest.raises(MapError):  # one level only
        decode_command(__import__("msgpack").packb([9, command_to_wire(wrapped), "x", 1]))


def test_the_trail_survives_a_snapshot_and_old_snapshots_still_load(tmp_path):
    from raftledger.cluster import meta
    from raftledger.cluster.map import EMPTY, Attributed, PutValue, SetNodeState

    trail = meta.AuditTrail(kept_max=3)
    for i in range(5):
        trail.record(Attributed(SetNodeState(f"n{i}", "up"), "tok_a", 100 + i), epoch=10 + i)
    trail.record(PutValue("feed", "webhook", {"secret": "s3cret"}), epoch=20)  # no actor: an old entry
    assert [e["offset"] for e in trail.events] == [4, 5, 6] and trail.first == 4
    assert trail.after(3, 10)[0]["offset"] == 4 and trail.after(5, 10)[0]["offset"] == 6
    last = trail.events[-1]
    assert last["type"] == "config.set" and last["data"] == {"section": "feed", "key": "webhook",
                                                            "actor": None, "epoch": 20}
    path = str(tmp_path / "dump")
    meta.write_dump(path, 42, {"pysyncobj": 1}, EMPTY, sync=False, trail=trail)
    index, state, loaded_map, loaded = meta.read_dump(path)
    assert (index, state, loaded_map) == (42, {"pysyncobj": 1}, EMPTY)
    assert list(loaded.events) == list(trail.events) and loaded.last == 6
    old = str(tmp_path / "old")
    pickled = __import__("pickle").dumps({"pysyncobj": 1})
    with open(old, "wb") as f:
        f.write(meta.HEADER_V1.pack(meta.MAGIC_V1, 7, len(pickled)) + pickled + EMPTY.pack())
    index, state, loaded_map, loaded = meta.read_dump(old)
    assert (index, loaded_map, loaded.last, list(loaded.events)) == (7, EMPTY, 0, [])
