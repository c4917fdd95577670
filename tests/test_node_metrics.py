"""The Raft side reports to a node's /metrics, and nodes log JSON lines with the request id.

A real 3-node, 1-shard cluster (cluster/testing.py, fsync): writes through the HTTP API, then the
batch, fsync, queue-depth and leader-change series are read back from /metrics; a request that a
follower refuses (503, so it is logged) shows up in that node's log as JSON with its request id.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from raftledger.cluster.testing import LocalCluster, wait_until

pytestmark = pytest.mark.slow

write_timeout_s = 20.0
A, B = "a:{m}", "b:{m}"
TRANSFERS = 5


def request(method: str, url: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        **({"Content-Type": "application/json"} if data else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def write(url: str, path: str, body: dict[str, Any]) -> int:
    """POST, retrying 503s and lost connections with the same id (ids are idempotency keys)."""
    def attempt() -> int | None:
        try:
            status, _, _ = request("POST", url + path, body)
        except OSError:
            return None
        return None if status == 503 else status
    return wait_until(attempt, write_timeout_s, f"POST {path}")


def scrape(url: str) -> dict[str, float]:
    """Every sample of the node's /metrics as ``name{labels}`` -> value (labels sorted)."""
    status, _, text = request("GET", url + "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root: Path = tmp_path_factory.mktemp("metrics")
    with LocalCluster(root, nodes=3, shards=1) as c:
        leader = c.urls[c.leader(0)]
        for account in (A, B):
            assert write(leader, "/v1/accounts", {"id": account, "currency": "BRL"}) == 201
        for n in range(TRANSFERS):
            assert write(leader, "/v1/transactions", {
                "id": f"m{n}", "debit_account_id": A, "credit_account_id": B, "amount": 10,
                "currency": "BRL"}) == 201
        c.wait_converged(0)
        yield c


def test_leader_metrics_show_batches_fsyncs_and_leader_changes(cluster: LocalCluster):
    leader = cluster.leader(0)
    m = scrape(cluster.urls[leader])
    # every write went through the leader's batcher: at least one entry, at least 7 requests
    assert m['raftledger_raft_batch_commands_count{shard="0"}'] > 0
    assert m['raftledger_raft_batch_commands_sum{shard="0"}'] >= 2 + TRANSFERS
    assert m['raftledger_raft_batch_linger_seconds_count{shard="0"}'] > 0
    assert m['raftledger_fsync_seconds_count{shard="0"}'] > 0
    assert m['raftledger_fsync_seconds_sum{shard="0"}'] > 0
    assert m['raftledger_leader_changes_total{shard="0"}'] >= 1
    assert m['raftledger_queue_depth{shard="0"}'] == 0  # idle: nothing waiting
    assert m['raftledger_shard_is_leader{shard="0"}'] == 1
    assert m['raftledger_shard_applied_index{shard="0"}'] > 0


def test_follower_metrics_show_fsyncs_and_the_leader_it_follows(cluster: LocalCluster):
    leader = cluster.leader(0)
    follower = next(n for n in cluster.node_ids if n != leader)
    m = scrape(cluster.urls[follower])
    assert m['raftledger_fsync_seconds_count{shard="0"}'] > 0  # appended entries made durable
    assert m['raftledger_leader_changes_total{shard="0"}'] >= 1
    assert m['raftledger_shard_is_leader{shard="0"}'] == 0
    assert m.get('raftledger_raft_batch_commands_count{shard="0"}', 0) == 0  # nothing to batch


def test_node_logs_are_json_lines_with_the_request_id(cluster: LocalCluster):
    leader = cluster.leader(0)
    follower = next(n for n in cluster.node_ids if n != leader)
    request_id = "metrics-test-refused-read"
    # A follower has always been out of touch with its leader for more than 0 ms: 503, and 5xx
    # answers are logged.
    url = f"{cluster.urls[follower]}/v1/accounts/{urllib.parse.quote(A, safe='')}/balance"
    status, headers, body = request("GET", url + "?max_staleness_ms=0",
                                    headers={"X-Request-Id": request_id})
    assert status == 503 and json.loads(body)["error"]["code"] == "stale_replica"
    assert headers["X-Request-Id"] == request_id

    def logged() -> dict[str, Any] | None:
        for line in cluster.log(follower).splitlines():
            if request_id in line:
                return json.loads(line)
        return None
    record = wait_until(logged, 10, "the refused request in the follower's log")
    assert record["request_id"] == request_id
    assert record["node"] == follower and record["status"] == 503
    lines = [line for line in cluster.log(follower).splitlines() if line.strip()]
    serving = [json.loads(line) for line in lines if '"node ' in line and "serving" in line]
    assert serving and serving[0]["node"] == follower and serving[0]["level"] == "info"
