"""The client's sans-I/O core on its own: retry policy, backoff bounds, deadline, id reuse, routing.

A scripted node stands in for the network: the core's program is driven the way the transports
drive it, with a clock that moves only when the program sleeps or an attempt times out.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest
from raftledger.client import operations as ops
from raftledger.client.core import (
    Operation,
    Program,
    Reply,
    RetryPolicy,
    Send,
    Session,
    Sleep,
    TransportFailure,
    decode_json,
    run,
)
from raftledger.client.errors import (
    InvalidRequest,
    OutcomeUnknown,
    RuleViolation,
    Unavailable,
)
from raftledger.cluster.router import routing_key, slot_of

A, B, C = "http://a:1", "http://b:1", "http://c:1"
MAP = {"epoch": 3, "slots": 4096,
       "nodes": [{"id": "n0", "url": A, "state": "up"}, {"id": "n1", "url": B, "state": "up"},
                 {"id": "n2", "url": C, "state": "up"}],
       "shards": [{"id": 0, "replicas": ["n0", "n1", "n2"], "slot_ranges": [[0, 2047]]},
                  {"id": 1, "replicas": ["n0", "n1", "n2"], "slot_ranges": [[2048, 4095]]}]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def answer(status: int, body: Any = None, **headers: str) -> Reply:
    return Reply(status, {k.replace("_", "-").lower(): v for k, v in headers.items()},
                 json.dumps(body).encode() if body is not None else b"")


def error(status: int, code: str, **details: Any) -> Reply:
    return answer(status, {"error": {"code": code, "message": code, "details": details}})


Script = Callable[[Send], Reply | TransportFailure]


def drive(program: Program[Any], script: Script, clock: FakeClock) -> tuple[Any, list[Send], list[float]]:
    """Run ``program`` against ``script``; (result or raised error, sends, sleeps)."""
    sends: list[Send] = []
    sleeps: list[float] = []
    outcome: Any = None
    while True:
        try:
            action = program.send(outcome)
        except StopIteration as stop:
            return stop.value, sends, sleeps
        except Exception as exc:  # noqa: BLE001 (the call's error is the result under test)
            return exc, sends, sleeps
        if isinstance(action, Sleep):
            assert action.seconds >= 0
            sleeps.append(action.seconds)
            clock.now += action.seconds
            outcome = None
            continue
        sends.append(action)
        outcome = script(action)
        if isinstance(outcome, TransportFailure) and outcome.sent:
            clock.now += action.timeout_s  # a timed-out attempt took its whole timeout


def session(clock: FakeClock, *, deadline_s: float = 10.0, with_map: bool = True) -> Session:
    s = Session([A, B, C], "secret-token", clock=clock, rng=random.Random(7),
                policy=RetryPolicy(deadline_s=deadline_s, attempt_timeout_s=2.0))
    if with_map:
        s.learn_map(MAP)
        s.learn_status({"shards": [{"id": 0, "leader": "n0"}, {"id": 1, "leader": "n1"}]})
    return s


def routes_to(send: Send) -> str:
    return send.url.split("/v1")[0]


def transaction_json(body: dict[str, Any]) -> dict[str, Any]:
    return {"id": body["id"], "status": "posted", "entries": [], "shards": [0]}


# -- backoff -----------------------------------------------------------------------------------------
def test_backoff_is_full_jitter_within_its_exponential_bound() -> None:
    policy = RetryPolicy(backoff_base_s=0.05, backoff_cap_s=2.0)
    rng = random.Random(1)
    for retry in range(12):
        bound = min(2.0, 0.05 * 2 ** retry)
        delays = [policy.backoff_s(retry, rng) for _ in range(200)]
        assert all(0.0 <= d <= bound for d in delays)
        assert max(delays) > bound * 0.8 and min(delays) < bound * 0.2  # spread over the whole range


# -- retries and ids ------------------------------------------------------------------------------
def test_a_retried_write_sends_the_same_generated_id_every_time() -> None:
    clock = FakeClock()
    failures = iter([TransportFailure("timed out", sent=True), error(503, "not_leader"),
                     error(503, "overloaded")])

    def script(send: Send) -> Reply | TransportFailure:
        if send.method == "GET":  # the map and leaders, read again after a lost answer
            return answer(200, MAP) if send.url.endswith("/map") else answer(200, {"shards": []})
        step = next(failures, None)
        return step if step is not None else answer(201, transaction_json(json.loads(send.body or b"")))

    op = ops.create_transaction({"debit_account_id": "cash:{u1}", "credit_account_id": "alice:{u1}",
                                 "amount": 5, "currency": "USD"})
    result, sent, _ = drive(run(op, session(clock)), script, clock)
    sends = [s for s in sent if s.url.endswith("/v1/transactions")]  # not the map read meanwhile
    bodies = {s.body for s in sends}
    assert len(sends) == 4 and len(bodies) == 1
    assert {s.headers["X-Request-Id"] for s in sends} == {sends[0].headers["X-Request-Id"]}
    assert result.id == json.loads(sends[0].body or b"")["id"] == op.write_id
    assert all(s.headers["Authorization"] == "Bearer secret-token" for s in sends)


def test_a_rule_violation_is_raised_at_once_with_its_code() -> None:
    clock = FakeClock()
    op = ops.create_transaction({"id": "t1", "debit_account_id": "a", "credit_account_id": "b",
                                 "amount": 5, "currency": "USD"})
    result, sends, _ = drive(run(op, session(clock)), lambda _: error(422, "exceeds_credits"), clock)
    assert isinstance(result, RuleViolation) and result.code == "exceeds_credits" and result.status == 422
    assert len(sends) == 1


def test_a_write_left_unsettled_until_the_deadline_is_outcome_unknown() -> None:
    clock = FakeClock()
    start = clock.now
    op = ops.create_transaction({"id": "t1", "debit_account_id": "a", "credit_account_id": "b",
                                 "amount": 5, "currency": "USD"})
    result, sends, _ = drive(run(op, session(clock, deadline_s=10.0)),
                             lambda _: TransportFailure("timed out", sent=True), clock)
    assert isinstance(result, OutcomeUnknown) and result.retryable
    assert result.details["id"] == "t1" and "same id" in result.message
    assert clock.now - start <= 10.0 + 1e-9  # attempts are cut to what is left of the deadline
    assert len({routes_to(s) for s in sends}) == 3  # every node was tried


def test_a_write_no_node_ever_received_is_unavailable_not_unknown() -> None:
    clock = FakeClock()
    op = ops.create_account({"id": "a", "currency": "USD"})
    result, sends, sleeps = drive(run(op, session(clock, deadline_s=5.0)),
                                  lambda _: TransportFailure("refused", sent=False), clock)
    assert type(result) is Unavailable and not isinstance(result, OutcomeUnknown)
    assert len(sends) > 3 and sum(sleeps) <= 5.0


def test_an_overloaded_answer_does_not_make_the_outcome_unknown() -> None:
    clock = FakeClock()
    op = ops.create_account({"id": "a", "currency": "USD"})
    result, _, sleeps = drive(run(op, session(clock, deadline_s=5.0)),
                              lambda _: answer(503, {"error": {"code": "overloaded", "message": "x"}},
                                               Retry_After="1"), clock)
    assert type(result).__name__ == "Overloaded"
    assert all(s >= 1.0 for s in sleeps)  # the node's Retry-After is honoured


def test_an_admin_request_that_may_have_arrived_is_not_sent_again() -> None:
    clock = FakeClock()
    op = ops.request("POST", "/v1/cluster/nodes", {"id": "n9"})
    result, sends, _ = drive(run(op, session(clock)), lambda _: TransportFailure("reset", sent=True), clock)
    assert isinstance(result, Unavailable) and len(sends) == 1


def test_an_admin_request_refused_at_connect_goes_to_another_node() -> None:
    clock = FakeClock()
    op = ops.request("POST", "/v1/cluster/nodes", {"id": "n9"})

    def script(send: Send) -> Reply | TransportFailure:
        return TransportFailure("refused", False) if routes_to(send) == A else answer(201, {"ok": 1})
    result, sends, _ = drive(run(op, session(clock, with_map=False)), script, clock)
    assert result == {"ok": 1} and [routes_to(s) for s in sends] == [A, B]


def test_a_read_is_retried_on_another_replica_when_one_is_stale() -> None:
    clock = FakeClock()
    seen: list[str] = []

    def script(send: Send) -> Reply:
        seen.append(routes_to(send))
        return error(503, "stale_replica") if len(seen) == 1 else answer(200, {"id": "x"})
    result, _, _ = drive(run(ops.request("GET", "/v1/accounts/x"), session(clock)), script, clock)
    assert result == {"id": "x"} and seen[0] != seen[1]


def test_each_retry_is_logged_with_the_answer_that_caused_it(caplog: pytest.LogCaptureFixture) -> None:
    """The admin CLI shows these on stderr: a change that waits minutes says why."""
    clock = FakeClock()
    answers = iter([error(503, "unavailable"), answer(200, {"id": "x"})])
    with caplog.at_level(logging.INFO, logger="raftledger.client"):
        result, _, sleeps = drive(run(ops.request("GET", "/v1/accounts/x"), session(clock)),
                                  lambda _: next(answers), clock)
    assert result == {"id": "x"} and len(sleeps) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"GET /v1/accounts/x: unavailable: unavailable; again in {sleeps[0]:.1f}s"]  # code: message


def test_deadline_bounds_every_sleep_and_attempt() -> None:
    clock = FakeClock()
    start = clock.now
    result, _, sleeps = drive(run(ops.request("GET", "/v1/cluster"), session(clock, deadline_s=3.0)),
                              lambda _: error(503, "unavailable"), clock)
    assert isinstance(result, Unavailable) and clock.now - start <= 3.0


def test_a_float_amount_is_refused_before_anything_is_sent() -> None:
    clock = FakeClock()
    op = ops.create_transaction({"id": "t", "debit_account_id": "a", "credit_account_id": "b",
                                 "amount": 10.5, "currency": "USD"})
    result, sends, _ = drive(run(op, session(clock)), lambda _: answer(201, {}), clock)
    assert isinstance(result, InvalidRequest) and result.code == "invalid_amount" and not sends


# -- routing ----------------------------------------------------------------------------------------
def test_writes_go_to_the_leader_of_the_shard_of_their_id() -> None:
    clock = FakeClock()
    s = session(clock)
    for ident in ("t1", "t2", "t3", "t4{x}", "t5{y}"):
        op = ops.create_transaction({"id": ident, "debit_account_id": "a", "credit_account_id": "b",
                                     "amount": 1, "currency": "USD"})
        _, sends, _ = drive(run(op, s), lambda send: answer(201, transaction_json({"id": "x"})), clock)
        expected = A if slot_of(ident) < 2048 else B  # shard 0 led by n0, shard 1 by n1
        assert routes_to(sends[0]) == expected


def test_a_not_leader_hint_sends_the_next_attempt_to_the_named_leader() -> None:
    clock = FakeClock()
    s = session(clock)
    ident = next(f"t{i}" for i in range(100) if slot_of(f"t{i}") < 2048)  # shard 0, led by n0

    def script(send: Send) -> Reply:
        if routes_to(send) == A:
            return error(503, "not_leader", leader="n2")
        return answer(201, transaction_json({"id": ident}))
    op = ops.create_transaction({"id": ident, "debit_account_id": "a", "credit_account_id": "b",
                                 "amount": 1, "currency": "USD"})
    _, sends, _ = drive(run(op, s), script, clock)
    assert [routes_to(x) for x in sends if "/v1/transactions" in x.url] == [A, C]
    assert s.leaders[0] == "n2"


def test_answers_teach_leaders_tokens_and_a_newer_map() -> None:
    clock = FakeClock()
    s = session(clock)
    s.learn_reply(answer(201, {}, X_Ledger_Token="0:17,1:4", X_Ledger_Leader="1=n2"))
    s.learn_reply(answer(201, {}, X_Ledger_Token="0:12,1:9"))
    assert s.tokens == {0: 17, 1: 9} and s.leaders[1] == "n2" and not s.map_stale
    s.learn_reply(answer(201, {}, X_Ledger_Map_Epoch="4"))
    assert s.map_stale


def test_session_reads_send_the_tokens_of_earlier_writes() -> None:
    clock = FakeClock()
    s = session(clock)
    s.learn_token("1:40")
    _, sends, _ = drive(run(ops.get_account("alice"), s), lambda _: answer(200, {"id": "alice"}), clock)
    assert "min_token=1%3A40" in sends[0].url
    _, sends, _ = drive(run(ops.get_account("alice", consistency="local"), s),
                        lambda _: answer(200, {}), clock)
    assert "min_token" not in sends[0].url
    _, sends, _ = drive(run(ops.get_account("alice", consistency="linearizable"), s),
                        lambda _: answer(200, {}), clock)
    assert "consistency=linearizable" in sends[0].url


def test_a_stale_map_is_read_again_before_a_routed_call() -> None:
    clock = FakeClock()
    s = session(clock, with_map=False)

    def script(send: Send) -> Reply:
        if send.url.endswith("/v1/cluster/map"):
            return answer(200, MAP)
        if send.url.endswith("/v1/cluster"):
            return answer(200, {"shards": [{"id": 0, "leader": "n2"}, {"id": 1, "leader": "n2"}]})
        return answer(201, {"id": "a", "currency": "USD"})
    _, sends, _ = drive(run(ops.create_account({"id": "a", "currency": "USD"}), s), script, clock)
    assert [x.url.rsplit("/v1", 1)[1] for x in sends] == ["/cluster/map", "/cluster", "/accounts"]
    assert routes_to(sends[-1]) == C and s.epoch == 3


# -- generated ids ------------------------------------------------------------------------------------
@pytest.mark.parametrize("account", ["alice:{u42}", "alice", "a{b", "{a}{b}", "a.b:c-d"])
def test_a_generated_id_lives_on_its_accounts_slot(account: str) -> None:
    ident = ops.tagged_id(account)
    assert slot_of(ident) == slot_of(account) and ident.startswith("tx-") and len(ident) <= 128


@pytest.mark.parametrize("account", ["a}b", "{}x", "x{}y", "x" * 120])
def test_a_key_no_tag_can_reproduce_gives_an_untagged_id(account: str) -> None:
    ident = ops.tagged_id(account)
    assert "{" not in ident and routing_key(ident) == ident


def test_a_batch_gives_each_item_without_an_id_its_own_tagged_one() -> None:
    op = ops.create_transactions([{"debit_account_id": "a:{t1}", "credit_account_id": "b:{t1}",
                                   "amount": 1, "currency": "USD"},
                                  {"id": "mine", "debit_account_id": "a:{t2}",
                                   "credit_account_id": "b:{t2}", "amount": 1, "currency": "USD"}],
                                 atomic=False)
    first, second = op.body["transactions"]
    assert first["id"].endswith("{t1}") and second["id"] == "mine" and op.route_key == first["id"]


def test_follow_ups_default_to_the_apis_ids() -> None:
    assert ops.follow_up("post", "h1{u}", None, 5).body == {"id": "h1{u}:post", "amount": 5}
    assert ops.follow_up("void", "h1{u}", "v9", None).body == {"id": "v9"}
    assert ops.follow_up("reverse", "t/1", None).path == "/v1/transactions/t%2F1/reverse"


def test_an_operation_is_built_once_so_its_id_is_fixed() -> None:
    op: Operation[Any] = ops.create_transaction({"entries": [{"account_id": "a:{k}"}]})
    assert op.body["id"] == op.write_id == op.route_key
    assert decode_json(answer(200, {"x": 1})) == {"x": 1}
