"""What the client returns: frozen, typed views of the API's objects (API.md), built from their JSON.

Money is ``int`` everywhere (minor units; balances reach 2**127, which Python's integers hold).
``replayed`` (on what a write returns) says the ledger answered from the stored outcome of an
earlier request with the same id, which may be an earlier attempt of the same call; it takes no
part in equality, so a replay equals the first answer.
Fields a newer server adds are ignored; a field the API names but an answer lacks takes its
documented empty value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import LedgerError, from_wire

T = TypeVar("T")


def _int(raw: Mapping[str, Any], name: str, default: int = 0) -> int:
    value = raw.get(name, default)
    return int(value) if value is not None else default


def _opt_str(raw: Mapping[str, Any], name: str) -> str | None:
    value = raw.get(name)
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    currency: str
    normal: str
    flags: tuple[str, ...]
    metadata: Mapping[str, Any]
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    balance: int
    available: int
    seq: int
    head: str
    shard: int
    timestamp: int
    replayed: bool = field(default=False, compare=False)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], replayed: bool = False) -> Account:
        return cls(str(raw["id"]), str(raw["currency"]), str(raw.get("normal", "debit")),
                   tuple(raw.get("flags") or ()), dict(raw.get("metadata") or {}),
                   _int(raw, "debits_posted"), _int(raw, "credits_posted"), _int(raw, "debits_pending"),
                   _int(raw, "credits_pending"), _int(raw, "balance"), _int(raw, "available"),
                   _int(raw, "seq"), str(raw.get("head", "")), _int(raw, "shard"), _int(raw, "timestamp"),
                   replayed)


@dataclass(frozen=True, slots=True)
class Balance:
    account_id: str
    currency: str
    balance: int
    available: int
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    seq: int
    timestamp: int

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Balance:
        return cls(str(raw["account_id"]), str(raw["currency"]), _int(raw, "balance"),
                   _int(raw, "available"), _int(raw, "debits_posted"), _int(raw, "credits_posted"),
                   _int(raw, "debits_pending"), _int(raw, "credits_pending"), _int(raw, "seq"),
                   _int(raw, "timestamp"))


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of an account's statement; ``released`` is what a partial post gave back of a hold."""

    seq: int
    transaction_id: str
    direction: str
    amount: int
    currency: str
    balance_after: int
    status: str
    timestamp: int
    hash: str
    prev_hash: str
    released: int = 0

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Entry:
        return cls(_int(raw, "seq"), str(raw["transaction_id"]), str(raw["direction"]),
                   _int(raw, "amount"), str(raw["currency"]), _int(raw, "balance_after"),
                   str(raw.get("status", "")), _int(raw, "timestamp"), str(raw.get("hash", "")),
                   str(raw.get("prev_hash", "")), _int(raw, "released"))


@dataclass(frozen=True, slots=True)
class TransactionEntry:
    """One entry of a transaction, with the ``seq`` and ``hash`` it got on its account."""

    account_id: str
    direction: str
    amount: int
    currency: str
    seq: int
    hash: str

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> TransactionEntry:
        return cls(str(raw["account_id"]), str(raw["direction"]), _int(raw, "amount"),
                   str(raw["currency"]), _int(raw, "seq"), str(raw.get("hash", "")))


@dataclass(frozen=True, slots=True)
class Transaction:
    id: str
    status: str
    entries: tuple[TransactionEntry, ...]
    code: str
    metadata: Mapping[str, Any]
    timestamp: int
    pending: bool
    timeout_seconds: int
    expires_at: int | None
    pending_id: str | None
    reverses: str | None
    reversed_by: str | None
    resolved_by: str | None
    shards: tuple[int, ...]
    cross_shard: bool
    replayed: bool = field(default=False, compare=False)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], replayed: bool = False) -> Transaction:
        expires = raw.get("expires_at")
        return cls(str(raw["id"]), str(raw.get("status", "")),
                   tuple(TransactionEntry.from_json(e) for e in raw.get("entries") or ()),
                   str(raw.get("code") or ""), dict(raw.get("metadata") or {}), _int(raw, "timestamp"),
                   bool(raw.get("pending", False)), _int(raw, "timeout_seconds"),
                   int(expires) if expires else None, _opt_str(raw, "pending_id"),
                   _opt_str(raw, "reverses"), _opt_str(raw, "reversed_by"),
                   _opt_str(raw, "resolved_by"), tuple(int(s) for s in raw.get("shards") or ()),
                   bool(raw.get("cross_shard", False)), replayed)


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a shard's change feed (docs/feed.md): ``id`` is ``<shard>:<offset>``, the same
    on every replica; ``data`` the account (``account.created``) or the transaction with this
    shard's entries and, under ``balances``, each moved account as it was right after the event."""

    id: str
    shard: int
    offset: int
    type: str
    timestamp: int
    data: Mapping[str, Any]

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Event:
        return cls(str(raw["id"]), int(raw["shard"]), int(raw["offset"]), str(raw["type"]),
                   _int(raw, "timestamp"), dict(raw.get("data") or {}))

    @property
    def transaction(self) -> Transaction | None:
        """The transaction of a ``transaction.*`` event."""
        return Transaction.from_json(self.data) if self.type.startswith("transaction.") else None

    @property
    def account(self) -> Account | None:
        """The new account of an ``account.created`` event."""
        return Account.from_json(self.data) if self.type == "account.created" else None

    @property
    def balances(self) -> tuple[Balance, ...]:
        """Each account a transaction moved, as it was right after this event."""
        return tuple(Balance.from_json(b) for b in self.data.get("balances") or ())


@dataclass(frozen=True, slots=True)
class BatchItem(Generic[T]):
    """One item of a batch answer: its ``value`` when it succeeded, else its ``error`` (the same
    error the single request would have raised)."""

    index: int
    id: str
    status: int
    value: T | None
    error: LedgerError | None
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def result(self) -> T:
        """The value, or raise the item's error."""
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


def batch_items(raw: Any, kind: str, build: type[Account] | type[Transaction]) -> list[BatchItem[Any]]:
    """The items of ``{"results": [...]}``; ``kind`` names the field of a success ("account",
    "transaction")."""
    items: list[BatchItem[Any]] = []
    for item in raw.get("results", []) if isinstance(raw, dict) else []:
        status = int(item.get("status", 0))
        error = None if "error" not in item else from_wire(status, {"error": item["error"]})
        replayed = bool(item.get("replayed", False))
        value = build.from_json(item[kind], replayed) if error is None and kind in item else None
        items.append(BatchItem(int(item["index"]), str(item.get("id", "")), status, value, error,
                               replayed))
    return items
