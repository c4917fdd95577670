"""A full disk under one replica (the chaos harness's ``disk`` fault), on real node processes whose
data directories are small ext4 filesystems of their own (``cluster.chaos.disks``; needs root, as CI
runs)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from raftledger.cluster.chaos.disks import Disks, unavailable_reason
from raftledger.cluster.testing import LocalCluster
from raftledger.node.files import disk_failed_exit_status

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def mounting_works() -> None:
    """CI runs as root with e2fsprogs (.ci/run): a machine that cannot mount fails here, loudly."""
    assert unavailable_reason() is None, unavailable_reason()

small_disk_bytes = 32 << 20
deadline_s = 90.0
transfers_max = 2000


@pytest.fixture
def cluster_on_disks(tmp_path: Path):
    cluster = LocalCluster(tmp_path / "data", nodes=3, shards=1, credentials=True)
    cluster.log_dir = str(tmp_path / "logs")  # a full data disk must not swallow the log line saying so
    disks = Disks(str(tmp_path / "images"), small_disk_bytes)
    try:
        for node in cluster.node_ids:
            disks.mount(node, os.path.join(cluster.data_dir, node))
        cluster.start()
        yield cluster, disks
    finally:
        cluster.close()
        assert disks.close() == []


def test_disks_fill_to_enospc_and_drain(tmp_path: Path) -> None:
    disks = Disks(str(tmp_path / "images"), small_disk_bytes)
    try:
        disks.mount("n0", str(tmp_path / "n0"))
        free = disks.free_bytes("n0")
        assert disks.fill("n0") >= free - 4096
        assert disks.free_bytes("n0") == 0
        with pytest.raises(OSError), open(tmp_path / "n0" / "more", "wb") as f:
            f.write(b"x" * 8192)
            f.flush()
            os.fsync(f.fileno())
        disks.drain("n0")
        assert disks.free_bytes("n0") >= free - 64 * 1024
    finally:
        assert disks.close() == []
    assert not os.path.ismount(tmp_path / "n0")


def test_a_replica_whose_disk_fills_stops_cleanly_and_catches_up_once_restarted(cluster_on_disks) -> None:
    """Before: the Raft journal is an mmap grown sparse, so the first entry a full disk could not back
    killed the node with SIGBUS, saying nothing; an exception of the journal (an mmap write past the
    map) was logged by PySyncObj, which went on with the entry in memory only and later truncated
    applied entries. Now the journal allocates ahead and any failure of the journal or an apply on
    the disk exits with a status and a log line that say so; the others go on, and the restarted
    replica converges."""
    cluster, disks = cluster_on_disks
    leader = cluster.leader(0)
    victim = next(n for n in cluster.node_ids if n != leader)
    acknowledged: list[str] = []
    with cluster.client() as client:
        client.create_account(id="payer", currency="USD")
        client.create_account(id="payee", currency="USD")
        disks.fill(victim)
        deadline = time.monotonic() + deadline_s
        for n in range(transfers_max):
            if cluster.procs[victim].poll() is not None or time.monotonic() > deadline:
                break
            client.transfer("payer", "payee", 1, "USD", id=f"t{n}")
            acknowledged.append(f"t{n}")
        status = cluster.procs[victim].poll()
        assert status == disk_failed_exit_status, status  # not -SIGBUS, not running on
        assert "disk full" in cluster.log(victim)
        for n in range(len(acknowledged), len(acknowledged) + 20):  # two of three still commit
            client.transfer("payer", "payee", 1, "USD", id=f"t{n}")
            acknowledged.append(f"t{n}")
        disks.drain(victim)
        cluster.start_node(victim)
        cluster.wait_converged(0, deadline_s)
        statement = client.entries("payee", consistency="linearizable")
        assert sorted(e.transaction_id for e in statement) == sorted(acknowledged)
        assert client.balance("payee", consistency="linearizable").credits_posted == len(acknowledged)
        assert cluster.status(victim)["shards"]["0"]["applied_index"] > 0
