"""The HTTP API over real Raft groups: three nodes in one process, two shards, real sockets.

Each node serves the API for its replica of every shard; writes sent to any node reach the leader
(forwarded over the internal route when needed) and reads on followers honour the consistency asked.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from raftledger.cluster.launcher import free_ports
from raftledger.node import wire
from raftledger.node.http import NodeContext, start
from raftledger.node.settings import ForwardingSettings, HttpSettings, NodeSettings
from raftledger.node.testing import TEST_SECRET, ReplicaGroup

pytestmark = pytest.mark.slow

NODES = 3
SHARDS = 2


class Cluster:
    def __init__(self, root: Path) -> None:
        self.groups = [ReplicaGroup(str(root / f"shard{s}"), NODES, shard=s) for s in range(SHARDS)]
        ports = free_ports(2 * NODES)
        self.ports, self.internal_ports = ports[:NODES], ports[NODES:]
        self.urls = {f"n{i}": f"http://127.0.0.1:{p}" for i, p in enumerate(self.ports)}
        self.internal_urls = {f"n{i}": f"http://127.0.0.1:{p}" for i, p in enumerate(self.internal_ports)}
        self.runners: dict[int, list[Any]] = {}

    async def start(self) -> None:
        for group in self.groups:
            group.start_all()
        for i in range(NODES):
            await self.start_http(i)
        for group in self.groups:
            await group.leader()

    async def start_http(self, i: int) -> None:
        shards = {g.shard: g.services[i] for g in self.groups}
        ctx = NodeContext(f"n{i}", shards, SHARDS, peers=self.urls, internal_urls=self.internal_urls,
                          sealer=wire.Sealer(wire.internal_key(TEST_SECRET), f"n{i}"),
                          settings=NodeSettings(http=HttpSettings(consistency_wait_s=2.0),
                                                forwarding=ForwardingSettings(leader_wait_s=3.0)))
        self.runners[i] = await start(ctx, "127.0.0.1", self.ports[i], self.internal_ports[i])

    async def stop(self) -> None:
        for runners in self.runners.values():
            for runner in runners:
                await runner.cleanup()
        for group in self.groups:
            await group.stop_all()

    async def leader_node(self, shard: int) -> int:
        leader = await self.groups[shard].leader()
        return int(leader.node_id[1:])

    def url(self, i: int) -> str:
        return self.urls[f"n{i}"]


@pytest.fixture
async def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    await c.start()
    session = aiohttp.ClientSession()
    c.http = session  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        await session.close()
        await c.stop()


TAG = "{k}"


def shard_of(account_id: str) -> int:
    return NodeContext("x", {}, SHARDS).shard_of(account_id)


async def post(c: Cluster, node: int, path: str, body: Any) -> tuple[int, Any, Any]:
    async with c.http.post(c.url(node) + path, json=body) as resp:  # type: ignore[attr-defined]
        return resp.status, await resp.json(), resp.headers


async def get(c: Cluster, node: int, path: str, **params: str) -> tuple[int, Any, Any]:
    async with c.http.get(c.url(node) + path, params=params) as resp:  # type: ignore[attr-defined]
        return resp.status, await resp.json(), resp.headers


async def test_write_on_any_node_reaches_the_leader_and_follower_reads_with_token(cluster):
    shard = shard_of(f"a{TAG}")
    leader = await cluster.leader_node(shard)
    follower = (leader + 1) % NODES
    other = (leader + 2) % NODES
    for ident in (f"a{TAG}", f"b{TAG}"):
        status, body, _ = await post(cluster, follower, "/v1/accounts",
                                     {"id": ident, "currency": "BRL"})
        assert status == 201, body
    for n in range(20):
        status, body, headers = await post(cluster, follower, "/v1/transactions", {
            "id": f"t{n}{TAG}", "debit_account_id": f"a{TAG}", "credit_account_id": f"b{TAG}",
            "amount": 10, "currency": "BRL"})
        assert status == 201, body
        token = headers["X-Ledger-Token"]
        assert token.startswith(f"{shard}:")
        # Read-your-writes on the replica that was not involved in the request.
        status, balance, rheaders = await get(cluster, other, f"/v1/accounts/a{TAG}/balance",
                                              min_token=token)
        assert status == 200 and balance["balance"] == 10 * (n + 1)
        assert int(rheaders["X-Ledger-Applied-Index"]) >= int(token.split(":")[1])
        assert rheaders["X-Ledger-Node"] == f"n{other}"


async def test_replayed_write_through_another_node_is_idempotent(cluster):
    for ident in (f"a{TAG}", f"b{TAG}"):
        await post(cluster, 0, "/v1/accounts", {"id": ident, "currency": "BRL"})
    body = {"id": f"once{TAG}", "debit_account_id": f"a{TAG}", "credit_account_id": f"b{TAG}",
            "amount": 5, "currency": "BRL"}
    first = await post(cluster, 0, "/v1/transactions", body)
    second = await post(cluster, 1, "/v1/transactions", body)
    assert first[0] == second[0] == 201
    assert second[2]["Idempotent-Replayed"] == "true" and first[1] == second[1]
    status, acct, _ = await get(cluster, 2, f"/v1/accounts/a{TAG}", consistency="linearizable")
    assert status == 200 and acct["seq"] == 1


async def test_linearizable_read_on_a_follower_sees_the_latest_write(cluster):
    shard = shard_of(f"a{TAG}")
    leader = await cluster.leader_node(shard)
    follower = (leader + 1) % NODES
    for ident in (f"a{TAG}", f"b{TAG}"):
        await post(cluster, leader, "/v1/accounts", {"id": ident, "currency": "BRL"})
    await post(cluster, leader, "/v1/transactions", {
        "id": "lin", "debit_account_id": f"a{TAG}", "credit_account_id": f"b{TAG}",
        "amount": 7, "currency": "BRL"})
    status, body, _ = await get(cluster, follower, "/v1/transactions/lin",
                                consistency="linearizable")
    assert status == 200 and body["status"] == "posted"


async def test_batch_across_shards_and_cluster_view(cluster):
    ids = [f"u{i}" for i in range(12)]
    accounts = [{"id": i, "currency": "USD"} for i in ids]
    status, body, headers = await post(cluster, 1, "/v1/accounts", {"accounts": accounts})
    assert status == 200 and {r["status"] for r in body["results"]} == {201}
    assert sorted(int(p.split(":")[0]) for p in headers["X-Ledger-Token"].split(",")) == [0, 1]
    status, view, _ = await get(cluster, 2, "/v1/cluster")
    assert status == 200
    for shard in view["shards"]:
        assert shard["leader"] is not None
        assert len(shard["replicas"]) == NODES
        assert {r["role"] for r in shard["replicas"]} == {"leader", "follower"}


async def test_replica_cut_off_from_its_leader_refuses_bounded_staleness_reads(cluster):
    shard = shard_of(f"a{TAG}")
    _, _, written = await post(cluster, 0, "/v1/accounts", {"id": f"a{TAG}", "currency": "BRL"})
    leader = await cluster.leader_node(shard)
    lone = (leader + 1) % NODES
    status, _, _ = await get(cluster, lone, f"/v1/accounts/a{TAG}", max_staleness_ms="1000",
                             min_token=written["X-Ledger-Token"])
    assert status == 200
    group = cluster.groups[shard]
    # Stop the leader and the third replica: the lone follower hears from no leader any more.
    for i in (leader, (leader + 2) % NODES):
        await group.stop(i)
    started = time.monotonic()

    async def refused() -> bool:
        status, body, headers = await get(cluster, lone, f"/v1/accounts/a{TAG}",
                                          max_staleness_ms="300")
        return status == 503 and body["error"]["code"] == "stale_replica" and \
            "Retry-After" in headers

    deadline = started + 10
    ok = False
    while not ok and time.monotonic() < deadline:
        ok = await refused()
        if not ok:
            await asyncio.sleep(0.05)  # poll interval
    assert ok
    status, _, headers = await get(cluster, lone, f"/v1/accounts/a{TAG}")
    assert status == 200 and int(headers["X-Ledger-Staleness-Ms"]) >= 300
