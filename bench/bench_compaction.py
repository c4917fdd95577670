"""Write pause while a shard with 1M ledger entries compacts its Raft log (LMDB snapshot).

    python -m raftledger.bench.bench_compaction [--transfers 500000]

Builds one shard replica (a one-member Raft group, fsync durability, in this process) holding
``transfers`` two-entry transfers (2 x transfers ledger entries) through the normal replicated path.
Then a probe writes one transfer at a time (each its own Raft entry, committed and applied) while
``forceLogCompaction`` runs the snapshot; it reports the probe's latency before and during the snapshot,
the snapshot's duration and size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from raftledger.bench.load import percentile, run_load, transfer
from raftledger.cluster.launcher import free_port
from raftledger.node.replica import ReplicaService, ReplicaSettings

baseline_s = 3.0
snapshot_timeout_s = 600.0
leader_timeout_s = 10.0


async def wait_leader(service: ReplicaService) -> None:
    deadline = time.monotonic() + leader_timeout_s
    while not service.is_leader():
        if time.monotonic() > deadline:
            raise RuntimeError("no leader")
        await asyncio.sleep(0.01)


async def probe(service: ReplicaService, prefix: str, until: asyncio.Event | float) -> list[float]:
    """Sequential single-transfer writes until ``until`` (a deadline or an event)."""
    latencies = []
    i = 0
    while not (until.is_set() if isinstance(until, asyncio.Event) else time.monotonic() > until):
        started = time.perf_counter()
        committed = await service.submit(transfer(f"{prefix}{i}", "s.0", "s.1"))
        assert committed.outcome.ok, committed.outcome
        latencies.append(time.perf_counter() - started)
        i += 1
    return latencies


async def watch_snapshot(service: ReplicaService, done: asyncio.Event) -> float:
    snapshotter = service.replica.snapshotter
    before = snapshotter.completed
    started = time.monotonic()
    service.replica.forceLogCompaction()
    while time.monotonic() - started < snapshot_timeout_s and snapshotter.completed == before:
        await asyncio.sleep(0.005)
    done.set()
    return time.monotonic() - started


def summary(name: str, latencies: list[float]) -> str:
    latencies = sorted(latencies)
    return (f"| {name} | {len(latencies)} | {percentile(latencies, 0.5) * 1e3:.1f} | "
            f"{percentile(latencies, 0.99) * 1e3:.1f} | {latencies[-1] * 1e3:.1f} |")


async def main_async(transfers: int) -> None:
    with tempfile.TemporaryDirectory(prefix="raftledger-compaction-") as root:
        settings = ReplicaSettings(shard=0, self_address=f"127.0.0.1:{free_port()}",
                                   partner_addresses=(), directory=root,
                                   raft_key=os.urandom(32), log_compaction_entries_min=10_000_000,
                                   log_compaction_interval_s=1e9)
        service = ReplicaService(settings, "n0")
        try:
            await wait_leader(service)
            started = time.monotonic()
            load = await run_load(service, transfers=transfers, concurrency=5000, prefix="s.")
            print(f"populated {load['transfers']} transfers ({2 * load['transfers']} ledger entries) "
                  f"in {time.monotonic() - started:.0f}s; journal {len(service.replica.journal)} entries")
            before = await probe(service, "p", time.monotonic() + baseline_s)
            done = asyncio.Event()
            during, took = await asyncio.gather(probe(service, "q", done),
                                                watch_snapshot(service, done))
            size = os.path.getsize(service.replica.snapshotter.dump_file)
            print(f"snapshot: {took:.2f}s, {size / 2**20:.0f} MiB, journal now "
                  f"{len(service.replica.journal)} entries\n")
            print("| probe writes | count | p50 ms | p99 ms | max ms |")
            print("|---|---:|---:|---:|---:|")
            print(summary("before compaction", before))
            print(summary("during compaction", during))
        finally:
            await service.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transfers", type=int, default=500_000)
    args = parser.parse_args()
    import uvloop

    uvloop.run(main_async(args.transfers))


if __name__ == "__main__":
    main()
