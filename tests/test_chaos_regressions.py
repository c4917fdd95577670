"""Bugs that ``raftledger chaos`` found, each pinned by a test on a real cluster."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from raftledger.cluster import launcher
from raftledger.cluster.chaos import clocks
from raftledger.cluster.chaos.clocks import Clocks
from raftledger.cluster.testing import LocalCluster, wait_until

pytestmark = pytest.mark.slow

restart_deadline_s = 90.0
answers_max = 100_000


def test_restarted_node_never_refuses_a_valid_token_while_it_catches_up(tmp_path: Path) -> None:
    """Seed 7: writes sent to a node just restarted after SIGKILL got 401 ``unauthorized`` with the
    admin token, until its cluster map caught up. It must say 503 (retry) instead: the token is
    valid, and a client told 401 gives up."""
    with LocalCluster(tmp_path, nodes=3, shards=1, credentials=True) as cluster:
        cluster.kill("n2")
        cluster.start_node("n2", wait=False)
        seen: list[int] = []
        deadline = time.monotonic() + restart_deadline_s
        while time.monotonic() < deadline and len(seen) < answers_max:
            try:
                status, _, _ = launcher.http_request("GET", cluster.urls["n2"] + "/v1/cluster",
                                                     token=cluster.admin_token, timeout_s=5.0)
            except OSError:
                continue  # not listening yet
            seen.append(status)
            if status == 200:
                break
        assert seen and seen[-1] == 200, seen[-20:]
        assert 401 not in seen, f"401 among {sorted(set(seen))}"
        wait_until(lambda: cluster.status("n2"), restart_deadline_s, "n2 to answer")


def test_a_feed_long_poll_on_a_replica_removed_meanwhile_is_answered_not_500(tmp_path: Path) -> None:
    """Seed 4: the feed subscriber got 500 ``internal_error``. A long-poll (``wait_ms``) holds the
    shard's replica across its wait; when membership churn removed that replica meanwhile, the page
    was read from its closed store (``lmdb.Error``). The node must answer from a replica that is
    still there instead."""
    with LocalCluster(tmp_path, nodes=3, shards=1, credentials=True) as cluster:
        follower = next(n for n in cluster.node_ids if n != cluster.leader(0))
        with cluster.client() as client:
            after = client.request("GET", "/v1/feed", params={"shard": 0, "wait_ms": 0})["last_offset"]
        answers: list[tuple[int, Any]] = []

        def long_poll() -> None:
            status, _, body = launcher.http_request(
                "GET", cluster.urls[follower] + f"/v1/feed?shard=0&after={after}&wait_ms=8000",
                token=cluster.admin_token, timeout_s=60.0)
            answers.append((status, body))

        poller = threading.Thread(target=long_poll, daemon=True)
        poller.start()
        with cluster.client() as client:
            client.request("DELETE", f"/v1/shards/0/replicas/{follower}")
        poller.join(restart_deadline_s)
        assert answers, "the long-poll did not end"
        status, body = answers[0]
        assert status == 200, (status, body)
        assert all(e["offset"] > after for e in body["events"])


def test_a_node_whose_clock_runs_ahead_honours_a_token_the_cluster_holds_valid(tmp_path: Path) -> None:
    """Found with the chaos skew fault: a node whose wall clock ran 5 minutes ahead answered 401 to
    a token valid for 2 more minutes, which tells a client to give up. Its peers' sealed requests
    carry their times: once the majority of them say its clock is off, it judges expiry by theirs."""
    assert clocks.unavailable_reason() is None, clocks.unavailable_reason()  # CI: apt faketime
    skewed_clocks = Clocks(str(tmp_path / "clocks"))
    cluster = LocalCluster(tmp_path / "data", nodes=3, shards=1, credentials=True)
    for node in cluster.node_ids:
        cluster.node_env[node] = skewed_clocks.env(node)
    with cluster:
        leader = cluster.leader(0)
        others = [u for n, u in cluster.urls.items() if n != leader]
        status, _, made = launcher.http_request(
            "POST", others[0] + "/v1/tokens", json.dumps(
                {"name": "soon", "role": "writer", "expires_at": time.time_ns() + 120 * 10**9}).encode(),
            token=cluster.admin_token)
        assert status == 201, made
        skewed_clocks.set_offset(leader, 300)

        def ahead() -> bool:  # its answers' Date header says its clock moved
            _, headers, _ = launcher.http_request("GET", cluster.urls[leader] + "/v1/health", timeout_s=5.0)
            return parsedate_to_datetime(headers["Date"]).timestamp() > time.time() + 200
        wait_until(ahead, restart_deadline_s, f"{leader}'s clock to move")
        seen: list[int] = []

        def honoured() -> bool:
            for n, url in enumerate(others):  # writes the others forward to the skewed leader
                with contextlib.suppress(OSError):
                    launcher.http_request("POST", url + "/v1/accounts", json.dumps(
                        {"id": f"traffic-{len(seen)}-{n}", "currency": "USD"}).encode(),
                        token=cluster.admin_token, timeout_s=5.0)
            status = launcher.http_request("GET", cluster.urls[leader] + "/v1/cluster/map",
                                           token=made["token"], timeout_s=5.0)[0]
            seen.append(status)
            return status == 200
        wait_until(honoured, restart_deadline_s, f"{leader} to honour the token (401: by its own clock)")
        peers = {n for n in cluster.node_ids if n != leader}
        offsets, off = clock_metrics(cluster.urls[leader])
        assert off == 1.0 and set(offsets) == peers, (off, offsets)  # the operator's alarm
        assert all(250 < offset < 350 for offset in offsets.values()), offsets
        skewed_clocks.set_offset(leader, 0)

        def agrees() -> bool:
            honoured()  # traffic from both peers, stamped by their clocks
            offsets, off = clock_metrics(cluster.urls[leader])
            return off == 0.0 and all(abs(offset) < 5 for offset in offsets.values())
        wait_until(agrees, restart_deadline_s, f"{leader}'s clock metrics to clear once its clock is back")


def clock_metrics(url: str) -> tuple[dict[str, float], float]:
    """(peer -> raftledger_peer_clock_offset_seconds, raftledger_clock_off) from a node's /metrics."""
    _, _, body = launcher.http_request("GET", url + "/metrics", timeout_s=5.0)
    offsets: dict[str, float] = {}
    off = -1.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "raftledger_peer_clock_offset_seconds":
                offsets[sample.labels["peer"]] = sample.value
            elif sample.name == "raftledger_clock_off":
                off = sample.value
    return offsets, off
