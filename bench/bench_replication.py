"""Replicated transfer throughput and commit latency on a local 3-node cluster.

    python -m raftledger.bench.bench_replication [--durability fsync] [--cases 1:3000:64,...]

For each case (requests per Raft entry, transfers, requests in flight) it starts a fresh 3-node x
2-shard cluster on loopback, then asks each shard's leader to run the in-process load generator
(``bench/load.py``) at the same time: two-entry transfers between 1000 accounts, submitted straight
to the leader's batcher. Latency is submit -> committed (a majority has the entry on disk) and applied
on the leader. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import tempfile
import time

from raftledger.bench.host import machine, process_cpu_s
from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster
from raftledger.node.http.internal import BENCH_ENV
from raftledger.node.settings import BatchingSettings, NodeSettings, SnapshotSettings

SHARDS = 2
NODES = 3
# Cases: batch_requests_max:transfers per shard:requests kept in flight per shard.
CASES_DEFAULT = "1:3000:64,100:20000:500,1000:40000:1000,1000:60000:5000"
bench_timeout_s = 600.0
poll_timeout_s = 10.0


def run_shard(cluster: LocalCluster, shard: int, transfers: int, concurrency: int) -> dict:
    leader = cluster.leader(shard)
    params = {"transfers": transfers, "concurrency": concurrency, "prefix": f"s{shard}."}
    status, started = cluster.call(leader, f"/shards/{shard}/bench", params)
    assert status == 200, started

    def finished() -> dict | None:
        try:
            status, result = launcher.call_internal(cluster.plan, leader, f"/bench/{started['run']}",
                                                    timeout_s=poll_timeout_s)
        except OSError:  # the node is busy running the load: ask again
            return None
        return result if status == 200 and result["done"] else None
    return launcher.wait_until(finished, bench_timeout_s, f"the load on shard {shard}")


def run_case(batch: int, transfers: int, concurrency: int, durability: str, directory: str) -> dict:
    """One case on a fresh cluster in an empty ``directory`` (a reused one would answer every
    transfer of a repeated case as an idempotent replay)."""
    settings = NodeSettings(batching=BatchingSettings(requests_max=batch),
                            snapshots=SnapshotSettings(log_compaction_entries_min=100_000))
    assert not os.path.exists(directory), directory
    cluster = LocalCluster(directory, nodes=NODES, shards=SHARDS, durability=durability,
                           settings=settings)
    with cluster, concurrent.futures.ThreadPoolExecutor(SHARDS) as pool:
        leaders = [cluster.leader(s) for s in range(SHARDS)]
        pids = [proc.pid for proc in cluster.procs.values()]
        cpu_before = sum(process_cpu_s(pid) for pid in pids)
        started = time.perf_counter()
        results = list(pool.map(lambda s: run_shard(cluster, s, transfers, concurrency),
                                range(SHARDS)))
        wall = time.perf_counter() - started
        cpu = sum(process_cpu_s(pid) for pid in pids) - cpu_before
    done = sum(r["transfers"] for r in results)
    return {"batch": batch, "concurrency": concurrency, "transfers": done,
            "failures": sum(r["failures"] for r in results),
            "per_s": done / wall, "p50_ms": max(r["p50_ms"] for r in results),
            "p99_ms": max(r["p99_ms"] for r in results),
            "entries": sum(r["entries"] for r in results), "wall_s": wall, "leaders": leaders,
            "cpu_us": cpu / done * 1e6 if done else 0.0,
            "reasons": [r["failure_reasons"] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--durability", default="fsync", choices=("fsync", "none"))
    parser.add_argument("--cases", default=CASES_DEFAULT,
                        help="batch:transfers-per-shard:in-flight-per-shard, comma separated")
    args = parser.parse_args()
    os.environ[BENCH_ENV] = "1"
    print(f"machine: {machine()}; {NODES} nodes x {SHARDS} shards on loopback, durability "
          f"{args.durability}\n")
    print("| batch_requests_max | in flight per shard | transfers | transfers/s | p50 ms | p99 ms "
          "| Raft entries | failures | node CPU µs/transfer | shard leaders |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="raftledger-bench-") as root:
        for n, case in enumerate(args.cases.split(",")):
            batch, transfers, concurrency = (int(x) for x in case.split(":"))
            r = run_case(batch, transfers, concurrency, args.durability, os.path.join(root, f"case{n}"))
            print(f"| {r['batch']} | {r['concurrency']} | {r['transfers']} | {r['per_s']:,.0f} | "
                  f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['entries']} | {r['failures']} | "
                  f"{r['cpu_us']:.0f} | {', '.join(r['leaders'])} |",
                  flush=True)
            if r["failures"]:
                print(f"failure reasons: {r['reasons']}", flush=True)


if __name__ == "__main__":
    main()
