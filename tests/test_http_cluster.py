"""End to end over real node processes (cluster/testing.py): 3 nodes, 2 shards, fsync, loopback.

Clients talk to any node; nodes forward writes to leaders and serve reads from their own replica.
Processes are paused (SIGSTOP) or killed only by the pids this test's cluster started.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from raftledger.cluster.router import shard_for_account
from raftledger.cluster.testing import LocalCluster
from raftledger.node.testing import transfer_body, wait_until

pytestmark = pytest.mark.slow

SHARDS = 2
poll_s = 0.05


@pytest.fixture
def cluster(tmp_path: Path):
    with LocalCluster(tmp_path, nodes=3, shards=SHARDS) as c:
        yield c


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any,
                                                                                        Any]:
    async with http.request(method, url, **kw) as resp:
        return resp.status, await resp.json(), resp.headers


async def write(http: aiohttp.ClientSession, url: str, path: str, body: Any,
                timeout_s: float = 20.0) -> tuple[int, Any, Any]:
    """POST, retrying 503s and lost connections with the same id, as a client should."""
    async def attempt() -> tuple[int, Any, Any] | None:
        try:
            status, data, headers = await call(http, "POST", url + path, json=body)
        except aiohttp.ClientError:
            return None
        return None if status == 503 else (status, data, headers)
    return await wait_until(attempt, timeout_s, f"POST {path} to succeed")


async def open_pair(cluster: LocalCluster, http: aiohttp.ClientSession, tag: str) -> tuple[str, str, int]:
    """Accounts ``a:{tag}`` and ``b:{tag}``, opened through n0; with the shard the tag routes to."""
    a, b = f"a:{{{tag}}}", f"b:{{{tag}}}"
    for ident in (a, b):
        status, body, _ = await write(http, cluster.urls["n0"], "/v1/accounts",
                                      {"id": ident, "currency": "BRL"})
        assert status == 201, body
    return a, b, shard_for_account(a, SHARDS)


async def test_follower_read_with_token_of_acknowledged_write_always_sees_it(cluster, http):
    urls = list(cluster.urls.values())
    a, b, shard = await open_pair(cluster, http, "rw")
    leader = cluster.leader(shard)
    followers = [cluster.urls[n] for n in cluster.node_ids if n != leader]
    for n in range(30):
        status, _, headers = await write(http, urls[n % 3], "/v1/transactions",
                                         transfer_body(f"rw{n}", a, b, 10))
        assert status == 201
        token = headers["X-Ledger-Token"]
        reader = followers[n % len(followers)]
        status, balance, rh = await call(http, "GET", f"{reader}/v1/accounts/{a}/balance",
                                         params={"min_token": token})
        assert status == 200 and balance["balance"] == 10 * (n + 1), (status, balance)
        assert rh["X-Ledger-Node"] != leader


async def test_paused_leader_makes_bounded_staleness_reads_refused_then_served(cluster, http):
    a = "a:{st}"
    shard = shard_for_account(a, SHARDS)
    _, _, headers = await write(http, cluster.urls["n0"], "/v1/accounts",
                                {"id": a, "currency": "BRL"})
    leader = cluster.leader(shard)
    lone = next(n for n in cluster.node_ids if n != leader)
    others = [n for n in cluster.node_ids if n != lone]
    url = f"{cluster.urls[lone]}/v1/accounts/{a}"
    params = {"max_staleness_ms": "500", "min_token": headers["X-Ledger-Token"]}
    assert (await call(http, "GET", url, params=params))[0] == 200
    for node in others:  # pause the leader and the third replica: no leader reaches `lone`
        os.kill(cluster.pids[node], signal.SIGSTOP)
    try:
        async def refused() -> bool:
            status, body, rh = await call(http, "GET", url, params={"max_staleness_ms": "500"})
            return status == 503 and body["error"]["code"] == "stale_replica" and \
                "Retry-After" in rh
        await wait_until(refused, 15, "a stale_replica refusal")

        async def not_ready() -> bool:
            return (await call(http, "GET", f"{cluster.urls[lone]}/readyz"))[0] == 503
        await wait_until(not_ready, 15, "/readyz to report the missing leader")
        status, _, rh = await call(http, "GET", url)  # a local read is still served, and says so
        assert status == 200 and int(rh["X-Ledger-Staleness-Ms"]) > 500
    finally:
        for node in others:
            os.kill(cluster.pids[node], signal.SIGCONT)

    async def served() -> bool:
        return (await call(http, "GET", url, params={"max_staleness_ms": "500"}))[0] == 200
    await wait_until(served, 20, "bounded-staleness reads served again")

    async def ready() -> bool:  # its leader is known again (an election may still be settling)
        return (await call(http, "GET", f"{cluster.urls[lone]}/readyz"))[0] == 200
    await wait_until(ready, 20, "/readyz to report ready again")


async def test_writes_survive_the_leader_being_killed(cluster, http):
    a, b, shard = await open_pair(cluster, http, "kl")
    leader = cluster.leader(shard)
    cluster.kill(leader)
    survivor = next(u for n, u in cluster.urls.items() if n != leader)
    status, body, headers = await write(http, survivor, "/v1/transactions",
                                        transfer_body("after-kill", a, b, 25), timeout_s=30)
    assert status == 201 and body["status"] == "posted"
    status, balance, _ = await call(http, "GET", f"{survivor}/v1/accounts/{b}/balance",
                                    params={"consistency": "linearizable"})
    assert status == 200 and balance["balance"] == -25


async def test_malformed_requests_never_break_a_real_node(cluster, http):
    url = cluster.urls["n1"]
    corpus = [b"{", b"[]", b'{"id":"x","amount":1.5}', b"[" * 10_000, b"\x00\xff",
              b'{"id":"t","debit_account_id":"a","credit_account_id":"b","amount":-1,'
              b'"currency":"BRL"}']
    for raw in corpus:
        async with http.post(url + "/v1/transactions", data=raw,
                             headers={"Content-Type": "application/json"}) as resp:
            assert 400 <= resp.status < 500
            assert "code" in (await resp.json())["error"]
    big = b'{"id":"' + b"x" * (9 * 2**20) + b'"}'
    async with http.post(url + "/v1/transactions", data=big,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
    assert (await call(http, "GET", url + "/healthz"))[0] == 200
    status, view, _ = await call(http, "GET", url + "/v1/cluster")
    assert status == 200 and len(view["shards"]) == SHARDS
    metrics = await (await http.get(url + "/metrics")).text()
    assert 'raftledger_http_request_seconds_count{method="POST",route="/v1/transactions"' in metrics


async def test_write_through_a_follower_moves_on_when_the_leader_is_paused(cluster, http):
    a, b, shard = await open_pair(cluster, http, "pz")
    leader = cluster.leader(shard)
    follower = next(n for n in cluster.node_ids if n != leader)
    os.kill(cluster.pids[leader], signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        status, body, _ = await call(http, "POST", cluster.urls[follower] + "/v1/transactions",
                                     json=transfer_body("while-paused", a, b, 3))
        elapsed = time.monotonic() - started
    finally:
        os.kill(cluster.pids[leader], signal.SIGCONT)
    # One request, no client retry: the node follows the new leader instead of waiting out the
    # forward timeout (12 s) on the paused one.
    assert status == 201, body
    assert elapsed < 8, elapsed


async def test_a_write_through_a_follower_waits_for_the_next_leader_when_the_leader_dies(cluster, http):
    a, b, shard = await open_pair(cluster, http, "dl")
    leader = cluster.leader(shard)
    follower = next(n for n in cluster.node_ids if n != leader)
    cluster.kill(leader)
    # One request, no client retry: the follower waits (bounded) for the election's result and
    # forwards there, instead of answering not_leader while the dead leader is still its leader.
    status, body, _ = await call(http, "POST", cluster.urls[follower] + "/v1/transactions",
                                 json=transfer_body("after-death", a, b, 7))
    assert status == 201, body
    assert cluster.leader(shard) != leader


async def test_a_hold_on_an_idle_shard_expires_by_itself_about_a_second_after_its_deadline(
        cluster, http):
    a, b, shard = await open_pair(cluster, http, "ex")
    status, hold, _ = await write(http, cluster.urls["n0"], "/v1/transactions",
                                  {**transfer_body("hold-1:{ex}", a, b, 40), "pending": True,
                                   "timeout_seconds": 1})
    assert status == 201 and hold["status"] == "pending", hold
    deadline_s = (hold["timestamp"] + 10**9) / 1e9
    for url in cluster.urls.values():  # nothing else is written to the shard from here on
        async def expired(url: str = url) -> bool:
            status, body, _ = await call(http, "GET", f"{url}/v1/transactions/hold-1%3A%7Bex%7D")
            return status == 200 and body["status"] == "expired"
        await wait_until(expired, 15, f"the hold to expire on {url}")
        status, balance, _ = await call(http, "GET", f"{url}/v1/accounts/{a}/balance")
        assert balance["debits_pending"] == 0 and balance["debits_posted"] == 0
    assert time.time() - deadline_s < 5  # well within the time it took to look at every replica

