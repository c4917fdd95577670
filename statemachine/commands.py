"""Typed commands: what a client asks the ledger to do.

Commands are values: immutable (``Final`` fields, checked by mypy), compared and hashed by content.
Each spells out its ``__init__`` because mypyc compiles that to a native constructor, an order of
magnitude cheaper than the generated one of a frozen dataclass; the decoder builds one per command.
Their wire form lives in ``codec``; their validation and effects in ``ledger``. A Raft log entry
carries a list of ``Request`` — a command plus the timestamp the shard leader gave it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag, StrEnum
from typing import Any, Final, TypeAlias

entries_per_transaction_min: Final = 2
entries_per_transaction_max: Final = 128
batch_commands_max: Final = 8190
amount_max: Final = 2**63 - 1
timeout_seconds_max: Final = 2**31 - 1
id_length_max: Final = 128


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


@dataclass(init=False, slots=True, unsafe_hash=True)
class CreateAccount:
    id: Final[str]
    currency: Final[str]
    normal: Final[Direction]
    flags: Final[int]
    metadata: Final[dict[str, Any]]

    def __init__(self, id: str, currency: str, normal: Direction = Direction.debit, flags: int = 0,
                 metadata: dict[str, Any] | None = None) -> None:
        self.id = id
        self.currency = currency
        self.normal = normal
        self.flags = flags
        self.metadata = {} if metadata is None else metadata


@dataclass(init=False, slots=True, unsafe_hash=True)
class EntrySpec:
    account_id: Final[str]
    direction: Final[Direction]
    amount: Final[int]
    currency: Final[str]

    def __init__(self, account_id: str, direction: Direction, amount: int, currency: str) -> None:
        self.account_id = account_id
        self.direction = direction
        self.amount = amount
        self.currency = currency


@dataclass(init=False, slots=True, unsafe_hash=True)
class CreateTransaction:
    id: Final[str]
    entries: Final[tuple[EntrySpec, ...]]
    pending: Final[bool]
    timeout_seconds: Final[int]
    code: Final[str]
    metadata: Final[dict[str, Any]]

    def __init__(self, id: str, entries: tuple[EntrySpec, ...], pending: bool = False,
                 timeout_seconds: int = 0, code: str = "",
                 metadata: dict[str, Any] | None = None) -> None:
        self.id = id
        self.entries = entries
        self.pending = pending
        self.timeout_seconds = timeout_seconds
        self.code = code
        self.metadata = {} if metadata is None else metadata


@dataclass(init=False, slots=True, unsafe_hash=True)
class PostPending:
    """Post a hold, fully (amount None) or partially; the remainder is released."""

    id: Final[str]
    pending_id: Final[str]
    amount: Final[int | None]

    def __init__(self, id: str, pending_id: str, amount: int | None = None) -> None:
        self.id = id
        self.pending_id = pending_id
        self.amount = amount


@dataclass(init=False, slots=True, unsafe_hash=True)
class VoidPending:
    id: Final[str]
    pending_id: Final[str]

    def __init__(self, id: str, pending_id: str) -> None:
        self.id = id
        self.pending_id = pending_id


@dataclass(init=False, slots=True, unsafe_hash=True)
class ReverseTransaction:
    """A new posted transaction mirroring every entry of a posted one."""

    id: Final[str]
    transaction_id: Final[str]

    def __init__(self, id: str, transaction_id: str) -> None:
        self.id = id
        self.transaction_id = transaction_id


Command: TypeAlias = CreateAccount | CreateTransaction | PostPending | VoidPending | ReverseTransaction


@dataclass(init=False, slots=True, unsafe_hash=True)
class Batch:
    """Several commands applied in one go: each on its own, or all-or-none when ``atomic``."""

    commands: Final[tuple[Command, ...]]
    atomic: Final[bool]

    def __init__(self, commands: tuple[Command, ...], atomic: bool = False) -> None:
        self.commands = commands
        self.atomic = atomic


@dataclass(init=False, slots=True, unsafe_hash=True)
class ExpireHolds:
    """Only a timestamp: lets a leader expire holds on a shard that receives no other request.

    Every request first expires the holds due by its timestamp; this one does nothing else. It is
    proposed on its own, never inside a Batch.
    """

    def __init__(self) -> None:
        pass

    @property
    def id(self) -> str:
        """Not a field: the empty id its Result carries, for code that sizes or logs commands by id."""
        return ""


@dataclass(init=False, slots=True, unsafe_hash=True)
class SetSlots:
    """The hash slots this shard owns from now on, as the cluster map gave them at ``epoch``.

    Proposed by a shard's leader when the map gives its shard a newer epoch than the store holds; it
    applies only if ``epoch`` is newer than the stored one, so a late or repeated one changes nothing.
    Once a shard has slots it refuses accounts of every other slot (``wrong_shard``). Never inside a
    Batch, never accepted from a client or a peer.
    """

    epoch: Final[int]
    ranges: Final[tuple[tuple[int, int], ...]]  # inclusive (first, last), ascending, disjoint

    def __init__(self, epoch: int, ranges: tuple[tuple[int, int], ...]) -> None:
        self.epoch = epoch
        self.ranges = ranges

    @property
    def id(self) -> str:
        """Not a field: the empty id its Result carries (as ``ExpireHolds``)."""
        return ""


AnyCommand: TypeAlias = Command | Batch | ExpireHolds | SetSlots


@dataclass(init=False, slots=True, unsafe_hash=True)
class Request:
    """One client request inside a Raft entry; ``timestamp_ns`` was assigned by the shard leader."""

    timestamp_ns: Final[int]
    command: Final[AnyCommand]

    def __init__(self, timestamp_ns: int, command: AnyCommand) -> None:
        self.timestamp_ns = timestamp_ns
        self.command = command
