"""Nodes route by the cluster map they hold, and a command routed by an older map is routed again.

Two nodes in this process: ``n2`` hosts both shards (stores that already hold their slots) and serves
the internal protocol; ``n1`` hosts nothing and forwards every write there. When the shard refuses a
command as ``wrong_shard`` (by ``n2``'s map, or by the slots its store holds), ``n1`` waits for its own
map to reach the epoch the refusal named, routes again and the command lands on the shard that owns it;
nothing is ever applied on the other one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from raftledger.cluster.follower import MapFollower
from raftledger.cluster.map import AssignSlots, ClusterMap, apply
from raftledger.node import wire
from raftledger.node.http import NodeContext, create_app
from raftledger.node.http import internal as internal_api
from raftledger.node.http.context import fixed_map
from raftledger.node.settings import ForwardingSettings, MetaSettings, NodeSettings
from raftledger.node.testing import DirectShard, account_body, transfer_body
from raftledger.statemachine.commands import SetSlots
from raftledger.statemachine.slots import slot_of
from raftledger.statemachine.store import LedgerStore

KEY = wire.internal_key(b"m" * 32)
OLD = fixed_map(2, {0: ("n2",), 1: ("n2",)})  # epoch 1: shard 0 owns 0..2047, shard 1 2048..4095
NEW, _ = apply(OLD, AssignSlots(0, 2047, 1))  # epoch 2: shard 1 owns every slot
LOW = [i for i in (f"low{n}:{{t{n}}}" for n in range(200)) if slot_of(i) < 2048]  # shard 0 at epoch 1


class Nodes:
    def __init__(self, sender: TestClient, receiver: NodeContext, stores: list[LedgerStore],
                 sender_ctx: NodeContext) -> None:
        self.sender, self.receiver, self.stores, self.sender_ctx = sender, receiver, stores, sender_ctx

    def later(self, follower: MapFollower, new: ClusterMap, after_s: float = 0.2) -> None:
        asyncio.get_running_loop().call_later(after_s, follower.update, new)

    def accounts(self, shard: int) -> list[str]:
        with self.stores[shard].reader() as reader:
            return list(reader.account_ids())


@pytest.fixture
async def nodes(tmp_path: Path, request: pytest.FixtureRequest):
    receiver_map, store_epoch = request.param
    stores = [LedgerStore(str(tmp_path / f"s{s}.lmdb"), shard=s, map_size=2**26) for s in range(2)]
    shards = {s: DirectShard(store, s, "n2") for s, store in enumerate(stores)}
    for shard, svc in shards.items():  # the shards already follow the newer map
        ranges = NEW.shard(shard).slot_ranges if store_epoch == 2 else OLD.shard(shard).slot_ranges  # type: ignore[union-attr]
        await svc.submit(SetSlots(store_epoch, ranges))
    settings = NodeSettings(forwarding=ForwardingSettings(map_wait_s=2.0, leader_wait_s=0.5),
                            meta=MetaSettings(long_poll_s=0.3))
    receiver = NodeContext("n2", shards, 2, sealer=wire.Sealer(KEY, "n2"), settings=settings,
                           maps=MapFollower(receiver_map))
    internal = TestServer(internal_api.create_app(receiver))
    await internal.start_server()
    sender_ctx = NodeContext("n1", {}, 2, peers={"n1": "http://n1", "n2": "http://n2"},
                             placement={0: ("n2",), 1: ("n2",)},
                             internal_urls={"n2": f"http://127.0.0.1:{internal.port}"},
                             sealer=wire.Sealer(KEY, "n1"), settings=settings, maps=MapFollower(OLD))
    sender = TestClient(TestServer(create_app(sender_ctx)))
    await sender.start_server()
    try:
        yield Nodes(sender, receiver, stores, sender_ctx)
    finally:
        await sender.close()
        await internal.close()
        await receiver.close()
        for store in stores:
            store.close()


@pytest.mark.parametrize("nodes", [(NEW, 2)], indirect=True, ids=["refused-by-the-receivers-map"])
async def test_a_write_refused_by_the_receivers_newer_map_is_routed_again_once_this_node_has_it(nodes):
    nodes.later(nodes.sender_ctx.maps, NEW)
    resp = await nodes.sender.post("/v1/accounts", json=account_body(LOW[0]))
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["shard"] == 1
    assert resp.headers["X-Ledger-Token"].startswith("1:")
    assert nodes.accounts(0) == [] and nodes.accounts(1) == [LOW[0]]


@pytest.mark.parametrize("nodes", [(OLD, 2)], indirect=True, ids=["refused-by-the-shards-slots"])
async def test_a_write_refused_by_the_shards_slots_is_routed_again_and_the_receiver_catches_up(nodes):
    nodes.later(nodes.sender_ctx.maps, NEW)
    nodes.later(nodes.receiver.maps, NEW, after_s=0.4)  # the second hop names epoch 2: n2 waits for it
    resp = await nodes.sender.post("/v1/accounts", json={"accounts": [account_body(i) for i in LOW[:3]]})
    assert resp.status == 200, await resp.text()
    assert [r["status"] for r in (await resp.json())["results"]] == [201, 201, 201]
    assert nodes.accounts(0) == [] and sorted(nodes.accounts(1)) == sorted(LOW[:3])
    transfer = transfer_body("t1", LOW[0], LOW[1], 5, "BRL")
    resp = await nodes.sender.post("/v1/transactions", json=transfer)
    assert resp.status == 201 and (await resp.json())["shards"] == [1], await resp.text()


@pytest.mark.parametrize("nodes", [(NEW, 2)], indirect=True, ids=["map-never-arrives"])
async def test_a_write_whose_map_does_not_catch_up_is_503_and_applied_nowhere(nodes):
    nodes.sender_ctx.settings = dataclasses.replace(
        nodes.sender_ctx.settings, forwarding=ForwardingSettings(map_wait_s=0.2))
    resp = await nodes.sender.post("/v1/accounts", json=account_body(LOW[1]))
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "unavailable", body
    assert body["error"]["details"] == {"epoch": 2, "map_epoch": 1}
    assert nodes.accounts(0) == [] and nodes.accounts(1) == []


# -- the map over HTTP -----------------------------------------------------------------------------------


async def call(ctx: NodeContext, path: str, payload: Any) -> tuple[int, Any]:
    server = TestServer(internal_api.create_app(ctx))
    async with TestClient(server) as client:
        sealer = wire.Sealer(KEY, "n9")
        sealed = sealer.seal_request("POST", wire.PREFIX + path, payload)
        async with client.post(wire.PREFIX + path, data=sealed.body, headers=sealed.headers) as resp:
            return resp.status, sealer.open_answer(sealed, resp.status, resp.headers, await resp.read())


async def test_the_map_long_poll_answers_at_once_when_newer_else_when_a_newer_map_arrives():
    follower = MapFollower(OLD)
    ctx = NodeContext("n2", {}, 2, sealer=wire.Sealer(KEY, "n2"), maps=follower,
                      settings=NodeSettings(meta=MetaSettings(long_poll_s=5.0)))
    status, answer = await call(ctx, "/map", {"epoch": 0})
    assert status == 200 and ClusterMap.from_wire(answer["map"]) == OLD
    asyncio.get_running_loop().call_later(0.2, follower.update, NEW)
    started = time.monotonic()
    status, answer = await call(ctx, "/map", {"epoch": 1})
    assert ClusterMap.from_wire(answer["map"]) == NEW and time.monotonic() - started < 3.0
    status, answer = await call(ctx, "/map", {"epoch": "x"})
    assert status == 400


async def test_a_node_without_a_map_is_not_ready_and_answers_routed_requests_503(tmp_path):
    store = LedgerStore(str(tmp_path / "s.lmdb"), map_size=2**26)
    ctx = NodeContext("n1", {0: DirectShard(store, 0)}, 1, maps=MapFollower())
    async with TestClient(TestServer(create_app(ctx))) as client:
        for method, path, body in [("POST", "/v1/accounts", account_body("a")),
                                   ("GET", "/v1/accounts/a", None), ("GET", "/v1/cluster/map", None)]:
            resp = await client.request(method, path, json=body)
            assert resp.status == 503, (path, await resp.text())
            assert (await resp.json())["error"]["code"] == "unavailable"
        resp = await client.get("/readyz")
        assert resp.status == 503 and (await resp.json())["map"] == {"epoch": 0, "ready": False}
        ctx.maps.update(fixed_map(1))
        resp = await client.get("/v1/cluster/map")
        body = await resp.json()
        assert resp.status == 200 and body["epoch"] == 1 and body["slots"] == 4096
        assert body["shards"] == [{"id": 0, "replicas": [], "epoch": 1, "slot_ranges": [[0, 4095]]}]
        assert (await client.get("/readyz")).status == 200
    store.close()
