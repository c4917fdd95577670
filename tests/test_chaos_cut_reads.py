"""``GET /v1/admin/shards/{s}/cut?accounts=...``: the balances of a shard's accounts read in the same
transaction as its cross-shard state, what the chaos harness sums money over at one consistent cut
(a real cluster with credentials; bad input answered 4xx with stable codes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from raftledger.cluster import launcher
from raftledger.cluster.cut import ShardCut, cut_problems
from raftledger.cluster.testing import LocalCluster
from raftledger.node.testing import account_body, pair_on_shard

SHARDS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("cut-reads")), nodes=3, shards=SHARDS,
                           durability="none", credentials=True)
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def accounts(cluster: LocalCluster) -> dict[int, tuple[str, str]]:
    """Two funded accounts on each shard, and a transfer between shards."""
    pairs = {s: pair_on_shard(s, SHARDS, f"cr{s}") for s in range(SHARDS)}
    with cluster.client() as client:
        client.create_account(**account_body("cr.bank", normal="debit"))
        for pair in pairs.values():
            for account in pair:
                client.create_account(**account_body(account, normal="credit"))
                client.transfer("cr.bank", account, 500, "BRL", id=f"fund.{account}")
        client.transfer(pairs[0][0], pairs[1][0], 120, "BRL", id="cross.1")
    return pairs


def cut_of(cluster: LocalCluster, shard: int, token: str | None = "admin",
           **params: Any) -> tuple[int, Any]:
    with cluster.client() as client:
        node = client.cluster_map()["shards"][shard]["replicas"][0]
    url = cluster.urls[node] + f"/v1/admin/shards/{shard}/cut?{urlencode(params)}"
    status, _headers, body = launcher.http_request(
        "GET", url, token=cluster.admin_token if token == "admin" else token)
    return status, body


def error_code(body: Any) -> str:
    return str(body["error"]["code"])


def test_balances_of_every_shard_at_a_consistent_cut_add_up_to_what_was_funded(cluster, accounts):
    for _ in range(10):  # readings taken while nothing moves fit together at once
        started_ns = time.time_ns()
        readings = {}
        for shard, pair in accounts.items():
            status, body = cut_of(cluster, shard, accounts=",".join(pair), consistency="linearizable")
            assert status == 200, body
            assert set(body["balances"]) == set(pair)
            readings[shard] = body
        cuts = {s: ShardCut.from_json(b) for s, b in readings.items()}
        if not cut_problems(cuts, started_ns - 60 * 10**9):
            break
    balances = {a: b["balance"] for body in readings.values() for a, b in body["balances"].items()}
    assert balances[accounts[0][0]] == 380 and balances[accounts[1][0]] == 620
    assert sum(balances.values()) == 2000
    one = readings[0]["balances"][accounts[0][0]]
    assert set(one) >= {"currency", "balance", "available", "seq", "debits_pending", "credits_pending"}


def test_without_accounts_the_cut_has_no_balances_to_show(cluster, accounts):
    status, body = cut_of(cluster, 0)
    assert status == 200 and body["balances"] == {}


@pytest.mark.parametrize(("params", "status", "code"), [
    ({"accounts": "cr0x,"}, 400, "invalid_id"),
    ({"accounts": "no space"}, 400, "invalid_id"),
    ({"accounts": ",".join(f"a{i}" for i in range(1001))}, 400, "invalid_query"),
    ({"consistency": "eventual"}, 400, "invalid_query"),
    ({"min_token": "zz"}, 400, "invalid_token"),
    ({"since_ns": "-1"}, 400, "invalid_query"),
    ({"acounts": "x"}, 400, "invalid_query"),
])
def test_bad_input_is_refused_with_a_stable_code(cluster, accounts, params, status, code):
    got, body = cut_of(cluster, 0, **params)
    assert (got, error_code(body)) == (status, code), body


def test_an_account_of_another_shard_is_refused_by_name(cluster, accounts):
    status, body = cut_of(cluster, 0, accounts=f"{accounts[0][0]},{accounts[1][0]}")
    assert (status, error_code(body)) == (400, "invalid_query")
    assert body["error"]["details"]["accounts"] == [accounts[1][0]]


def test_an_account_that_does_not_exist_is_not_found(cluster, accounts):
    missing = pair_on_shard(0, SHARDS, "nobody")[0]
    status, body = cut_of(cluster, 0, accounts=f"{accounts[0][0]},{missing}")
    assert (status, error_code(body)) == (404, "not_found")
    assert body["error"]["details"]["account_id"] == missing


def test_the_cut_with_balances_takes_the_admin_token(cluster, accounts):
    status, body = cut_of(cluster, 0, token=None, accounts=accounts[0][0])
    assert (status, error_code(body)) == (401, "unauthorized")
    with cluster.client() as client:
        reader = client.request("POST", "/v1/tokens", json={"name": "r", "role": "reader"})["token"]
    status, body = cut_of(cluster, 0, token=reader, accounts=accounts[0][0])
    assert (status, error_code(body)) == (403, "forbidden")
