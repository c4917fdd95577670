"""One definition per request body: the parser and /openapi.json agree on every example and on a corpus
of malformed bodies (each refused by both), because both come from the tables of node/http/bodies.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from raftledger.client.errors import LedgerError
from raftledger.node.http import bodies, openapi
from raftledger.node.http.parse import decode_body

SPEC = openapi.spec()
READERS: dict[str, Callable[[Any], Any]] = {
    "NewAccount": bodies.parse_account,
    "NewAccounts": lambda body: bodies.parse_accounts(body)[0],
    "Entry": lambda body: bodies.parse_entry(body, "entries[0]"),
    "NewTransaction": bodies.parse_transaction,
    "Transfer": bodies.parse_transaction,
    "NewBatch": bodies.parse_batch,
    "PostPending": lambda body: bodies.parse_post(body, "hold-1", None),
    "FollowUp": lambda body: bodies.parse_void(body, "hold-1", None),
    "NewNode": lambda body: bodies.parse_new_node(body, 2),
    "NewReplica": bodies.parse_new_replica,
    "MetaMove": bodies.parse_meta_move,
    "TokenRequest": bodies.parse_token_request,
}


def schema_accepts(name: str, body: Any) -> bool:
    root = {"$ref": f"#/components/schemas/{name}", "components": SPEC["components"]}
    return jsonschema.Draft202012Validator(root).is_valid(body)


def parser_accepts(name: str, body: Any) -> bool:
    try:
        READERS[name](body)
    except LedgerError as exc:
        assert 400 <= exc.status < 500, exc
        return False
    return True


def test_every_body_has_a_reader_here_and_every_route_body_is_one_of_them():
    assert set(READERS) == set(bodies.BODIES)
    refs = set()
    for operations in SPEC["paths"].values():
        for op in operations.values():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            schema = body.get("schema", {})
            for option in schema.get("oneOf", [schema]):
                if "$ref" in option:
                    refs.add(option["$ref"].rsplit("/", 1)[1])
    assert refs == set(bodies.BODIES) - {"Entry"}


EXAMPLES = [(name, example) for name, body in bodies.BODIES.items() for example in body.examples]


@pytest.mark.parametrize(("name", "example"), EXAMPLES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(EXAMPLES)])
def test_every_documented_example_is_valid_for_both_the_schema_and_the_parser(name, example):
    assert schema_accepts(name, example)
    assert parser_accepts(name, example)


def test_every_body_with_a_required_field_has_an_example():
    for body in bodies.BODIES.values():
        assert body.examples or body.name == "Entry", body.name


T = {"id": "t-1", "debit_account_id": "a", "credit_account_id": "b", "amount": 5, "currency": "BRL"}
E = {"account_id": "a", "direction": "debit", "amount": 5, "currency": "BRL"}
TX = {"id": "t-2", "entries": [E, {**E, "account_id": "b", "direction": "credit"}]}
# Bodies both must refuse (JSON text, so numbers stay as the client wrote them).
MALFORMED: list[tuple[str, str]] = [
    ("NewAccount", '{"currency": "BRL"}'),
    ("NewAccount", '{"id": "a", "currency": "brl"}'),
    ("NewAccount", '{"id": "a b", "currency": "BRL"}'),
    ("NewAccount", '{"id": "a", "currency": "BRL", "normal": "sideways"}'),
    ("NewAccount", '{"id": "a", "currency": "BRL", "flags": ["overdraft"]}'),
    ("NewAccount", '{"id": "a", "currency": "BRL", "flags": "closed"}'),
    ("NewAccount", '{"id": "a", "currency": "BRL", "metadata": []}'),
    ("NewAccount", '{"id": "a", "currency": "BRL", "colour": "red"}'),
    ("NewAccount", '{"id": "' + "x" * 129 + '", "currency": "BRL"}'),
    ("NewAccounts", '{"accounts": []}'),
    ("NewAccounts", '{"accounts": [{"id": "a"}]}'),
    ("Transfer", json.dumps({**T, "amount": 0})),
    ("Transfer", json.dumps({**T, "amount": -5})),
    ("Transfer", json.dumps(T).replace('"amount": 5', '"amount": 5.5')),
    ("Transfer", json.dumps({**T, "amount": "5.00"})),
    ("Transfer", json.dumps({**T, "amount": 2**63})),
    ("Transfer", json.dumps({**T, "amount": True})),
    ("Transfer", json.dumps({k: v for k, v in T.items() if k != "currency"})),
    ("Transfer", json.dumps({**T, "pending": "yes"})),
    ("Transfer", json.dumps({**T, "timeout_seconds": -1})),
    ("Transfer", json.dumps({**T, "code": "has spaces"})),
    ("Transfer", json.dumps({**T, "code": 7})),
    ("Transfer", json.dumps({**T, "extra": 1})),
    ("NewTransaction", json.dumps({**TX, "entries": [E]})),
    ("NewTransaction", json.dumps({**TX, "entries": [E] * 129})),
    ("NewTransaction", json.dumps({**TX, "entries": "none"})),
    ("NewTransaction", json.dumps({**TX, "entries": [{**E, "direction": "up"}, E]})),
    ("NewTransaction", json.dumps({**TX, "entries": [{**E, "note": 1}, E]})),
    ("NewTransaction", json.dumps({k: v for k, v in TX.items() if k != "entries"})),
    ("NewBatch", '{"transactions": []}'),
    ("NewBatch", json.dumps({"transactions": [T], "atomic": 1})),
    ("NewBatch", json.dumps({"transactions": [{**T, "amount": "x"}]})),
    ("NewBatch", json.dumps({"transactions": [T] * 8191})),
    ("NewBatch", json.dumps({"atomic": True})),
    ("PostPending", '{"amount": 0}'),
    ("PostPending", '{"id": "a b"}'),
    ("PostPending", '{"amount": 5, "currency": "BRL"}'),
    ("FollowUp", '{"id": 5}'),
    ("FollowUp", '{"reason": "dup"}'),
    ("TokenRequest", '{"role": "reader"}'),
    ("TokenRequest", '{"name": "x", "role": "king"}'),
    ("TokenRequest", '{"name": "", "role": "reader"}'),
    ("TokenRequest", '{"name": "x", "role": "reader", "account_patterns": "a*"}'),
    ("TokenRequest", '{"name": "x", "role": "reader", "account_patterns": [""]}'),
    ("TokenRequest", '{"name": "x", "role": "reader", "expires_at": 1.5}'),
    ("TokenRequest", '{"name": "x", "role": "reader", "expires_at": 0}'),
    ("TokenRequest", '{"name": "x", "role": "reader", "rate_per_s": -1}'),
    ("TokenRequest", '{"name": "x", "role": "reader", "rate_per_s": 0}'),
    ("TokenRequest", '{"name": "x", "role": "reader", "rate_per_s": "fast"}'),
    ("TokenRequest", '{"name": "x", "role": "reader", "rate_per_s": true}'),
    ("TokenRequest", '{"name": "x", "role": "reader", "z": 1}'),
]
# And bodies both accept that the examples do not show.
WELL_FORMED: list[tuple[str, str]] = [
    ("Transfer", json.dumps({**T, "amount": "12345678901234567"})),
    ("Transfer", json.dumps({**T, "pending": True, "timeout_seconds": 60, "metadata": None})),
    ("Transfer", json.dumps({k: v for k, v in T.items() if k != "id"} | {"id": None}).replace(
        '"id": null', '"id": "t-9"')),
    ("NewAccount", '{"id": "a:{t}", "currency": "USDC", "flags": ["history", "closed"]}'),
    ("NewTransaction", json.dumps({**TX, "entries": [E] * 2 + [{**E, "account_id": "b",
                                                                "direction": "credit",
                                                                "amount": 10}]})),
    ("PostPending", "{}"),
    ("PostPending", '{"amount": null, "id": null}'),
    ("FollowUp", "{}"),
]


@pytest.mark.parametrize(("name", "text"), MALFORMED)
def test_a_malformed_body_is_refused_by_both_the_parser_and_the_schema(name, text):
    body = decode_body(text.encode(), "application/json")
    assert not parser_accepts(name, body)
    assert not schema_accepts(name, json.loads(text))


# What JSON Schema cannot say: an integer written with an exponent or a fraction (1e3, 5.0) is the
# number 1000 or 5 to a schema validator, but money never travels as a float, so the parser refuses
# it (400 invalid_amount). The description of every amount says so.
FLOAT_WRITTEN = [json.dumps(T).replace('"amount": 5', f'"amount": {n}') for n in ("1e3", "5.0", "5E0")]


@pytest.mark.parametrize("text", FLOAT_WRITTEN)
def test_an_amount_written_as_a_float_is_refused_by_the_parser_though_a_schema_cannot_tell(text):
    assert not parser_accepts("Transfer", decode_body(text.encode(), "application/json"))
    assert schema_accepts("Transfer", json.loads(text))
    assert "never a float" in bodies.AMOUNT["description"]


@pytest.mark.parametrize(("name", "text"), WELL_FORMED)
def test_a_well_formed_body_is_accepted_by_both(name, text):
    assert parser_accepts(name, decode_body(text.encode(), "application/json"))
    assert schema_accepts(name, json.loads(text))
