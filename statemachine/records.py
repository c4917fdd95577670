"""What the ledger stores and returns: accounts, transactions, statement entries, events, results.

Each record knows how to present itself as JSON-ready data (``to_json``) in the shape of the HTTP API.
Records built on the apply path (TxEntry, Transaction, Result) spell out their ``__init__`` and mark
their fields ``Final``: immutable, and built by a native constructor once compiled (see commands.py).
Amounts and balances are Python ints throughout; they are never floats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from .codes import MESSAGES, ResultCode
from .commands import AccountFlag, Direction, TxEntry, flags_to_names

STATUS_PENDING: Final = "pending"
STATUS_POSTED: Final = "posted"
STATUS_VOIDED: Final = "voided"
STATUS_EXPIRED: Final = "expired"
STATUS_REJECTED: Final = "rejected"
NO_DETAILS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    currency: str
    normal: Direction
    flags: int
    metadata: dict[str, Any]
    num: int
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    seq: int = 0
    head: bytes = b""
    timestamp: int = 0

    @property
    def balance(self) -> int:
        if self.normal is Direction.credit:
            return self.credits_posted - self.debits_posted
        return self.debits_posted - self.credits_posted

    @property
    def available(self) -> int:
        if self.normal is Direction.credit:
            return self.balance - self.debits_pending
        return self.balance - self.credits_pending

    def has(self, flag: AccountFlag) -> bool:
        return bool(self.flags & flag)

    def to_json(self, shard: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "currency": self.currency,
            "normal": self.normal._value_,
            "flags": flags_to_names(self.flags),
            "metadata": self.metadata,
            "debits_posted": self.debits_posted,
            "credits_posted": self.credits_posted,
            "debits_pending": self.debits_pending,
            "credits_pending": self.credits_pending,
            "balance": self.balance,
            "available": self.available,
            "seq": self.seq,
            "head": self.head.hex(),
            "shard": shard,
            "timestamp": self.timestamp,
        }


@dataclass(frozen=True, slots=True)
class Balance:
    account_id: str
    currency: str
    normal: Direction
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    seq: int
    timestamp: int

    def to_json(self) -> dict[str, Any]:
        acct = Account(self.account_id, self.currency, self.normal, 0, {}, 0, self.debits_posted,
                       self.credits_posted, self.debits_pending, self.credits_pending)
        return {
            "account_id": self.account_id,
            "currency": self.currency,
            "balance": acct.balance,
            "available": acct.available,
            "debits_posted": self.debits_posted,
            "credits_posted": self.credits_posted,
            "debits_pending": self.debits_pending,
            "credits_pending": self.credits_pending,
            "seq": self.seq,
            "timestamp": self.timestamp,
        }


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of an account's statement. ``released`` is the hold amount a post gives back."""

    account_id: str
    seq: int
    transaction_id: str
    direction: Direction
    amount: int
    currency: str
    status: str
    balance_after: int
    timestamp: int
    released: int
    hash: bytes
    prev_hash: bytes
    # Totals after this entry; kept only for accounts with the ``history`` flag.
    totals: tuple[int, int, int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq,
            "transaction_id": self.transaction_id,
            "direction": self.direction._value_,
            "amount": self.amount,
            "currency": self.currency,
            "balance_after": self.balance_after,
            "status": self.status,
            "timestamp": self.timestamp,
            "hash": self.hash.hex(),
            "prev_hash": self.prev_hash.hex(),
        }
        if self.released:
            out["released"] = self.released
        return out


@dataclass(init=False, slots=True)
class Transaction:
    id: Final[str]
    status: Final[str]
    entries: Final[tuple[TxEntry, ...]]
    code: Final[str]
    metadata: Final[dict[str, Any]]
    timestamp: Final[int]
    pending: Final[bool]
    timeout_seconds: Final[int]
    pending_id: Final[str | None]
    reverses: Final[str | None]
    reversed_by: Final[str | None]
    resolved_by: Final[str | None]
    shards: Final[tuple[int, ...]]  # a cross-shard transaction's shards (its home holds this record)

    def __init__(self, id: str, status: str, entries: tuple[TxEntry, ...], code: str,
                 metadata: dict[str, Any], timestamp: int, pending: bool = False,
                 timeout_seconds: int = 0, pending_id: str | None = None, reverses: str | None = None,
                 reversed_by: str | None = None, resolved_by: str | None = None,
                 shards: tuple[int, ...] = ()) -> None:
        self.id = id
        self.status = status
        self.entries = entries
        self.code = code
        self.metadata = metadata
        self.timestamp = timestamp
        self.pending = pending
        self.timeout_seconds = timeout_seconds
        self.pending_id = pending_id
        self.reverses = reverses
        self.reversed_by = reversed_by
        self.resolved_by = resolved_by
        self.shards = shards

    @property
    def cross_shard(self) -> bool:
        return bool(self.shards)

    def with_status(self, status: str, *, resolved_by: str | None = None,
                    reversed_by: str | None = None) -> Transaction:
        """The same transaction with new status fields (status, resolved_by, reversed_by).

        Only a hold is ever resolved and only a posted transaction reversed, so at most one of the
        two is set.
        """
        return Transaction(self.id, status, self.entries, self.code, self.metadata, self.timestamp,
                           self.pending, self.timeout_seconds, self.pending_id, self.reverses,
                           reversed_by, resolved_by, self.shards)

    @property
    def initial_status(self) -> str:
        """Only holds change status after creation (posted, voided or expired later)."""
        return STATUS_PENDING if self.pending else self.status

    @property
    def expires_at(self) -> int | None:
        if not (self.pending and self.timeout_seconds):
            return None
        return self.timestamp + self.timeout_seconds * 1_000_000_000

    def to_json(self, shard: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "entries": [e.to_json() for e in self.entries],
            "code": self.code,
            "metadata": self.metadata,
            "timestamp": self.timestamp,
            "pending": self.pending,
            "timeout_seconds": self.timeout_seconds,
            "expires_at": self.expires_at,
            "pending_id": self.pending_id,
            "reverses": self.reverses,
            "reversed_by": self.reversed_by,
            "resolved_by": self.resolved_by,
            "shards": list(self.shards) if self.shards else [shard],
            "cross_shard": bool(self.shards),
        }


LEG_PREPARED: Final = "prepared"  # holds placed, no decision yet
LEG_REFUSED: Final = "refused"  # the prepare was refused (its code and details kept)
LEG_ABORTED: Final = "aborted"  # a void arrived before any prepare: a later prepare is refused
LEG_HELD: Final = "held"  # committed as a hold: waits for a post, a void or an expiry
LEG_OPEN: Final = (LEG_PREPARED, LEG_HELD)


@dataclass(init=False, slots=True)
class Leg:
    """A participant's part of a cross-shard transaction: its entries, placed as holds and later
    posted, kept, voided or expired (``status`` then names that: posted, voided, expired)."""

    id: Final[str]
    status: Final[str]
    coordinator: Final[int]
    digest: Final[bytes]
    entries: Final[tuple[TxEntry, ...]]
    pending: Final[bool]
    code: Final[str]
    metadata: Final[dict[str, Any]]
    shards: Final[tuple[int, ...]]
    timestamp: Final[int]  # when it was prepared
    finished_by: Final[str]  # the transaction whose entries finished it ("" while open)
    refusal: Final[int]  # the ResultCode of a refused prepare (0 otherwise)
    details: Final[dict[str, Any]]

    def __init__(self, id: str, status: str, coordinator: int, digest: bytes,
                 entries: tuple[TxEntry, ...], pending: bool, code: str, metadata: dict[str, Any],
                 shards: tuple[int, ...], timestamp: int, finished_by: str = "", refusal: int = 0,
                 details: dict[str, Any] | None = None) -> None:
        self.id = id
        self.status = status
        self.coordinator = coordinator
        self.digest = digest
        self.entries = entries
        self.pending = pending
        self.code = code
        self.metadata = metadata
        self.shards = shards
        self.timestamp = timestamp
        self.finished_by = finished_by
        self.refusal = refusal
        self.details = {} if details is None else details

    def finished(self, status: str, by: str) -> Leg:
        return Leg(self.id, status, self.coordinator, self.digest, self.entries, self.pending, self.code,
                   self.metadata, self.shards, self.timestamp, by, self.refusal, self.details)

    def as_transaction(self) -> Transaction:
        """The leg as the transaction record a participant answers with (its own entries)."""
        status = STATUS_PENDING if self.status in LEG_OPEN else self.status
        return Transaction(self.id, status, self.entries, self.code, self.metadata, self.timestamp,
                           self.pending, shards=self.shards)

    def to_json(self, shard: int) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "shard": shard, "coordinator": self.coordinator,
                "shards": list(self.shards), "entries": [e.to_json() for e in self.entries],
                "pending": self.pending, "timestamp": self.timestamp,
                "finished_by": self.finished_by or None}


@dataclass(frozen=True, slots=True)
class OpenDecision:
    """At a coordinator: a decision whose participants may not all have finished their legs yet.

    Each participant in ``participants`` must apply ``FinishLeg(leg, digest, outcome, by, amount)``."""

    id: str  # the decision's own id: the transaction's, a follow-up's, or EXPIRY_SUFFIX appended
    timestamp: int
    leg: str  # the legs to finish: those of this transaction id
    digest: bytes  # ... placed for this payload
    outcome: int  # commands.LEG_*
    by: str
    amount: int | None
    participants: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Rejection:
    """A stored rejection: the first outcome of a transaction id that did not apply."""

    id: str
    code: ResultCode
    timestamp: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self, shard: int) -> dict[str, Any]:
        return {"id": self.id, "status": STATUS_REJECTED, "code": self.code.name,
                "timestamp": self.timestamp, "details": self.details, "shards": [shard]}


@dataclass(frozen=True, slots=True)
class Event:
    offset: int
    type: str
    timestamp: int
    data: dict[str, Any]

    def to_json(self, shard: int) -> dict[str, Any]:
        return {"id": f"{shard}:{self.offset}", "shard": shard, "offset": self.offset,
                "type": self.type, "timestamp": self.timestamp, "data": self.data}


@dataclass(init=False, slots=True)
class Result:
    """The outcome of one command. ``replayed`` marks an idempotent repeat of a stored outcome."""

    code: Final[ResultCode]
    id: Final[str]
    record: Final[Account | Transaction | None]
    replayed: Final[bool]
    details: Final[Mapping[str, Any]]

    def __init__(self, code: ResultCode, id: str, record: Account | Transaction | None = None,
                 replayed: bool = False, details: Mapping[str, Any] = NO_DETAILS) -> None:
        self.code = code
        self.id = id
        self.record = record
        self.replayed = replayed
        self.details = details

    @property
    def ok(self) -> bool:
        return self.code is ResultCode.ok

    @property
    def message(self) -> str:
        return MESSAGES[self.code]


Outcome = Result | list[Result]
