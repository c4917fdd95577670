"""Typed commands: what a client asks the ledger to do.

Commands are values: frozen, slotted, compared by content. Their wire form lives in ``codec``; their
validation and effects in ``ledger``. A Raft log entry carries a list of ``Request`` — a command plus the
timestamp the shard leader gave it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntFlag, StrEnum
from typing import Any, TypeAlias

entries_per_transaction_min = 2
entries_per_transaction_max = 128
batch_commands_max = 8190
amount_max = 2**63 - 1
timeout_seconds_max = 2**31 - 1
id_length_max = 128


class Direction(StrEnum):
    debit = "debit"
    credit = "credit"


class AccountFlag(IntFlag):
    debits_must_not_exceed_credits = 1
    credits_must_not_exceed_debits = 2
    closed = 4
    history = 8


def flags_to_names(flags: int) -> list[str]:
    return [f.name for f in AccountFlag if flags & f and f.name is not None]


@dataclass(frozen=True, slots=True)
class CreateAccount:
    id: str
    currency: str
    normal: Direction = Direction.debit
    flags: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EntrySpec:
    account_id: str
    direction: Direction
    amount: int
    currency: str


@dataclass(frozen=True, slots=True)
class CreateTransaction:
    id: str
    entries: tuple[EntrySpec, ...]
    pending: bool = False
    timeout_seconds: int = 0
    code: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PostPending:
    """Post a hold, fully (amount None) or partially; the remainder is released."""

    id: str
    pending_id: str
    amount: int | None = None


@dataclass(frozen=True, slots=True)
class VoidPending:
    id: str
    pending_id: str


@dataclass(frozen=True, slots=True)
class ReverseTransaction:
    """A new posted transaction mirroring every entry of a posted one."""

    id: str
    transaction_id: str


Command: TypeAlias = CreateAccount | CreateTransaction | PostPending | VoidPending | ReverseTransaction


@dataclass(frozen=True, slots=True)
class Batch:
    """Several commands applied in one go: each on its own, or all-or-none when ``atomic``."""

    commands: tuple[Command, ...]
    atomic: bool = False


AnyCommand: TypeAlias = Command | Batch


@dataclass(frozen=True, slots=True)
class Request:
    """One client request inside a Raft entry; ``timestamp_ns`` was assigned by the shard leader."""

    timestamp_ns: int
    command: AnyCommand
