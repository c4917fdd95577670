"""The client library against a real local cluster (3 node processes, 2 shards, loopback).

Every method of ``Client`` and ``LedgerClient``, the error tree as users catch it, statements over
many pages, generated ids that keep transactions on one shard, reading one's writes on followers,
and writes that stay exactly-once while nodes are paused or killed under them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from raftledger.client import (
    Client,
    Conflict,
    LedgerClient,
    NotFound,
    Rejected,
    RetryPolicy,
    RuleViolation,
)
from raftledger.client.core import Reply, Send, TransportFailure
from raftledger.cluster.launcher import free_port
from raftledger.cluster.testing import LocalCluster, wait_until

pytestmark = pytest.mark.slow

USD = "USD"
writers = 6  # concurrent writers in the fault tests
wait_s = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("client"), nodes=3, shards=2, durability="none",
                      credentials=True) as c:
        yield c


@pytest.fixture
def ledger(cluster: LocalCluster) -> Iterator[Client]:
    with Client(list(cluster.urls.values()), cluster.admin_token) as client:
        yield client


def open_pair(ledger: Client, tag: str, limited: bool = False) -> tuple[str, str]:
    """``cash:{tag}`` (debit normal) and ``alice:{tag}`` (credit normal; never overdrawn if limited)."""
    cash, alice = f"cash:{{{tag}}}", f"alice:{{{tag}}}"
    ledger.create_account(id=cash, currency=USD)
    flags = ["debits_must_not_exceed_credits"] if limited else []
    ledger.create_account(id=alice, currency=USD, normal="credit", flags=flags)
    return cash, alice


class Recorder:
    """Wraps a client's transport to see where each attempt went and what came back."""

    def __init__(self, client: Client) -> None:
        self.sends: list[tuple[Send, Reply | TransportFailure]] = []
        self.lock = threading.Lock()
        self.inner = client.transport.send
        client.transport.send = self  # type: ignore[method-assign]

    def __call__(self, request: Send) -> Reply | TransportFailure:
        outcome = self.inner(request)
        with self.lock:
            self.sends.append((request, outcome))
        return outcome

    def failures(self) -> list[TransportFailure]:
        with self.lock:
            return [o for _, o in self.sends if isinstance(o, TransportFailure)]


def test_a_client_finds_the_cluster_from_its_data_dir(cluster: LocalCluster,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAFTLEDGER_ENDPOINTS", raising=False)
    with Client(data_dir=cluster.data_dir) as ledger:
        assert set(ledger.session.endpoints) == set(cluster.urls.values())
        assert ledger.cluster_map()["epoch"] >= 1


def test_a_dead_endpoint_is_passed_over(cluster: LocalCluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with Client([dead, *cluster.urls.values()], cluster.admin_token) as ledger:
        recorder = Recorder(ledger)
        assert ledger.request("GET", "/healthz")["status"] == "ok"
        ledger.create_account(id="x:{m0}", currency=USD)
        assert ledger.get_account("x:{m0}").id == "x:{m0}"
        failed = [(s.url, o) for s, o in recorder.sends if isinstance(o, TransportFailure)]
        assert failed and all(url.startswith(dead) and not o.sent for url, o in failed)


# -- every method ------------------------------------------------------------------------------------
def test_accounts_are_created_once_and_read_back(ledger: Client) -> None:
    first = ledger.create_account(id="acct:{m1}", currency=USD, normal="credit", metadata={"name": "A"})
    again = ledger.create_account(id="acct:{m1}", currency=USD, normal="credit", metadata={"name": "A"})
    assert first == again and first.metadata == {"name": "A"} and first.balance == 0
    assert not first.replayed and again.replayed
    read = ledger.get_account("acct:{m1}")
    assert read.id == "acct:{m1}" and read.normal == "credit" and read.shard == first.shard
    with pytest.raises(Conflict) as conflict:
        ledger.create_account(id="acct:{m1}", currency="EUR")
    assert conflict.value.code == "exists_with_different_fields" and conflict.value.status == 409
    with pytest.raises(NotFound):
        ledger.get_account("nobody:{m1}")


def test_a_batch_of_accounts_answers_each_item(ledger: Client) -> None:
    items = ledger.create_accounts([{"id": f"b{i}:{{m2}}", "currency": USD} for i in range(3)]
                                   + [{"id": "b0:{m2}", "currency": "EUR"}])
    assert [i.status for i in items] == [201, 201, 201, 409]
    assert items[0].result().id == "b0:{m2}" and not items[3].ok
    assert items[3].error is not None and items[3].error.code == "exists_with_different_fields"


def test_transfers_move_money_and_rules_raise_their_codes(ledger: Client) -> None:
    cash, alice = open_pair(ledger, "m3", limited=True)
    tx = ledger.transfer(cash, alice, 1500, USD, code="deposit", metadata={"ref": "r1"})
    assert tx.status == "posted" and tx.code == "deposit" and not tx.cross_shard
    assert [(e.account_id, e.direction, e.amount) for e in tx.entries] == [
        (cash, "debit", 1500), (alice, "credit", 1500)]
    assert ledger.balance(alice).balance == 1500 and ledger.balance(cash).balance == 1500
    with pytest.raises(Rejected) as refused:
        ledger.transfer(alice, cash, 1501, USD)
    assert refused.value.code == "exceeds_credits" and isinstance(refused.value, RuleViolation)
    assert refused.value.status == 422
    assert ledger.get_transaction(tx.id) == tx


def test_a_generated_id_keeps_the_transaction_on_its_accounts_shard(ledger: Client) -> None:
    cash, alice = open_pair(ledger, "m4")
    tx = ledger.transfer(cash, alice, 10, USD)
    account = ledger.get_account(alice)
    assert tx.id.endswith("{m4}") and tx.shards == (account.shard,) and not tx.cross_shard
    untagged_cash = "cash-m4-plain"
    ledger.create_account(id=untagged_cash, currency=USD)
    tx = ledger.transfer(untagged_cash, alice, 5, USD)
    assert tx.id.endswith("{cash-m4-plain}") and tx.shards[0] == ledger.get_account(untagged_cash).shard


def test_given_id_is_the_idempotency_key(ledger: Client) -> None:
    cash, alice = open_pair(ledger, "m5")
    first = ledger.transfer(cash, alice, 7, USD, id="pay-1:{m5}")
    again = ledger.transfer(cash, alice, 7, USD, id="pay-1:{m5}")
    assert again == first and again.replayed and not first.replayed
    with pytest.raises(Conflict) as reused:
        ledger.transfer(cash, alice, 8, USD, id="pay-1:{m5}")
    assert reused.value.code == "idempotency_key_reused"
    assert ledger.balance(alice).balance == 7


def test_entries_transactions_and_their_batches(ledger: Client) -> None:
    cash, alice = open_pair(ledger, "m6")
    bob = "bob:{m6}"
    ledger.create_account(id=bob, currency=USD, normal="credit")
    tx = ledger.create_transaction([
        {"account_id": cash, "direction": "debit", "amount": 30, "currency": USD},
        {"account_id": alice, "direction": "credit", "amount": 20, "currency": USD},
        {"account_id": bob, "direction": "credit", "amount": 10, "currency": USD}])
    assert len(tx.entries) == 3 and tx.id.endswith("{m6}")
    items = ledger.create_transactions([
        {"debit_account_id": cash, "credit_account_id": alice, "amount": 1, "currency": USD},
        {"debit_account_id": cash, "credit_account_id": "ghost:{m6}", "amount": 1, "currency": USD}])
    assert items[0].ok and items[1].error is not None and items[1].error.code == "account_not_found"
    atomic = ledger.create_transactions([
        {"debit_account_id": cash, "credit_account_id": alice, "amount": 1, "currency": USD},
        {"debit_account_id": cash, "credit_account_id": "ghost:{m6}", "amount": 1, "currency": USD}],
        atomic=True)
    assert [i.error.code for i in atomic if i.error] == ["linked_event_failed", "account_not_found"]
    assert ledger.balance(alice).balance == 21


def test_holds_are_posted_voided_and_transfers_reversed(ledger: Client) -> None:
    cash, alice = open_pair(ledger, "m7")
    hold = ledger.transfer(cash, alice, 100, USD, pending=True)
    assert hold.status == "pending" and ledger.balance(alice).credits_pending == 100
    posted = ledger.post(hold.id, 60)
    assert posted.id == f"{hold.id}:post" and posted.pending_id == hold.id
    assert ledger.balance(alice).balance == 60 and ledger.balance(alice).credits_pending == 0
    other = ledger.transfer(cash, alice, 50, USD, pending=True)
    voided = ledger.void(other.id)
    assert ledger.get_transaction(other.id).status == "voided" and voided.pending_id == other.id
    reversal = ledger.reverse(posted.id)
    assert reversal.reverses == posted.id and ledger.balance(alice).balance == 0
    assert ledger.reverse(posted.id) == reversal  # the same logical reversal, replayed
    with pytest.raises(RuleViolation) as twice:
        ledger.reverse(posted.id, reverse_id="second-reversal:{m7}")
    assert twice.value.code == "already_reversed"


def test_a_statement_is_read_over_every_page_in_both_orders(ledger: Client) -> None:
    cash, alice = open_pair(ledger, "m8")
    amounts = list(range(1, 26))
    for amount in amounts:
        ledger.transfer(cash, alice, amount, USD)
    ascending = list(ledger.entries(alice, page_size=4))
    assert [e.seq for e in ascending] == list(range(1, 26)) and [e.amount for e in ascending] == amounts
    assert ascending[-1].balance_after == sum(amounts)
    assert all(e.prev_hash == p.hash for p, e in zip(ascending, ascending[1:], strict=False))
    descending = list(ledger.entries(alice, order="desc", page_size=7))
    assert [e.seq for e in descending] == list(range(25, 0, -1))
    assert [e.seq for e in ledger.entries(alice, after_seq=20, page_size=2)] == [21, 22, 23, 24, 25]
    with pytest.raises(RuleViolation) as no_history:
        ledger.balance(alice, at_seq=3)
    assert no_history.value.code == "history_not_enabled"


def test_point_in_time_balances_of_an_account_with_history(ledger: Client) -> None:
    cash = "cash:{m9}"
    ledger.create_account(id=cash, currency=USD)
    ledger.create_account(id="h:{m9}", currency=USD, normal="credit", flags=["history"])
    for amount in (5, 7, 11):
        ledger.transfer(cash, "h:{m9}", amount, USD)
    assert ledger.balance("h:{m9}", at_seq=2).balance == 12
    assert ledger.balance("h:{m9}").balance == 23


def test_cluster_status_and_map(ledger: Client, cluster: LocalCluster) -> None:
    status = ledger.cluster_status()
    assert {s["id"] for s in status["shards"]} == {0, 1} and all(s["leader"] for s in status["shards"])
    routing = ledger.cluster_map()
    assert routing["slots"] == 4096 and {n["url"] for n in routing["nodes"]} == set(cluster.urls.values())
    assert ledger.request("GET", "/healthz")["status"] == "ok"


def test_writes_go_straight_to_the_shard_leader(ledger: Client, cluster: LocalCluster) -> None:
    recorder = Recorder(ledger)
    cash, alice = open_pair(ledger, "m10")
    for _ in range(5):
        ledger.transfer(cash, alice, 1, USD)
    shard = ledger.get_account(alice).shard
    leader_url = cluster.urls[cluster.leader(shard)]
    writes = [s for s, _ in recorder.sends if s.method == "POST"]
    assert writes and all(s.url.startswith(leader_url + "/") for s in writes)
    assert all(o.header("x-ledger-leader") == f"{shard}={cluster.leader(shard)}"
               for s, o in recorder.sends if s.method == "POST" and isinstance(o, Reply))


def test_reads_see_this_sessions_writes_on_followers(ledger: Client, cluster: LocalCluster) -> None:
    recorder = Recorder(ledger)
    cash, alice = open_pair(ledger, "m11")
    for amount in range(1, 31):
        ledger.transfer(cash, alice, amount, USD)
        assert ledger.balance(alice).credits_posted == amount * (amount + 1) // 2
    shard = ledger.get_account(alice).shard
    served = [o.header("x-ledger-node") for s, o in recorder.sends
              if s.method == "GET" and isinstance(o, Reply) and "/balance" in s.url]
    assert set(served) - {cluster.leader(shard)}, "no read was served by a follower"
    assert all("min_token=" in s.url for s, _ in recorder.sends if "/balance" in s.url)


async def test_the_async_client_has_the_same_methods(cluster: LocalCluster) -> None:
    async with LedgerClient(list(cluster.urls.values()), cluster.admin_token) as ledger:
        await ledger.create_account(id="cash:{a1}", currency=USD)
        await ledger.create_account(id="alice:{a1}", currency=USD, normal="credit")
        hold = await ledger.transfer("cash:{a1}", "alice:{a1}", 40, USD, pending=True)
        await ledger.post(hold.id)
        tx = await ledger.create_transaction([
            {"account_id": "cash:{a1}", "direction": "debit", "amount": 2, "currency": USD},
            {"account_id": "alice:{a1}", "direction": "credit", "amount": 2, "currency": USD}])
        await ledger.reverse(tx.id)
        held = await ledger.transfer("cash:{a1}", "alice:{a1}", 3, USD, pending=True)
        await ledger.void(held.id)
        assert (await ledger.balance("alice:{a1}")).balance == 40
        assert (await ledger.get_transaction(tx.id)).reversed_by == f"{tx.id}:reverse"
        assert (await ledger.get_account("alice:{a1}")).seq == 6
        assert [e.seq async for e in ledger.entries("alice:{a1}", page_size=2)] == [1, 2, 3, 4, 5, 6]
        items = await ledger.create_transactions([
            {"debit_account_id": "cash:{a1}", "credit_account_id": "alice:{a1}", "amount": 1,
             "currency": USD}])
        assert items[0].ok
        with pytest.raises(RuleViolation) as refused:
            await ledger.transfer("cash:{a1}", "nobody:{a1}", 1, USD)
        assert refused.value.code == "account_not_found"
        assert (await ledger.cluster_map())["epoch"] >= 1
        assert len((await ledger.cluster_status())["shards"]) == 2
        assert (await ledger.create_accounts([{"id": "z:{a1}", "currency": USD}]))[0].ok


# -- faults ------------------------------------------------------------------------------------------
def _transfers(ledger: Client, cash: str, alice: str, count: int, acked: list[str],
               errors: list[BaseException]) -> None:
    try:
        for _ in range(count):
            acked.append(ledger.transfer(cash, alice, 1, USD).id)
    except BaseException as exc:  # noqa: BLE001 (reported by the test)
        errors.append(exc)


def run_writers(ledger: Client, cash: str, alice: str, per_writer: int, during: Any) -> list[str]:
    """``writers`` threads of transfers of 1 while ``during()`` runs; the ids acknowledged."""
    acked: list[str] = []
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_transfers, args=(ledger, cash, alice, per_writer, acked, errors))
               for _ in range(writers)]
    for t in threads:
        t.start()
    try:
        during()
    finally:
        for t in threads:
            t.join(wait_s * 2)
    assert not any(t.is_alive() for t in threads), "a writer did not finish"
    assert not errors, errors
    return acked


def assert_applied_once(ledger: Client, alice: str, acked: list[str]) -> None:
    """Every acknowledged transfer is in the statement exactly once, and nothing else is."""
    assert len(set(acked)) == len(acked)
    account = ledger.get_account(alice, consistency="linearizable")
    statement = [e.transaction_id for e in ledger.entries(alice, consistency="linearizable")]
    assert sorted(statement) == sorted(acked)
    assert account.balance == len(acked) and account.seq == len(acked)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path, nodes=3, shards=2) as c:
        yield c


def test_a_leader_killed_under_retrying_writes_applies_each_exactly_once(own_cluster: LocalCluster) -> None:
    policy = RetryPolicy(deadline_s=wait_s, attempt_timeout_s=3.0)
    with Client(list(own_cluster.urls.values()), policy=policy) as ledger:
        cash, alice = open_pair(ledger, "k1")
        shard = ledger.get_account(alice).shard
        leader = own_cluster.leader(shard)
        recorder = Recorder(ledger)

        def kill_mid_stream() -> None:
            wait_until(lambda: len(recorder.sends) >= 60, wait_s, "writes under way")
            own_cluster.kill(leader)  # SIGKILL while writes are in flight to it
        acked = run_writers(ledger, cash, alice, 40, kill_mid_stream)
        # A write was on its way to the leader when it died: its outcome was open, and retried.
        assert any(f.sent for f in recorder.failures()), "no write met the dying leader"
        assert own_cluster.leader(shard) != leader
        assert_applied_once(ledger, alice, acked)
        assert len(acked) == writers * 40


def test_a_retry_storm_over_a_paused_leader_applies_each_write_once(own_cluster: LocalCluster) -> None:
    async def storm() -> None:
        policy = RetryPolicy(deadline_s=wait_s, attempt_timeout_s=1.0, backoff_base_s=0.01)
        async with LedgerClient(list(own_cluster.urls.values()), policy=policy) as ledger:
            await ledger.create_account(id="cash:{s1}", currency=USD)
            await ledger.create_account(id="alice:{s1}", currency=USD, normal="credit")
            shard = (await ledger.get_account("alice:{s1}")).shard
            leader = own_cluster.leader(shard)
            ids = [f"storm-{i}:{{s1}}" for i in range(120)]
            own_cluster.pause(leader)  # accepts connections, answers nothing: every attempt times out
            try:
                writes = [asyncio.ensure_future(ledger.transfer("cash:{s1}", "alice:{s1}", 1, USD, id=i))
                          for i in ids]
                same = [asyncio.ensure_future(ledger.transfer("cash:{s1}", "alice:{s1}", 1, USD, id=i))
                        for i in ids[:40]]  # the same logical writes, sent again concurrently
                done = await asyncio.gather(*writes, *same)
            finally:
                own_cluster.resume(leader)
            assert {t.id for t in done} == set(ids)
            account = await ledger.get_account("alice:{s1}", consistency="linearizable")
            assert account.balance == len(ids) and account.seq == len(ids)
    asyncio.run(storm())
