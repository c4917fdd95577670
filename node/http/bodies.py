"""Request bodies, each declared once: the parser reads a body by its table, ``/openapi.json`` renders
the same table as a JSON schema, and the documented examples come from it too, so they cannot drift.

A ``Body`` is a table of ``Field``s: a name, the field parser of ``parse.py`` that checks and converts
the value (with a stable error code naming the field's path), the JSON schema of the value, whether it
is required, and the value used when it is absent. ``Body.read`` refuses unknown fields and missing
required ones, and returns the parsed values in table order; the builders below turn them into
commands and run the ledger's own shape rules (``parse.check``). What a JSON schema cannot say (the
ledger's rules across fields: balanced entries, an account on both sides) is checked by the ledger's
rules and documented in the body's description.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from raftledger.client.errors import LedgerError
from raftledger.cluster import tokens
from raftledger.cluster.map import NodeEntry
from raftledger.node.config import ADDRESS_PATTERN, NODE_ID_PATTERN, shards_max
from raftledger.statemachine.commands import (
    AccountFlag,
    CreateAccount,
    CreateTransaction,
    Direction,
    EntrySpec,
    PostPending,
    ReverseTransaction,
    VoidPending,
    batch_commands_max,
    entries_per_transaction_max,
    entries_per_transaction_min,
    timeout_seconds_max,
)
from raftledger.statemachine.validate import metadata_bytes_max

from . import parse
from .parse import check, join, object_at

FieldParser = Callable[[Any, str, str], Any]

ID_PATTERN = r"^[A-Za-z0-9._:{}\-]{1,128}$"
CURRENCY_PATTERN = r"^[A-Z0-9]{3,12}$"
CODE_PATTERN = r"^[A-Za-z0-9._:\-]{0,64}$"
ID = {"type": "string", "pattern": ID_PATTERN}
CURRENCY = {"type": "string", "pattern": CURRENCY_PATTERN}
AMOUNT = {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                    {"type": "string", "pattern": "^[0-9]{1,19}$"}],
          "description": "minor units, as an integer or a string of digits; never a float"}
DIRECTION = {"enum": ["debit", "credit"]}
METADATA = {"type": "object", "default": {},
            "description": f"JSON without floats (decimals as strings), at most {metadata_bytes_max} "
                           "bytes encoded and 8 levels deep"}


NULL_IS_ABSENT = " An optional field sent as null is taken as absent."


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    parse: FieldParser
    schema: dict[str, Any]
    required: bool = False
    default: Any = None  # the parsed value when the field is absent (or null)


@dataclass(frozen=True)
class Body:
    name: str  # its schema's name under components/schemas
    description: str
    fields: tuple[Field, ...]
    examples: tuple[dict[str, Any], ...] = ()
    names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", frozenset(f.name for f in self.fields))

    def read(self, value: Any, where: str = "") -> list[Any]:
        """The parsed value of every field, in table order; LedgerError for the first problem."""
        obj = object_at(value, where)
        if not obj.keys() <= self.names:
            unknown = sorted(str(k) for k in obj if k not in self.names)
            raise LedgerError("unknown_field", details={"fields": [join(where, k) for k in unknown]})
        out = []
        for f in self.fields:
            raw = obj.get(f.name)
            if raw is not None:
                out.append(f.parse(raw, where, f.name))
            elif f.required:
                raise LedgerError("missing_field", details={"field": join(where, f.name)})
            else:
                out.append(f.default)
        return out

    def schema(self) -> dict[str, Any]:
        properties = {f.name: f.schema if f.required else {"anyOf": [f.schema, {"type": "null"}]}
                      for f in self.fields}
        out: dict[str, Any] = {"type": "object", "description": self.description + NULL_IS_ABSENT,
                               "additionalProperties": False, "properties": properties}
        required = [f.name for f in self.fields if f.required]
        if required:
            out["required"] = required
        if self.examples:
            out["examples"] = list(self.examples)
        return out


def list_of(read: Callable[[Any, str], Any], items_max: int, code: str = "too_many_commands",
            items_min: int = 1) -> FieldParser:
    """A field holding a list of objects, each read by ``read(item, "field[i]")``."""

    def parse_list(value: Any, where: str, name: str) -> list[Any]:
        path = join(where, name)
        if not isinstance(value, list) or len(value) < items_min:
            raise LedgerError("invalid_field", f"{path} is a list of at least {items_min}",
                              details={"field": path})
        if len(value) > items_max:
            raise LedgerError(code, details={"field": path, "max": items_max, "count": len(value)})
        return [read(item, f"{path}[{i}]") for i, item in enumerate(value)]

    return parse_list


def _timeout(value: Any, where: str, name: str) -> int:
    return parse.parse_int_field(value, where, name, 0, timeout_seconds_max, code="invalid_timeout")


# -- accounts ------------------------------------------------------------------------------------------

ACCOUNT = Body("NewAccount", "An account to open.", (
    Field("id", parse.parse_id, {**ID, "description": "may hold one hash tag {tag}: only the tag "
                                 "routes, so accounts sharing it share a shard"}, required=True),
    Field("currency", parse.parse_currency, CURRENCY, required=True),
    Field("normal", parse.parse_direction, {**DIRECTION, "default": "debit",
                                            "description": "the side that increases balance"},
          default=Direction.debit),
    Field("flags", parse.parse_flags, {"type": "array", "default": [], "uniqueItems": True,
                                       "items": {"enum": list(AccountFlag.__members__)},
                                       "description": "the two limits are mutually exclusive"},
          default=0),
    Field("metadata", parse.parse_metadata, METADATA),
), examples=({"id": "alice:{u42}", "currency": "BRL", "normal": "credit",
              "flags": ["debits_must_not_exceed_credits"], "metadata": {"name": "Alice"}},
             {"id": "cash:{u42}", "currency": "BRL"}))


def parse_account(value: Any, where: str = "") -> CreateAccount:
    ident, currency, normal, flags, metadata = ACCOUNT.read(value, where)
    return check(CreateAccount(ident, currency, normal, flags, metadata), where)


ACCOUNTS = Body("NewAccounts", "Several accounts to open, each on its own (answered like a batch).", (
    Field("accounts", list_of(parse_account, batch_commands_max),
          {"type": "array", "items": ref("NewAccount"), "minItems": 1, "maxItems": batch_commands_max},
          required=True),
), examples=({"accounts": [{"id": "bob:{u77}", "currency": "BRL"},
                           {"id": "fees", "currency": "BRL", "normal": "credit"}]},))


def parse_accounts(value: Any) -> tuple[list[CreateAccount], bool]:
    """One account, or ``{"accounts": [...]}``; returns the commands and whether it was a list."""
    if isinstance(value, dict) and "accounts" in value:
        [accounts] = ACCOUNTS.read(value)
        return accounts, True
    return [parse_account(value)], False


# -- transactions --------------------------------------------------------------------------------------

ENTRY = Body("Entry", "One side of a transaction: its currency must be its account's.", (
    Field("account_id", parse.parse_id, ID, required=True),
    Field("direction", parse.parse_direction, DIRECTION, required=True),
    Field("amount", parse.parse_amount, AMOUNT, required=True),
    Field("currency", parse.parse_currency, CURRENCY, required=True),
))


def parse_entry(value: Any, where: str) -> EntrySpec:
    return EntrySpec(*ENTRY.read(value, where))


def _parse_entries(value: Any, where: str, name: str) -> tuple[EntrySpec, ...]:
    path = join(where, name)
    if not isinstance(value, list):
        raise LedgerError("invalid_field", "entries is a list", details={"field": path})
    if len(value) > entries_per_transaction_max:
        raise LedgerError("too_many_entries", details={"field": path, "count": len(value)})
    return tuple([parse_entry(e, f"{path}[{i}]") for i, e in enumerate(value)])


OPTIONS = (  # what a transaction and a shorthand transfer share, after their entries
    Field("pending", parse.parse_bool, {"type": "boolean", "default": False,
                                        "description": "a hold: counts in *_pending until posted, "
                                                       "voided or expired"}, default=False),
    Field("timeout_seconds", _timeout, {"type": "integer", "minimum": 0, "maximum": timeout_seconds_max,
                                        "default": 0, "description": "a hold expires on its own after "
                                                                     "this (needs pending)"},
          default=0),
    Field("code", parse.parse_text, {"type": "string", "pattern": CODE_PATTERN, "default": ""},
          default=""),
    Field("metadata", parse.parse_metadata, METADATA),
)
OPTIONAL_ID = Field("id", parse.parse_id, {**ID, "description": "the idempotency key; or send it in "
                                           "the Idempotency-Key header (equal if both)"})

TRANSACTION = Body("NewTransaction", "Entries of any currencies, each currency balanced (debits == "
                   "credits); an account may not be on both sides.", (
    OPTIONAL_ID,
    Field("entries", _parse_entries, {"type": "array", "items": ref("Entry"),
                                      "minItems": entries_per_transaction_min,
                                      "maxItems": entries_per_transaction_max}, required=True),
    *OPTIONS,
), examples=({"id": "t-0001", "entries": [
    {"account_id": "cash:{u42}", "direction": "debit", "amount": 1500, "currency": "BRL"},
    {"account_id": "alice:{u42}", "direction": "credit", "amount": 1500, "currency": "BRL"}],
    "code": "internal_transfer", "metadata": {"order": "A-1"}},))

TRANSFER = Body("Transfer", "The shorthand of a two-entry transaction: amount from debit_account_id "
                "to credit_account_id (two different accounts).", (
    OPTIONAL_ID,
    Field("debit_account_id", parse.parse_id, ID, required=True),
    Field("credit_account_id", parse.parse_id, ID, required=True),
    Field("amount", parse.parse_amount, AMOUNT, required=True),
    Field("currency", parse.parse_currency, CURRENCY, required=True),
    *OPTIONS,
), examples=({"id": "t-1", "debit_account_id": "cash:{u42}", "credit_account_id": "alice:{u42}",
              "amount": 1500, "currency": "BRL"},
             {"id": "hold-1", "debit_account_id": "alice:{u42}", "credit_account_id": "cash:{u42}",
              "amount": "700", "currency": "BRL", "pending": True, "timeout_seconds": 3600}))


def parse_transaction(value: Any, header_key: str | None = None,
                      where: str = "") -> CreateTransaction:
    """A full transaction, or the shorthand transfer ``{id, debit_account_id, ...}``."""
    obj = object_at(value, where)
    if "entries" not in obj and "debit_account_id" in obj:
        ident, debit, credit, amount, currency, pending, timeout, code, metadata = TRANSFER.read(obj, where)
        entries = (EntrySpec(debit, Direction.debit, amount, currency),
                   EntrySpec(credit, Direction.credit, amount, currency))
    else:
        ident, entries, pending, timeout, code, metadata = TRANSACTION.read(obj, where)
    ident = resolve_id(ident, header_key, where)
    return check(CreateTransaction(ident, entries, pending, timeout, code, metadata), where)


BATCH = Body("NewBatch", "Transactions applied in one go: each on its own, or all or none (atomic).", (
    Field("transactions", list_of(lambda item, path: parse_transaction(item, None, path),
                                  batch_commands_max),
          {"type": "array", "items": {"oneOf": [ref("NewTransaction"), ref("Transfer")]},
           "minItems": 1, "maxItems": batch_commands_max}, required=True),
    Field("atomic", parse.parse_bool, {"type": "boolean", "default": False}, default=False),
), examples=({"transactions": [
    {"id": "b-1", "debit_account_id": "cash:{u42}", "credit_account_id": "alice:{u42}", "amount": 100,
     "currency": "BRL"},
    {"id": "b-2", "debit_account_id": "cash:{u42}", "credit_account_id": "alice:{u42}", "amount": 250,
     "currency": "BRL"}], "atomic": True},))


def parse_batch(value: Any) -> tuple[list[CreateTransaction], bool]:
    commands, atomic = BATCH.read(value)
    return commands, atomic


def resolve_id(body_id: str | None, header_key: str | None, where: str, default: str | None = None) -> str:
    """The id IS the idempotency key: body ``id`` and/or ``Idempotency-Key``, equal if both."""
    if body_id is not None:
        if header_key is not None and header_key != body_id:
            raise LedgerError("id_mismatch", details={"field": join(where, "id")})
        return body_id
    if header_key is not None:
        return parse.parse_id(header_key, "", "Idempotency-Key")
    if default is not None:
        return parse.parse_id(default, where, "id")
    raise LedgerError("missing_id", details={"field": join(where, "id")})


# -- post, void, reverse -------------------------------------------------------------------------------

POST = Body("PostPending", "Post a hold, fully (no amount) or partly; the rest is released.", (
    Field("id", parse.parse_id, {**ID, "description": "the new transaction's id; default {id}:post"}),
    Field("amount", parse.parse_amount, AMOUNT),
), examples=({}, {"id": "hold-1:capture", "amount": 500}))

FOLLOW_UP = Body("FollowUp", "The new transaction's id (default {id}:void or {id}:reverse).", (
    Field("id", parse.parse_id, ID),
), examples=({}, {"id": "t-1:refund"}))


def parse_post(value: Any, pending_id: str, header_key: str | None) -> PostPending:
    ident, amount = POST.read(value)
    pending_id = parse.parse_id(pending_id, "", "pending_id")
    return check(PostPending(resolve_id(ident, header_key, "", default=f"{pending_id}:post"),
                             pending_id, amount))


def parse_void(value: Any, pending_id: str, header_key: str | None) -> VoidPending:
    [ident] = FOLLOW_UP.read(value)
    pending_id = parse.parse_id(pending_id, "", "pending_id")
    return check(VoidPending(resolve_id(ident, header_key, "", default=f"{pending_id}:void"), pending_id))


def parse_reverse(value: Any, transaction_id: str, header_key: str | None) -> ReverseTransaction:
    [ident] = FOLLOW_UP.read(value)
    transaction_id = parse.parse_id(transaction_id, "", "transaction_id")
    return check(ReverseTransaction(resolve_id(ident, header_key, "", default=f"{transaction_id}:reverse"),
                                    transaction_id))


URL_RE = re.compile(r"^https?://[A-Za-z0-9.-]+:\d{1,5}/?$")
NODE_ID = {"type": "string", "pattern": NODE_ID_PATTERN.pattern}
ADDRESS = {"type": "string", "pattern": ADDRESS_PATTERN.pattern}


# -- membership (node/http/membership.py) ------------------------------------------------------------


def parse_node_id(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not NODE_ID_PATTERN.fullmatch(value):
        field = parse.join(where, name)
        raise LedgerError("invalid_field", f"{field} must be 1-64 chars of A-Z a-z 0-9 _ . -",
                          details={"field": field})
    return value


def parse_address(value: Any, where: str, name: str) -> str:
    match = ADDRESS_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None or not 0 < int(match.group(1)) <= 65535:
        field = parse.join(where, name)
        raise LedgerError("invalid_field", f"{field} must be host:port", details={"field": field})
    return str(value)


def parse_url(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not URL_RE.fullmatch(value):
        field = parse.join(where, name)
        raise LedgerError("invalid_field", f"{field} must be http(s)://host:port",
                          details={"field": field})
    return value.rstrip("/")


def parse_raft(value: Any, where: str, name: str) -> tuple[tuple[int, str], ...]:
    field = parse.join(where, name)
    if not isinstance(value, dict) or not 0 < len(value) <= shards_max:
        raise LedgerError("invalid_field", f"{field} maps shard ids to host:port",
                          details={"field": field})
    out = []
    for key, address in value.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 6):
            raise LedgerError("invalid_field", f"{field} keys are shard ids", details={"field": field})
        out.append((int(key), parse_address(address, field, key)))
    return tuple(sorted(out))


NEW_NODE = Body("NewNode", "A node to register: where its API, its internal listener and its Raft "
                "replicas listen. It can host a replica of a shard only when it names a Raft "
                "address for that shard.", (
                    Field("id", parse_node_id, NODE_ID, required=True),
                    Field("url", parse_url, {"type": "string", "format": "uri"}, required=True),
                    Field("internal", parse_address, ADDRESS, required=True),
                    Field("raft", parse_raft, {"type": "object", "additionalProperties": ADDRESS,
                                               "description": "shard id -> host:port"}),
                    Field("raft_host", parse_address, {
                        **ADDRESS, "description": "instead of raft: shard s listens on this host "
                                                  "at this port + s, for every shard"}),
                    Field("meta", parse_address, {
                        **ADDRESS, "description": "where it may host a member of the metadata group "
                                                  "(the cluster map) when one is moved to it"}),
                ), examples=({"id": "n3", "url": "http://127.0.0.1:8083", "internal": "127.0.0.1:7083",
                              "raft": {"0": "127.0.0.1:9030", "1": "127.0.0.1:9031"}},))

NEW_REPLICA = Body("NewReplica", "The node that is to host a new replica of the shard.", (
    Field("node", parse_node_id, NODE_ID, required=True),
), examples=({"node": "n3"},))


META_MOVE = Body("MetaMove", "Move a member of the metadata group (the cluster map) off a node: to "
                 "the node named, else to an up node that names a metadata address and hosts no "
                 "member; with shrink, a node with no such node to take it just leaves the group.", (
                     Field("from", parse_node_id, NODE_ID, required=True),
                     Field("to", parse_node_id, NODE_ID),
                     Field("shrink", parse.parse_bool, {"type": "boolean", "default": False},
                           default=False),
                 ), examples=({"from": "n1", "to": "n3"}, {"from": "n1"}))


def parse_meta_move(value: Any) -> tuple[str, str | None, bool]:
    leaving, to, shrink = META_MOVE.read(value)
    return str(leaving), None if to is None else str(to), bool(shrink)


def parse_new_node(value: Any, shards: int) -> NodeEntry:
    """A node to register, its Raft addresses spelled out for each of the ``shards``."""
    node_id, url, internal, raft, raft_host, meta = NEW_NODE.read(value)
    return NodeEntry(node_id, url, internal, _raft_of(raft, raft_host, shards), meta)


def parse_new_replica(value: Any) -> str:
    [node_id] = NEW_REPLICA.read(value)
    return str(node_id)


def _raft_of(raft: tuple[tuple[int, str], ...] | None, raft_host: str | None,
             shards: int) -> tuple[tuple[int, str], ...]:
    if (raft is None) == (raft_host is None):
        raise LedgerError("invalid_field", "give exactly one of raft and raft_host",
                          details={"field": "raft"})
    if raft is not None:
        return raft
    host, port = str(raft_host).rsplit(":", 1)
    if int(port) + shards - 1 > 65535:
        raise LedgerError("invalid_field", "raft_host: the port of the last shard passes 65535",
                          details={"field": "raft_host"})
    return tuple((s, f"{host}:{int(port) + s}") for s in range(shards))


# -- API tokens (node/http/auth.py; what a token is: cluster/tokens.py) --------------------------------
token_rate_per_s_max = 10**9


def _invalid(where: str, name: str, message: str) -> LedgerError:
    path = join(where, name)
    return LedgerError("invalid_field", f"{path} {message}", details={"field": path})


def parse_token_name(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= tokens.name_chars_max:
        raise _invalid(where, name, f"is a string of 1 to {tokens.name_chars_max} characters")
    return value


def parse_role(value: Any, where: str, name: str) -> str:
    if value not in tokens.ROLES:
        raise _invalid(where, name, f"is one of {list(tokens.ROLES)}")
    return str(value)


def parse_patterns(value: Any, where: str, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > tokens.patterns_max or not all(
            isinstance(p, str) and 1 <= len(p) <= tokens.pattern_chars_max for p in value):
        raise _invalid(where, name, f"is a list of at most {tokens.patterns_max} strings of 1 to "
                                    f"{tokens.pattern_chars_max} characters")
    return tuple(value)


def parse_expiry(value: Any, where: str, name: str) -> int:
    return parse.parse_int_field(value, where, name, 1, 2**63 - 1)


RATE_TEXT_RE = re.compile(r"^[0-9]{1,10}(\.[0-9]{1,9})?$")


def parse_rate(value: Any, where: str, name: str) -> float:
    """A rate: a number, or its decimal text (how the API's JSON decoder hands a decimal on)."""
    if isinstance(value, str) and RATE_TEXT_RE.fullmatch(value):
        value = Fraction(value)
    if isinstance(value, bool) or not isinstance(value, int | Fraction | float) or \
            not 0 < value <= token_rate_per_s_max:
        raise _invalid(where, name, f"is a number above 0 and at most {token_rate_per_s_max}, or null "
                                    "(the node's default)")
    return float(value)


TOKEN_REQUEST = Body("TokenRequest", "An API token to create: its secret is in the answer only.", (
    Field("name", parse_token_name, {"type": "string", "minLength": 1,
                                     "maxLength": tokens.name_chars_max}, required=True),
    Field("role", parse_role, {"enum": list(tokens.ROLES)}, required=True),
    Field("account_patterns", parse_patterns, {
        "type": "array", "maxItems": tokens.patterns_max,
        "items": {"type": "string", "minLength": 1, "maxLength": tokens.pattern_chars_max},
        "description": "shell-style globs on account ids; empty: every account"}, default=()),
    Field("expires_at", parse_expiry, {"type": "integer", "minimum": 1, "maximum": 2**63 - 1,
                                       "description": "ns since the epoch"}),
    Field("rate_per_s", parse_rate, {
        "oneOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": token_rate_per_s_max},
                  {"type": "string", "pattern": RATE_TEXT_RE.pattern}],
        "description": "requests per second on each node (a number, or its decimal text); absent: "
                       "the node's default"}),
), examples=({"name": "billing", "role": "writer"},
             {"name": "tenant42-reports", "role": "reader", "account_patterns": ["*{tenant42}*"],
              "expires_at": 1893456000000000000, "rate_per_s": 50}))


def parse_token_request(value: Any) -> tokens.TokenRequest:
    name, role, patterns, expires_at, rate = TOKEN_REQUEST.read(value)
    return tokens.TokenRequest(name, role, patterns, expires_at, rate)


BODIES: Mapping[str, Body] = {b.name: b for b in (ACCOUNT, ACCOUNTS, ENTRY, TRANSACTION, TRANSFER, BATCH,
                                                  POST, FOLLOW_UP, NEW_NODE, NEW_REPLICA, META_MOVE,
                                                  TOKEN_REQUEST)}
