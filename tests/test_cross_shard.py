"""Cross-shard transactions through the HTTP API: two-phase commit driven by the node, on three real
stores played by ``DirectShard`` (no Raft), so each step can be failed on purpose.

Time is a ``FakeClock`` and the resolver runs only when a test calls it (after moving time past its
timeouts). Every
test ends with the ledger audited: each store's own invariants, no hold left open, no decision
left unfinished, and per currency the debits equal the credits over all shards.
(The same protocol over Raft, with leaders killed: tests/test_cross_shard_cluster.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from raftledger.client.errors import LedgerError
from raftledger.node.http import NodeContext, create_app, cross_shard
from raftledger.node.service import Committed
from raftledger.node.settings import CrossShardSettings, ForwardingSettings, NodeSettings
from raftledger.node.testing import DirectShard, FakeClock, account_body, ids_on_shard, transfer_body
from raftledger.statemachine.audit import currency_totals, verify_store
from raftledger.statemachine.commands import AnyCommand, Batch, Decide, FinishLeg, PrepareLeg
from raftledger.statemachine.store import LedgerStore

SHARDS = 3
HOME, A, B = 0, 1, 2
ALICE = ids_on_shard(A, SHARDS, "alice")[0]
BOB = ids_on_shard(B, SHARDS, "bob")[0]
CAROL = ids_on_shard(B, SHARDS, "carol")[0]


def tx_id(name: str, shard: int = HOME) -> str:
    """A transaction id whose home is ``shard`` (a hash tag that routes there)."""
    tag = ids_on_shard(shard, SHARDS, "h")[0]
    return f"{name}{{{tag}}}"


Fault = Callable[[int, AnyCommand], str | None]


class FaultyShard(DirectShard):
    """A DirectShard whose ``fault(shard, command)`` may answer ``"unreachable"`` (nothing applied,
    the call fails) or ``"lost"`` (applied, but the answer never comes back)."""

    fault: Fault | None = None

    async def submit(self, command: AnyCommand) -> Committed:
        what = self.fault(self.shard, command) if self.fault else None
        if what == "unreachable":
            raise LedgerError("unavailable", f"shard {self.shard} unreachable (test)")
        committed = await super().submit(command)
        if what == "lost":
            raise LedgerError("outcome_unknown", f"answer of shard {self.shard} lost (test)")
        return committed


class Ledger:
    def __init__(self, client: TestClient, shards: dict[int, FaultyShard], ctx: NodeContext,
                 clock: FakeClock) -> None:
        self.client, self.shards, self.ctx, self.clock = client, shards, ctx, clock

    def fail(self, fault: Fault | None) -> None:
        for shard in self.shards.values():
            shard.fault = fault

    async def post(self, path: str, body: Any = None) -> tuple[int, dict[str, Any], Any]:
        resp = await self.client.post(path, json=body)
        return resp.status, await resp.json(), resp.headers

    async def balance(self, account_id: str) -> dict[str, Any]:
        resp = await self.client.get(f"/v1/accounts/{account_id}/balance")
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def transaction(self, txid: str) -> tuple[int, dict[str, Any]]:
        resp = await self.client.get(f"/v1/transactions/{txid}")
        return resp.status, await resp.json()

    async def resolve(self) -> None:
        """One resolver pass on every shard, with every timeout passed."""
        await self.clock.advance(3600)
        for shard in sorted(self.shards):
            await cross_shard.resolve_shard(self.ctx, shard)

    def audit(self) -> None:
        """Each store sound; nothing open; debits equal credits per currency over all shards."""
        totals: dict[str, list[int]] = {}
        for shard in self.shards.values():
            with shard.store.reader() as reader:
                assert verify_store(reader) == [], f"shard {shard.shard}"
                assert reader.open_legs(2**63, 100) == [], f"shard {shard.shard}: legs left prepared"
                assert reader.open_decisions(2**63, 100) == [], f"shard {shard.shard}: decisions open"
                for currency, sums in currency_totals(reader).items():
                    into = totals.setdefault(currency, [0, 0, 0, 0])
                    for i, value in enumerate(sums):
                        into[i] += value
        for currency, (debits, credits, debits_pending, credits_pending) in totals.items():
            assert debits == credits, currency
            assert debits_pending == credits_pending == 0, f"{currency}: holds left pending"


async def no_background_resolver(ctx: NodeContext) -> None:
    """In place of ``cross_shard.resolve``: here the resolver runs only when a test calls it."""


@pytest.fixture
async def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cross_shard, "resolve", no_background_resolver)
    stores = [LedgerStore(str(tmp_path / f"s{s}.lmdb"), shard=s, map_size=2**27) for s in range(SHARDS)]
    shards = {s: FaultyShard(store, s) for s, store in enumerate(stores)}
    clock = FakeClock()
    settings = NodeSettings(forwarding=ForwardingSettings(leader_wait_s=0.2),
                            cross_shard=CrossShardSettings(prepare_timeout_s=30, finish_timeout_s=5))
    ctx = NodeContext("n1", shards, SHARDS, settings=settings, clock=clock)
    client = TestClient(TestServer(create_app(ctx)))
    await client.start_server()
    made = Ledger(client, shards, ctx, clock)
    for account_id in (ALICE, BOB, CAROL):
        resp = await client.post("/v1/accounts", json=account_body(account_id))
        assert resp.status == 201
    try:
        yield made
    finally:
        await client.close()
        for store in stores:
            store.close()


def pay(txid: str, amount: int = 100, debit: str = ALICE, credit: str = BOB, **fields: Any) -> dict[str, Any]:
    return transfer_body(txid, debit, credit, amount, **fields)


# -- the protocol, undisturbed ----------------------------------------------------------------------------


async def test_a_transfer_between_shards_posts_on_both_and_is_recorded_at_its_home(ledger):
    txid = tx_id("t1")
    status, body, headers = await ledger.post("/v1/transactions", pay(txid, 250))
    assert status == 201, body
    assert body["status"] == "posted" and body["cross_shard"] is True and body["shards"] == [A, B]
    assert [e["amount"] for e in body["entries"]] == [250, 250]
    token = dict(part.split(":") for part in headers["X-Ledger-Token"].split(","))
    assert set(token) == {str(HOME), str(A), str(B)}  # the decision and both legs
    assert (await ledger.balance(ALICE))["balance"] == 250  # debit-normal: debited
    assert (await ledger.balance(BOB))["balance"] == -250
    assert (await ledger.balance(ALICE))["debits_pending"] == 0
    got_status, got = await ledger.transaction(txid)
    assert got_status == 200 and got["id"] == txid and got["shards"] == [A, B]
    with ledger.shards[A].store.reader() as reader:  # no record of it off its home: one lookup
        assert reader.transaction(txid) is None
    status, back, _ = await ledger.post("/v1/transactions", pay(tx_id("t1back"), 50, debit=BOB, credit=ALICE))
    assert status == 201 and [e["account_id"] for e in back["entries"]] == [BOB, ALICE]  # as sent
    ledger.audit()


async def test_retry_replays_the_one_outcome_and_another_payload_is_409(ledger):
    txid = tx_id("t2")
    first = await ledger.post("/v1/transactions", pay(txid))
    again = await ledger.post("/v1/transactions", pay(txid))
    assert first[0] == again[0] == 201 and first[1] == again[1]
    assert again[2]["Idempotent-Replayed"] == "true"
    other = await ledger.post("/v1/transactions", pay(txid, 101))
    assert other[0] == 409 and other[1]["error"]["code"] == "idempotency_key_reused"
    moved = await ledger.post("/v1/transactions", pay(txid, debit=CAROL))  # other accounts, too
    assert moved[0] == 409
    assert (await ledger.balance(ALICE))["balance"] == 100
    ledger.audit()


async def test_an_id_used_by_a_single_shard_transaction_is_409_as_a_cross_shard_one(ledger):
    txid = tx_id("t3", B)  # home B: a transfer between bob and carol takes the one-round path
    assert (await ledger.post("/v1/transactions", pay(txid, debit=CAROL)))[0] == 201
    status, body, _ = await ledger.post("/v1/transactions", pay(txid))
    assert status == 409 and body["error"]["code"] == "idempotency_key_reused"
    assert (await ledger.balance(ALICE))["balance"] == 0
    ledger.audit()


async def test_a_refusing_participant_aborts_it_everywhere(ledger):
    rich, poor = ids_on_shard(A, SHARDS, "rich")[0], ids_on_shard(B, SHARDS, "poor")[0]
    for account_id, flags in ((rich, []), (poor, ["debits_must_not_exceed_credits"])):
        assert (await ledger.post("/v1/accounts", account_body(account_id, flags=flags)))[0] == 201
    txid = tx_id("t4")
    status, body, _ = await ledger.post("/v1/transactions", pay(txid, 10, debit=poor, credit=rich))
    assert status == 422 and body["error"]["code"] == "exceeds_credits"
    again = await ledger.post("/v1/transactions", pay(txid, 10, debit=poor, credit=rich))
    assert again[0] == 422 and again[2]["Idempotent-Replayed"] == "true"
    for account_id in (rich, poor):
        bal = await ledger.balance(account_id)
        assert bal["balance"] == bal["debits_pending"] == bal["credits_pending"] == 0
    assert (await ledger.transaction(txid))[1]["status"] == "rejected"
    ledger.audit()


async def test_an_untagged_id_whose_accounts_share_another_shard_goes_through_its_home(ledger):
    txid = next(i for i in (f"plain{n}" for n in range(100)) if ledger.ctx.shard_of(i) == HOME)
    status, body, _ = await ledger.post("/v1/transactions", pay(txid, debit=CAROL))
    assert status == 201 and body["shards"] == [B]
    assert (await ledger.transaction(txid))[0] == 200
    ledger.audit()


async def test_a_hold_across_shards_posts_partially_then_reverses(ledger):
    hold = tx_id("h1")
    status, body, _ = await ledger.post("/v1/transactions", pay(hold, 100, pending=True))
    assert status == 201 and body["status"] == "pending"
    assert (await ledger.balance(ALICE))["debits_pending"] == 100
    assert (await ledger.balance(BOB))["credits_pending"] == 100
    post = tx_id("h1post")
    status, body, _ = await ledger.post(f"/v1/transactions/{hold}/post", {"id": post, "amount": 60})
    assert status == 201, body
    assert body["status"] == "posted" and [e["amount"] for e in body["entries"]] == [60, 60]
    alice = await ledger.balance(ALICE)
    assert alice["balance"] == 60 and alice["debits_pending"] == 0
    assert (await ledger.transaction(hold))[1]["status"] == "posted"
    void = await ledger.post(f"/v1/transactions/{hold}/void", {"id": tx_id("h1void")})
    assert void[0] == 422 and void[1]["error"]["code"] == "pending_already_posted"
    again = await ledger.post(f"/v1/transactions/{hold}/post", {"id": post, "amount": 60})
    assert again[0] == 201 and again[2]["Idempotent-Replayed"] == "true"
    rev = tx_id("h1rev")
    status, body, _ = await ledger.post(f"/v1/transactions/{post}/reverse", {"id": rev})
    assert status == 201, body
    assert body["reverses"] == post and body["shards"] == [A, B]
    assert (await ledger.balance(ALICE))["balance"] == 0
    twice = await ledger.post(f"/v1/transactions/{post}/reverse", {"id": tx_id("h1rev2")})
    assert twice[0] == 422 and twice[1]["error"]["code"] == "already_reversed"
    ledger.audit()


async def test_a_hold_across_shards_voids(ledger):
    hold = tx_id("h2")
    assert (await ledger.post("/v1/transactions", pay(hold, 70, pending=True)))[0] == 201
    status, body, _ = await ledger.post(f"/v1/transactions/{hold}/void", {"id": tx_id("h2void")})
    assert status == 201 and body["status"] == "voided"
    for account_id in (ALICE, BOB):
        bal = await ledger.balance(account_id)
        assert bal["balance"] == bal["debits_pending"] == bal["credits_pending"] == 0
    ledger.audit()


async def test_a_hold_across_shards_expires_at_its_home_and_the_resolver_releases_its_legs(ledger):
    hold = tx_id("h3")
    body = pay(hold, 40, pending=True, timeout_seconds=1)
    assert (await ledger.post("/v1/transactions", body))[0] == 201
    ledger.shards[HOME]._clock += 2_000_000_000  # the home's next entry is past the deadline
    assert (await ledger.post("/v1/accounts", account_body(ids_on_shard(HOME, SHARDS, "z")[0])))[0] == 201
    assert (await ledger.transaction(hold))[1]["status"] == "expired"
    assert (await ledger.balance(ALICE))["debits_pending"] == 40  # until the resolver's pass
    await ledger.resolve()
    assert (await ledger.balance(ALICE))["debits_pending"] == 0
    late = await ledger.post(f"/v1/transactions/{hold}/post", {"id": tx_id("h3post")})
    assert late[0] == 422 and late[1]["error"]["code"] == "pending_expired"
    ledger.audit()


async def test_a_batch_mixes_single_and_cross_shard_items(ledger):
    items = [pay(tx_id("b1")), pay(tx_id("b2", B), debit=CAROL), pay(tx_id("b3"), credit="ghost"),
             pay(tx_id("b4"), 5)]
    resp = await ledger.client.post("/v1/transactions/batch", json={"transactions": items})
    assert resp.status == 200
    results = (await resp.json())["results"]
    assert [r["status"] for r in results] == [201, 201, 422, 201]
    assert results[2]["error"]["code"] == "account_not_found"
    assert (await ledger.balance(ALICE))["balance"] == 105
    ledger.audit()


# -- faults: a step that fails, an answer that is lost --------------------------------------------------


def on(kind: type, shard: int, what: str, times: int = 1) -> Fault:
    left = [times]

    def fault(at: int, command: AnyCommand) -> str | None:
        steps = command.commands if isinstance(command, Batch) else (command,)
        if at == shard and any(isinstance(c, kind) for c in steps) and left[0] > 0:
            left[0] -= 1
            return what
        return None

    return fault


async def test_an_unreachable_participant_leaves_no_decision_and_a_retry_completes_it(ledger):
    txid = tx_id("f1")
    ledger.fail(on(PrepareLeg, B, "unreachable"))
    status, body, _ = await ledger.post("/v1/transactions", pay(txid))
    assert status == 503, body
    assert (await ledger.balance(ALICE))["debits_pending"] == 100  # alice's leg holds, bob's never came
    assert (await ledger.transaction(txid))[0] == 404
    status, body, _ = await ledger.post("/v1/transactions", pay(txid))
    assert status == 201, body
    assert (await ledger.balance(ALICE))["balance"] == 100
    ledger.audit()


async def test_a_prepare_never_decided_is_aborted_by_the_resolver_and_the_retry_sees_the_abort(ledger):
    txid = tx_id("f2")
    ledger.fail(on(PrepareLeg, B, "lost"))
    status, _, _ = await ledger.post("/v1/transactions", pay(txid))
    assert status == 503
    assert (await ledger.balance(BOB))["credits_pending"] == 100  # prepared, answer lost
    await ledger.resolve()  # both legs ask the home, which records the abort first
    for account_id in (ALICE, BOB):
        assert (await ledger.balance(account_id))["debits_pending"] == 0
    status, body, _ = await ledger.post("/v1/transactions", pay(txid))
    assert status == 422 and body["error"]["code"] == "transaction_aborted"
    assert (await ledger.transaction(txid))[1]["status"] == "rejected"
    ledger.audit()


async def test_a_lost_decision_answer_is_finished_by_the_resolver_and_replayed_to_the_retry(ledger):
    txid = tx_id("f3")
    ledger.fail(on(Decide, HOME, "lost"))
    status, _, _ = await ledger.post("/v1/transactions", pay(txid))
    assert status == 503  # decided, but the driver never heard: the client may not assume either way
    assert (await ledger.transaction(txid))[1]["status"] == "posted"
    assert (await ledger.balance(ALICE))["debits_pending"] == 100  # legs still held
    await ledger.resolve()
    assert (await ledger.balance(ALICE))["balance"] == 100
    status, body, headers = await ledger.post("/v1/transactions", pay(txid))
    assert status == 201 and headers["Idempotent-Replayed"] == "true" and body["status"] == "posted"
    ledger.audit()


async def test_a_leg_not_finished_in_time_is_finished_by_the_resolver(ledger):
    """Decided, but bob's leg not finished: no 201 yet, since a read of bob would not show the
    transaction (raftledger chaos, seed 7, caught a linearizable read missing an acknowledged
    transfer this way); the client retries with the same id and gets 201 once it is finished."""
    txid = tx_id("f4")
    ledger.fail(on(FinishLeg, B, "unreachable"))
    status, body, _ = await ledger.post("/v1/transactions", pay(txid))
    assert status == 503, body  # retryable: the same id gets the decision once the leg is finished
    assert (await ledger.balance(BOB))["credits_pending"] == 100
    await ledger.resolve()
    bob = await ledger.balance(BOB)
    assert bob["balance"] == -100 and bob["credits_pending"] == 0
    status, body, _ = await ledger.post("/v1/transactions", pay(txid))
    assert status == 201 and body["status"] == "posted"
    ledger.audit()


async def test_a_retry_racing_the_resolver_cannot_commit_after_the_abort(ledger):
    txid = tx_id("f5")
    ledger.fail(on(PrepareLeg, B, "unreachable"))
    assert (await ledger.post("/v1/transactions", pay(txid)))[0] == 503
    await ledger.clock.advance(3600)
    await cross_shard.resolve_shard(ledger.ctx, A)  # alice's leg: the home records the abort
    status, body, _ = await ledger.post("/v1/transactions", pay(txid))  # bob prepares now; too late
    assert status == 422 and body["error"]["code"] == "transaction_aborted"
    for account_id in (ALICE, BOB):
        bal = await ledger.balance(account_id)
        assert bal["balance"] == bal["debits_pending"] == bal["credits_pending"] == 0
    ledger.audit()


# -- atomic batches and ids claimed at their homes ------------------------------------------------------


async def batch(ledger: Ledger, items: list[dict[str, Any]], atomic: bool = True) -> list[dict[str, Any]]:
    resp = await ledger.client.post("/v1/transactions/batch", json={"transactions": items, "atomic": atomic})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["results"]


def plain_id(ledger: Ledger, prefix: str, shard: int) -> str:
    """An untagged id whose home is ``shard``."""
    return next(i for i in (f"{prefix}{n}" for n in range(200)) if ledger.ctx.shard_of(i) == shard)


async def test_an_atomic_batch_across_shards_and_homes_commits_whole(ledger):
    first, second = tx_id("a1"), tx_id("a2", B)
    results = await batch(ledger, [pay(first, 10), pay(second, 20, debit=CAROL, credit=ALICE)])
    assert [r["status"] for r in results] == [201, 201]
    assert (await ledger.balance(ALICE))["balance"] == 10 - 20
    for txid in (first, second):  # the second is claimed at its home (B), recorded with the first's
        status, body = await ledger.transaction(txid)
        assert status == 200 and body["id"] == txid
    with ledger.shards[B].store.reader() as reader:
        assert reader.recorded_at(second) == HOME
    again = await batch(ledger, [pay(first, 10), pay(second, 20, debit=CAROL, credit=ALICE)])
    assert [r.get("replayed") for r in again] == [True, True]
    ledger.audit()


async def test_an_atomic_batch_with_one_refusal_aborts_every_item(ledger):
    poor = ids_on_shard(B, SHARDS, "poor")[0]
    limited = account_body(poor, flags=["debits_must_not_exceed_credits"])
    assert (await ledger.post("/v1/accounts", limited))[0] == 201
    items = [pay(tx_id("r1"), 10), pay(tx_id("r2", A), 5, debit=poor), pay(tx_id("r3", B), 1, debit=CAROL)]
    results = await batch(ledger, items)
    assert [r["error"]["code"] for r in results] == ["linked_event_failed", "exceeds_credits",
                                                    "linked_event_failed"]
    assert results[0]["error"]["details"]["failed_index"] == 1
    for account_id in (ALICE, BOB, CAROL, poor):
        bal = await ledger.balance(account_id)
        assert bal["balance"] == bal["debits_pending"] == bal["credits_pending"] == 0
    for item in items:
        assert (await ledger.transaction(item["id"]))[1]["status"] == "rejected"
    again = await batch(ledger, items)
    assert [r["error"]["code"] for r in again] == [r["error"]["code"] for r in results]
    ledger.audit()


async def test_an_atomic_batch_reusing_another_payloads_id_is_409_and_moves_nothing(ledger):
    taken = tx_id("u1", A)
    assert (await ledger.post("/v1/transactions", pay(taken, 1)))[0] == 201
    results = await batch(ledger, [pay(tx_id("u2"), 10), pay(taken, 2)])
    assert [r["status"] for r in results] == [422, 409]
    assert results[0]["error"]["code"] == "linked_event_failed"
    assert (await ledger.balance(ALICE))["balance"] == 1
    ledger.audit()


async def test_an_atomic_batch_fenced_by_the_resolver_aborts_whole_on_retry(ledger):
    items = [pay(tx_id("z1"), 10), pay(tx_id("z2", A), 20, debit=CAROL)]
    ledger.fail(on(PrepareLeg, B, "lost"))  # both legs on bob's shard, in one request
    assert (await ledger.client.post("/v1/transactions/batch",
                                     json={"transactions": items, "atomic": True})).status == 503
    ledger.fail(None)
    await ledger.clock.advance(3600)
    await cross_shard.resolve_shard(ledger.ctx, B)  # one of bob's legs: the coordinator aborts it
    results = await batch(ledger, items)
    codes = [r["error"]["code"] for r in results]
    assert "transaction_aborted" in codes and set(codes) <= {"transaction_aborted", "linked_event_failed"}
    await ledger.resolve()
    ledger.audit()


async def test_a_follow_up_with_an_untagged_id_claims_it_at_its_home(ledger):
    hold = tx_id("c1")
    assert (await ledger.post("/v1/transactions", pay(hold, 30, pending=True)))[0] == 201
    post = plain_id(ledger, "settle", A)
    status, body, _ = await ledger.post(f"/v1/transactions/{hold}/post", {"id": post})
    assert status == 201, body
    got_status, got = await ledger.transaction(post)
    assert got_status == 200 and got["pending_id"] == hold
    reused = await ledger.post("/v1/transactions", pay(post, 5, debit=CAROL))
    assert reused[0] == 409
    other_hold = tx_id("c2")
    assert (await ledger.post("/v1/transactions", pay(other_hold, 30, pending=True)))[0] == 201
    twice = await ledger.post(f"/v1/transactions/{other_hold}/post", {"id": post})
    assert twice[0] == 409 and twice[1]["error"]["code"] == "idempotency_key_reused"
    await ledger.post(f"/v1/transactions/{other_hold}/void", {"id": tx_id("c2void")})
    ledger.audit()


async def test_a_single_shard_follow_up_with_an_id_homed_elsewhere_is_claimed_too(ledger):
    hold = tx_id("s1", B)
    assert (await ledger.post("/v1/transactions", pay(hold, 8, debit=CAROL, pending=True)))[0] == 201
    void = plain_id(ledger, "undo", A)
    status, body, _ = await ledger.post(f"/v1/transactions/{hold}/void", {"id": void})
    assert status == 201 and body["status"] == "voided"
    assert (await ledger.transaction(void))[1]["pending_id"] == hold
    assert (await ledger.post("/v1/transactions", pay(void, 1)))[0] == 409
    ledger.audit()


@pytest.mark.parametrize("skewed", ["the leader that stamped it ran ahead", "the resolver's runs behind"])
async def test_a_leg_is_resolved_once_open_that_long_whatever_the_wall_clocks_say(ledger, skewed):
    """Found by raftledger chaos (a clock moved +175 s): a leader whose wall clock ran ahead stamps
    the shard's timestamps ahead, and they stay ahead once its clock is right again; a leader whose
    clock runs behind sees every timestamp as young. The resolver judged a leg's age by its
    timestamp alone, so such a leg waited until real time caught up (minutes of holds left
    pending). It is now resolved once this leader has seen it open ``prepare_timeout_s`` on its
    monotonic clock."""
    backoff = cross_shard.Backoff(ledger.ctx)
    if skewed.startswith("the leader"):
        ledger.shards[B]._clock += 600 * 10**9
    ledger.fail(on(PrepareLeg, B, "lost"))  # bob's leg prepared, its answer lost: the driver gives up
    assert (await ledger.post("/v1/transactions", pay(tx_id("sk"))))[0] == 503
    ledger.fail(None)
    if skewed.startswith("the resolver"):
        ledger.clock._wall_offset -= 600 * 10**9
    await cross_shard.resolve_shard(ledger.ctx, B, backoff)
    with ledger.shards[B].store.reader() as reader:
        assert len(reader.open_legs(2**63, 100)) == 1  # seen open, not for long yet
    await ledger.clock.advance(ledger.ctx.settings.cross_shard.prepare_timeout_s)
    await cross_shard.resolve_shard(ledger.ctx, B, backoff)
    with ledger.shards[B].store.reader() as reader:
        assert reader.open_legs(2**63, 100) == []
    await ledger.resolve()
    ledger.audit()


async def test_the_resolver_backs_off_a_shard_it_cannot_reach_and_finishes_once_it_can(ledger):
    txid = tx_id("bo")
    attempts = []

    def unreachable(shard: int, command: AnyCommand) -> str | None:
        if shard == B and isinstance(command, FinishLeg):
            attempts.append(command.id)
            return "unreachable"
        return None

    ledger.fail(unreachable)
    assert (await ledger.post("/v1/transactions", pay(txid)))[0] == 503  # decided, bob unfinished
    backoff = cross_shard.Backoff(ledger.ctx)
    await ledger.clock.advance(3600)
    await cross_shard.resolve_shard(ledger.ctx, HOME, backoff)
    first_wait = backoff.waits[txid][1]
    await cross_shard.resolve_shard(ledger.ctx, HOME, backoff)  # not due yet: not tried
    assert len(attempts) == 2  # the driver's, then the resolver's first
    await ledger.clock.advance(first_wait)
    await cross_shard.resolve_shard(ledger.ctx, HOME, backoff)
    assert len(attempts) == 3 and backoff.waits[txid][1] == 2 * first_wait
    ledger.fail(None)
    await ledger.clock.advance(2 * first_wait)
    await cross_shard.resolve_shard(ledger.ctx, HOME, backoff)
    assert txid not in backoff.waits
    assert (await ledger.balance(BOB))["balance"] == -100
    ledger.audit()


# -- the coordinator holds a leg: prepared in the decision's entry ----------------------------------------


async def test_a_transaction_homed_on_one_of_its_shards_prepares_that_leg_with_the_decision(ledger):
    txid = tx_id("l1", A)  # alice's shard is the coordinator
    status, body, headers = await ledger.post("/v1/transactions", pay(txid, 30))
    assert status == 201 and body["shards"] == [A, B]
    assert [e["account_id"] for e in body["entries"]] == [ALICE, BOB]
    assert all(e["seq"] > 0 and len(e["hash"]) == 64 for e in body["entries"])
    assert set(dict(p.split(":") for p in headers["X-Ledger-Token"].split(","))) == {str(A), str(B)}
    assert (await ledger.balance(ALICE))["balance"] == 30 and (await ledger.balance(BOB))["balance"] == -30
    again = await ledger.post("/v1/transactions", pay(txid, 30))
    assert again[0] == 201 and again[1] == body
    ledger.audit()


async def test_a_refusal_of_the_coordinators_own_leg_is_the_decision(ledger):
    poor = ids_on_shard(A, SHARDS, "poor")[0]
    limited = account_body(poor, flags=["debits_must_not_exceed_credits"])
    assert (await ledger.post("/v1/accounts", limited))[0] == 201
    txid = tx_id("l2", A)
    status, body, _ = await ledger.post("/v1/transactions", pay(txid, 5, debit=poor))
    assert status == 422 and body["error"]["code"] == "exceeds_credits"
    assert (await ledger.balance(BOB))["credits_pending"] == 0  # bob's leg was voided
    assert (await ledger.transaction(txid))[1]["code"] == "exceeds_credits"
    ledger.audit()


async def test_a_lost_answer_of_the_decision_with_its_local_leg_is_finished_by_the_resolver(ledger):
    txid = tx_id("l3", A)
    ledger.fail(on(Decide, A, "lost"))
    assert (await ledger.post("/v1/transactions", pay(txid, 12)))[0] == 503
    # Prepared, decided and finished in one entry at the coordinator; the other leg is still held.
    assert (await ledger.balance(ALICE))["balance"] == 12
    assert (await ledger.balance(ALICE))["debits_pending"] == 0
    assert (await ledger.balance(BOB))["credits_pending"] == 12
    await ledger.resolve()
    assert (await ledger.balance(BOB))["credits_pending"] == 0
    assert (await ledger.balance(BOB))["balance"] == -12  # debit-normal: credited
    again = await ledger.post("/v1/transactions", pay(txid, 12))
    assert again[0] == 201 and again[2]["Idempotent-Replayed"] == "true"
    ledger.audit()


async def test_a_remote_leg_that_never_answered_leaves_the_coordinators_leg_unprepared(ledger):
    txid = tx_id("l4", A)
    ledger.fail(on(PrepareLeg, B, "unreachable"))
    assert (await ledger.post("/v1/transactions", pay(txid, 12)))[0] == 503
    assert (await ledger.balance(ALICE))["debits_pending"] == 0
    assert (await ledger.post("/v1/transactions", pay(txid, 12)))[0] == 201
    ledger.audit()


async def test_a_hold_from_an_atomic_batch_is_posted_where_the_batch_recorded_it(ledger):
    first, hold = tx_id("ah1"), tx_id("ah2", B)  # the hold's home (B) only holds a claim
    items = [pay(first, 1), pay(hold, 9, debit=CAROL, credit=ALICE, pending=True)]
    assert [r["status"] for r in await batch(ledger, items)] == [201, 201]
    status, body, _ = await ledger.post(f"/v1/transactions/{hold}/post", {"id": tx_id("ah2post", B)})
    assert status == 201 and body["pending_id"] == hold, body
    status, body, _ = await ledger.post(f"/v1/transactions/{tx_id('ah2post', B)}/reverse",
                                        {"id": tx_id("ah2rev", A)})
    assert status == 201, body
    assert (await ledger.balance(ALICE))["balance"] == 1
    ledger.audit()
