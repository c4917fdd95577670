"""Strict decoding of request bodies, the parsers of their fields, and query strings.

The edge refuses bad input before it reaches a shard, with a stable code and the offending field:
money is never a float (JSON numbers with a fraction or exponent are kept as text by the decoder's
hooks, so no float is ever built, and refused as ``invalid_amount``), unknown fields are reported,
objects may not repeat a key, and nesting and sizes are bounded. The ledger validates again on
apply; the edge only makes the common mistakes cheap and precise.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
from raftledger.client.errors import LedgerError
from raftledger.statemachine.commands import (
    AccountFlag,
    Command,
    Direction,
    amount_max,
)
from raftledger.statemachine.store import statement_page_limit_default, statement_page_limit_max
from raftledger.statemachine.validate import CURRENCY_RE, ID_RE, command_problem

body_depth_max = 32

DIGITS_RE = re.compile(r"[0-9]{1,20}")
TOKEN_PART_RE = re.compile(r"([0-9]{1,6}):([0-9]{1,20})")

JSON_TYPES = ("application/json", "")
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")



class Fraction(str):
    """A JSON number with a fraction or exponent, kept as its text: never a float."""


# --- bodies ---------------------------------------------------------------------------------------


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_body(raw: bytes, content_type: str | None, *, empty: Any = None) -> Any:
    """Decode a JSON or msgpack body; ``empty`` is returned for an empty body when given."""
    if not raw.strip():
        if empty is not None:
            return empty
        raise LedgerError("malformed_json", "the body is empty")
    kind = media_type(content_type)
    if kind in MSGPACK_TYPES:
        value = _decode_msgpack(raw)
        check_depth(value)
    elif kind in JSON_TYPES or kind.endswith("+json"):
        value = _decode_json(raw)
        if raw.count(b"{") + raw.count(b"[") > body_depth_max:  # else it cannot nest too deep
            check_depth(value)
    else:
        raise LedgerError("unsupported_media_type", details={"content_type": kind})
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        counts = Counter(k for k, _ in pairs)
        raise LedgerError("duplicate_field", details={"fields": sorted(k for k, n in counts.items()
                                                                    if n > 1)})
    return obj


def _decode_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_float=Fraction, parse_constant=_reject_constant,
                          object_pairs_hook=_object_without_duplicates)
    except RecursionError as exc:
        raise LedgerError("too_deep", details={"depth_max": body_depth_max}) from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise LedgerError("malformed_json", details={"reason": str(exc)[:200]}) from exc


def _decode_msgpack(raw: bytes) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except RecursionError as exc:
        raise LedgerError("too_deep", details={"depth_max": body_depth_max}) from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise LedgerError("malformed_body", details={"reason": str(exc)[:200]}) from exc


def check_depth(value: Any) -> None:
    """Refuse more than ``body_depth_max`` nested objects and lists; iterative, so hostile input
    cannot recurse."""
    if not isinstance(value, dict | list):
        return
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > body_depth_max:
            raise LedgerError("too_deep", details={"depth_max": body_depth_max})
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):  # only containers nest: scalars are not walked
                stack.append((child, depth + 1))


# --- fields ---------------------------------------------------------------------------------------


def object_at(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise LedgerError("invalid_field", f"{where or 'the body'} must be an object",
                       details={"field": where})
    return value


def join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


# Each field parser takes the value, where its object sits (``transactions[3]``, or "" at the top)
# and the field's name; the dotted path is only built for an error, not for every field of a batch.


def parse_id(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise LedgerError("invalid_id", details={"field": join(where, name)})
    return value


def parse_currency(value: Any, where: str, name: str = "currency") -> str:
    if not isinstance(value, str) or not CURRENCY_RE.fullmatch(value):
        raise LedgerError("invalid_currency", details={"field": join(where, name)})
    return value


def parse_amount(value: Any, where: str, name: str = "amount") -> int:
    """0 < amount <= amount_max, as a JSON integer or a string of digits; never a float."""
    amount: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        amount = value
    elif isinstance(value, str) and not isinstance(value, Fraction) and DIGITS_RE.fullmatch(value):
        amount = int(value)
    if amount is None or not 0 < amount <= amount_max:
        raise LedgerError("invalid_amount", details={"field": join(where, name)})
    return amount


def parse_direction(value: Any, where: str, name: str) -> Direction:
    if value not in ("debit", "credit"):
        raise LedgerError("invalid_field", "direction is debit or credit",
                       details={"field": join(where, name)})
    return Direction(value)


def parse_bool(value: Any, where: str, name: str) -> bool:
    if not isinstance(value, bool):
        field = join(where, name)
        raise LedgerError("invalid_field", f"{field} must be true or false", details={"field": field})
    return value


def parse_int_field(value: Any, where: str, name: str, low: int, high: int,
                    code: str = "invalid_field") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        field = join(where, name)
        raise LedgerError(code, f"{field} must be an integer in [{low}, {high}]",
                       details={"field": field})
    return value


def parse_text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        field = join(where, name)
        raise LedgerError("invalid_field", f"{field} is a string", details={"field": field})
    return value


def parse_metadata(value: Any, where: str, name: str = "metadata") -> dict[str, Any]:
    """An object; fractions are refused here, the rest by the ledger's own rules (``check``)."""
    if not isinstance(value, dict):
        raise LedgerError("invalid_metadata", details={"field": join(where, name)})
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, Fraction | float):
            raise LedgerError("invalid_metadata", "numbers in metadata are integers; send decimals "
                           "as strings", details={"field": join(where, name)})
    return value


def parse_flags(value: Any, where: str, name: str = "flags") -> int:
    if not isinstance(value, list):
        raise LedgerError("invalid_field", "flags is a list of names",
                       details={"field": join(where, name)})
    flags = 0
    for flag in value:
        if not isinstance(flag, str) or flag not in AccountFlag.__members__:
            raise LedgerError("invalid_flag", details={"field": join(where, name), "flag": str(flag)[:64],
                                                    "allowed": list(AccountFlag.__members__)})
        flags |= AccountFlag[flag]
    return flags


# --- commands -------------------------------------------------------------------------------------


C = TypeVar("C", bound=Command)


def check(command: C, where: str = "") -> C:
    """The ledger's own shape rules (``statemachine.validate``), applied before proposing: a
    command the ledger would refuse as malformed never costs a Raft round (it would not be stored
    under its id either)."""
    problem = command_problem(command)
    if problem is not None:
        code, details = problem
        if where and "field" in details:
            details = {**details, "field": join(where, details["field"])}
        raise LedgerError(code.name, details=details)
    return command


# --- query strings --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadParams:
    """The consistency a read asks for (API.md, "Read consistency")."""

    linearizable: bool = False
    min_token: Mapping[int, int] | None = None
    max_staleness_ms: int | None = None


@dataclass(frozen=True, slots=True)
class EntriesQuery:
    after_seq: int | None
    before_seq: int | None
    limit: int
    order: str
    from_ns: int | None
    to_ns: int | None


READ_PARAMS = frozenset({"consistency", "min_token", "max_staleness_ms"})
ENTRIES_PARAMS = READ_PARAMS | {"after_seq", "before_seq", "limit", "order", "from", "to"}
BALANCE_PARAMS = READ_PARAMS | {"at_seq", "at"}


def check_query(query: Mapping[str, str], allowed: frozenset[str]) -> None:
    unknown = sorted(k for k in query if k not in allowed)
    if unknown:
        raise LedgerError("invalid_query", "unknown query parameters", details={"params": unknown})


def query_int(query: Mapping[str, str], name: str, low: int = 0, high: int = 2**63 - 1,
              default: int | None = None) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if not DIGITS_RE.fullmatch(raw) or not low <= int(raw) <= high:
        raise LedgerError("invalid_query", f"{name} is an integer in [{low}, {high}]",
                       details={"param": name})
    return int(raw)


def parse_token(raw: str, shard_count: int) -> dict[int, int]:
    """``<shard>:<index>[,<shard>:<index>...]``, each shard one of ``shard_count``; for a repeated
    shard the highest index counts."""
    out: dict[int, int] = {}
    for part in raw.split(","):
        match = TOKEN_PART_RE.fullmatch(part.strip())
        if match is None:
            raise LedgerError("invalid_token", details={"min_token": raw[:200]})
        shard, index = int(match.group(1)), int(match.group(2))
        if shard >= shard_count:
            raise LedgerError("invalid_token", f"min_token names shard {shard}; the shards are 0 to "
                           f"{shard_count - 1}", details={"min_token": raw[:200], "shard": shard})
        out[shard] = max(index, out.get(shard, 0))
    return out


def format_token(parts: Mapping[int, int]) -> str:
    return ",".join(f"{shard}:{index}" for shard, index in sorted(parts.items()))


def parse_read_params(query: Mapping[str, str], shard_count: int) -> ReadParams:
    consistency = query.get("consistency", "local")
    if consistency not in ("local", "linearizable"):
        raise LedgerError("invalid_query", "consistency is local or linearizable",
                       details={"param": "consistency"})
    token = query.get("min_token")
    return ReadParams(
        linearizable=consistency == "linearizable",
        min_token=parse_token(token, shard_count) if token else None,
        max_staleness_ms=query_int(query, "max_staleness_ms"),
    )


def parse_entries_query(query: Mapping[str, str]) -> EntriesQuery:
    check_query(query, ENTRIES_PARAMS)
    order = query.get("order", "asc")
    if order not in ("asc", "desc"):
        raise LedgerError("invalid_query", "order is asc or desc", details={"param": "order"})
    limit = query_int(query, "limit", 1, statement_page_limit_max, statement_page_limit_default)
    assert limit is not None
    return EntriesQuery(
        after_seq=query_int(query, "after_seq"),
        before_seq=query_int(query, "before_seq"),
        limit=limit,
        order=order,
        from_ns=query_int(query, "from"),
        to_ns=query_int(query, "to"),
    )


def parse_balance_query(query: Mapping[str, str]) -> tuple[int | None, int | None]:
    check_query(query, BALANCE_PARAMS)
    at_seq, at_ns = query_int(query, "at_seq"), query_int(query, "at")
    if at_seq is not None and at_ns is not None:
        raise LedgerError("invalid_query", "give at_seq or at, not both", details={"param": "at"})
    return at_seq, at_ns

