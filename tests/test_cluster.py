"""Replicated shards as real node processes on loopback (``raftledger node`` x 3, 2 shards)."""

from __future__ import annotations

import concurrent.futures
import threading
import urllib.parse

import pytest
from raftledger.cluster.launcher import wait_until
from raftledger.cluster.testing import LocalCluster, SubmitFailed
from raftledger.node.settings import NodeSettings, SnapshotSettings
from raftledger.node.testing import pair_on_shard
from raftledger.statemachine.testing import account, transfer

pytestmark = pytest.mark.slow

compaction_entries_min = 50


def open_accounts(cluster: LocalCluster, shard: int, prefix: str) -> tuple[str, str]:
    """Two accounts opened on ``shard`` (see ``accounts_on``)."""
    a, b = pair_on_shard(shard, 2, prefix)
    assert_ok(cluster.submit(shard, account(a)))
    assert_ok(cluster.submit(shard, account(b)))
    return a, b


def quoted(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def assert_ok(reply: dict) -> int:
    assert all(r["code"] == "ok" for r in reply["results"]), reply
    return reply["index"]


def credits_posted(cluster: LocalCluster, node: str, account_id: str) -> int:
    status, body = cluster.get(node, f"/v1/accounts/{quoted(account_id)}")
    assert status == 200, body
    return body["credits_posted"]


def assert_ledger_balanced(cluster: LocalCluster, node: str, shards: int) -> None:
    """Invariant 2: per currency over all shards, debits == credits (posted and pending)."""
    sums: dict[str, list[int]] = {}
    for shard in range(shards):
        for currency, t in cluster.totals(node, shard)["currencies"].items():
            acc = sums.setdefault(currency, [0, 0, 0, 0])
            for i, key in enumerate(("debits_posted", "credits_posted", "debits_pending",
                                     "credits_pending")):
                acc[i] += t[key]
    for currency, (dp, cp, dpend, cpend) in sums.items():
        assert dp == cp and dpend == cpend, currency


@pytest.fixture
def cluster(tmp_path):
    with LocalCluster(tmp_path, nodes=3, shards=2,
                      settings=NodeSettings(snapshots=SnapshotSettings(
                          log_compaction_entries_min=compaction_entries_min))) as c:
        yield c


def test_followers_of_both_shards_apply_the_leaders_writes(cluster):
    for shard in (0, 1):
        a, b = open_accounts(cluster, shard, "r")
        for i in range(20):
            assert_ok(cluster.submit(shard, transfer(f"r{shard}.{i}", a, b, 5)))
    for shard in (0, 1):
        index, _ = cluster.wait_converged(shard)
        assert index > 20
        a, b = pair_on_shard(shard, 2, "r")
        assert {credits_posted(cluster, n, b) for n in cluster.node_ids} == {100}


def write_stream(cluster: LocalCluster, shard: int, ids: list[str], a: str, b: str,
                 acked: list[str], stop: threading.Event) -> None:
    for tx_id in ids:
        if stop.is_set():
            return
        try:
            reply = cluster.submit(shard, transfer(tx_id, a, b, 1), cancel=stop)
        except SubmitFailed:
            continue
        if reply["results"][0]["code"] == "ok":
            acked.append(tx_id)


class WriteStreams:
    """Four writers moving 1 unit from ``a`` to ``b`` per transfer on one shard, recording every
    acknowledged transfer id; leaving the ``with`` block stops them."""

    writers = 4

    def __init__(self, cluster: LocalCluster, shard: int, prefix: str, count: int) -> None:
        self.cluster = cluster
        self.a, self.b = open_accounts(cluster, shard, prefix)
        self.ids = [f"{prefix}{i}" for i in range(count)]
        self.acked: list[str] = []
        self.stop = threading.Event()
        self.pool = concurrent.futures.ThreadPoolExecutor(self.writers)
        self.futures = [self.pool.submit(write_stream, cluster, shard, self.ids[w::self.writers],
                                         self.a, self.b, self.acked, self.stop)
                        for w in range(self.writers)]

    def __enter__(self) -> WriteStreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True)

    def wait_acked(self, count: int) -> None:
        wait_until(lambda: len(self.acked) >= count, 60, f"{count} acknowledged writes")

    def join(self) -> None:
        for future in self.futures:
            future.result(timeout=120)

    def assert_none_lost(self, node: str) -> None:
        """Every acknowledged transfer is on ``node``, and each applied one moved 1 unit exactly once."""
        applied = [t for t in self.ids if self.cluster.get(node, f"/v1/transactions/{t}")[0] == 200]
        assert set(self.acked) <= set(applied), "an acknowledged write was lost"
        assert credits_posted(self.cluster, node, self.b) == len(applied)


def test_killing_the_leader_mid_stream_loses_no_acknowledged_write(cluster):
    shard = 0
    with WriteStreams(cluster, shard, "k", 300) as streams:
        victim = cluster.leader(shard)
        streams.wait_acked(40)
        cluster.kill(victim)
        new_leader = cluster.leader(shard)
        streams.join()
    assert new_leader != victim
    assert len(streams.acked) > 100, "writes must continue after the failover"
    cluster.start_node(victim)
    cluster.wait_converged(shard)
    for node in cluster.node_ids:
        streams.assert_none_lost(node)


def test_stopped_follower_catches_up_by_snapshot(cluster):
    shard = 1
    a, b = open_accounts(cluster, shard, "s")
    leader = cluster.leader(shard)
    follower = next(n for n in cluster.node_ids if n != leader)
    cluster.stop(follower)
    for i in range(3 * compaction_entries_min):
        assert_ok(cluster.submit(shard, transfer(f"s{i}", a, b, 1)))
    wait_until(lambda: cluster.shard_status(shard)[leader]["journal_entries"] < compaction_entries_min,
               30, "the leader to compact its log")
    cluster.start_node(follower)
    cluster.wait_converged(shard)
    status = cluster.shard_status(shard)[follower]
    assert status["snapshots_installed"] >= 1
    assert credits_posted(cluster, follower, b) == 3 * compaction_entries_min


def test_restarting_every_node_keeps_acknowledged_data_and_invariants(cluster):
    written = {}
    for shard in (0, 1):
        a, b = open_accounts(cluster, shard, "w")
        for i in range(compaction_entries_min + 10):
            assert_ok(cluster.submit(shard, transfer(f"w{shard}.{i}", a, b, 3)))
        written[shard] = (b, 3 * (compaction_entries_min + 10))
    before = {shard: cluster.wait_converged(shard) for shard in (0, 1)}
    cluster.stop_all()
    cluster.start()
    for shard, (b, expected) in written.items():
        after = cluster.wait_converged(shard)
        assert after[0] >= before[shard][0]
        for node in cluster.node_ids:
            assert credits_posted(cluster, node, b) == expected
    for node in cluster.node_ids:
        assert_ledger_balanced(cluster, node, 2)
    replay = cluster.submit(0, transfer("w0.0", *pair_on_shard(0, 2, "w"), 3))
    assert replay["results"][0]["replayed"]


def test_a_paused_leader_is_replaced_and_rejoins_after_resume(cluster):
    shard = 0
    a, b = open_accounts(cluster, shard, "p")
    paused = cluster.leader(shard)
    cluster.pause(paused)
    wait_until(lambda: cluster.leader(shard) != paused, 30, "a new leader")
    for i in range(10):
        submit_via(cluster, shard, transfer(f"p{i}", a, b, 1), exclude=paused)
    cluster.resume(paused)
    cluster.wait_converged(shard)
    assert credits_posted(cluster, paused, b) == 10


def submit_via(cluster: LocalCluster, shard: int, command, exclude: str) -> None:
    """Submit to the leader among the running, unpaused nodes (a paused node never answers)."""
    from raftledger.statemachine import codec

    for _ in range(100):
        for node in cluster.node_ids:
            if node == exclude:
                continue
            status = cluster.status(node)
            if status and status["shards"][str(shard)]["role"] == "leader":
                code, answer = cluster.call(node, f"/shards/{shard}/submit",
                                            [codec.encode_command(command)])
                if code == 200 and "error" not in answer["replies"][0]:
                    assert_ok(answer["replies"][0])
                    return
    raise AssertionError("no running leader took the write")


def test_sigkill_of_every_node_mid_stream_keeps_every_acknowledged_write(cluster):
    shard = 1
    with WriteStreams(cluster, shard, "x", 400) as streams:
        streams.wait_acked(60)
        streams.stop.set()
        for node in cluster.node_ids:
            cluster.kill(node)
        streams.join()
    cluster.start()
    cluster.wait_converged(shard)
    for node in cluster.node_ids:
        streams.assert_none_lost(node)
        assert_ledger_balanced(cluster, node, 2)
