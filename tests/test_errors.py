"""One error tree for the server and the client: stable codes, statuses, families, one wire shape."""

from __future__ import annotations

import pytest
from raftledger.client.errors import (
    STATUS,
    Conflict,
    InvalidRequest,
    LedgerError,
    NotFound,
    NotLeader,
    OutcomeUnknown,
    Overloaded,
    RateLimited,
    Rejected,
    RuleViolation,
    StaleReplica,
    Unavailable,
    WrongShard,
    from_wire,
)
from raftledger.statemachine.codes import ResultCode


@pytest.mark.parametrize("code", sorted(STATUS))
def test_every_code_builds_the_class_of_its_status(code):
    if code == "ok":
        return
    error = LedgerError(code)
    assert error.code == code and error.status == STATUS[code]
    assert isinstance(error, Rejected) == (400 <= STATUS[code] < 500)
    assert isinstance(error, Unavailable) == (STATUS[code] == 503)
    assert error.retryable == (STATUS[code] in (429, 503))
    assert error.message and error.message != code  # every code has a human text


def test_ledger_rules_are_rule_violations_and_cluster_conditions_have_their_own_class():
    assert isinstance(LedgerError("exceeds_credits"), RuleViolation)
    assert isinstance(LedgerError("idempotency_key_reused"), Conflict)
    assert isinstance(LedgerError("invalid_amount"), InvalidRequest)
    assert isinstance(LedgerError("transaction_not_found"), NotFound)
    assert isinstance(LedgerError("wrong_shard"), WrongShard)
    assert isinstance(LedgerError("rate_limited"), RateLimited)
    assert isinstance(LedgerError("not_leader", details={"leader": "n2"}), NotLeader)
    assert LedgerError("not_leader", details={"leader": "n2"}).leader == "n2"
    assert isinstance(LedgerError("overloaded"), Overloaded)
    assert isinstance(LedgerError("stale_replica"), StaleReplica)
    assert isinstance(LedgerError("timeout"), OutcomeUnknown)
    for member in ResultCode:
        assert member.name in STATUS, member


def test_errors_travel_in_one_shape_and_come_back_as_the_same_class():
    sent = NotLeader(message="shard 0 has no leader", leader="n3", retry_after_s=2.5)
    assert sent.body() == {"error": {"code": "not_leader", "message": "shard 0 has no leader",
                                     "details": {"leader": "n3"}}}
    assert sent.headers() == {"Retry-After": "3"}
    back = from_wire(503, sent.body(), sent.headers()["Retry-After"])
    assert isinstance(back, NotLeader) and back.leader == "n3" and back.retry_after_s == 3.0
    rule = from_wire(422, LedgerError("exceeds_credits", details={"account_id": "a"}).body())
    assert isinstance(rule, RuleViolation) and rule.details == {"account_id": "a"} and not rule.retryable
    item = from_wire(None, {"error": {"code": "overloaded", "message": "m",
                                      "details": {"retry_after_s": 0.5}}})
    assert isinstance(item, Overloaded) and item.retry_after_s == 0.5 and item.status == 503


def test_a_code_this_client_does_not_know_falls_into_its_status_family():
    newer = from_wire(422, {"error": {"code": "some_future_rule", "message": "m", "details": {}}})
    assert isinstance(newer, RuleViolation) and newer.code == "some_future_rule"
    assert isinstance(from_wire(503, {"error": {"code": "new_cluster_state"}}), Unavailable)
    assert isinstance(from_wire(502, b"<html>bad gateway</html>"), Unavailable)
    assert isinstance(from_wire(418, None), Rejected)


def test_the_server_raises_the_same_classes_the_client_catches():
    from raftledger.node.raft import fail_reason_error

    assert isinstance(fail_reason_error(4, None, 1.0), Unavailable)
