"""``raftledger verify``: a replica's fingerprint history (what replicas are compared by, at one index),
and the command against a real cluster: it passes while cross-shard writes go on (the balance is
exact on a consistent cut), and reports a leg left open after its home decided until the resolver
finishes it."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from raftledger.client import Client
from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster
from raftledger.node.faults import FAULTS_ENV, crash_exit_status
from raftledger.node.fingerprints import FingerprintHistory
from raftledger.node.settings import CrossShardSettings, NodeSettings
from raftledger.node.testing import account_body, ids_on_shard, transfer_body


def test_fingerprint_at_an_index_is_the_one_after_the_last_entry_at_or_below_it():
    history = FingerprintHistory((10, "a"))
    history.record((12, "b"))  # 11 was a PySyncObj no-op: it never reached the store
    history.record((12, "b"))  # an entry the store skipped changes nothing
    history.record((13, "c"))
    assert history.at(10) == (10, "a")
    assert history.at(11) == (10, "a")
    assert history.at(12) == (12, "b")
    assert history.at(13) == (13, "c")
    assert history.at(14) is None  # not applied yet
    assert history.at(9) is None  # from before this history


def test_fingerprint_history_forgets_the_oldest_and_restarts_after_a_snapshot_install():
    history = FingerprintHistory((1, "x"), kept_max=3)
    for index in range(2, 6):
        history.record((index, str(index)))
    assert history.at(2) is None and history.at(3) == (3, "3") and history.at(5) == (5, "5")
    history.reset((50, "installed"))
    assert history.at(5) is None  # what came before the install is no longer consecutive
    assert history.at(50) == (50, "installed")


# -- verify against a real cluster ------------------------------------------------------------------

SHARDS = 3
HOME, A, B = 0, 1, 2
verify_timeout_s = 300.0
recovery_s = 120.0  # elections, a restart and resolver passes on a slow shared machine
writer_time_max_s = 120.0
writes_max = 2000


def tag_of(shard: int, salt: str = "v") -> str:
    return "{" + ids_on_shard(shard, SHARDS, salt)[0] + "}"


def verify(cluster: LocalCluster, *extra: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", "verify", "--json", "--endpoint",
                           *[u for u in cluster.urls.values()][:1], *extra],
                          capture_output=True, text=True, timeout=verify_timeout_s)
    return done.returncode, json.loads(done.stdout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    settings = NodeSettings(cross_shard=CrossShardSettings(prepare_timeout_s=30, finish_timeout_s=20,
                                                           resolver_interval_s=0.5))
    with pytest.MonkeyPatch.context() as env:  # for every node started, restarts included
        env.setenv(FAULTS_ENV, "1")
        cluster = LocalCluster(Path(tmp_path_factory.mktemp("verify")), nodes=3, shards=SHARDS,
                               settings=settings, durability="none")
        try:
            yield cluster.start()
        finally:
            cluster.close()


def _accounts(client: Client, prefix: str) -> tuple[str, str]:
    """An account on shard A and one on shard B."""
    alice, bob = f"{prefix}.alice{tag_of(A)}", f"{prefix}.bob{tag_of(B)}"
    for account_id in (alice, bob):
        client.create_account(**account_body(account_id))
    return alice, bob


@pytest.mark.slow
def test_verify_passes_under_continuous_cross_shard_writes(cluster):
    """Transactions in flight between the shards' readings are settled exactly, never guessed."""
    with cluster.client() as client:
        alice, bob = _accounts(client, "w")
        stop, acked = threading.Event(), []

        def write() -> None:
            deadline = time.monotonic() + writer_time_max_s
            for n in range(writes_max):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                debit, credit = (alice, bob) if n % 2 else (bob, alice)
                home = tag_of(n % SHARDS, "h")
                client.transfer(debit, credit, n + 1, "BRL", id=f"w.{n}{home}")
                acked.append(n)

        writers = [threading.Thread(target=write, daemon=True)]
        for thread in writers:
            thread.start()
        try:
            launcher.wait_until(lambda: len(acked) >= 20, writer_time_max_s, "the writer's first transfers")
            for _ in range(3):
                code, report = verify(cluster)
                assert code == 0, report["problems"]
                assert set(report["cut"]) == {str(s) for s in range(SHARDS)}
            assert all(t.is_alive() for t in writers), "the writer must still be writing"
        finally:
            stop.set()
            for thread in writers:
                thread.join(writer_time_max_s)


@pytest.mark.slow
def test_verify_reports_a_leg_left_open_after_its_decision_until_the_resolver_finishes_it(cluster):
    """The coordinator's leader dies right after the decision (crash point ``cross_shard.decided``):
    the legs stay prepared, holding funds, until the new leader's resolver finishes them."""
    with cluster.client() as client:
        alice, bob = _accounts(client, "o")
    coordinator = cluster.leader(HOME)
    status, armed = cluster.call(coordinator, "/faults", {"crash": ["cross_shard.decided"]})
    assert status == 200, armed
    txid = f"o.t{tag_of(HOME)}"
    with contextlib.suppress(OSError):  # the node dies before it can answer
        launcher.http_request("POST", cluster.urls[coordinator] + "/v1/transactions",
                              json.dumps(transfer_body(txid, alice, bob, 40)).encode())
    assert cluster.procs[coordinator].wait(30) == crash_exit_status
    cluster.start_node(coordinator)
    cluster.wait_ready()

    code, report = verify(cluster, "--grace-s", "0")
    assert code == 1
    open_legs = [p for p in report["problems"] if f"leg {txid}" in p]
    assert {p.split(":")[0] for p in open_legs} == {f"shard {A}", f"shard {B}"}, report["problems"]
    assert all(f"home shard {HOME} decided to post it" in p for p in open_legs), open_legs
    assert len(open_legs) == len(report["problems"]), report["problems"]  # and the balance is exact

    def passes() -> bool:
        return verify(cluster, "--grace-s", "0")[0] == 0
    launcher.wait_until(passes, recovery_s, "verify to pass once the resolver finished the legs")
