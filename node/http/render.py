"""Responses: content negotiation (JSON or msgpack) and the rendering of ledger results.

A shard's results reach the renderer as ``Rendered`` values, whether the command ran on this node or
on the leader node it was forwarded to, so both paths answer byte-for-byte the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import msgpack
import orjson
from aiohttp import web
from raftledger.client.errors import STATUS, LedgerError, message_for
from raftledger.statemachine.records import Account, Result

from .parse import MSGPACK_TYPES, media_type

JSON_TYPE = "application/json"
MSGPACK_TYPE = "application/msgpack"
msgpack_int_min = -(2**63)
msgpack_int_max = 2**64 - 1


class Rendered:
    """One command's result, with its record already in API shape; never changed once made.

    A plain class: a batch makes one per transfer, and a frozen dataclass's constructor cost four
    times as much."""

    __slots__ = ("code", "id", "replayed", "details", "record", "is_account")

    def __init__(self, code: str, id: str, replayed: bool = False,  # noqa: A002 (the API's name)
                 details: dict[str, Any] | None = None, record: dict[str, Any] | None = None,
                 is_account: bool = False) -> None:
        self.code = code
        self.id = id
        self.replayed = replayed
        self.details: dict[str, Any] = {} if details is None else details
        self.record = record
        self.is_account = is_account

    @classmethod
    def of(cls, result: Result, shard: int) -> Rendered:
        record = result.record.to_json(shard) if result.record is not None else None
        details = dict(result.details) if result.details else None  # a read-only view: copied
        return cls(result.code._name_, result.id, result.replayed, details, record,
                   isinstance(result.record, Account))

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Rendered:
        return cls(wire["code"], wire["id"], bool(wire["replayed"]), dict(wire["details"]),
                   wire["record"], bool(wire["is_account"]))

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "id": self.id, "replayed": self.replayed,
                "details": self.details, "record": self.record, "is_account": self.is_account}

    @property
    def ok(self) -> bool:
        return self.code == "ok"

    @property
    def status(self) -> int:
        """201 created; an identical account created again answers 200 (API.md)."""
        if self.ok:
            return 200 if self.replayed and self.is_account else 201
        return STATUS.get(self.code, 422)

    def body(self) -> dict[str, Any]:
        if self.ok:
            return self.record if self.record is not None else {"id": self.id}
        details = dict(self.details)
        details.setdefault("id", self.id)
        return {"error": {"code": self.code, "message": message_for(self.code),
                          "details": details}}

    def item(self, index: int, kind: str) -> dict[str, Any]:
        """This result as one element of a batch response."""
        out: dict[str, Any] = {"index": index, "id": self.id, "status": self.status}
        if self.replayed:
            out["replayed"] = True
        if self.ok:
            out[kind] = self.body()
        else:
            out["error"] = self.body()["error"]
        return out


def wants_msgpack(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    if MSGPACK_TYPE in accept or "application/x-msgpack" in accept:
        return True
    return (media_type(request.headers.get("Content-Type")) in MSGPACK_TYPES
            and (not accept or accept.strip() == "*/*"))


def _msgpack_safe(value: Any) -> Any:
    """msgpack holds 64-bit integers; larger ones (balances reach 2**127) travel as strings."""
    if isinstance(value, dict):
        return {k: _msgpack_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_msgpack_safe(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not (
            msgpack_int_min <= value <= msgpack_int_max):
        return str(value)
    return value


def json_bytes(body: Any) -> bytes:
    """Compact JSON. orjson is about ten times faster than ``json`` on a batch response but stops at
    64-bit integers; balances reach 2**127, so those responses take the standard library's way.
    (Bodies are never decoded with orjson: it turns such integers into floats.)"""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, separators=(",", ":")).encode()  # ASCII: lone surrogates survive


def encode(request: web.Request, body: Any) -> tuple[bytes, str]:
    if wants_msgpack(request):
        try:
            return msgpack.packb(body), MSGPACK_TYPE
        except OverflowError:
            return msgpack.packb(_msgpack_safe(body)), MSGPACK_TYPE
    return json_bytes(body), JSON_TYPE


def respond(request: web.Request, status: int, body: Any,
            headers: Mapping[str, str] | None = None) -> web.Response:
    data, content_type = encode(request, body)
    return web.Response(status=status, body=data, content_type=content_type, headers=headers)


def error_response(request: web.Request, exc: LedgerError) -> web.Response:
    return respond(request, exc.status, exc.body(), exc.headers())


def replay_headers(replayed: bool) -> dict[str, str]:
    return {"Idempotent-Replayed": "true"} if replayed else {}
