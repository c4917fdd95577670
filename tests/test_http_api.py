"""The HTTP API over real LMDB stores, with a direct in-test shard service instead of Raft.

``DirectShard`` applies each command to its store at once (one log index per command), so these
tests exercise parsing, routing, rendering, idempotency, consistency checks and the edge's limits.
The replicated path is covered by tests/test_http_cluster.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiohttp.test_utils import TestClient, TestServer
from raftledger.bench import loadgen
from raftledger.node.http import NodeContext, create_app, openapi
from raftledger.node.http.context import CONTEXT
from raftledger.node.logs import JsonFormatter, request_id_var
from raftledger.node.service import Committed
from raftledger.node.settings import ForwardingSettings, HttpSettings, NodeSettings
from raftledger.node.testing import DirectShard, account_body, transfer_body
from raftledger.statemachine.store import LedgerStore

SHARDS = 2


@pytest.fixture
async def api(tmp_path: Path):
    stores = [LedgerStore(str(tmp_path / f"s{s}.lmdb"), shard=s, map_size=2**28)
              for s in range(SHARDS)]
    shards = {s: DirectShard(store, s) for s, store in enumerate(stores)}
    settings = NodeSettings(http=HttpSettings(body_bytes_max=256 * 1024, body_read_timeout_s=0.5,
                                              requests_in_flight_max=64),
                            forwarding=ForwardingSettings(leader_wait_s=0.2))
    ctx = NodeContext("n1", shards, SHARDS, settings=settings)
    client = TestClient(TestServer(create_app(ctx)))
    await client.start_server()
    client.shards = shards  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        await client.close()
        for store in stores:
            store.close()


TAG = "{c1}"  # every account below shares this hash tag: one shard


async def make_accounts(api: TestClient, *ids: str, **fields: Any) -> None:
    for ident in ids:
        resp = await api.post("/v1/accounts", json=account_body(ident, **fields))
        assert resp.status == 201, await resp.text()


def transfer(txid: str, amount: Any = 100, debit: str = f"a{TAG}",
             credit: str = f"b{TAG}") -> dict[str, Any]:
    """By default from a{TAG} to b{TAG}, the two accounts most tests open, with an id of the same tag:
    a single-shard transaction (cross-shard ones: tests/test_cross_shard.py)."""
    return transfer_body(txid if "{" in txid else txid + TAG, debit, credit, amount)


async def test_create_account_then_identical_again_is_200_replayed(api):
    body = {"id": f"alice:{TAG}", "currency": "BRL", "normal": "credit", "metadata": {"n": 1}}
    first = await api.post("/v1/accounts", json=body)
    assert first.status == 201
    assert first.headers["X-Ledger-Token"].count(":") == 1
    again = await api.post("/v1/accounts", json=body)
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    different = await api.post("/v1/accounts", json=dict(body, currency="USD"))
    assert different.status == 409
    assert (await different.json())["error"]["code"] == "exists_with_different_fields"


async def test_transfer_read_balance_and_statement(api):
    await make_accounts(api, f"a{TAG}", f"b{TAG}")
    resp = await api.post("/v1/transactions", json=transfer("t1", "250"))
    assert resp.status == 201, await resp.text()
    tx = await resp.json()
    assert tx["status"] == "posted" and [e["amount"] for e in tx["entries"]] == [250, 250]
    token = resp.headers["X-Ledger-Token"]
    bal = await api.get(f"/v1/accounts/b{TAG}/balance", params={"min_token": token})
    assert bal.status == 200
    assert (await bal.json())["balance"] == -250  # debit-normal account, credited
    for header in ("X-Ledger-Node", "X-Ledger-Applied-Index", "X-Ledger-Staleness-Ms"):
        assert header in bal.headers
    statement = await (await api.get(f"/v1/accounts/a{TAG}/entries")).json()
    assert [e["seq"] for e in statement["entries"]] == [1] and statement["next"] is None
    got = await api.get(f"/v1/transactions/t1{TAG}")
    assert got.status == 200 and (await got.json())["id"] == f"t1{TAG}"


async def test_totals_beyond_64_bits_are_exact_json_integers(api):
    await make_accounts(api, f"a{TAG}", f"b{TAG}")
    largest = 2**63 - 1
    for i in range(3):
        resp = await api.post("/v1/transactions", json=transfer(f"big{i}", largest))
        assert resp.status == 201, await resp.text()
    text = await (await api.get(f"/v1/accounts/b{TAG}/balance")).text()
    assert json.loads(text)["balance"] == -3 * largest  # exact: json.loads keeps big integers
    assert str(3 * largest) in text


async def test_percent_encoded_and_raw_braces_reach_the_same_account(api):
    await make_accounts(api, f"a{TAG}")
    raw = await api.get("/v1/accounts/a{c1}")
    encoded = await api.get("/v1/accounts/a%7Bc1%7D")
    assert raw.status == encoded.status == 200
    assert (await raw.json())["id"] == (await encoded.json())["id"] == f"a{TAG}"


async def test_retry_of_rejected_transaction_returns_same_rejection(api):
    await make_accounts(api, f"a{TAG}", f"b{TAG}", flags=["debits_must_not_exceed_credits"])
    first = await api.post("/v1/transactions", json=transfer("t-over", 5))
    assert first.status == 422
    body = await first.json()
    assert body["error"]["code"] == "exceeds_credits"
    again = await api.post("/v1/transactions", json=transfer("t-over", 5))
    assert again.status == 422 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["error"]["code"] == "exceeds_credits"


async def test_a_transfer_from_an_account_to_itself_is_422_and_takes_no_id(api):
    await make_accounts(api, f"a{TAG}")
    own = {"id": "self", "debit_account_id": f"a{TAG}", "credit_account_id": f"a{TAG}",
           "amount": 5, "currency": "BRL"}
    resp = await api.post("/v1/transactions", json=own)
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["code"] == "accounts_must_be_different"
    assert error["details"]["account_id"] == f"a{TAG}"
    assert (await api.get("/v1/transactions/self")).status == 404


async def test_identical_retry_is_replayed_and_different_payload_is_409(api):
    await make_accounts(api, f"a{TAG}", f"b{TAG}")
    first = await api.post("/v1/transactions", json=transfer("t2"), headers={"Idempotency-Key": f"t2{TAG}"})
    again = await api.post("/v1/transactions", json=transfer("t2"))
    assert first.status == again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await first.json() == await again.json()
    changed = await api.post("/v1/transactions", json=transfer("t2", 101))
    assert changed.status == 409
    assert (await changed.json())["error"]["code"] == "idempotency_key_reused"


async def test_unknown_account_is_422_and_missing_account_read_is_404(api):
    await make_accounts(api, f"a{TAG}")
    resp = await api.post("/v1/transactions", json=transfer("t3", credit=f"ghost{TAG}"))
    assert resp.status == 422
    assert (await resp.json())["error"]["code"] == "account_not_found"
    missing = await api.get(f"/v1/accounts/ghost{TAG}")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"
    assert "X-Ledger-Applied-Index" in missing.headers  # how fresh the replica that missed it was
    assert (await api.get("/v1/transactions/nope")).status == 404


async def test_pending_post_void_reverse(api):
    await make_accounts(api, f"a{TAG}", f"b{TAG}")
    hold = dict(transfer("h1", 100), pending=True)
    assert (await api.post("/v1/transactions", json=hold)).status == 201
    posted = await api.post(f"/v1/transactions/h1{TAG}/post", json={"amount": 60})
    assert posted.status == 201, await posted.text()
    assert (await posted.json())["id"] == f"h1{TAG}:post"
    assert (await api.post(f"/v1/transactions/h1{TAG}/void")).status == 422
    reversed_ = await api.post(f"/v1/transactions/h1{TAG}:post/reverse")
    assert reversed_.status == 201, await reversed_.text()
    twice = await api.post(f"/v1/transactions/h1{TAG}:post/reverse", json={"id": f"r2{TAG}"})
    assert (await twice.json())["error"]["code"] == "already_reversed"


async def test_batch_independent_and_atomic(api):
    await make_accounts(api, f"a{TAG}", f"b{TAG}")
    batch = {"transactions": [transfer("b1"), transfer("b2", credit=f"ghost{TAG}"),
                              transfer("b3")]}
    resp = await api.post("/v1/transactions/batch", json=batch)
    assert resp.status == 200
    statuses = [r["status"] for r in (await resp.json())["results"]]
    assert statuses == [201, 422, 201]
    atomic = {"transactions": [transfer("b4"), transfer("b5", credit=f"ghost{TAG}")],
              "atomic": True}
    results = (await (await api.post("/v1/transactions/batch", json=atomic)).json())["results"]
    assert [r["error"]["code"] for r in results] == ["linked_event_failed", "account_not_found"]
    assert (await api.get(f"/v1/transactions/b4{TAG}")).status == 404  # all or none
    assert (await (await api.get(f"/v1/accounts/a{TAG}")).json())["seq"] == 2


async def test_many_accounts_in_one_request_span_shards(api):
    accounts = [{"id": f"m{i}", "currency": "USD"} for i in range(10)]
    resp = await api.post("/v1/accounts", json={"accounts": accounts})
    assert resp.status == 200
    assert [r["status"] for r in (await resp.json())["results"]] == [201] * 10
    assert resp.headers["X-Ledger-Token"].count(",") == SHARDS - 1


async def test_seed_routes(api):
    await make_accounts(api, f"a{TAG}", f"b{TAG}")
    resp = await api.post("/transacoes", json=transfer("pt1"))
    assert resp.status == 201
    assert (await (await api.get(f"/contas/a{TAG}/saldo")).json())["balance"] == 100
    extrato = await (await api.get(f"/contas/a{TAG}/extrato", params={"order": "desc"})).json()
    assert extrato["entries"][0]["transaction_id"] == f"pt1{TAG}"


async def test_statement_cursor_pages_through_every_entry(api):
    await make_accounts(api, f"a{TAG}", f"b{TAG}")
    for i in range(7):
        assert (await api.post("/v1/transactions", json=transfer(f"c{i}"))).status == 201
    seen, after = [], None
    for _ in range(10):
        params = {"limit": "3"} | ({"after_seq": str(after)} if after else {})
        page = await (await api.get(f"/v1/accounts/a{TAG}/entries", params=params)).json()
        seen += [e["seq"] for e in page["entries"]]
        after = page["next"]
        if after is None:
            break
    assert seen == list(range(1, 8))


async def test_msgpack_in_and_out(api):
    await make_accounts(api, f"a{TAG}", f"b{TAG}")
    resp = await api.post("/v1/transactions", data=msgpack.packb(transfer("mp1")),
                          headers={"Content-Type": "application/msgpack"})
    assert resp.status == 201 and resp.content_type == "application/msgpack"
    assert msgpack.unpackb(await resp.read())["id"] == f"mp1{TAG}"


async def test_bounded_staleness_read_is_refused_when_leader_not_heard_from(api):
    await make_accounts(api, f"a{TAG}")
    for shard in api.shards.values():
        shard.contact_age_ms = 5_000.0
    resp = await api.get(f"/v1/accounts/a{TAG}", params={"max_staleness_ms": "100"})
    assert resp.status == 503 and "Retry-After" in resp.headers
    assert resp.headers["X-Ledger-Staleness-Ms"] == "5000"
    assert (await resp.json())["error"]["code"] == "stale_replica"
    assert (await api.get(f"/v1/accounts/a{TAG}")).status == 200


async def test_unreachable_min_token_is_stale_replica(api):
    await make_accounts(api, f"a{TAG}")
    resp = await api.get(f"/v1/accounts/a{TAG}", params={"min_token": "0:999,1:999"})
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "stale_replica"


async def test_no_leader_answers_503_with_retry_after(api):
    await make_accounts(api, f"a{TAG}", f"b{TAG}")
    for shard in api.shards.values():
        shard.leading = False
    resp = await api.post("/v1/transactions", json=transfer("nl"))
    assert resp.status == 503 and "Retry-After" in resp.headers
    assert (await resp.json())["error"]["code"] == "not_leader"


async def test_request_id_is_echoed_or_made(api):
    resp = await api.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
    assert len((await api.get("/healthz")).headers["X-Request-Id"]) == 24


async def test_ops_routes(api):
    assert (await api.get("/readyz")).status == 200
    cluster = await (await api.get("/v1/cluster")).json()
    assert [s["id"] for s in cluster["shards"]] == list(range(SHARDS))
    metrics = await (await api.get("/metrics")).text()
    assert "raftledger_shard_is_leader" in metrics
    assert "raftledger_http_request_seconds_bucket" in metrics


async def test_every_route_is_in_openapi(api):
    spec = await (await api.get("/openapi.json")).json()
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    for route in api.app.router.routes():
        path = route.resource.canonical.replace("{id:[^/]+}", "{id}")
        assert (path, route.method.lower()) in documented, (route.method, path)


# --- robustness -----------------------------------------------------------------------------


MALFORMED: list[tuple[str, str, Any, dict[str, str], int, str]] = [
    ("POST", "/v1/transactions", b"{", {}, 400, "malformed_json"),
    ("POST", "/v1/transactions", b"", {}, 400, "malformed_json"),
    ("POST", "/v1/transactions", b"[]", {}, 400, "invalid_field"),
    ("POST", "/v1/transactions", b"null", {}, 400, "invalid_field"),
    ("POST", "/v1/transactions", b"\xff\xfe\x00", {}, 400, "malformed_json"),
    ("POST", "/v1/transactions", b'{"a":NaN}', {}, 400, "malformed_json"),
    ("POST", "/v1/transactions", b'{"id":"t","id":"u"}', {}, 400, "duplicate_field"),
    ("POST", "/v1/transactions", b"[" * 5000 + b"]" * 5000, {}, 400, "too_deep"),
    ("POST", "/v1/transactions", json.dumps(transfer("f", 1.5)).encode(), {}, 400,
     "invalid_amount"),
    ("POST", "/v1/transactions", b'{"id":"f","debit_account_id":"a","credit_account_id":"b",'
     b'"amount":1e2,"currency":"BRL"}', {}, 400, "invalid_amount"),
    ("POST", "/v1/transactions", json.dumps(transfer("f", -1)).encode(), {}, 400,
     "invalid_amount"),
    ("POST", "/v1/transactions", json.dumps(transfer("f", 0)).encode(), {}, 400,
     "invalid_amount"),
    ("POST", "/v1/transactions", json.dumps(transfer("f", 2**70)).encode(), {}, 400,
     "invalid_amount"),
    ("POST", "/v1/transactions", json.dumps(transfer("bad id!")).encode(), {}, 400, "invalid_id"),
    ("POST", "/v1/transactions", json.dumps(dict(transfer("f"), currency="brl")).encode(), {},
     400, "invalid_currency"),
    ("POST", "/v1/transactions", json.dumps(dict(transfer("f"), memo="x")).encode(), {}, 400,
     "unknown_field"),
    # a lone surrogate, echoed back in the error details: JSON can carry it, UTF-8 cannot
    ("POST", "/v1/transactions", b'{"id":"f","\\ud800":1}', {}, 400, "unknown_field"),
    ("POST", "/v1/transactions", json.dumps({k: v for k, v in transfer("f").items() if k != "id"})
     .encode(), {}, 400, "missing_id"),
    ("POST", "/v1/transactions", json.dumps(transfer("f")).encode(), {"Idempotency-Key": "g"},
     400, "id_mismatch"),
    ("POST", "/v1/transactions", json.dumps(dict(transfer("f"), pending="yes")).encode(), {}, 400,
     "invalid_field"),
    ("POST", "/v1/transactions", b"{}", {"Content-Type": "text/plain"}, 415,
     "unsupported_media_type"),
    ("POST", "/v1/transactions", b"\xc1", {"Content-Type": "application/msgpack"}, 400,
     "malformed_body"),
    ("POST", "/v1/transactions/batch", json.dumps({"transactions": []}).encode(), {}, 400,
     "invalid_field"),
    ("POST", "/v1/accounts", json.dumps({"id": "a", "currency": "BRL", "flags": ["x"]}).encode(),
     {}, 400, "invalid_flag"),
    ("POST", "/v1/accounts", json.dumps({"id": "a", "currency": "BRL", "normal": 1}).encode(), {},
     400, "invalid_field"),
    ("POST", "/v1/accounts", json.dumps({"id": "a", "currency": "BRL",
                                         "metadata": {"x": 0.1}}).encode(), {}, 400,
     "invalid_metadata"),
    ("GET", "/v1/accounts/a/entries?limit=0", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/a/entries?order=up", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/a?consistency=strong", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/a?min_token=zz", None, {}, 400, "invalid_token"),
    ("GET", "/v1/accounts/a?max_staleness_ms=-1", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/a/balance?at_seq=x", None, {}, 400, "invalid_query"),
    ("GET", "/v1/accounts/" + "a" * 200, None, {}, 400, "invalid_id"),
    ("GET", "/v1/nothing", None, {}, 404, "not_found"),
    ("DELETE", "/v1/accounts", None, {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize("method,path,data,headers,status,code", MALFORMED,
                         ids=[f"{i}-{m[5]}" for i, m in enumerate(MALFORMED)])
async def test_malformed_request_gets_4xx_and_stable_code(api, method, path, data, headers,
                                                          status, code):
    headers = {"Content-Type": "application/json", **headers}
    resp = await api.request(method, path, data=data, headers=headers)
    raw = await resp.read()
    body = msgpack.unpackb(raw) if resp.content_type == "application/msgpack" else json.loads(raw)
    assert (resp.status, body["error"]["code"]) == (status, code), body
    assert set(body["error"]) == {"code", "message", "details"}
    assert (await api.get("/healthz")).status == 200  # still serving


async def test_huge_payload_is_413(api):
    huge = b'{"id":"' + b"a" * (300 * 1024) + b'"}'
    resp = await api.post("/v1/transactions", data=huge,
                          headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "body_too_large"


async def test_huge_chunked_payload_is_cut_off_at_the_limit(api):
    async def chunks():
        for _ in range(100):
            yield b" " * 8192

    resp = await api.post("/v1/transactions", data=chunks(),
                          headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await api.get("/healthz")).status == 200


async def test_slow_client_body_times_out_with_408(api):
    reader, writer = await asyncio.open_connection(api.host, api.port)
    writer.write(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"id\":")
    await writer.drain()
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    assert head.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 4
    writer.close()
    assert (await api.get("/healthz")).status == 200


async def test_in_flight_bound_answers_503_overloaded(api):
    gate = asyncio.Event()
    shard = api.shards[0]
    original = shard.submit

    async def slow_submit(command: Any) -> Committed:
        await gate.wait()
        return await original(command)

    shard.submit = slow_submit
    ids = [i for i in (f"acct{n}" for n in range(200))
           if NodeContext("n", {}, SHARDS).shard_of(i) == 0][:80]
    tasks = [asyncio.ensure_future(api.post("/v1/accounts", json={"id": i, "currency": "BRL"}))
             for i in ids]
    deadline = time.monotonic() + 5
    overloaded = None
    while overloaded is None and time.monotonic() < deadline:
        resp = await api.get("/v1/accounts/probe")  # a read: never held up by the slow shard
        if resp.status == 503:
            overloaded = resp
        await asyncio.sleep(0.01)  # poll interval while the slow requests pile up
    gate.set()
    responses = await asyncio.gather(*tasks)
    assert overloaded is not None and "Retry-After" in overloaded.headers
    assert (await overloaded.json())["error"]["code"] == "overloaded"
    assert any(r.status == 201 for r in responses)


async def test_raft_glue_metric_hooks_are_exported(api):
    metrics = api.app[CONTEXT].metrics
    metrics.observe_batch(0, 42, 0.002)
    metrics.observe_fsync(0, 0.0007)
    metrics.set_queue_depth(1, 17)
    metrics.leader_changed(1)
    text = await (await api.get("/metrics")).text()
    for line in ('raftledger_raft_batch_commands_sum{shard="0"} 42.0',
                 'raftledger_fsync_seconds_count{shard="0"} 1.0',
                 'raftledger_queue_depth{shard="1"} 17.0',
                 'raftledger_leader_changes_total{shard="1"} 1.0'):
        assert line in text


def test_json_log_lines_carry_the_request_id():
    record = logging.LogRecord("raftledger.http", logging.INFO, __file__, 1, "request %s", ("x",),
                               None)
    record.status = 201
    token = request_id_var.set("rid-1")
    try:
        line = json.loads(JsonFormatter("n1").format(record))
    finally:
        request_id_var.reset(token)
    assert line["msg"] == "request x" and line["request_id"] == "rid-1"
    assert line["node"] == "n1" and line["status"] == 201


def test_openapi_path_parameters_are_declared():
    spec = openapi.spec()
    for path, operations in spec["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for method, op in operations.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (method, path)
            assert op["responses"], (method, path)


@pytest.mark.parametrize("mode", ["single", "batch"])
async def test_load_generator_runs_against_a_node(api, mode, tmp_path):
    cluster_file = tmp_path / "cluster.json"  # the node runs in this very process
    cluster_file.write_text(json.dumps({"nodes": [{"id": "n1", "pid": os.getpid()}]}))
    args = argparse.Namespace(url=str(api.make_url("")).rstrip("/"), mode=mode, batch_size=10,
                              connections=4, rate=0.0, duration=0.3, warmup=0.0, groups=4,
                              prefix=f"lg-{mode}", direct=False, cluster_file=str(cluster_file))
    result = await loadgen.run(args)
    assert result["requests"] > 0 and result["statuses"] == {"201" if mode == "single" else "200":
                                                             result["requests"]}
    assert result["transfers_per_s"] > 0 and result["latency_ms"]["p50"] > 0
    assert result["node_cpu_us_per_transfer"] > 0
