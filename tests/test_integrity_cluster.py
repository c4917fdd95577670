"""Integrity on a real cluster: published keys, majority-signed tree heads identical on every replica,
and ``raftledger audit`` / ``raftledger verify`` against honest, forged and tampered histories. The
cluster takes credentials, as a node does by default: the auditor reads with an ``auditor`` token."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import pytest
from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster
from raftledger.node.testing import account_body, ids_on_shard
from raftledger.statemachine.layout import (
    ENTRY,
    pack_transaction,
    unpack_account,
    unpack_transaction,
)

SHARDS = 2
audit_timeout_s = 300.0
TOKENS: dict[str, str] = {}  # role -> a token of the module's cluster
keys_timeout_s = 120.0


def tag(shard: int, salt: str) -> str:
    return "{" + ids_on_shard(shard, SHARDS, salt)[0] + "}"


def get(cluster: LocalCluster, node: str, path: str) -> Any:
    status, _, body = launcher.http_request("GET", cluster.urls[node] + path, token=TOKENS["auditor"])
    assert status == 200, (path, status, body)
    return body


def cli(*args: str) -> tuple[int, dict[str, Any]]:
    """``raftledger audit`` with the auditor's token, ``raftledger verify`` with the admin's."""
    token = TOKENS["admin" if args[0] == "verify" else "auditor"]
    done = subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", *args, "--json"],
                          capture_output=True, text=True, timeout=audit_timeout_s,
                          env=os.environ | {"RAFTLEDGER_TOKEN": token})
    try:
        return done.returncode, json.loads(done.stdout)
    except json.JSONDecodeError:
        failed = f"{args}: {done.returncode} {done.stdout[-2000:]} {done.stderr[-2000:]}"
        raise AssertionError(failed) from None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("integrity")), nodes=3, shards=SHARDS,
                           durability="none", credentials=True)
    try:
        cluster.start()
        TOKENS["admin"] = cluster.admin_token
        with cluster.client() as client:
            TOKENS["auditor"] = client.request("POST", "/v1/tokens", json={"name": "auditor",
                                                                          "role": "auditor"})["token"]
        yield cluster
    finally:
        TOKENS.clear()
        cluster.close()


@pytest.fixture(scope="module")
def ledger(cluster: LocalCluster) -> dict[str, str]:
    """Accounts on both shards; single-shard, held, posted and cross-shard transactions."""
    t0, t1 = tag(0, "i"), tag(1, "i")
    names = {"a0": f"alice{t0}", "b0": f"bob{t0}", "a1": f"carol{t1}"}
    with cluster.client() as client:
        for account_id in names.values():
            client.create_account(**account_body(account_id))
        for n in range(6):
            client.transfer(names["a0"], names["b0"], 10 + n, "BRL", id=f"t{n}{t0}")
        client.transfer(names["b0"], names["a0"], 5, "BRL", id=f"hold{t0}", pending=True)
        client.post(f"hold{t0}")
        client.transfer(names["a0"], names["a1"], 7, "BRL", id=f"x{t1}")
    return {**names, "tx": f"t0{t0}", "cross": f"x{t1}", "hold": f"hold{t0}"}


def keys_file(cluster: LocalCluster, path: Path) -> Path:
    listed = launcher.wait_until(
        lambda: (lambda k: k if {x["node"] for x in k["keys"]} == set(cluster.node_ids) and
                 all(n in json.dumps(get(cluster, n, "/v1/keys")) for n in cluster.node_ids) else None)(
            get(cluster, "n0", "/v1/keys")), keys_timeout_s, "every node's key in the map")
    path.write_text(json.dumps(listed))
    return path


def test_every_node_publishes_its_key_and_keeps_it_private(cluster: LocalCluster, tmp_path: Path) -> None:
    listed = json.loads(keys_file(cluster, tmp_path / "keys.json").read_text())["keys"]
    import hashlib
    for key in listed:
        raw = bytes.fromhex(key["public_key"])
        assert len(raw) == 32 and key["key_id"] == hashlib.sha256(raw).digest()[:8].hex()
        assert key["algorithm"] == "ed25519" and key["retired_at"] is None
    for node in cluster.node_ids:
        mode = os.stat(os.path.join(cluster.data_dir, node, "signing-keys.json")).st_mode
        assert stat.S_IMODE(mode) == 0o600


def test_replicas_agree_on_every_leaf_and_root(cluster: LocalCluster, ledger: dict[str, str]) -> None:
    for shard in range(SHARDS):
        size = get(cluster, "n0", f"/v1/shards/{shard}/tree-head")["tree_size"]
        assert size > 0
        heads = [get(cluster, n, f"/v1/shards/{shard}/tree-head?tree_size={size}") for n in cluster.node_ids]
        assert len({h["root"] for h in heads}) == 1
        assert all(len({s["node"] for s in h["signatures"]}) >= 2 for h in heads)
        for index in range(size):
            leaves = {get(cluster, n, f"/v1/shards/{shard}/leaves/{index}/proof?tree_size={size}")["leaf"]
                      for n in cluster.node_ids}
            assert len(leaves) == 1


def test_proof_of_unknown_transaction_and_bad_sizes_are_4xx(cluster: LocalCluster,
                                                            ledger: dict[str, str]) -> None:
    url, token = cluster.urls["n1"], TOKENS["auditor"]
    for path, status in (("/v1/transactions/nope/proof", 404),
                         ("/v1/shards/0/tree-head?tree_size=99999999", 404),
                         ("/v1/shards/0/consistency?first=5&second=2", 400),
                         ("/v1/shards/0/consistency?first=x&second=2", 400), ("/v1/shards/9/tree-head", 404)):
        assert launcher.http_request("GET", url + path, token=token)[0] == status, path
    assert launcher.http_request("GET", url + "/v1/shards/0/tree-head")[0] == 401


def test_audit_passes_then_checks_consistency_with_the_saved_head(cluster: LocalCluster,
                                                                   ledger: dict[str, str],
                                                                   tmp_path: Path) -> None:
    keys = keys_file(cluster, tmp_path / "keys.json")
    state = tmp_path / "state.json"
    args = ("audit", "--endpoint", cluster.urls["n2"], "--keys", str(keys), "--state", str(state),
            "--tx", ledger["tx"], "--tx", ledger["cross"], "--tx", ledger["hold"],
            "--account", ledger["a0"], "--account", ledger["a1"], "--sample", "4")
    code, report = cli(*args)
    assert code == 0, report["failures"]
    assert any(c.startswith(f"account {ledger['a0']}") for c in report["checks"])
    saved = json.loads(state.read_text())["heads"]
    with cluster.client() as client:
        client.transfer(ledger["a0"], ledger["b0"], 3, "BRL", id=f"more{tag(0, 'i')}")
    code, report = cli(*args)
    assert code == 0, report["failures"]
    assert any("consistent with the head saved" in c for c in report["checks"])
    assert json.loads(state.read_text())["heads"]["0"]["tree_size"] > saved["0"]["tree_size"]


def test_forged_or_truncated_history_fails_the_consistency_check(cluster: LocalCluster,
                                                                ledger: dict[str, str],
                                                                tmp_path: Path) -> None:
    keys = keys_file(cluster, tmp_path / "keys.json")
    head = get(cluster, "n0", "/v1/shards/0/tree-head")
    forged = {"heads": {"0": {**head, "root": "ab" * 32, "tree_size": head["tree_size"] - 1}}}
    longer = {"heads": {"0": {**head, "tree_size": head["tree_size"] + 5}}}  # the server lost leaves
    for name, state in (("forged", forged), ("truncated", longer)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(state))
        code, report = cli("audit", "--endpoint", cluster.urls["n0"], "--keys", str(keys),
                           "--state", str(path), "--sample", "0")
        assert code == 1, name
        assert any("shard 0: consistent" in f for f in report["failures"]), report
        assert json.loads(path.read_text()) == state  # a failed audit keeps the head it trusted


def test_untrusted_keys_fail_the_signature_check(cluster: LocalCluster, ledger: dict[str, str],
                                                 tmp_path: Path) -> None:
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                 serialization.PublicFormat.Raw)
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"keys": [{"node": "n0", "key_id": hashlib.sha256(raw).digest()[:8].hex(),
                                          "algorithm": "ed25519", "public_key": raw.hex()}]}))
    code, report = cli("audit", "--endpoint", cluster.urls["n0"], "--keys", str(path), "--sample", "0")
    assert code == 1 and any("trusted signatures" in f for f in report["failures"]), report


def test_rotated_key_signs_new_heads_and_the_old_one_stays_published(cluster: LocalCluster,
                                                                     ledger: dict[str, str],
                                                                     tmp_path: Path) -> None:
    before = {k["key_id"] for k in get(cluster, "n0", "/v1/keys")["keys"] if k["node"] == "n1"}
    done = subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", "keys", "rotate", "--node", "n1",
                           "--data-dir", cluster.data_dir], capture_output=True, text=True,
                          timeout=audit_timeout_s)
    assert done.returncode == 0, done.stderr

    def rotated() -> list[dict[str, Any]] | None:
        mine = [k for k in get(cluster, "n2", "/v1/keys")["keys"] if k["node"] == "n1"]
        return mine if len(mine) == len(before) + 1 else None
    keys = launcher.wait_until(rotated, keys_timeout_s, "n1's new key in every node's /v1/keys")
    old, new = keys[-2], keys[-1]
    assert old["key_id"] in before and old["retired_at"] is not None and new["retired_at"] is None
    assert new["valid_from"] >= old["retired_at"]
    with cluster.client() as client:
        client.transfer(ledger["a0"], ledger["b0"], 2, "BRL", id=f"rot{tag(0, 'i')}")
    head = launcher.wait_until(
        lambda: (lambda h: h if any(s["key_id"] == new["key_id"] for s in h["signatures"]) else None)(
            get(cluster, "n1", "/v1/shards/0/tree-head")), keys_timeout_s, "a head signed by the new key")
    assert all(s["key_id"] != old["key_id"] for s in head["signatures"])
    trusted = keys_file(cluster, tmp_path / "keys.json")
    code, report = cli("audit", "--endpoint", cluster.urls["n1"], "--keys", str(trusted),
                       "--min-signatures", "3", "--sample", "2")
    assert code == 0, report["failures"]


def _store_path(cluster: LocalCluster, node: str, shard: int) -> str:
    directory = os.path.join(cluster.data_dir, node, f"shard-{shard}")
    current = os.path.join(directory, "CURRENT")  # absent: generation 0 (node/store_slot.py)
    generation = int(Path(current).read_text().strip()) if os.path.exists(current) else 0
    return os.path.join(directory, f"state.{generation}.mdb")


def _tamper(path: str, txid: str, account_id: str) -> None:
    """Move one more unit on both sides of ``txid``'s record (it still balances), and change the amount
    of ``account_id``'s first entry."""
    env = lmdb.open(path, subdir=False, max_dbs=32, map_size=os.path.getsize(path))
    try:
        with env.begin(write=True) as txn:
            transactions, accounts = env.open_db(b"transactions", txn=txn), env.open_db(b"accounts", txn=txn)
            entries = env.open_db(b"entries", txn=txn)
            tx = unpack_transaction(txn.get(txid.encode(), db=transactions))
            bumped = tuple(type(e)(e.account_id, e.direction, e.amount + 1, e.currency, e.seq, e.hash)
                           for e in tx.entries)
            txn.put(txid.encode(), pack_transaction(type(tx)(tx.id, tx.status, bumped, tx.code, tx.metadata,
                                                            tx.timestamp)), db=transactions)
            num = unpack_account(account_id, txn.get(account_id.encode(), db=accounts)).num
            key = num.to_bytes(8, "big") + (1).to_bytes(8, "big")
            raw = bytearray(txn.get(key, db=entries))
            raw[8:16] = (int.from_bytes(raw[8:16], "big") + 1).to_bytes(8, "big")  # the amount
            assert len(raw) >= ENTRY.size
            txn.put(key, bytes(raw), db=entries)
    finally:
        env.close()


def test_tampering_with_one_replica_is_found_by_audit_and_verify(cluster: LocalCluster,
                                                                 ledger: dict[str, str],
                                                                 tmp_path: Path) -> None:
    keys = keys_file(cluster, tmp_path / "keys.json")
    victim = "n2"
    assert cluster.stop(victim) == 0
    _tamper(_store_path(cluster, victim, 0), ledger["tx"], ledger["a0"])
    cluster.start_node(victim)
    cluster.wait_ready()
    code, report = cli("audit", "--endpoint", cluster.urls[victim], "--keys", str(keys),
                       "--tx", ledger["tx"], "--account", ledger["a0"], "--sample", "0")
    assert code == 1
    failures = "\n".join(report["failures"])
    assert f"transaction {ledger['tx']}" in failures and "differs from the signed leaf" in failures
    assert f"account {ledger['a0']}: hash chain breaks at seq 1" in failures
    code, report = cli("verify", "--endpoint", cluster.urls["n0"])
    assert code == 1
    problems = "\n".join(report["problems"])
    assert f"shard 0 on {victim}" in problems
    assert "differs from its leaf" in problems, problems
