"""The internal protocol: sealed with the cluster secret, validated like public requests, off the public port.

A request that is not sealed with the cluster's key (or is stale, or replayed) is refused with 401 and
applies nothing; a sealed one is still checked as the public edge checks (shape, batch limit, the
shard that owns every account it names). The public port serves none of the internal paths.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from raftledger.client.errors import LedgerError
from raftledger.node import wire
from raftledger.node.http import NodeContext, create_app, forward
from raftledger.node.http import internal as internal_api
from raftledger.node.metrics import Metrics
from raftledger.node.testing import DirectShard, ids_on_shard
from raftledger.statemachine import codec
from raftledger.statemachine.commands import (
    DECIDE_NEW,
    LEG_VOID,
    Batch,
    ClaimId,
    Complete,
    CreateAccount,
    Decide,
    Direction,
    EntrySpec,
    ExpireHolds,
    FinishLeg,
    PrepareLeg,
)
from raftledger.statemachine.store import LedgerStore
from raftledger.statemachine.testing import account, transfer

SHARDS = 2
KEY = wire.internal_key(b"k" * 32)


@pytest.fixture
async def node(tmp_path: Path):
    stores = [LedgerStore(str(tmp_path / f"s{s}.lmdb"), shard=s, map_size=2**28) for s in range(SHARDS)]
    shards = {s: DirectShard(store, s) for s, store in enumerate(stores)}
    ctx = NodeContext("n1", shards, SHARDS, sealer=wire.Sealer(KEY, "n1"))
    internal = TestClient(TestServer(internal_api.create_app(ctx)))
    public = TestClient(TestServer(create_app(ctx)))
    await internal.start_server()
    await public.start_server()
    try:
        yield internal, public, stores
    finally:
        await internal.close()
        await public.close()
        for store in stores:
            store.close()


async def call(client: TestClient, path: str, payload: Any, sealer: wire.Sealer | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    sealer = sealer or wire.Sealer(KEY, "n2")
    sealed = sealer.seal_request("POST", wire.PREFIX + path, payload)
    async with client.post(wire.PREFIX + path, data=sealed.body,
                           headers={**sealed.headers, **(headers or {})}) as resp:
        body = await resp.read()
        if resp.status == 401:
            return 401, await resp.json()
        return resp.status, sealer.open_answer(sealed, resp.status, resp.headers, body)


async def submit(client: TestClient, shard: int, *commands: Any) -> list[dict[str, Any]]:
    status, answer = await call(client, f"/shards/{shard}/submit",
                                [codec.encode_command(c) for c in commands])
    assert status == 200, answer
    return list(answer["replies"])


def applied(stores: list[LedgerStore]) -> list[int]:
    return [store.applied_index() for store in stores]


# -- authentication -----------------------------------------------------------------------------------


async def test_an_unsigned_request_is_refused_and_applies_nothing(node):
    internal, _, stores = node
    a = ids_on_shard(0, SHARDS, "u")[0]
    async with internal.post(wire.PREFIX + "/shards/0/submit",
                             data=wire.pack([codec.encode_command(account(a))])) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"
    assert applied(stores) == [0, 0]


async def test_a_request_sealed_with_another_key_is_refused_and_applies_nothing(node):
    internal, _, stores = node
    stranger = wire.Sealer(wire.internal_key(os.urandom(32)), "n2")
    status, body = await call(internal, "/shards/0/submit",
                              [codec.encode_command(account(ids_on_shard(0, SHARDS, "w")[0]))],
                              sealer=stranger)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert applied(stores) == [0, 0]


async def test_a_sealed_body_cannot_be_moved_to_another_path_or_replayed(node):
    internal, _, stores = node
    sealer = wire.Sealer(KEY, "n2")
    a = ids_on_shard(0, SHARDS, "r")[0]
    sealed = sealer.seal_request("POST", wire.PREFIX + "/shards/0/submit", [codec.encode_command(account(a))])
    async with internal.post(wire.PREFIX + "/shards/1/submit", data=sealed.body,
                             headers=sealed.headers) as resp:
        assert resp.status == 401  # the path is part of what the seal covers
    for expected in (200, 401):  # the first delivery works, the same bytes again do not
        async with internal.post(wire.PREFIX + "/shards/0/submit", data=sealed.body,
                                 headers=sealed.headers) as resp:
            assert resp.status == expected
    assert applied(stores) == [1, 0]


async def test_a_sender_whose_clock_is_off_logs_the_reason_its_peer_gave(node, monkeypatch, caplog):
    """Under a skewed clock the sender used to log "is it configured with this cluster's secret?";
    the peer's unsealed reason names the clock instead (found in the chaos skew fault's logs)."""
    internal, _, stores = node
    sealer = wire.Sealer(KEY, "n2")
    now = time.time_ns()
    monkeypatch.setattr(wire.time, "time_ns", lambda: now + 3600 * 10**9)  # an hour ahead
    sealed = sealer.seal_request("POST", wire.PREFIX + "/status", None)
    monkeypatch.undo()
    async with internal.post(wire.PREFIX + "/status", data=sealed.body, headers=sealed.headers) as resp:
        status, headers, body = resp.status, resp.headers, await resp.read()
    assert status == 401
    ctx = NodeContext("n2", {}, SHARDS, sealer=sealer)
    with caplog.at_level(logging.ERROR, logger="raftledger.node.http.forward"), \
            pytest.raises(LedgerError) as refused:
        forward._answer(ctx, "n1", sealed, status, headers, body)
    assert refused.value.code == "unavailable"
    assert "refused this node's request: request time is -3600.0s off this node's clock" in caplog.text
    assert "secret" not in caplog.text
    assert forward._refusal_reason(401, b"not json") == "" and forward._refusal_reason(500, body) == ""
    assert applied(stores) == [0, 0]


def test_a_request_outside_the_time_window_or_seen_before_is_refused():
    guard = wire.ReplayGuard(window_s=10, nonces_max=1000)
    now = time.time_ns()
    with pytest.raises(wire.Unauthenticated, match="off this node's clock"):
        guard.admit(b"a" * 12, now - 11 * 10**9, now)
    guard.admit(b"b" * 12, now + 9 * 10**9, now)  # a sender's clock ahead, within the window
    with pytest.raises(wire.Unauthenticated, match="replayed"):
        guard.admit(b"b" * 12, now + 9 * 10**9, now + 15 * 10**9)  # still inside its own window


def test_peer_clocks_say_this_node_is_off_only_when_most_peers_heard_from_say_so():
    now = [0.0]
    clocks = wire.PeerClocks(window_s=10, memory_s=30, monotonic=lambda: now[0])
    assert clocks.own_offset_ns() is None  # heard from nobody
    clocks.observe("n2", 300 * 10**9)
    assert clocks.own_offset_ns() is None  # one peer alone: n2 may be the one that is off
    clocks.observe("n3", 2 * 10**9)
    assert clocks.own_offset_ns() is None  # one of two
    clocks.observe("n3", 299 * 10**9)
    assert clocks.own_offset_ns() == 300 * 10**9 or clocks.own_offset_ns() == 299 * 10**9
    now[0] = 31.0  # forgotten: heard nothing since
    assert clocks.own_offset_ns() is None
    guard = wire.ReplayGuard(window_s=10, nonces_max=1000, peer_clocks=clocks)
    for peer, nonce in (("n2", b"c" * 12), ("n3", b"d" * 12)):
        with pytest.raises(wire.Unauthenticated):
            guard.admit(nonce, 1_000 * 10**9, 1_120 * 10**9, peer=peer)  # refused, but heard
    assert clocks.own_offset_ns() == 120 * 10**9


def test_metrics_show_each_peers_clock_offset_and_whether_this_node_is_the_one_off():
    now = [0.0]
    clocks = wire.PeerClocks(window_s=10, memory_s=30, monotonic=lambda: now[0], own_id="n1")
    metrics = Metrics("n1")
    metrics.watch_clocks(clocks.offsets_ns, clocks.own_offset_ns)

    def scraped() -> tuple[dict[str, float], float]:
        text = generate_latest(metrics.registry).decode()
        families = {f.name: f.samples for f in text_string_to_metric_families(text)}
        offsets = {s.labels["peer"]: s.value for s in families["raftledger_peer_clock_offset_seconds"]}
        return offsets, families["raftledger_clock_off"][0].value

    assert scraped() == ({}, 0.0)
    clocks.observe("n2", -1_500_000_000)
    clocks.observe("n3", 250_000)
    assert scraped() == ({"n2": -1.5, "n3": 0.00025}, 0.0)  # within the window: worth a look, not off
    clocks.observe("n2", 40 * 10**9)
    clocks.observe("n3", 41 * 10**9)
    clocks.observe(wire.TOOL_SENDER, 0)  # the CLI seals its requests too, but has no say on the clock
    clocks.observe("n1", 0)  # nor has this node, calling itself
    assert scraped() == ({"n2": 40.0, "n3": 41.0}, 1.0)
    now[0] = 31.0  # not heard from since: neither is shown
    assert scraped() == ({}, 0.0)


def test_an_answer_is_bound_to_its_request_and_status():
    caller, server = wire.Sealer(KEY, "n1"), wire.Sealer(KEY, "n2")
    first = caller.seal_request("POST", "/p", None)
    second = caller.seal_request("POST", "/p", None)
    headers, body = server.seal_answer(first.nonce, 200, {"balance": 2**100, "debt": -(2**70)})
    assert caller.open_answer(first, 200, headers, body) == {"balance": 2**100, "debt": -(2**70)}
    with pytest.raises(wire.Unauthenticated):
        caller.open_answer(second, 200, headers, body)
    with pytest.raises(wire.Unauthenticated):
        caller.open_answer(first, 503, headers, body)


# -- validated like the public edge -------------------------------------------------------------------


async def test_a_command_for_an_account_of_another_shard_is_refused_unapplied(node):
    internal, _, stores = node
    foreign = ids_on_shard(1, SHARDS, "f")[0]
    [reply] = await submit(internal, 0, account(foreign))
    assert reply["error"]["code"] == "wrong_shard" and reply["error"]["details"]["accounts"] == [foreign]
    assert reply["error"]["details"]["epoch"] == 1  # the map it was judged by
    a, b = ids_on_shard(0, SHARDS, "x")[0], ids_on_shard(1, SHARDS, "y")[0]
    [reply] = await submit(internal, 0, transfer("cross", a, b, 5))  # a cross-shard transaction
    assert reply["error"]["code"] == "wrong_shard"
    assert applied(stores) == [0, 0]


async def test_a_batch_over_the_public_limit_is_refused_unapplied(node):
    internal, _, stores = node
    ids = ids_on_shard(0, SHARDS, "b")
    huge = Batch(tuple(CreateAccount(id=f"{ids[0]}.{i}", currency="USD") for i in range(20_000)))
    [reply] = await submit(internal, 0, huge)
    assert reply["error"]["code"] == "too_many_commands"
    assert reply["error"]["details"] == {"max": 8190, "count": 20_000}
    assert applied(stores) == [0, 0]


async def test_a_malformed_command_is_refused_before_it_is_proposed(node):
    internal, _, stores = node
    a = ids_on_shard(0, SHARDS, "m")[0]
    replies = await submit(internal, 0, CreateAccount(id=a, currency="usd"))
    assert replies[0]["error"]["code"] == "invalid_currency"
    status, answer = await call(internal, "/shards/0/submit", [b"\x01\xc1", "not bytes"])
    assert status == 400 and answer["error"]["code"] == "malformed_body"
    assert applied(stores) == [0, 0]
    [good] = await submit(internal, 0, account(a))
    assert good["results"][0]["code"] == "ok"
    assert applied(stores) == [1, 0]


async def test_a_self_transfer_or_a_leader_only_command_is_refused_unapplied(node):
    internal, _, stores = node
    a = ids_on_shard(0, SHARDS, "s")[0]
    [own] = await submit(internal, 0, transfer("self", a, a, 5))
    assert own["error"]["code"] == "accounts_must_be_different"
    [expire] = await submit(internal, 0, ExpireHolds())  # proposed by a leader itself, never sent
    assert expire["error"]["code"] == "malformed_body"
    assert applied(stores) == [0, 0]


async def test_the_steps_of_a_cross_shard_transaction_are_admitted_alone_or_batched(node):
    internal, _, stores = node
    here, there = ids_on_shard(0, SHARDS, "x")[0], ids_on_shard(1, SHARDS, "x")[0]
    digest = b"d" * 32
    leg = PrepareLeg("x1", 0, digest, (EntrySpec(here, Direction.debit, 5, "BRL"),), shards=(0, 1))
    steps = [ClaimId("x9", digest, 1), Batch((leg, Decide("x1", digest, DECIDE_NEW, 0, local=True))),
             FinishLeg("x1", digest, LEG_VOID, "x1"), Complete("x1")]
    for step in steps:
        [reply] = await submit(internal, 0, step)
        assert "error" not in reply, (step, reply)
    elsewhere = PrepareLeg("x2", 0, digest, (EntrySpec(there, Direction.debit, 5, "BRL"),), shards=(1,))
    for step in (elsewhere, Batch((elsewhere,))):
        [reply] = await submit(internal, 0, step)
        assert reply["error"]["code"] == "wrong_shard"
    assert applied(stores) == [len(steps), 0]


async def test_a_shard_in_the_path_that_is_not_a_hosted_number_is_a_404(node):
    internal, _, _ = node
    for shard in ("x", "7", "-1", "99999999999999999999"):
        status, answer = await call(internal, f"/shards/{shard}/barrier", None)
        assert status == 404 and answer["error"]["code"] == "not_found", shard


async def test_status_and_totals_answer_sealed(node):
    internal, _, _ = node
    status, answer = await call(internal, "/status", None)
    assert status == 200 and set(answer["shards"]) == {"0", "1"}
    assert answer["shards"]["0"]["fingerprint"]["index"] == 0
    status, answer = await call(internal, "/shards/1/totals", None)
    assert status == 200 and answer == {"accounts": 0, "applied_index": 0, "currencies": {}}


# -- the public port -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("path", ["/internal/v1/status", "/internal/v1/shards/0/submit",
                                  "/internal/v1/shards/0/barrier", "/internal/v1/shards/0/totals",
                                  "/_node/status", "/_node/shards/0/submit", "/_node/shards/0/totals",
                                  "/_node/shards/0/bench"])
async def test_the_public_port_serves_no_internal_path(node, method, path):
    _, public, stores = node
    async with public.request(method, path, data=b"\x00") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    assert applied(stores) == [0, 0]
