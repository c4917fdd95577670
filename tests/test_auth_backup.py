"""A backup keeps the token hashes of the cluster map (never a secret): a token created before the
backup works on the cluster restored from it, and a token revoked before it stays revoked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster, UpProcess
from raftledger.node.testing import consecutive_free_ports

pytestmark = pytest.mark.slow

cli_timeout_s = 240.0


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", *args],
                          capture_output=True, text=True, timeout=cli_timeout_s)


def test_a_token_created_before_a_backup_works_on_the_restored_cluster(tmp_path):
    with LocalCluster(tmp_path / "source", nodes=3, shards=2, durability="none",
                      credentials=True) as source:
        url = source.urls["n0"]
        with source.client() as ledger:
            kept = ledger.request("POST", "/v1/tokens", json={"name": "kept", "role": "writer"})
            gone = ledger.request("POST", "/v1/tokens", json={"name": "gone", "role": "reader"})
            ledger.request("DELETE", f"/v1/tokens/{gone['id']}")
            ledger.create_account(id="before-backup", currency="USD")
        backup_dir = str(tmp_path / "backup")
        done = cli("backup", backup_dir, "--endpoint", url, "--token", source.admin_token, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
    for name in os.listdir(backup_dir):  # hashes only: no secret is written anywhere in the backup
        with open(os.path.join(backup_dir, name), "rb") as f:
            data = f.read()
        for secret in (kept["token"], gone["token"], source.admin_token):
            assert secret.encode() not in data, name

    restored = str(tmp_path / "restored")
    done = cli("restore", backup_dir, "--data-dir", restored, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    up = UpProcess("--data-dir", restored, "--port-base", str(consecutive_free_ports(3)),
                   "--durability", "none", "--no-demo")
    try:
        up.wait_for("cluster is up")
        with open(os.path.join(restored, "cluster.json")) as f:
            plan = json.load(f)
        new_admin = plan["admin_token"]
        assert new_admin != source.admin_token
        restored_url = plan["nodes"][0]["http"]
        status, body = launcher.http_json("GET", f"{restored_url}/v1/accounts/before-backup",
                                          token=kept["token"])
        assert status == 200 and body["id"] == "before-backup", body
        status, body = launcher.http_json("POST", f"{restored_url}/v1/accounts",
                                          json.dumps({"id": "after-restore", "currency": "USD"}).encode(),
                                          token=kept["token"])
        assert status == 201, body
        assert launcher.http_json("GET", f"{restored_url}/v1/accounts/before-backup",
                                  token=gone["token"])[0] == 401
        status, listed = launcher.http_json("GET", f"{restored_url}/v1/tokens", token=new_admin)
        assert status == 200 and kept["id"] in {t["id"] for t in listed["tokens"]}
    finally:
        assert up.stop() == 0
