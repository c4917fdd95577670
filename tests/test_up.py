"""``raftledger up``: starts a cluster, shows a transfer, stops on SIGTERM, resumes from cluster.json."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from raftledger.cluster import launcher
from raftledger.cluster.testing import UpProcess
from raftledger.node.testing import consecutive_free_ports

pytestmark = pytest.mark.slow

up_timeout_s = 90.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def running_up(data_dir: str, port_base: int) -> Iterator[UpProcess]:
    """``raftledger up`` until its cluster is up, then (on leaving) SIGTERM and a clean exit."""
    up = UpProcess("--nodes", "3", "--shards", "2", "--data-dir", data_dir, "--port-base", str(port_base),
                   "--durability", "none", timeout_s=up_timeout_s)
    try:
        up.wait_for("cluster is up")
        yield up
    finally:
        assert up.stop() == 0


def test_up_runs_a_cluster_shows_a_transfer_and_resumes_it(tmp_path):
    data_dir = str(tmp_path / "data")
    base = consecutive_free_ports(3)
    with running_up(data_dir, base) as first:
        with open(os.path.join(data_dir, "cluster.json")) as f:
            plan = json.load(f)
        pids = [n["pid"] for n in plan["nodes"]]
        assert [n["http"] for n in plan["nodes"]] == [f"http://127.0.0.1:{base + i}" for i in range(3)]
        assert all(pid_alive(p) for p in pids)
        assert any("bob:{demo}: balance 1500 USD" in line for line in first.lines)
        secret_file = os.path.join(data_dir, "cluster.secret")
        assert os.stat(secret_file).st_mode & 0o777 == 0o600
        with open(secret_file) as f:
            assert f.read().strip() not in json.dumps(plan)  # the plan names the file, never the secret
        # credentials on by default: the first admin token, in a file only its owner reads
        assert plan["admin_token"].startswith("rlt_")
        assert os.stat(os.path.join(data_dir, "cluster.json")).st_mode & 0o777 == 0o600
        assert any('"admin_token" in ' in line for line in first.lines)
        assert not any(plan["admin_token"] in line for line in first.lines)
        no_token, _, body = launcher.http_request("GET", f"http://127.0.0.1:{base}/v1/cluster/map")
        assert (no_token, body["error"]["code"]) == (401, "unauthorized")
        assert launcher.http_request("GET", f"http://127.0.0.1:{base}/v1/cluster/map",
                                     token=plan["admin_token"])[0] == 200
    assert not any(pid_alive(p) for p in pids)
    with running_up(data_dir, base) as second:
        assert any("resuming the cluster" in line for line in second.lines)
        assert any("demo-transfer-1:{demo}: ok (replayed)" in line for line in second.lines), second.lines


def test_up_resumes_a_cluster_planned_before_nodes_had_a_secret_and_an_internal_port(tmp_path):
    data_dir = str(tmp_path / "data")
    base = consecutive_free_ports(3)
    with running_up(data_dir, base):
        pass
    path = os.path.join(data_dir, "cluster.json")
    with open(path) as f:
        plan = json.load(f)
    plan["version"] = 1  # as an earlier release wrote it
    del plan["secret_file"]
    for node in plan["nodes"]:
        del node["internal"]
    with open(path, "w") as f:
        json.dump(plan, f)
    os.remove(os.path.join(data_dir, "cluster.secret"))
    with running_up(data_dir, base) as second:
        assert any("demo-transfer-1:{demo}: ok (replayed)" in line for line in second.lines), second.lines
    with open(path) as f:
        upgraded = json.load(f)
    assert upgraded["version"] == 3 and all(n["internal"] for n in upgraded["nodes"])
    assert all(n["meta"] for n in upgraded["nodes"]) and upgraded["slot_layout"] == "modulo"
    assert os.path.exists(os.path.join(data_dir, "cluster.secret"))


def test_up_refuses_a_port_already_in_use(tmp_path):
    import socket

    base = consecutive_free_ports(3)
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", base + 1))
        held.listen()
        out = subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", "up", "--data-dir",
                              str(tmp_path), "--port-base", str(base)],
                             capture_output=True, text=True, timeout=up_timeout_s)
    assert out.returncode == 2
    assert f"ports already in use: 127.0.0.1:{base + 1}" in out.stderr
