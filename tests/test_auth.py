"""Credentials on a real cluster: tokens in the map, roles, scopes, revocation, expiry, rate limits,
the CLI, and secrets that never leak into logs, metrics or error bodies."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from typing import Any

import pytest
from raftledger.cluster import launcher, tokens
from raftledger.cluster.testing import LocalCluster, wait_until

SPREAD_DEADLINE_S = 10.0  # generous on a shared machine; the target is 2 s (docs/operations.md)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with LocalCluster(tmp_path_factory.mktemp("auth"), nodes=3, shards=2, durability="none",
                      credentials=True) as running:
        yield running


def call(cluster: LocalCluster, method: str, path: str, body: Any = None, token: str | None = None,
         node: str = "n0") -> tuple[int, Any, Any]:
    data = None if body is None else json.dumps(body).encode()
    status, headers, decoded = launcher.http_request(method, cluster.urls[node] + path, data,
                                                     token=token, timeout_s=15.0)
    return status, headers, decoded


def applied(cluster: LocalCluster, path: str, token: str | None) -> tuple[int, Any, Any]:
    """A read of something just written, from n0, which may host only a follower of its shard: the
    first answer that is not 404 (not applied there yet), polled with a deadline."""
    def answered() -> tuple[int, Any, Any] | None:
        got = call(cluster, "GET", path, token=token)
        return got if got[0] != 404 else None

    return wait_until(answered, 15.0, f"GET {path} to find what was written")


def make_token(cluster: LocalCluster, **fields: Any) -> dict[str, Any]:
    status, _, body = call(cluster, "POST", "/v1/tokens", {"name": "t", **fields},
                           token=cluster.admin_token)
    assert status == 201, body
    return dict(body)


def code(body: Any) -> str:
    return str(body["error"]["code"])


def test_cluster_file_holds_the_admin_token_readable_by_its_owner_only(cluster: LocalCluster) -> None:
    path = os.path.join(cluster.data_dir, "cluster.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        assert json.load(f)["admin_token"] == cluster.admin_token


def test_requests_without_valid_credentials_get_401_and_open_routes_stay_open(
        cluster: LocalCluster) -> None:
    for token in (None, "rlt_not-a-token", "x" * 5000):
        status, headers, body = call(cluster, "GET", "/v1/accounts/a", token=token)
        assert (status, code(body)) == (401, "unauthorized")
        assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = call(cluster, "POST", "/v1/accounts", {"id": "a", "currency": "USD"})
    assert (status, code(body)) == (401, "unauthorized")
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert call(cluster, "GET", path)[0] == 200, path


def test_roles_allow_what_they_name(cluster: LocalCluster) -> None:
    reader = make_token(cluster, role="reader")["token"]
    writer = make_token(cluster, role="writer")["token"]
    auditor = make_token(cluster, role="auditor")["token"]
    status, _, body = call(cluster, "POST", "/v1/accounts", {"id": "roles:a", "currency": "USD"},
                           token=reader)
    assert (status, code(body)) == (403, "forbidden")
    assert call(cluster, "POST", "/v1/accounts", {"id": "roles:a", "currency": "USD"}, token=writer)[0] == 201
    for token in (reader, writer, auditor):
        assert applied(cluster, "/v1/accounts/roles:a", token)[0] == 200
        for path in ("/v1/tokens", "/v1/admin/verify", "/v1/feed/dlq", "/v1/admin/cluster/map"):
            status, _, body = call(cluster, "GET", path, token=token)
            assert (status, code(body)) == (403, "forbidden"), path
        status, _, body = call(cluster, "POST", "/v1/tokens", {"name": "x", "role": "admin"}, token=token)
        assert status == 403
    assert call(cluster, "GET", "/v1/tokens", token=cluster.admin_token)[0] == 200


def test_integrity_routes_belong_to_auditors_and_admins_and_keep_to_scopes(cluster: LocalCluster) -> None:
    admin = cluster.admin_token
    for account in ("cash:{i1}", "alice:{i1}", "bob:{i2}"):
        created = call(cluster, "POST", "/v1/accounts", {"id": account, "currency": "USD"}, token=admin)
        assert created[0] == 201
    pay = {"id": "i-1:{i1}", "debit_account_id": "cash:{i1}", "credit_account_id": "alice:{i1}",
           "amount": 7, "currency": "USD"}
    assert call(cluster, "POST", "/v1/transactions", pay, token=admin)[0] == 201
    shard = applied(cluster, "/v1/transactions/i-1:%7Bi1%7D", admin)[2]["shards"][0]
    routes = ["/v1/keys", f"/v1/shards/{shard}/tree-head", "/v1/transactions/i-1:%7Bi1%7D/proof",
              "/v1/accounts/alice:%7Bi1%7D/chain"]
    auditor = make_token(cluster, role="auditor")["token"]
    for role in ("reader", "writer"):
        token = make_token(cluster, role=role)["token"]
        for path in routes:
            status, _, body = call(cluster, "GET", path, token=token)
            assert (status, code(body)) == (403, "forbidden"), (role, path)
    for token in (auditor, admin):
        for path in routes:
            assert applied(cluster, path, token)[0] == 200, path
    scoped = make_token(cluster, role="auditor", account_patterns=["*{i2}"])["token"]
    for path in ("/v1/transactions/i-1:%7Bi1%7D/proof", "/v1/accounts/alice:%7Bi1%7D/chain",
                 f"/v1/shards/{shard}/leaves/0/proof"):
        status, _, body = applied(cluster, path, scoped)
        assert (status, code(body)) == (403, "forbidden"), path
    assert applied(cluster, "/v1/accounts/bob:%7Bi2%7D/chain", scoped)[0] == 200


def test_scoped_token_is_confined_to_its_accounts_on_every_route(cluster: LocalCluster) -> None:
    admin = cluster.admin_token
    for account in ("cash:{t1}", "alice:{t1}", "bob:{t2}"):
        assert call(cluster, "POST", "/v1/accounts", {"id": account, "currency": "USD"},
                    token=admin)[0] == 201
    scoped = make_token(cluster, role="writer", account_patterns=["*{t1}"])["token"]
    assert call(cluster, "GET", "/v1/accounts/alice:%7Bt1%7D/balance", token=scoped)[0] == 200
    for path in ("/v1/accounts/bob:%7Bt2%7D", "/v1/accounts/bob:%7Bt2%7D/balance",
                 "/v1/accounts/bob:%7Bt2%7D/entries", "/contas/bob:%7Bt2%7D/saldo"):
        status, _, body = call(cluster, "GET", path, token=scoped)
        assert (status, code(body)) == (403, "forbidden"), path
    ok = {"id": "s-1:{t1}", "debit_account_id": "cash:{t1}", "credit_account_id": "alice:{t1}",
          "amount": 5, "currency": "USD"}
    assert call(cluster, "POST", "/v1/transactions", ok, token=scoped)[0] == 201
    out = dict(ok, id="s-2:{t1}", credit_account_id="bob:{t2}")
    assert call(cluster, "POST", "/v1/transactions", out, token=scoped)[0] == 403
    batch = {"transactions": [dict(ok, id="s-3:{t1}"), dict(out, id="s-4:{t1}")]}
    status, _, body = call(cluster, "POST", "/v1/transactions/batch", batch, token=scoped)
    assert (status, code(body)) == (403, "forbidden")
    assert call(cluster, "GET", "/v1/transactions/s-3:%7Bt1%7D", token=admin)[0] == 404  # none applied
    # post / void / reverse: by the accounts of the transaction they act on
    foreign = dict(out, id="s-5:{t2}", debit_account_id="bob:{t2}", credit_account_id="cash:{t1}",
                   pending=True)
    assert call(cluster, "POST", "/v1/transactions", foreign, token=admin)[0] == 201
    for action in ("post", "void", "reverse"):
        status, _, body = call(cluster, "POST", f"/v1/transactions/s-5:%7Bt2%7D/{action}", {},
                               token=scoped)
        assert (status, code(body)) == (403, "forbidden"), action
    assert call(cluster, "GET", "/v1/transactions/s-5:%7Bt2%7D", token=scoped)[0] == 403
    assert call(cluster, "POST", "/v1/transactions/s-1:%7Bt1%7D/reverse", {}, token=scoped)[0] == 201


def test_scoped_reader_sees_only_its_accounts_events_in_the_feed(cluster: LocalCluster) -> None:
    admin = cluster.admin_token
    for account in ("feed-a:{f1}", "feed-b:{f1}", "feed-c:{f2}"):
        assert call(cluster, "POST", "/v1/accounts", {"id": account, "currency": "USD"},
                    token=admin)[0] == 201
    scoped = make_token(cluster, role="reader", account_patterns=["*{f1}"])["token"]
    seen_all: list[dict[str, Any]] = []
    seen_scoped: list[dict[str, Any]] = []
    for shard in (0, 1):
        query = f"/v1/feed?shard={shard}&limit=1000&consistency=linearizable"
        status, _, everything = call(cluster, "GET", query, token=admin)
        assert status == 200, everything
        status, _, mine = call(cluster, "GET", query, token=scoped)
        assert status == 200, mine
        assert mine["next_after"] == everything["next_after"]  # paging goes on past hidden events
        seen_all += everything["events"]
        seen_scoped += mine["events"]
    ids = {e["data"].get("id") for e in seen_scoped if e["type"] == "account.created"}
    assert {"feed-a:{f1}", "feed-b:{f1}"} <= ids and "feed-c:{f2}" not in ids
    assert {e["data"].get("id") for e in seen_all} >= {"feed-c:{f2}"}


def test_revoked_token_stops_working_on_every_node(cluster: LocalCluster) -> None:
    made = make_token(cluster, role="reader")
    for node in cluster.node_ids:
        wait_until(lambda n=node: call(cluster, "GET", "/v1/cluster/map", token=made["token"],
                                       node=n)[0] == 200, SPREAD_DEADLINE_S, f"{node} to know the token")
    status, _, body = call(cluster, "DELETE", f"/v1/tokens/{made['id']}", token=cluster.admin_token)
    assert status == 200 and body["revoked"] is True
    revoked_at = time.monotonic()
    for node in cluster.node_ids:
        wait_until(lambda n=node: call(cluster, "GET", "/v1/cluster/map", token=made["token"],
                                       node=n)[0] == 401, SPREAD_DEADLINE_S, f"{node} to refuse it")
    print(f"revocation reached every node in {time.monotonic() - revoked_at:.3f}s")
    listed = call(cluster, "GET", "/v1/tokens", token=cluster.admin_token)[2]["tokens"]
    assert made["id"] not in {t["id"] for t in listed}
    assert call(cluster, "DELETE", f"/v1/tokens/{made['id']}", token=cluster.admin_token)[0] == 404


def test_expired_token_is_refused(cluster: LocalCluster) -> None:
    made = make_token(cluster, role="reader", expires_at=time.time_ns() - 60 * 10**9)
    status, _, body = call(cluster, "GET", "/v1/cluster/map", token=made["token"])
    assert (status, code(body)) == (401, "unauthorized")


def test_a_token_is_honoured_for_the_clock_difference_tolerated_after_expiry(cluster: LocalCluster) -> None:
    """A node whose clock runs a little ahead (within ``internal.window_s``) must not answer 401 to
    a token the cluster still holds valid: every node honours a token that long past its expiry."""
    made = make_token(cluster, role="reader", expires_at=time.time_ns() - 2 * 10**9)
    assert call(cluster, "GET", "/v1/cluster/map", token=made["token"])[0] == 200


def test_token_over_its_rate_gets_429_with_retry_after(cluster: LocalCluster) -> None:
    made = make_token(cluster, role="reader", rate_per_s=0.5)
    answers = [call(cluster, "GET", "/v1/cluster/map", token=made["token"]) for _ in range(3)]
    assert answers[0][0] == 200
    limited = [a for a in answers if a[0] == 429]
    assert limited, [a[0] for a in answers]
    assert code(limited[0][2]) == "rate_limited" and float(limited[0][1]["Retry-After"]) > 0
    assert call(cluster, "GET", "/v1/cluster/map", token=cluster.admin_token)[0] == 200  # per token


def test_bad_token_requests_get_400_not_500(cluster: LocalCluster) -> None:
    for body in ({}, {"name": "x", "role": "king"}, {"name": "", "role": "reader"},
                 {"name": "x", "role": "reader", "account_patterns": "a*"},
                 {"name": "x", "role": "reader", "expires_at": 1.5},
                 {"name": "x", "role": "reader", "rate_per_s": -1}, {"name": "x", "role": "reader", "z": 1},
                 [1, 2]):
        status, _, answer = call(cluster, "POST", "/v1/tokens", body, token=cluster.admin_token)
        assert status == 400, (body, answer)
    assert call(cluster, "DELETE", "/v1/tokens/tok_nope", token=cluster.admin_token)[0] == 404


def test_token_cli_creates_lists_and_revokes(cluster: LocalCluster) -> None:
    def cli(*args: str) -> Any:
        done = subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", "token", *args,
                               "--data-dir", cluster.data_dir, "--json"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    made = cli("create", "--name", "ci", "--role", "reader", "--account-pattern", "*{cli}")
    assert made["token"].startswith("rlt_") and made["account_patterns"] == ["*{cli}"]
    listed = cli("list")["tokens"]
    assert made["id"] in {t["id"] for t in listed}
    assert all("hash" not in t and "token" not in t for t in listed)
    assert cli("revoke", made["id"])["revoked"] is True
    wait_until(lambda: call(cluster, "GET", "/v1/cluster/map", token=made["token"])[0] == 401,
               SPREAD_DEADLINE_S, "the revoked token to be refused")


def test_secrets_never_appear_in_maps_logs_metrics_or_error_bodies(cluster: LocalCluster) -> None:
    made = [make_token(cluster, role=role) for role in ("reader", "writer", "admin")]
    secrets_ = [m["token"] for m in made] + [cluster.admin_token]
    hashes = [tokens.hash_secret(s) for s in secrets_]
    bodies: list[str] = []
    for secret in secrets_:
        for tampered in (secret, secret[:-1], secret + "x"):
            for method, path in (("GET", "/v1/accounts/zz"), ("POST", "/v1/tokens"),
                                 ("GET", "/v1/feed?shard=9"), ("GET", "/nope")):
                status, _, body = call(cluster, method, path, {"name": secret} if method == "POST" else None,
                                       token=tampered)
                assert status < 500
                bodies.append(json.dumps(body))
    _, _, public_map = call(cluster, "GET", "/v1/cluster/map", token=made[0]["token"])
    bodies.append(json.dumps(public_map))
    bodies.append(json.dumps(call(cluster, "GET", "/v1/tokens", token=cluster.admin_token)[2]))
    for node in cluster.node_ids:
        bodies.append(str(call(cluster, "GET", "/metrics", node=node)[2]))
        bodies.append(cluster.log(node))
    for node in cluster.node_ids:
        with open(launcher.node_config_path(cluster.plan, node)) as f:
            bodies.append(f.read())
    everything = "\n".join(bodies)
    for secret in secrets_:
        assert secret not in everything
        assert secret[4:20] not in everything
    for digest in hashes:
        assert digest not in json.dumps(public_map)

