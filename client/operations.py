"""Every client method as one ``Operation`` (method, path, body, routing, decoding), built once per
logical call: the synchronous and the asyncio client only run what these return.

Transaction ids: a write without an id gets one here, once, so every retry sends the same.
A generated id carries its accounts' routing key as a hash tag (``tx-<random>{u42}`` for the
accounts ``alice:{u42}`` and ``cash:{u42}``; ``{alice}`` for an account ``alice`` without a tag),
so the transaction lives on its accounts' shard and commits in one Raft round (docs/design.md,
"Cross-shard transactions"). When no tag can reproduce an account's routing key (an id whose
braces would be read as another tag) the id is left untagged.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from raftledger.cluster.router import routing_key

from .core import Consistency, Operation, Reply, decode_json
from .types import Account, Balance, BatchItem, Entry, Transaction, batch_items

ID_LENGTH_MAX = 128
statement_page_size_default = 1000  # the node's maximum page: fewest round trips for a statement


def tagged_id(account_id: str, prefix: str = "tx-") -> str:
    """A new transaction id that routes with ``account_id``: its routing key as the id's hash tag,
    or an untagged id when no tag reproduces the key or the id would be too long."""
    base = prefix + secrets.token_hex(12)
    key = routing_key(account_id)
    candidate = f"{base}{{{key}}}"
    if len(candidate) <= ID_LENGTH_MAX and routing_key(candidate) == key:
        return candidate
    return base


def _quoted(ident: str) -> str:
    return quote(ident, safe="")


def _replayed(reply: Reply) -> bool:
    return reply.header("idempotent-replayed") == "true"


def _account(reply: Reply) -> Account:
    return Account.from_json(reply.json(), _replayed(reply))


def _transaction(reply: Reply) -> Transaction:
    return Transaction.from_json(reply.json(), _replayed(reply))


def _balance(reply: Reply) -> Balance:
    return Balance.from_json(reply.json())


def _accounts(reply: Reply) -> list[BatchItem[Account]]:
    return batch_items(reply.json(), "account", Account)


def _transactions(reply: Reply) -> list[BatchItem[Transaction]]:
    return batch_items(reply.json(), "transaction", Transaction)


def request(method: str, path: str, json: Any = None, params: Mapping[str, str | int] | None = None,
            idempotent: bool | None = None) -> Operation[Any]:
    """Any route. GET and HEAD are retried as reads; other methods as admin requests (only where
    they surely were not processed) unless ``idempotent`` says a retry is safe."""
    method = method.upper()
    safe = method in ("GET", "HEAD") if idempotent is None else idempotent
    return Operation(method, path, decode_json, kind="read" if method in ("GET", "HEAD") else
                     "write" if safe else "admin", body=json, params=dict(params or {}))


def stream(path: str, params: Mapping[str, str | int] | None = None) -> Operation[Reply]:
    """``GET path`` whose answer is read as it arrives (``Reply.stream``), retried as a read."""
    return Operation("GET", path, _reply, kind="read", params=dict(params or {}), stream=True)


def _reply(reply: Reply) -> Reply:
    return reply


def create_account(fields: Mapping[str, Any]) -> Operation[Account]:
    account_id = str(fields.get("id", ""))
    return Operation("POST", "/v1/accounts", _account, kind="write", body=dict(fields),
                     route_key=account_id, write_id=account_id)


def create_accounts(accounts: Sequence[Mapping[str, Any]]) -> Operation[list[BatchItem[Account]]]:
    first = str(accounts[0].get("id", "")) if accounts else None
    return Operation("POST", "/v1/accounts", _accounts, kind="write",
                     body={"accounts": [dict(a) for a in accounts]}, route_key=first, write_id=first)


def _with_id(fields: Mapping[str, Any], account_id: str | None) -> dict[str, Any]:
    body = dict(fields)
    if body.get("id") is None:
        body["id"] = tagged_id(account_id) if account_id else "tx-" + secrets.token_hex(12)
    return body


def _first_account(fields: Mapping[str, Any]) -> str | None:
    entries = fields.get("entries")
    if isinstance(entries, Sequence) and entries and isinstance(entries[0], Mapping):
        return str(entries[0].get("account_id", "")) or None
    debit = fields.get("debit_account_id")
    return str(debit) if debit else None


def create_transaction(fields: Mapping[str, Any]) -> Operation[Transaction]:
    """A transaction (``entries``, or the debit/credit shorthand of ``transfer``)."""
    body = _with_id(fields, _first_account(fields))
    return Operation("POST", "/v1/transactions", _transaction, kind="write", body=body,
                     route_key=str(body["id"]), write_id=str(body["id"]))


def create_transactions(transactions: Iterable[Mapping[str, Any]],
                        atomic: bool) -> Operation[list[BatchItem[Transaction]]]:
    items = [_with_id(t, _first_account(t)) for t in transactions]
    first = str(items[0]["id"]) if items else None
    return Operation("POST", "/v1/transactions/batch", _transactions, kind="write",
                     body={"transactions": items, "atomic": atomic}, route_key=first, write_id=first)


def follow_up(action: str, target: str, new_id: str | None, amount: int | None = None
              ) -> Operation[Transaction]:
    """post / void / reverse of ``target``; the new transaction's id is ``{target}:{action}`` (the
    API's default, so a retry or a second call names the same one) unless given."""
    body: dict[str, Any] = {"id": new_id or f"{target}:{action}"}
    if amount is not None:
        body["amount"] = amount
    return Operation("POST", f"/v1/transactions/{_quoted(target)}/{action}", _transaction,
                     kind="write", body=body, route_key=target, write_id=str(body["id"]))


def _read(path: str, decode: Any, key: str, consistency: Consistency | None,
          max_staleness_ms: int | None, params: Mapping[str, str | int] | None = None) -> Operation[Any]:
    return Operation("GET", path, decode, params=dict(params or {}), route_key=key,
                     consistency=consistency, max_staleness_ms=max_staleness_ms)


def get_account(account_id: str, consistency: Consistency | None = None,
                max_staleness_ms: int | None = None) -> Operation[Account]:
    return _read(f"/v1/accounts/{_quoted(account_id)}", _account, account_id, consistency,
                 max_staleness_ms)


def get_transaction(transaction_id: str, consistency: Consistency | None = None,
                    max_staleness_ms: int | None = None) -> Operation[Transaction]:
    return _read(f"/v1/transactions/{_quoted(transaction_id)}", _transaction, transaction_id,
                 consistency, max_staleness_ms)


def balance(account_id: str, at_seq: int | None, at: int | None, consistency: Consistency | None = None,
            max_staleness_ms: int | None = None) -> Operation[Balance]:
    params: dict[str, str | int] = {}
    if at_seq is not None:
        params["at_seq"] = at_seq
    if at is not None:
        params["at"] = at
    return _read(f"/v1/accounts/{_quoted(account_id)}/balance", _balance, account_id, consistency,
                 max_staleness_ms, params)


class Statement:
    """The pages of one statement: ``next_page`` is the operation for the following page (None
    after the last), ``take`` reads a page's entries and moves the cursor."""

    def __init__(self, account_id: str, *, order: str = "asc", after_seq: int | None = None,
                 before_seq: int | None = None, from_ns: int | None = None, to_ns: int | None = None,
                 page_size: int = statement_page_size_default, consistency: Consistency | None = None,
                 max_staleness_ms: int | None = None) -> None:
        if order not in ("asc", "desc"):
            raise ValueError("order is 'asc' or 'desc'")
        self.account_id = account_id
        self.order = order
        self.cursor = after_seq if order == "asc" else before_seq
        self.fixed: dict[str, str | int] = {"order": order, "limit": page_size}
        if order == "asc" and before_seq is not None:
            self.fixed["before_seq"] = before_seq
        if order == "desc" and after_seq is not None:
            self.fixed["after_seq"] = after_seq
        if from_ns is not None:
            self.fixed["from"] = from_ns
        if to_ns is not None:
            self.fixed["to"] = to_ns
        self.consistency = consistency
        self.max_staleness_ms = max_staleness_ms
        self.done = False

    def next_page(self) -> Operation[Any] | None:
        if self.done:
            return None
        params = dict(self.fixed)
        if self.cursor is not None:
            params["after_seq" if self.order == "asc" else "before_seq"] = self.cursor
        return _read(f"/v1/accounts/{_quoted(self.account_id)}/entries", decode_json, self.account_id,
                     self.consistency, self.max_staleness_ms, params)

    def take(self, page: Any) -> list[Entry]:
        entries = [Entry.from_json(e) for e in page.get("entries", [])]
        following = page.get("next")
        if following is None or not entries:
            self.done = True
        else:
            self.cursor = int(following)
        return entries


def cluster_status() -> Operation[Any]:
    return Operation("GET", "/v1/cluster", decode_json)


def cluster_map() -> Operation[Any]:
    return Operation("GET", "/v1/cluster/map", decode_json)
