"""The benchmarks' own parts: the in-process load generator (against a one-member Raft group), the HTTP
load's draw, the floor server, one replication case and one failover round on real clusters."""

from __future__ import annotations

import json

from raftledger.bench import bench_replication, failover
from raftledger.bench.load import run_load
from raftledger.cluster.testing import LocalCluster
from raftledger.node.http.internal import BENCH_ENV
from raftledger.node.testing import ReplicaGroup, consecutive_free_ports


async def test_load_generator_keeps_its_clients_busy_and_counts_every_transfer(tmp_path):
    group = ReplicaGroup(str(tmp_path), size=1)
    group.start_all()
    try:
        leader = await group.leader()
        result = await run_load(leader, transfers=300, concurrency=30, prefix="b.", accounts=20)
        assert (result["transfers"], result["failures"]) == (300, 0)
        assert 1 <= result["entries"] < 300  # concurrent clients share Raft entries
        assert 0 < result["p50_ms"] <= result["p99_ms"]
        with leader.store.reader() as r:
            credits = sum(r.balance(f"b.{i}").credits_posted for i in range(20))
        assert credits == 300  # every transfer moves 1
    finally:
        await group.stop_all()


async def test_load_generator_counts_replays_as_failures(tmp_path):
    """Run twice with the same ids: the second run moves no money and must not look like work."""
    group = ReplicaGroup(str(tmp_path), size=1)
    group.start_all()
    try:
        leader = await group.leader()
        await run_load(leader, transfers=50, concurrency=10, prefix="r.", accounts=5)
        again = await run_load(leader, transfers=50, concurrency=10, prefix="r.", accounts=5)
        assert again["transfers"] == 0 and again["failure_reasons"] == {"replayed": 50}
    finally:
        await group.stop_all()


def test_http_load_draws_direct_transfers_from_the_shard_it_sends_them_to():
    import random

    from raftledger.bench.loadgen import Workload
    from raftledger.cluster.router import shard_for_account

    work = Workload(["http://n0"], "batch", 10, 64, "d")
    work.shard_count = 2
    rng = random.Random(0)
    for shard in (0, 1):
        for _ in range(50):
            t = work.transfer(rng, shard)
            assert t["debit_account_id"] != t["credit_account_id"]
            assert {shard_for_account(t[k], 2) for k in ("debit_account_id", "credit_account_id")} \
                == {shard}
            assert type(t["amount"]) is int and t["amount"] > 0


def test_http_floor_serves_and_reports_the_servers_cpu(capsys):
    from raftledger.bench import http_floor

    base = consecutive_free_ports(http_floor.servers, first=23000)
    http_floor.main(["--duration", "1", "--warmup", "0", "--connections", "4",
                     "--port-base", str(base)])
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] > 0 and set(result["statuses"]) == {"201"}
    assert result["server_cpu_us_per_request"] > 0


def test_bench_replication_runs_a_small_case_on_a_real_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv(BENCH_ENV, "1")
    result = bench_replication.run_case(10, 40, 4, "none", str(tmp_path / "case"))
    assert (result["transfers"], result["failures"]) == (40 * bench_replication.SHARDS, 0)
    assert result["entries"] >= 40 * bench_replication.SHARDS // 10


def test_bench_failover_measures_one_round_and_starts_the_killed_node_again(tmp_path):
    with LocalCluster(tmp_path / "data", nodes=3, shards=1, durability="none") as cluster:
        old = cluster.leader(failover.SHARD)
        elapsed, elections = failover.one_round(cluster, quiet_s=0.0)
        assert 0 < elapsed < failover.new_leader_timeout_s and elections >= 1
        assert old in cluster.procs and cluster.status(old) is not None  # started again, answering
