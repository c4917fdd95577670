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
    """Several commands applied in one go: each on its own, or all-or-none when ``atomic``. Clients'
    batches hold client commands; a node driving cross-shard transactions batches their steps."""

    commands: Final[tuple[Command | ProtocolCommand, ...]]
    atomic: Final[bool]

    def __init__(self, commands: tuple[Command | ProtocolCommand, ...], atomic: bool = False) -> None:
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


# ---- the change feed: durable consumers and retention (docs/design.md, "Change feed") ------------


@dataclass(init=False, slots=True, unsafe_hash=True)
class SetFeedOffset:
    """A durable consumer of this shard's feed has processed every event up to ``offset`` (0: none);
    ``remove`` forgets the consumer, so that it no longer holds back retention. Standalone only."""

    consumer: Final[str]
    offset: Final[int]
    remove: Final[bool]

    def __init__(self, consumer: str, offset: int = 0, remove: bool = False) -> None:
        self.consumer = consumer
        self.offset = offset
        self.remove = remove

    @property
    def id(self) -> str:
        """Not a field: the consumer's name, which its Result carries."""
        return self.consumer


@dataclass(init=False, slots=True, unsafe_hash=True)
class CompactFeed:
    """Drop the oldest outbox events, up to ``through``, that every consumer has processed and that
    were written at least ``age_min_ns`` before this request's timestamp. Proposed by the leader
    (as ``ExpireHolds``), never accepted from a client or a peer; standalone only."""

    through: Final[int]
    age_min_ns: Final[int]

    def __init__(self, through: int, age_min_ns: int) -> None:
        self.through = through
        self.age_min_ns = age_min_ns

    @property
    def id(self) -> str:
        """Not a field: the empty id its Result carries (as ``ExpireHolds``)."""
        return ""


# ---- cross-shard transactions: the steps of two-phase commit (docs/design.md) ----------------------

LEG_POST: Final = 1  # post the leg's holds (a committed posted transaction, or a post follow-up)
LEG_HOLD: Final = 2  # keep them as a hold (a committed pending transaction)
LEG_VOID: Final = 3  # void them (an abort, or a void follow-up)
LEG_EXPIRE: Final = 4  # expire them (the cross-shard hold expired at its home)
LEG_OUTCOMES: Final = (LEG_POST, LEG_HOLD, LEG_VOID, LEG_EXPIRE)
# As the open decision ``by`` on this shard says (validate.RULES_LOCAL_FINISH): the coordinator's own leg,
# finished in the entry that decides, just after the decision.
LEG_AS_DECIDED: Final = 5

DECIDE_NEW: Final = 0  # a new cross-shard transaction
DECIDE_POST: Final = 1  # a post of a cross-shard hold (``target``)
DECIDE_VOID: Final = 2  # a void of a cross-shard hold
DECIDE_REVERSE: Final = 3  # a reversal of a cross-shard posted transaction (its legs are mirrored)
DECIDE_KINDS: Final = (DECIDE_NEW, DECIDE_POST, DECIDE_VOID, DECIDE_REVERSE)


@dataclass(init=False, slots=True, unsafe_hash=True)
class PrepareLeg:
    """On a participant: place its entries of a cross-shard transaction as holds, fully validated."""

    id: Final[str]
    coordinator: Final[int]
    digest: Final[bytes]  # of the client's command: a leg of another payload with this id is a conflict
    entries: Final[tuple[EntrySpec, ...]]
    pending: Final[bool]
    code: Final[str]
    metadata: Final[dict[str, Any]]
    shards: Final[tuple[int, ...]]

    def __init__(self, id: str, coordinator: int, digest: bytes, entries: tuple[EntrySpec, ...],
                 pending: bool = False, code: str = "", metadata: dict[str, Any] | None = None,
                 shards: tuple[int, ...] = ()) -> None:
        self.id = id
        self.coordinator = coordinator
        self.digest = digest
        self.entries = entries
        self.pending = pending
        self.code = code
        self.metadata = {} if metadata is None else metadata
        self.shards = shards


@dataclass(init=False, slots=True, unsafe_hash=True)
class FinishLeg:
    """On a participant: post, keep, void or expire the holds of leg ``id`` (of payload ``digest``);
    the new entries belong to transaction ``by`` (``id`` itself, or a follow-up's id)."""

    id: Final[str]
    digest: Final[bytes]
    outcome: Final[int]
    by: Final[str]
    amount: Final[int | None]  # a partial post

    def __init__(self, id: str, digest: bytes, outcome: int, by: str, amount: int | None = None) -> None:
        self.id = id
        self.digest = digest
        self.outcome = outcome
        self.by = by
        self.amount = amount


@dataclass(init=False, slots=True, unsafe_hash=True)
class TxEntry:
    """An entry as its shard placed it (seq and hash included): in a transaction's record, and in the
    decision of a cross-shard one, as each participant placed it."""

    account_id: Final[str]
    direction: Final[Direction]
    amount: Final[int]
    currency: Final[str]
    seq: Final[int]
    hash: Final[bytes]

    def __init__(self, account_id: str, direction: Direction, amount: int, currency: str, seq: int,
                 hash: bytes) -> None:
        self.account_id = account_id
        self.direction = direction
        self.amount = amount
        self.currency = currency
        self.seq = seq
        self.hash = hash

    def to_json(self) -> dict[str, Any]:
        # Enum members' _value_ is a plain attribute; .value is a property, five times slower.
        return {
            "account_id": self.account_id,
            "direction": self.direction._value_,
            "amount": self.amount,
            "currency": self.currency,
            "seq": self.seq,
            "hash": self.hash.hex(),
        }


@dataclass(init=False, slots=True, unsafe_hash=True)
class Decide:
    """At the coordinator (the home of ``id``): the commit point of a cross-shard transaction or
    follow-up. ``outcome`` is ``ok`` to commit, else the refusal to store; for a follow-up the home
    checks ``target`` first, and a refusal it finds there replaces a commit. When the coordinator is
    a participant too, its leg is prepared in the same entry, just before (``local``): that leg's
    refusal is the decision's, and its entries fill the placeholders (``seq`` 0) of ``entries``."""

    id: Final[str]
    digest: Final[bytes]
    kind: Final[int]
    outcome: Final[int]  # a ResultCode value
    details: Final[dict[str, Any]]
    entries: Final[tuple[TxEntry, ...]]
    pending: Final[bool]
    timeout_seconds: Final[int]
    code: Final[str]
    metadata: Final[dict[str, Any]]
    shards: Final[tuple[int, ...]]
    target: Final[str]
    amount: Final[int | None]
    local: Final[bool]  # this shard's own leg was prepared just before, in the same entry

    def __init__(self, id: str, digest: bytes, kind: int, outcome: int,
                 details: dict[str, Any] | None = None, entries: tuple[TxEntry, ...] = (),
                 pending: bool = False, timeout_seconds: int = 0, code: str = "",
                 metadata: dict[str, Any] | None = None, shards: tuple[int, ...] = (),
                 target: str = "", amount: int | None = None, local: bool = False) -> None:
        self.id = id
        self.digest = digest
        self.kind = kind
        self.outcome = outcome
        self.details = {} if details is None else details
        self.entries = entries
        self.pending = pending
        self.timeout_seconds = timeout_seconds
        self.code = code
        self.metadata = {} if metadata is None else metadata
        self.shards = shards
        self.target = target
        self.amount = amount
        self.local = local


@dataclass(init=False, slots=True, unsafe_hash=True)
class Complete:
    """At the coordinator: every participant finished what decision ``id`` asked for; the resolver
    no longer needs to drive it."""

    id: Final[str]

    def __init__(self, id: str) -> None:
        self.id = id


@dataclass(init=False, slots=True, unsafe_hash=True)
class ClaimId:
    """At the home of ``id``: the id is taken by a transaction recorded on shard ``at`` (a post, void
    or reverse is recorded with its target, an atomic batch's items with its first), so that nobody
    can use it for another payload here, and a lookup at the home finds where it is."""

    id: Final[str]
    digest: Final[bytes]
    at: Final[int]

    def __init__(self, id: str, digest: bytes, at: int) -> None:
        self.id = id
        self.digest = digest
        self.at = at


ProtocolCommand: TypeAlias = PrepareLeg | FinishLeg | Decide | Complete | ClaimId

AnyCommand: TypeAlias = (Command | Batch | ExpireHolds | SetSlots | ProtocolCommand | SetFeedOffset
                         | CompactFeed)


@dataclass(init=False, slots=True, unsafe_hash=True)
class Request:
    """One client request inside a Raft entry; ``timestamp_ns`` was assigned by the shard leader."""

    timestamp_ns: Final[int]
    command: Final[AnyCommand]

    def __init__(self, timestamp_ns: int, command: AnyCommand) -> None:
        self.timestamp_ns = timestamp_ns
        self.command = command
