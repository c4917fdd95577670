"""The feed's HTTP routes over real LMDB stores, with in-test shard services (``DirectShard``) instead
of Raft: pages, long-polls, Server-Sent Events, durable consumers, 410 after compaction, bad input.
Real clusters are in test_feed_cluster.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from raftledger.cluster import cli
from raftledger.node.http import NodeContext, create_app
from raftledger.node.settings import FeedSettings, NodeSettings
from raftledger.node.testing import DirectShard, account_body, transfer_body
from raftledger.statemachine.commands import CompactFeed, SetFeedOffset
from raftledger.statemachine.store import LedgerStore

SHARDS = 2
TAG = "{f1}"
stream_read_timeout_s = 30.0  # a generous bound on waiting for a line that is expected


@pytest.fixture
async def api(tmp_path: Path):
    stores = [LedgerStore(str(tmp_path / f"s{s}.lmdb"), shard=s, map_size=2**28) for s in range(SHARDS)]
    shards = {s: DirectShard(store, s) for s, store in enumerate(stores)}
    settings = NodeSettings(feed=FeedSettings(stream_heartbeat_s=0.2, wait_ms_max=20_000))
    ctx = NodeContext("n1", shards, SHARDS, settings=settings)
    client = TestClient(TestServer(create_app(ctx)))
    await client.start_server()
    client.shards = shards  # type: ignore[attr-defined]
    client.ctx = ctx  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        await client.close()
        for store in stores:
            store.close()


def shard_of(api: TestClient) -> int:
    return int(api.ctx.shard_of(f"a{TAG}"))  # type: ignore[attr-defined]


async def post(api: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await api.post(path, json=body)
    assert resp.status in (200, 201), await resp.text()
    return dict(await resp.json())


async def funded(api: TestClient) -> int:
    """Accounts a and b (one shard, by their tag) and a transfer of 100 from a to b; the shard."""
    for name in ("a", "b"):
        await post(api, "/v1/accounts", account_body(f"{name}{TAG}", normal="credit"))
    await post(api, "/v1/transactions", transfer_body(f"t1{TAG}", f"a{TAG}", f"b{TAG}", 100))
    return shard_of(api)


async def feed(api: TestClient, **params: Any) -> tuple[int, dict[str, Any]]:
    resp = await api.get("/v1/feed", params={k: str(v) for k, v in params.items()})
    return resp.status, dict(await resp.json())


async def test_feed_page_gives_events_in_offset_order_with_ids_and_balances(api):
    shard = await funded(api)
    status, page = await feed(api, shard=shard)
    assert status == 200
    assert [e["id"] for e in page["events"]] == [f"{shard}:1", f"{shard}:2", f"{shard}:3"]
    assert [e["type"] for e in page["events"]] == ["account.created", "account.created",
                                                    "transaction.posted"]
    posted = page["events"][2]["data"]
    assert posted["id"] == f"t1{TAG}" and posted["cross_shard"] is False
    assert {b["account_id"]: b["balance"] for b in posted["balances"]} == {f"a{TAG}": -100, f"b{TAG}": 100}
    assert (page["next_after"], page["first_offset"], page["last_offset"]) == (3, 1, 3)
    status, rest = await feed(api, shard=shard, after=1, limit=1)
    assert [e["offset"] for e in rest["events"]] == [2] and rest["next_after"] == 2


async def test_empty_long_poll_answers_when_its_wait_is_over(api):
    shard = await funded(api)
    status, page = await feed(api, shard=shard, after=3, wait_ms=50)
    assert (status, page["events"], page["next_after"]) == (200, [], 3)


async def test_long_poll_is_woken_by_the_next_applied_event(api):
    shard = await funded(api)
    waiting = asyncio.ensure_future(feed(api, shard=shard, after=3, wait_ms=20_000))
    await asyncio.sleep(0)  # let the request reach its wait (it would also find the event if later)
    await post(api, "/v1/transactions", transfer_body(f"t2{TAG}", f"a{TAG}", f"b{TAG}", 7))
    status, page = await asyncio.wait_for(waiting, 15)  # well before its own 20 s
    assert status == 200 and [e["data"]["id"] for e in page["events"]] == [f"t2{TAG}"]


async def test_reader_behind_the_retention_point_gets_410_with_the_earliest_offset(api):
    shard = await funded(api)
    svc = api.shards[shard]
    await svc.submit(CompactFeed(through=2, age_min_ns=0))
    status, body = await feed(api, shard=shard, after=0)
    assert status == 410 and body["error"]["code"] == "feed_compacted"
    assert body["error"]["details"]["earliest_offset"] == 3
    status, page = await feed(api, shard=shard, after=2)
    assert status == 200 and [e["offset"] for e in page["events"]] == [3]


@pytest.mark.parametrize(("params", "code"), [
    ({}, "invalid_query"),  # the feed is per shard
    ({"shard": 2}, "invalid_query"),
    ({"shard": "x"}, "invalid_query"),
    ({"shard": 0, "after": -1}, "invalid_query"),
    ({"shard": 0, "after": "1.5"}, "invalid_query"),
    ({"shard": 0, "limit": 0}, "invalid_query"),
    ({"shard": 0, "limit": 1001}, "invalid_query"),
    ({"shard": 0, "wait_ms": 20_001}, "invalid_query"),
    ({"shard": 0, "from": 1}, "invalid_query"),
    ({"shard": 0, "consistency": "eventual"}, "invalid_query"),
    ({"shard": 0, "min_token": "zz"}, "invalid_token"),
])
async def test_bad_feed_parameters_are_400_with_stable_codes(api, params, code):
    status, body = await feed(api, **params)
    assert status == 400 and body["error"]["code"] == code, body


async def read_sse(resp: Any, count: int) -> list[dict[str, str]]:
    """The next ``count`` events or comments of a stream, each as its fields."""
    out: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    while len(out) < count:
        line = (await asyncio.wait_for(resp.content.readline(), stream_read_timeout_s)).decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if line == "":
            if fields:
                out.append(fields)
            fields = {}
        elif line.startswith(":"):
            out.append({"comment": line[1:].strip()})
        else:
            name, _, value = line.partition(": ")
            fields[name] = value
    return out


async def test_stream_sends_events_then_new_ones_then_heartbeats(api):
    shard = await funded(api)
    async with api.get("/v1/feed/stream", params={"shard": str(shard), "after": "1"}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        first = await read_sse(resp, 2)
        assert [e["id"] for e in first] == [f"{shard}:2", f"{shard}:3"]
        assert first[1]["event"] == "transaction.posted"
        assert json.loads(first[1]["data"])["data"]["id"] == f"t1{TAG}"
        await post(api, "/v1/transactions", transfer_body(f"t2{TAG}", f"a{TAG}", f"b{TAG}", 5))
        [live] = await read_sse(resp, 1)
        assert live["id"] == f"{shard}:4"
        [idle] = await read_sse(resp, 1)
        assert idle == {"comment": "heartbeat"}


async def test_stream_resumes_after_last_event_id(api):
    shard = await funded(api)
    headers = {"Last-Event-ID": f"{shard}:2"}
    async with api.get("/v1/feed/stream", params={"shard": str(shard)}, headers=headers) as resp:
        [event] = await read_sse(resp, 1)
        assert event["id"] == f"{shard}:3"
    wrong = {"Last-Event-ID": f"{1 - shard}:2"}
    async with api.get("/v1/feed/stream", params={"shard": str(shard)}, headers=wrong) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_query"


async def test_stream_behind_the_retention_point_is_410(api):
    shard = await funded(api)
    await api.shards[shard].submit(CompactFeed(through=3, age_min_ns=0))
    async with api.get("/v1/feed/stream", params={"shard": str(shard), "after": "0"}) as resp:
        assert resp.status == 410
        assert (await resp.json())["error"]["details"]["earliest_offset"] == 4


async def test_consumer_offsets_are_stored_per_shard_with_their_lag(api):
    shard = await funded(api)
    other = 1 - shard
    resp = await api.put("/v1/feed/consumers/billing/offsets", json={"offsets": {str(shard): 2}})
    assert resp.status == 200 and resp.headers["X-Ledger-Token"]
    resp = await api.get("/v1/feed/consumers/billing")
    body = await resp.json()
    assert resp.status == 200
    assert body["shards"][str(shard)]["offset"] == 2 and body["shards"][str(shard)]["lag"] == 1
    assert body["shards"][str(other)]["offset"] is None and body["lag"] == 1
    metrics = await (await api.get("/metrics")).text()
    assert f'raftledger_feed_consumer_lag{{consumer="billing",shard="{shard}"}} 1.0' in metrics


async def test_an_offset_past_the_last_event_is_refused_and_named_per_shard(api):
    shard = await funded(api)
    resp = await api.put("/v1/feed/consumers/billing/offsets", json={"offsets": {str(shard): 99}})
    body = await resp.json()
    assert resp.status == 422 and body["error"]["code"] == "feed_offset_out_of_range"
    assert body["error"]["details"]["shards"][str(shard)]["applied"] is False
    assert (await api.get("/v1/feed/consumers/billing")).status == 404


async def test_a_removed_consumer_no_longer_holds_back_retention(api):
    shard = await funded(api)
    resp = await api.put("/v1/feed/consumers/slow/offsets", json={"offsets": {str(shard): 1}})
    assert resp.status == 200
    await api.shards[shard].submit(CompactFeed(through=3, age_min_ns=0))
    assert (await feed(api, shard=shard, after=1))[0] == 200  # kept for the consumer
    assert (await api.delete("/v1/feed/consumers/slow")).status == 200
    await api.shards[shard].submit(CompactFeed(through=3, age_min_ns=0))
    assert (await feed(api, shard=shard, after=1))[0] == 410
    assert (await api.get("/v1/feed/consumers/slow")).status == 404


@pytest.mark.parametrize(("body", "code"), [
    ({}, "missing_field"),
    ([], "invalid_field"),
    ({"offsets": {}}, "invalid_field"),
    ({"offsets": {"0": -1}}, "invalid_field"),
    ({"offsets": {"0": 1.0}}, "invalid_field"),
    ({"offsets": {"0": "3"}}, "invalid_field"),
    ({"offsets": {"0": True}}, "invalid_field"),
    ({"offsets": {"9": 1}}, "invalid_field"),
    ({"offsets": {"a": 1}}, "invalid_field"),
    ({"offsets": {"0": 1}, "extra": 1}, "unknown_field"),
])
async def test_bad_offsets_bodies_are_400_with_stable_codes(api, body, code):
    resp = await api.put("/v1/feed/consumers/c1/offsets", json=body)
    payload = await resp.json()
    assert resp.status == 400 and payload["error"]["code"] == code, payload


async def test_a_bad_consumer_name_is_400(api):
    resp = await api.put("/v1/feed/consumers/" + "x" * 129 + "/offsets", json={"offsets": {"0": 0}})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_id"


def run_cli(*argv: str) -> int:
    try:
        cli.main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


async def test_feed_dlq_commands_list_and_redrive_through_the_api(api, capsys):
    shard = await funded(api)
    await api.shards[shard].submit(SetFeedOffset("dlq.webhook.2-3", 1))  # as the exporter stores one
    url = str(api.make_url(""))
    assert await asyncio.to_thread(run_cli, "feed", "dlq", "list", "--json", "--endpoint", url) == 0
    listed = json.loads(capsys.readouterr().out)["dead_letters"]
    assert [(d["sink"], d["shard"], d["first"], d["last"]) for d in listed] == [("webhook", shard, 2, 3)]
    # no webhook is configured on this node: the batch fails again and stays
    assert await asyncio.to_thread(run_cli, "feed", "dlq", "redrive", "--json", "--endpoint", url) == 1
    failed = json.loads(capsys.readouterr().out)["failed"]
    assert failed[0]["first"] == 2 and "webhook" in failed[0]["error"]
    await api.shards[shard].submit(CompactFeed(through=3, age_min_ns=0))
    status, page = await feed(api, shard=shard, after=1)  # the dead letter holds its events
    assert status == 200 and page["first_offset"] == 2


async def test_a_stream_of_a_shard_whose_hosts_cannot_be_reached_is_503_not_a_redirect(tmp_path):
    store = LedgerStore(str(tmp_path / "s0.lmdb"), shard=0, map_size=2**28)
    peers = {"n1": "http://127.0.0.1:1", "n2": "http://127.0.0.1:2"}
    ctx = NodeContext("n1", {0: DirectShard(store, 0)}, SHARDS, peers=peers, placement={0: ["n1"], 1: ["n2"]})
    client = TestClient(TestServer(create_app(ctx)))
    await client.start_server()
    try:
        resp = await client.get("/v1/feed/stream", params={"shard": "1"}, headers={"Last-Event-ID": "1:7"},
                                allow_redirects=False)  # relayed from a host (tests/test_auth_spread.py)
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"
    finally:
        await client.close()
        store.close()
