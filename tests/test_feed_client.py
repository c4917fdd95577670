"""The client's subscriber on a real cluster (node processes on loopback).

An asyncio subscriber (a durable consumer) follows every shard while transfers are written, the
leader of a shard is SIGKILLed and started again; it feeds the daily-totals projection as it goes.
Afterwards: every committed event handed out exactly once, in per-shard order, every acknowledged
write among them and none of a rejected one; its offsets committed; the projection rebuilt from
scratch by a replay equals the one followed live, and both agree with the accounts' balances. A
synchronous subscriber resumes after its committed offsets, and an event whose processing failed
comes again.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from raftledger.client import (
    Client,
    CommitPolicy,
    Event,
    LedgerClient,
    OutcomeUnknown,
    RetryPolicy,
    RuleViolation,
)
from raftledger.client.examples import daily_totals
from raftledger.cluster.testing import LocalCluster
from raftledger.node.testing import pair_on_shard, wait_until

pytestmark = pytest.mark.slow

SHARDS = 2
recovery_s = 120.0  # elections and restarts on a slow shared machine
POLICY = RetryPolicy(deadline_s=recovery_s)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("subscriber")), nodes=3, shards=SHARDS,
                           durability="none")
    try:
        yield cluster.start()
    finally:
        cluster.close()


@dataclass
class Followed:
    events: list[Event]
    outcomes: dict[str, str]  # transaction id -> ok | rejected | unknown
    accounts: list[str]
    last: dict[int, int]
    committed: dict[str, Any]
    projection: str


def endpoints(cluster: LocalCluster) -> list[str]:
    return list(cluster.urls.values())


async def write(ledger: LedgerClient, outcomes: dict[str, str], accounts: list[str], count: int,
                prefix: str) -> None:
    """Transfers on each shard, across shards, holds posted, reversals, and some a limit refuses."""
    pairs = [pair_on_shard(s, SHARDS, prefix) for s in range(SHARDS)]
    for debit, credit in pairs:
        await ledger.create_account(id=debit, currency="BRL")
        await ledger.create_account(id=credit, currency="BRL", flags=["debits_must_not_exceed_credits"])
        accounts += [debit, credit]

    async def attempt(tx_id: str, call: Any) -> None:
        try:
            await call
            outcomes[tx_id] = "ok"
        except RuleViolation:
            outcomes[tx_id] = "rejected"
        except OutcomeUnknown:
            outcomes[tx_id] = "unknown"
    for i in range(count):
        debit, credit = pairs[i % SHARDS]
        tag = credit[credit.index("{"):]
        tx_id = f"{prefix}{i}{tag}"
        if i % 6 == 3:  # the limited account pays more than it has: refused, never an event
            await attempt(tx_id, ledger.transfer(credit, debit, 10**9, "BRL", id=tx_id))
        elif i % 6 == 4:  # across shards
            await attempt(f"{prefix}x{i}", ledger.transfer(pairs[0][0], pairs[1][1], 3, "BRL",
                                                           id=f"{prefix}x{i}"))
        elif i % 6 == 5:  # a hold, partly posted
            await attempt(tx_id, ledger.transfer(debit, credit, 9, "BRL", id=tx_id, pending=True))
            await attempt(f"{tx_id}:post", ledger.post(tx_id, 4))
        else:
            await attempt(tx_id, ledger.transfer(debit, credit, 5 + i, "BRL", id=tx_id))
    reversed_id = f"{prefix}0{pairs[0][1][pairs[0][1].index('{'):]}"
    await attempt(f"{reversed_id}:reverse", ledger.reverse(reversed_id))


async def last_offsets(ledger: LedgerClient) -> dict[int, int]:
    out = {}
    for shard in range(SHARDS):
        page = await ledger.request("GET", "/v1/feed", params={
            "shard": shard, "after": 0, "limit": 1, "consistency": "linearizable"})
        out[shard] = page["last_offset"]
    return out


async def follow_through_a_leader_kill(cluster: LocalCluster, projection: str) -> Followed:
    db = daily_totals.open_db(projection)
    events: list[Event] = []
    outcomes: dict[str, str] = {}
    accounts: list[str] = []
    async with LedgerClient(endpoints(cluster), policy=POLICY) as reader, \
            LedgerClient(endpoints(cluster), policy=POLICY) as writer:
        subscriber = reader.subscribe("billing", commit=CommitPolicy(every_events=7, interval_s=0.5),
                                      wait_ms=1000)

        async def consume() -> None:
            async with subscriber:
                async for event in subscriber:
                    events.append(event)
                    daily_totals.apply(db, event)
        task = asyncio.ensure_future(consume())
        try:
            await write(writer, outcomes, accounts, 18, "k")
            victim = cluster.leader(0)
            cluster.kill(victim)  # mid-stream: the subscriber, the writer and the exporters lose it
            await write(writer, outcomes, accounts, 18, "m")
            cluster.start_node(victim)
            await write(writer, outcomes, accounts, 12, "n")
            last = await last_offsets(writer)

            def caught_up() -> bool:
                return task.done() or all(any(e.shard == s and e.offset >= o for e in events)
                                          for s, o in last.items())
            await wait_until(caught_up, recovery_s, "the subscriber to reach the last events")
            subscriber.stop()
            await asyncio.wait_for(task, recovery_s)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            db.close()
        committed = await writer.request("GET", "/v1/feed/consumers/billing",
                                         params={"consistency": "linearizable"})
    return Followed(events, outcomes, accounts, last, committed, projection)


@pytest.fixture(scope="module")
def followed(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Followed:
    path = str(tmp_path_factory.mktemp("projection") / "live.sqlite")
    return asyncio.run(follow_through_a_leader_kill(cluster, path))


def test_subscriber_through_a_leader_kill_hands_out_every_committed_event_once_in_order(
        followed: Followed) -> None:
    ids = [e.id for e in followed.events]
    assert len(ids) == len(set(ids))  # never a duplicate
    for shard, last in followed.last.items():
        assert [e.offset for e in followed.events if e.shard == shard] == list(range(1, last + 1))
    transactions: dict[str, list[Event]] = {}
    for event in followed.events:
        tx = event.transaction
        if tx is not None:
            transactions.setdefault(tx.id, []).append(event)
    assert "rejected" in followed.outcomes.values()
    for tx_id, outcome in followed.outcomes.items():
        if outcome == "ok":
            assert tx_id in transactions, f"acknowledged {tx_id} is not in the feed"
        elif outcome == "rejected":
            assert tx_id not in transactions, f"rejected {tx_id} is in the feed"
    crossed = [evs for tx_id, evs in transactions.items() if "x" in tx_id]
    assert crossed and all(sorted(e.shard for e in evs) == [0, 1] for evs in crossed)
    assert {s: p["offset"] for s, p in followed.committed["shards"].items()} == \
        {str(s): o for s, o in followed.last.items()}


def test_projection_rebuilt_by_replay_equals_the_one_followed_live(
        cluster: LocalCluster, followed: Followed, tmp_path: Path) -> None:
    rebuilt = str(tmp_path / "rebuilt.sqlite")
    with Client(endpoints(cluster), policy=POLICY) as ledger:
        applied = daily_totals.rebuild(ledger, rebuilt)
        accounts = {a: ledger.get_account(a, consistency="linearizable") for a in followed.accounts}
    assert applied == sum(followed.last.values())
    live_db, rebuilt_db = daily_totals.open_db(followed.projection), daily_totals.open_db(rebuilt)
    try:
        live, again = daily_totals.totals(live_db), daily_totals.totals(rebuilt_db)
        assert daily_totals.applied_offsets(rebuilt_db) == followed.last
    finally:
        live_db.close()
        rebuilt_db.close()
    assert live == again and live
    for account_id, account in accounts.items():  # the ledger's own sums, with no day boundaries
        rows = [t for (a, _, _), t in live.items() if a == account_id]
        assert sum(r[0] for r in rows) == account.debits_posted, account_id
        assert sum(r[1] for r in rows) == account.credits_posted, account_id


def test_a_restarted_subscriber_resumes_after_the_committed_offsets(
        cluster: LocalCluster, followed: Followed) -> None:
    lasting = CommitPolicy(every_events=10**6, interval_s=3600.0)  # only the close commits
    with Client(endpoints(cluster), policy=POLICY) as ledger:
        with ledger.subscribe("resume", commit=lasting) as events:
            first_run = [e for _, e in zip(range(25), events, strict=False)]
        committed = ledger.request("GET", "/v1/feed/consumers/resume")["shards"]
        for shard in range(SHARDS):
            offsets = [e.offset for e in first_run if e.shard == shard]
            assert committed[str(shard)]["offset"] == (offsets[-1] if offsets else 0)

        with ledger.subscribe("resume", until_caught_up=True) as events:
            second_run = list(events)
    assert sorted((e.shard, e.offset) for e in first_run + second_run) == \
        [(s, o) for s in range(SHARDS) for o in range(1, followed.last[s] + 1)]


def test_an_event_whose_processing_failed_comes_again(cluster: LocalCluster) -> None:
    with Client(endpoints(cluster), policy=POLICY) as ledger:
        each = CommitPolicy(every_events=1)
        with pytest.raises(RuntimeError), ledger.subscribe("fails", commit=each) as events:
            seen = [next(events), next(events)]
            raise RuntimeError("processing the second event failed")
        with ledger.subscribe("fails") as events:
            assert next(events) == seen[1]
