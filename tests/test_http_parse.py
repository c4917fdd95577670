"""Strict parsing at the edge: money is never a float, unknown fields are reported."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftledger.client.errors import STATUS, LedgerError
from raftledger.cluster.router import modulo_table, route, routing_key, shard_for_account, slot_of
from raftledger.node.http.bodies import (
    parse_account,
    parse_accounts,
    parse_batch,
    parse_post,
    parse_transaction,
)
from raftledger.node.http.parse import decode_body, parse_entries_query, parse_read_params, parse_token
from raftledger.statemachine.codes import ResultCode
from raftledger.statemachine.commands import AccountFlag, Direction, EntrySpec


def code_of(fn, *args, **kwargs) -> str:
    with pytest.raises(LedgerError) as info:
        fn(*args, **kwargs)
    return info.value.code


def body(text: str):
    return decode_body(text.encode(), "application/json")


TRANSFER = {"id": "t1", "entries": [
    {"account_id": "a", "direction": "debit", "amount": 10, "currency": "BRL"},
    {"account_id": "b", "direction": "credit", "amount": 10, "currency": "BRL"}]}


def test_every_result_code_has_a_status():
    assert {c.name for c in ResultCode} <= set(STATUS)


def test_fraction_or_exponent_amount_is_invalid_amount_and_no_float_is_built():
    for number in ("10.0", "1e3", "10.50", "-0.0"):
        raw = json.dumps(TRANSFER).replace('"amount": 10,', f'"amount": {number},', 1)
        parsed = body(raw)
        amount = parsed["entries"][0]["amount"]
        assert not isinstance(amount, float)
        assert code_of(parse_transaction, parsed) == "invalid_amount"


@pytest.mark.parametrize("amount", [0, -5, 2**63, "12a", "", True, None, [1], "1.5", " 1"])
def test_bad_amounts_are_refused(amount):
    tx = json.loads(json.dumps(TRANSFER))
    tx["entries"][0]["amount"] = amount
    assert code_of(parse_transaction, tx) in ("invalid_amount", "missing_field")


def test_amount_as_digit_string_is_accepted():
    tx = json.loads(json.dumps(TRANSFER))
    tx["entries"][0]["amount"] = "10"
    assert parse_transaction(tx).entries[0].amount == 10


def test_largest_amount_is_accepted():
    tx = json.loads(json.dumps(TRANSFER))
    tx["entries"][0]["amount"] = 2**63 - 1
    assert parse_transaction(tx).entries[0].amount == 2**63 - 1


def test_unknown_fields_are_reported_by_path():
    tx = json.loads(json.dumps(TRANSFER))
    tx["colour"] = "red"
    tx["entries"][1]["memo"] = "x"
    with pytest.raises(LedgerError) as info:
        parse_transaction(tx)
    assert info.value.code == "unknown_field"
    assert info.value.details["fields"] == ["colour"]
    del tx["colour"]
    with pytest.raises(LedgerError) as info:
        parse_transaction(tx)
    assert info.value.details["fields"] == ["entries[1].memo"]


def test_idempotency_header_and_body_id():
    tx = {k: v for k, v in TRANSFER.items() if k != "id"}
    assert parse_transaction(tx, "k-1").id == "k-1"
    assert parse_transaction(TRANSFER, "t1").id == "t1"
    assert code_of(parse_transaction, TRANSFER, "other") == "id_mismatch"
    assert code_of(parse_transaction, tx) == "missing_id"
    assert code_of(parse_transaction, tx, "bad key!") == "invalid_id"


def test_shorthand_transfer_means_two_entries():
    tx = parse_transaction({"id": "t", "debit_account_id": "a", "credit_account_id": "b",
                            "amount": "7", "currency": "USD"})
    assert tx.entries == (EntrySpec("a", Direction.debit, 7, "USD"),
                          EntrySpec("b", Direction.credit, 7, "USD"))


@pytest.mark.parametrize("ident", ["", "a" * 129, "sp ace", "é", "a/b", 5])
def test_bad_ids_are_refused(ident):
    assert code_of(parse_account, {"id": ident, "currency": "BRL"}) == "invalid_id"


@pytest.mark.parametrize("currency", ["br", "brl", "TOOLONGCURRENCY", "BR-L", 986])
def test_bad_currencies_are_refused(currency):
    assert code_of(parse_account, {"id": "a", "currency": currency}) == "invalid_currency"


def test_account_fields_and_flags():
    acct = parse_account({"id": "alice:{u42}", "currency": "BRL", "normal": "credit",
                          "flags": ["history"], "metadata": {"n": 1}})
    assert acct.normal is Direction.credit and acct.flags == AccountFlag.history
    vip = {"id": "a", "currency": "BRL", "flags": ["vip"]}
    assert code_of(parse_account, vip) == "invalid_flag"
    cmds, is_list = parse_accounts({"accounts": [{"id": "a", "currency": "BRL"}]})
    assert is_list and cmds[0].id == "a"


def test_metadata_refuses_fractions_and_huge_objects():
    assert code_of(parse_account, body('{"id":"a","currency":"BRL","metadata":{"x":1.5}}')) == \
        "invalid_metadata"
    big = {"id": "a", "currency": "BRL", "metadata": {"x": "y" * 10_000}}
    assert code_of(parse_account, big) == "invalid_metadata"


def test_malformed_bodies():
    assert code_of(body, "{") == "malformed_json"
    assert code_of(body, "") == "malformed_json"
    assert code_of(body, '{"a": NaN}') == "malformed_json"
    assert code_of(body, '{"a": 1, "a": 2}') == "duplicate_field"
    assert code_of(body, "[" * 40 + "]" * 40) == "too_deep"
    deepest = '{"a":' * 31 + "[1]" + "}" * 31  # 32 nested containers: the limit
    assert body(deepest) and code_of(body, "[" + deepest + "]") == "too_deep"
    nested: object = [1, "x"]
    for _ in range(31):
        nested = {"a": nested}
    assert decode_body(msgpack.packb(nested), "application/msgpack") == nested
    assert code_of(decode_body, msgpack.packb([nested]), "application/msgpack") == "too_deep"
    assert code_of(body, "[" * 100_000) in ("too_deep", "malformed_json")
    assert code_of(decode_body, b"\xff\xfe", "application/json") == "malformed_json"
    assert code_of(decode_body, b"{}", "text/plain") == "unsupported_media_type"


def test_msgpack_body_is_accepted_and_float_amount_refused():
    tx = json.loads(json.dumps(TRANSFER))
    decoded = decode_body(msgpack.packb(tx), "application/msgpack")
    assert parse_transaction(decoded).id == "t1"
    tx["entries"][0]["amount"] = 10.0
    assert code_of(parse_transaction, decode_body(msgpack.packb(tx), "application/msgpack")) == \
        "invalid_amount"
    assert code_of(decode_body, b"\xc1", "application/msgpack") == "malformed_body"


def test_batch_limit_and_entries_limit():
    assert code_of(parse_batch, {"transactions": [TRANSFER] * 8191}) == "too_many_commands"
    commands, atomic = parse_batch({"transactions": [TRANSFER], "atomic": True})
    assert atomic and commands[0].id == "t1"
    many = dict(TRANSFER, entries=TRANSFER["entries"] * 65)
    assert code_of(parse_transaction, many) == "too_many_entries"


def test_post_defaults_its_id_from_the_pending_id():
    assert parse_post({}, "p1", None).id == "p1:post"
    assert parse_post({"amount": 5}, "p1", None).amount == 5


def test_min_token_naming_a_shard_that_does_not_exist_is_invalid():
    assert code_of(parse_token, "0:5,2:1", 2) == "invalid_token"
    assert code_of(parse_read_params, {"min_token": "999999:1"}, 2) == "invalid_token"


def test_read_params_and_tokens():
    assert parse_token("0:5,1:7,0:9", 2) == {0: 9, 1: 7}
    assert code_of(parse_token, "zero", 2) == "invalid_token"
    params = parse_read_params({"consistency": "linearizable", "max_staleness_ms": "50"}, 2)
    assert params.linearizable and params.max_staleness_ms == 50
    assert code_of(parse_read_params, {"consistency": "strong"}, 2) == "invalid_query"
    assert code_of(parse_entries_query, {"limit": "1001"}) == "invalid_query"
    assert code_of(parse_entries_query, {"bogus": "1"}) == "invalid_query"
    assert parse_entries_query({}).limit == 100


def test_routing_hashes_the_tag_only_and_is_stable():
    assert routing_key("alice:{u42}") == "u42"
    assert routing_key("a{}b") == "a{}b"
    assert shard_for_account("alice:{u42}", 8) == shard_for_account("bob:{u42}", 8)
    # Pinned: slots must not change between releases or processes.
    assert [slot_of(f"acct-{i}") for i in range(8)] == [31, 1990, 1436, 1274, 2697, 3312, 1874, 2117]
    assert [shard_for_account(f"acct-{i}", 4) for i in range(8)] == [0, 1, 1, 1, 2, 3, 1, 2]
    # The modulo layout routes as sha256 % 4 did before the cluster map.
    assert [route(modulo_table(4), f"acct-{i}") for i in range(8)] == [3, 2, 0, 2, 1, 0, 2, 1]
    assert shard_for_account("x", 1) == 0


JSON_SCALARS = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.text(max_size=20) | st.sampled_from(["a", "BRL", "debit", "credit", "10", "t1"])
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["id", "entries", "amount", "currency", "account_id", "direction", "pending",
                     "debit_account_id", "credit_account_id", "metadata", "flags", "normal",
                     "transactions", "atomic", "accounts", "x"]), inner, max_size=6), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_any_json_value_parses_or_raises_a_stable_api_error(value):
    for parser in (parse_transaction, parse_account, parse_accounts, parse_batch):
        try:
            parser(value)
        except LedgerError as exc:
            assert exc.code in STATUS and 400 <= exc.status < 500
    try:
        parse_post(value, "p1", None)
    except LedgerError as exc:
        assert exc.code in STATUS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["application/json", "application/msgpack"]))
def test_any_bytes_decode_or_raise_a_stable_api_error(raw, content_type):
    try:
        decode_body(raw, content_type)
    except LedgerError as exc:
        assert exc.code in STATUS and 400 <= exc.status < 500


def test_ledger_shape_rules_apply_at_the_edge_with_field_paths():
    assert code_of(parse_account, {"id": "a{x}{y}", "currency": "BRL"}) == "invalid_id"
    assert code_of(parse_transaction, dict(TRANSFER, code="no spaces allowed")) == \
        "invalid_command"
    assert code_of(parse_transaction, dict(TRANSFER, timeout_seconds=5)) == "invalid_timeout"
    one = dict(TRANSFER, entries=TRANSFER["entries"][:1])
    with pytest.raises(LedgerError) as info:
        parse_batch({"transactions": [TRANSFER, one]})
    assert info.value.code == "too_few_entries" and info.value.status == 422
    deep = {"id": "a", "currency": "BRL", "metadata": {"a": [[[[[[[[1]]]]]]]]}}
    assert code_of(parse_account, deep) == "invalid_metadata"


def _shorthand(txid: str, **changes: object) -> dict:
    return {"id": txid, "debit_account_id": "a", "credit_account_id": "b", "amount": 5,
            "currency": "BRL", **changes}


@pytest.mark.parametrize(("parse", "args", "code", "field"), [
    (parse_batch, ({"transactions": [_shorthand("t0"), _shorthand("t1", amount="1.5")]},),
     "invalid_amount", "transactions[1].amount"),
    (parse_batch, ({"transactions": [_shorthand("t0", debit_account_id="bad id")]},),
     "invalid_id", "transactions[0].debit_account_id"),
    (parse_batch, ({"transactions": [_shorthand("t0"), _shorthand("t1"),
                                     _shorthand("t2", metadata={"rate": body("1.5")})]},),
     "invalid_metadata", "transactions[2].metadata"),
    (parse_batch, ({"transactions": [_shorthand("t0", pending="yes")]},),
     "invalid_field", "transactions[0].pending"),
    (parse_batch, ({"transactions": [_shorthand("t0")], "atomic": 1},), "invalid_field", "atomic"),
    (parse_transaction, ({**TRANSFER, "entries": [TRANSFER["entries"][0],
                                                  {**TRANSFER["entries"][1], "currency": "b"}]},),
     "invalid_currency", "entries[1].currency"),
    (parse_transaction, ({**TRANSFER, "entries": [{**TRANSFER["entries"][0], "direction": "up"},
                                                  TRANSFER["entries"][1]]},),
     "invalid_field", "entries[0].direction"),
    (parse_transaction, (_shorthand("t0", pending=True, timeout_seconds=-1),),
     "invalid_timeout", "timeout_seconds"),
    (parse_transaction, (_shorthand("t0", code=7),), "invalid_field", "code"),
    (parse_transaction, (_shorthand("t0"), "other"), "id_mismatch", "id"),
    (parse_transaction, ({k: v for k, v in _shorthand("x").items() if k != "id"}, "no spaces!"),
     "invalid_id", "Idempotency-Key"),
    (parse_account, ({"id": "acct", "currency": "BRL", "flags": ["nope"]},), "invalid_flag", "flags"),
    (parse_post, ({"amount": 0}, "hold", None), "invalid_amount", "amount"),
])
def test_an_error_names_the_field_by_its_full_path(parse, args, code, field):
    with pytest.raises(LedgerError) as info:
        parse(*args)
    assert (info.value.code, info.value.details["field"]) == (code, field)
