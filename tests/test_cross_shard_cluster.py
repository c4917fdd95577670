"""Cross-shard transactions over real node processes: 3 nodes, 3 shards, fsync, loopback.

Each fault test kills a node at an exact step of two-phase commit (a crash point armed through the
internal listener, ``raftledger.node.faults``): the coordinator's leader after the prepares, after the
decision; a participant's leader after its prepare, before it answers. After recovery every
transaction is all or nothing, no hold is left, and per currency the debits equal the credits over
all shards. The contention test runs many concurrent transfers between a few limited accounts.
Only processes this module's cluster started are killed, by the cluster's own handles.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from raftledger.cluster.router import shard_for_account
from raftledger.cluster.testing import LocalCluster
from raftledger.node.faults import FAULTS_ENV
from raftledger.node.settings import CrossShardSettings, NodeSettings
from raftledger.node.testing import account_body, ids_on_shard, transfer_body, wait_until

pytestmark = pytest.mark.slow

SHARDS = 3
HOME, A, B = 0, 1, 2
recovery_s = 60.0  # elections, restarts and resolver passes on a slow shared machine


def tag_of(shard: int, salt: str = "h") -> str:
    return "{" + ids_on_shard(shard, SHARDS, salt)[0] + "}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    settings = NodeSettings(cross_shard=CrossShardSettings(prepare_timeout_s=2, finish_timeout_s=1,
                                                           resolver_interval_s=0.2))
    with pytest.MonkeyPatch.context() as env:  # for every node started, restarts included
        env.setenv(FAULTS_ENV, "1")
        cluster = LocalCluster(Path(tmp_path_factory.mktemp("xs")), nodes=3, shards=SHARDS,
                               settings=settings)
        try:
            yield cluster.start()
        finally:
            cluster.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


class Client:
    def __init__(self, cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
        self.cluster, self.http = cluster, http

    async def once(self, node: str, path: str, body: Any) -> tuple[int, Any] | None:
        """One POST; None when the connection broke (the node died under it)."""
        try:
            async with self.http.post(self.cluster.urls[node] + path, json=body) as resp:
                return resp.status, await resp.json()
        except (TimeoutError, aiohttp.ClientError):
            return None

    async def write(self, path: str, body: Any, node: str | None = None) -> tuple[int, Any]:
        """POST until a final answer, retrying lost connections and 503s with the same id."""
        async def attempt() -> tuple[int, Any] | None:
            answer = await self.once(node or random.choice(self.live()), path, body)
            return None if answer is None or answer[0] == 503 else answer
        return await wait_until(attempt, recovery_s, f"POST {path} to get a final answer")

    def live(self) -> list[str]:
        return [n for n in self.cluster.node_ids if self.cluster.procs.get(n) is not None
                and self.cluster.procs[n].poll() is None]

    async def get(self, path: str, **params: str) -> tuple[int, Any]:
        async with self.http.get(self.cluster.urls[random.choice(self.live())] + path,
                                 params={"consistency": "linearizable", **params}) as resp:
            return resp.status, await resp.json()

    async def settled(self, account_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Every account's balance once none has a pending amount (the resolvers' work done)."""
        async def look() -> dict[str, dict[str, Any]] | None:
            out = {}
            for account_id in account_ids:
                try:
                    status, bal = await self.get(f"/v1/accounts/{account_id}/balance")
                except (TimeoutError, aiohttp.ClientError):
                    return None
                if status != 200 or bal["debits_pending"] or bal["credits_pending"]:
                    return None
                out[account_id] = bal
            return out
        return await wait_until(look, recovery_s, f"no pending amount on {account_ids}")

    def conserved(self) -> None:
        """Over all shards, per currency: debits equal credits and nothing is pending."""
        node = self.live()[0]
        sums: dict[str, list[int]] = {}
        for shard in range(SHARDS):
            self.cluster.wait_converged(shard)
            for currency, t in self.cluster.totals(node, shard)["currencies"].items():
                into = sums.setdefault(currency, [0, 0, 0, 0])
                for i, key in enumerate(("debits_posted", "credits_posted", "debits_pending",
                                         "credits_pending")):
                    into[i] += t[key]
        for currency, (debits, credits, debits_pending, credits_pending) in sums.items():
            assert (debits, debits_pending) == (credits, credits_pending) == (debits, 0), currency

    async def recover(self, node: str) -> None:
        proc = self.cluster.procs[node]
        await asyncio.to_thread(proc.wait, 30)
        assert proc.returncode == 137, f"{node} exited with {proc.returncode}, not at its crash point"
        await asyncio.to_thread(self.cluster.start_node, node)
        await asyncio.to_thread(self.cluster.wait_ready)


@pytest.fixture
async def client(cluster, http):
    return Client(cluster, http)


async def open_accounts(client: Client, prefix: str) -> tuple[str, str]:
    """An account on shard A and one on shard B."""
    alice, bob = f"{prefix}.alice{tag_of(A)}", f"{prefix}.bob{tag_of(B)}"
    for account_id in (alice, bob):
        status, body = await client.write("/v1/accounts", account_body(account_id))
        assert status == 201, body
    return alice, bob


async def crash_during(client: Client, node: str, point: str, entry: str, body: dict[str, Any]) -> None:
    status, armed = await asyncio.to_thread(client.cluster.call, node, "/faults", {"crash": [point]})
    assert status == 200, armed
    answer = await client.once(entry, "/v1/transactions", body)
    assert answer is None or answer[0] == 503, answer  # the node died before it could answer 201


async def test_the_coordinators_leader_dies_after_the_prepares_and_the_legs_are_aborted(client):
    alice, bob = await open_accounts(client, "c1")
    coordinator = client.cluster.leader(HOME)
    body = transfer_body(f"c1.t{tag_of(HOME)}", alice, bob, 40)
    await crash_during(client, coordinator, "cross_shard.prepared", coordinator, body)
    balances = await client.settled([alice, bob])  # the participants' resolvers ask the new leader
    assert balances[alice]["balance"] == balances[bob]["balance"] == 0
    status, tx = await client.get(f"/v1/transactions/{body['id']}")
    assert status == 200 and (tx["status"], tx["code"]) == ("rejected", "transaction_aborted")
    await client.recover(coordinator)
    assert (await client.write("/v1/transactions", body))[1]["error"]["code"] == "transaction_aborted"
    client.conserved()


async def test_the_coordinators_leader_dies_after_the_decision_and_the_legs_are_posted(client):
    alice, bob = await open_accounts(client, "c2")
    coordinator = client.cluster.leader(HOME)
    body = transfer_body(f"c2.t{tag_of(HOME)}", alice, bob, 40)
    await crash_during(client, coordinator, "cross_shard.decided", coordinator, body)
    balances = await client.settled([alice, bob])  # the new leader's resolver finishes the legs
    assert (balances[alice]["balance"], balances[bob]["balance"]) == (40, -40)
    await client.recover(coordinator)
    status, again = await client.write("/v1/transactions", body)
    assert status == 201 and again["status"] == "posted"
    client.conserved()


async def test_a_participants_leader_dies_after_its_prepare_and_the_transaction_is_all_or_nothing(client):
    alice, bob = await open_accounts(client, "c3")
    participant = client.cluster.leader(B)
    entry = next(n for n in client.cluster.node_ids if n != participant)
    body = transfer_body(f"c3.t{tag_of(HOME)}", alice, bob, 40)
    await crash_during(client, participant, "leg.prepared", entry, body)
    status, outcome = await client.write("/v1/transactions", body)  # a retry, racing the resolvers
    balances = await client.settled([alice, bob])
    if status == 201:
        assert (balances[alice]["balance"], balances[bob]["balance"]) == (40, -40)
    else:
        assert outcome["error"]["code"] == "transaction_aborted", outcome
        assert balances[alice]["balance"] == balances[bob]["balance"] == 0
    await client.recover(participant)
    client.conserved()


async def test_concurrent_transfers_between_limited_accounts_never_overdraw_and_reconcile(client):
    """Contention: a few wallets (credits must cover debits) on every shard, many concurrent
    transfers between shards. Every acknowledged one is posted, every refused one moved nothing,
    and each wallet's balance is its funding plus what the acknowledged transfers moved."""
    rng = random.Random(12)
    wallets = {}
    for shard in range(SHARDS):
        tag = tag_of(shard, "w")
        funding = f"fund{tag}"
        assert (await client.write("/v1/accounts", account_body(funding)))[0] == 201
        for name in ("a", "b"):
            wallet = f"wallet.{name}{tag}"
            limited = account_body(wallet, normal="credit", flags=["debits_must_not_exceed_credits"])
            assert (await client.write("/v1/accounts", limited))[0] == 201
            assert (await client.write("/v1/transactions",
                                       transfer_body(f"fund.{name}{tag}", funding, wallet, 500)))[0] == 201
            wallets[wallet] = shard
    names = sorted(wallets)
    plans = []
    for n in range(150):
        debit, credit = rng.sample(names, 2)
        while wallets[debit] == wallets[credit]:
            debit, credit = rng.sample(names, 2)
        plans.append(transfer_body(f"race{n}", debit, credit, rng.randint(1, 400)))
    gate = asyncio.Semaphore(12)

    async def send(body: dict[str, Any]) -> tuple[int, Any]:
        async with gate:
            return await client.write("/v1/transactions", body)

    answers = await asyncio.gather(*(send(body) for body in plans))
    expected = dict.fromkeys(names, 500)
    acknowledged = 0
    for body, (status, outcome) in zip(plans, answers, strict=True):
        if status == 201:
            acknowledged += 1
            expected[body["debit_account_id"]] -= body["amount"]
            expected[body["credit_account_id"]] += body["amount"]
        else:
            assert status == 422 and outcome["error"]["code"] in ("exceeds_credits", "transaction_aborted")
    assert acknowledged >= 30, "too few transfers went through to say anything"
    balances = await client.settled(names)
    for wallet in names:
        assert balances[wallet]["balance"] == expected[wallet], wallet
        assert balances[wallet]["debits_posted"] <= balances[wallet]["credits_posted"], wallet
    for body, (status, _) in zip(plans[:40], answers[:40], strict=True):
        found, tx = await client.get(f"/v1/transactions/{body['id']}")
        assert found == 200 and tx["status"] == ("posted" if status == 201 else "rejected"), tx
    client.conserved()


async def test_follow_ups_claims_and_atomic_batches_across_shards_over_real_nodes(client):
    """Every kind of step travels between real nodes: a hold homed on one of its shards (its leg
    prepared with the decision), its post under an id homed elsewhere (claimed), a reversal, and an
    atomic batch whose items have different homes."""
    alice, bob = await open_accounts(client, "c5")
    hold = f"c5.h{tag_of(A)}"
    status, body = await client.write("/v1/transactions", transfer_body(hold, alice, bob, 70, pending=True))
    assert status == 201 and body["status"] == "pending", body
    post = next(f"c5.post{n}" for n in range(100) if shard_for_account(f"c5.post{n}", SHARDS) == HOME)
    status, body = await client.write(f"/v1/transactions/{hold}/post", {"id": post, "amount": 50})
    assert status == 201 and body["status"] == "posted", body
    status, got = await client.get(f"/v1/transactions/{post}")
    assert status == 200 and got["pending_id"] == hold
    status, body = await client.write(f"/v1/transactions/{post}/reverse", {"id": f"c5.rev{tag_of(B)}"})
    assert status == 201 and body["reverses"] == post, body
    items = [transfer_body(f"c5.b1{tag_of(HOME)}", alice, bob, 5),
             transfer_body(f"c5.b2{tag_of(B)}", bob, alice, 3)]
    status, body = await client.write("/v1/transactions/batch", {"transactions": items, "atomic": True})
    assert status == 200 and [r["status"] for r in body["results"]] == [201, 201], body
    balances = await client.settled([alice, bob])
    assert (balances[alice]["balance"], balances[bob]["balance"]) == (2, -2)
    client.conserved()


async def test_a_cross_shard_hold_expires_at_its_home_and_its_legs_are_released_by_themselves(client):
    alice, bob = await open_accounts(client, "c6")
    hold = f"c6.h{tag_of(HOME)}"
    body = {**transfer_body(hold, alice, bob, 30), "pending": True, "timeout_seconds": 1}
    status, created = await client.write("/v1/transactions", body)
    assert status == 201 and created["status"] == "pending", created
    balances = await client.settled([alice, bob])  # nothing else is written to these shards
    assert time.time() - (created["timestamp"] / 1e9 + 1) < 10  # released soon after the deadline
    assert balances[alice]["balance"] == balances[bob]["balance"] == 0
    status, tx = await client.get(f"/v1/transactions/{hold}")
    assert status == 200 and tx["status"] == "expired"
    client.conserved()
