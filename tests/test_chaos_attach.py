"""``raftledger chaos --data-dir DIR`` on a cluster already running there: the harness finds the
node processes, kills and restarts them with their own command lines, pauses them and churns
replicas (the proxy-based faults are left out, and said so), every checker passes, and the cluster
is left running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from raftledger.cluster import launcher
from raftledger.cluster.chaos.attach import ATTACHED_KINDS, AttachedCluster, AttachError
from raftledger.cluster.chaos.runner import Options, run
from raftledger.cluster.testing import LocalCluster

pytestmark = pytest.mark.slow

attach_seed = 4  # its first 40 s plan kills, churn and a pause, and proxy faults to leave out
attach_duration_s = 40.0


def test_a_run_attached_to_a_running_cluster_passes_every_checker(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    cluster = LocalCluster(data, nodes=3, shards=2, credentials=True)
    try:
        cluster.start()
        lines: list[str] = []
        result = run(Options(duration_s=attach_duration_s, seed=attach_seed, data_dir=str(data),
                             out=str(tmp_path / "out")), say=lines.append)
        report = "\n".join(lines)
        assert result.ok, report
        assert any("attached to the running cluster" in line for line in lines), report
        skipped = next(line for line in lines if "skipped" in line)  # the seed plans proxy kinds too
        assert any(kind in skipped for kind in ("isolate", "blackhole", "split", "bridge", "slow")), report
        history = json.loads((tmp_path / "out" / "history.json").read_text())
        kinds = {f["kind"] for f in history["faults"]}
        assert kinds <= ATTACHED_KINDS and "kill" in kinds, kinds
        assert result.summary["verdicts"]["reads"]["stats"]["reads"]["conservation"] > 0, report
        plan = launcher.load_plan(str(data))
        assert plan is not None
        for node in cluster.node_ids:  # left running, restarted ones included, as cluster.json says
            assert launcher.is_running(plan.pids[node]), node
    finally:
        cluster.close()
        _stop_recorded(data)


def test_attaching_to_a_cluster_with_a_node_down_says_which(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    cluster = LocalCluster(data, nodes=3, shards=1, durability="none")
    try:
        cluster.start()
        cluster.stop("n1")
        with pytest.raises(AttachError, match="n1"):
            AttachedCluster(str(data))
    finally:
        cluster.close()


def _stop_recorded(data: Path) -> None:
    """The nodes the run restarted are not the test cluster's children: stop them by their pids."""
    plan = launcher.load_plan(str(data))
    if plan is None:
        return
    for node, pid in plan.pids.items():
        launcher.stop_pid(pid, launcher.node_config_path(plan, node))
