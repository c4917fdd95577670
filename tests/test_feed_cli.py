"""``raftledger feed tail`` and ``raftledger feed replay`` as subprocesses against a real cluster, and
what a reader behind the retention point gets (the subscriber's FeedCompacted, the CLI's exit 1).

The cluster compacts its feed as soon as it may (no minimum age): a durable consumer (``keeper``)
registered before any write holds every event until the last test removes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from raftledger.client import Client, FeedCompacted, RetryPolicy
from raftledger.cluster.testing import LocalCluster
from raftledger.node.settings import FeedSettings, NodeSettings
from raftledger.node.testing import pair_on_shard

pytestmark = pytest.mark.slow

SHARDS = 2
recovery_s = 120.0
command_timeout_s = 120.0
POLICY = RetryPolicy(deadline_s=recovery_s)
CONSUMERS = ("keeper", "replayer", "tailer")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    feed = FeedSettings(retention_age_min_s=0, compaction_interval_s=0.2)
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("feedcli")), nodes=1, shards=SHARDS,
                           durability="none", settings=NodeSettings(feed=feed))
    try:
        cluster.start()
        with Client(list(cluster.urls.values()), policy=POLICY) as ledger:
            ledger.request("PUT", "/v1/feed/consumers/keeper/offsets",
                           json={"offsets": {str(s): 0 for s in range(SHARDS)}}, idempotent=True)
            for shard in range(SHARDS):
                debit, credit = pair_on_shard(shard, SHARDS, "cli")
                ledger.create_account(id=debit, currency="EUR")
                ledger.create_account(id=credit, currency="EUR")
                for _ in range(3):
                    ledger.transfer(debit, credit, 250, "EUR")
        yield cluster
    finally:
        cluster.close()


def raftledger(cluster: LocalCluster, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "raftledger.cluster.cli", "feed", *args,
            "--endpoint", next(iter(cluster.urls.values()))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTLEDGER_")}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=command_timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"{proc.args} did not end: {out[-2000:]} {err[-2000:]}") from None
    return proc.returncode, out, err


def every_event(cluster: LocalCluster) -> list[str]:
    with Client(list(cluster.urls.values()), policy=POLICY) as ledger, \
            ledger.subscribe(start=0, until_caught_up=True) as events:
        return [e.id for e in events]


def test_replay_prints_every_event_from_the_start_in_per_shard_order_then_exits(
        cluster: LocalCluster) -> None:
    proc = raftledger(cluster, "replay", "--from", "0", "--json", "--consumer", "replayer")
    code, out, err = finished(proc)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert sorted(e["id"] for e in events) == sorted(every_event(cluster))
    for shard in range(SHARDS):
        offsets = [e["offset"] for e in events if e["shard"] == shard]
        assert offsets == list(range(1, len(offsets) + 1)) and offsets
    assert {e["type"] for e in events} == {"account.created", "transaction.posted"}
    assert all(isinstance(e["data"]["entries"][0]["amount"], int) for e in events
               if e["type"] != "account.created")
    with Client(list(cluster.urls.values())) as ledger:
        committed = ledger.request("GET", "/v1/feed/consumers/replayer")["shards"]
    assert {int(s): p["offset"] for s, p in committed.items()} == \
        {s: max(e["offset"] for e in events if e["shard"] == s) for s in range(SHARDS)}


def test_replay_from_an_offset_prints_human_lines_of_the_events_after_it(cluster: LocalCluster) -> None:
    code, out, err = finished(raftledger(cluster, "replay", "--from", "2"))
    assert code == 0, err
    lines = out.splitlines()
    assert lines and all(" transaction.posted " in line for line in lines)  # offsets 1-2: the accounts
    assert all("debit cli" in line and " 250 EUR" in line for line in lines)


def test_tail_follows_new_events_and_stops_after_count(cluster: LocalCluster) -> None:
    before = set(every_event(cluster))
    proc = raftledger(cluster, "tail", "--count", "3", "--json", "--consumer", "tailer")
    debit, credit = pair_on_shard(1, SHARDS, "cli")
    with Client(list(cluster.urls.values()), policy=POLICY) as ledger:
        deadline = time.monotonic() + command_timeout_s
        while proc.poll() is None and time.monotonic() < deadline:  # until it has seen 3 new ones
            ledger.transfer(debit, credit, 7, "EUR")
            time.sleep(0.2)  # paces the writer; the test waits on the process, not on time
    code, out, err = finished(proc)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 3 and not {e["id"] for e in events} & before
    assert [e["data"]["entries"][0]["amount"] for e in events] == [7, 7, 7]
    offsets = [e["offset"] for e in events]
    assert offsets == list(range(offsets[0], offsets[0] + 3))  # one shard, in order, no gap


def test_a_reader_behind_the_retention_point_gets_feed_compacted_with_the_earliest_offset(
        cluster: LocalCluster) -> None:
    with Client(list(cluster.urls.values()), policy=POLICY) as ledger:
        for name in CONSUMERS:
            ledger.request("DELETE", f"/v1/feed/consumers/{name}", idempotent=True)
        deadline = time.monotonic() + recovery_s
        firsts: dict[int, int] = {}
        while time.monotonic() < deadline:
            firsts = {s: ledger.request("GET", "/v1/feed", params={"shard": s, "after": 2**40}
                                        )["first_offset"] for s in range(SHARDS)}
            if all(f > 1 for f in firsts.values()):
                break
            time.sleep(0.1)
        assert all(f > 1 for f in firsts.values()), firsts
        with pytest.raises(FeedCompacted) as raised, ledger.subscribe(start=0) as events:
            next(events)
        assert raised.value.earliest_offset == firsts[raised.value.shard or 0]
    code, out, err = finished(raftledger(cluster, "replay", "--from", "0"))
    assert code == 1 and "holds events from offset" in err, (out, err)
