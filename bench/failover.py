"""Time to a new leader after the leader's node is killed, on a quiet local cluster.

    python -m raftledger.bench.failover [--rounds 10] [--nodes 3] [--quiet-s 5]

Each round: the cluster has been quiet for ``--quiet-s``, longer than the Raft connection timeout
(3 s), so the followers' connections to each other have carried nothing meanwhile; then SIGKILL the
node of shard 0's leader, and ask the other replicas of shard 0 every 20 ms until one leads at a
higher term. It prints, per round, the seconds to the new leader and the elections that took (the
new term minus the old), then the median and the worst. The killed node is started again, and the
next round waits until it follows. One shard and no load: the figure is Raft's timing alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

from raftledger.bench.host import machine
from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster

SHARD = 0
poll_s = 0.02
new_leader_timeout_s = 30.0


def shard_view(cluster: LocalCluster, node_id: str) -> dict[str, Any] | None:
    status = cluster.status(node_id)
    return None if status is None else status["shards"].get(str(SHARD))


def one_round(cluster: LocalCluster, quiet_s: float) -> tuple[float, int]:
    old = cluster.leader(SHARD)
    def everyone_follows() -> bool:
        return all((shard_view(cluster, n) or {}).get("leader") == old for n in cluster.procs)
    launcher.wait_until(everyone_follows, new_leader_timeout_s, "every replica to follow the leader")
    old_term = int((shard_view(cluster, old) or {})["term"])
    time.sleep(quiet_s)  # the quiet is what is measured against, not a wait for something
    cluster.kill(old)
    killed_at = time.monotonic()
    while time.monotonic() - killed_at < new_leader_timeout_s:
        for node_id in cluster.procs:
            view = shard_view(cluster, node_id)
            if view is not None and view["role"] == "leader" and int(view["term"]) > old_term:
                elapsed = time.monotonic() - killed_at
                cluster.start_node(old)
                return elapsed, int(view["term"]) - old_term
        time.sleep(poll_s)
    raise RuntimeError(f"no new leader of shard {SHARD} within {new_leader_timeout_s:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--quiet-s", type=float, default=5.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    seconds, elections = [], []
    with tempfile.TemporaryDirectory(prefix="raftledger-failover-") as root, \
            LocalCluster(root, nodes=args.nodes, shards=1) as cluster:
        for i in range(args.rounds):
            elapsed, terms = one_round(cluster, args.quiet_s)
            seconds.append(elapsed)
            elections.append(terms)
            print(f"round {i + 1}: new leader after {elapsed:.2f}s, {terms} election(s)", flush=True)
    print(f"{args.nodes} nodes, {args.rounds} rounds: new leader after median "
          f"{statistics.median(seconds):.2f}s, "
          f"worst {max(seconds):.2f}s; elections median {statistics.median(elections)}, "
          f"worst {max(elections)}; rounds won by the first election: "
          f"{sum(1 for t in elections if t == 1)} of {args.rounds}")


if __name__ == "__main__":
    main()
