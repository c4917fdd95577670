"""The wire form of commands: versioned msgpack, and the canonical payload hash behind idempotency.

A Raft entry payload is ``VERSION byte + msgpack([[timestamp_ns, command], ...])``. Each command is a
list whose first element is its type tag. Decoding is strict: a command of the wrong shape decodes to
``Invalid`` (and applies as ``invalid_command``) instead of raising, so one bad command cannot stop a
replica from applying the rest of the log.

The version byte is also the version of the ledger rules the entry was proposed under
(``validate.RULES_VERSION``): entries of every version in ``VERSIONS`` apply under their own rules, and
an entry of a version this code does not know raises ``UnknownVersion``, which stops the replica
(a newer leader's entry is never applied as something else).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from .commands import (
    AnyCommand,
    Batch,
    ClaimId,
    Command,
    CompactFeed,
    Complete,
    CreateAccount,
    CreateTransaction,
    Decide,
    Direction,
    EntrySpec,
    ExpireHolds,
    FinishLeg,
    PostPending,
    PrepareLeg,
    ProtocolCommand,
    Request,
    ReverseTransaction,
    SetFeedOffset,
    SetSlots,
    TxEntry,
    VoidPending,
)
from .validate import RULES_VERSION

VERSION: Final = RULES_VERSION  # written
VERSIONS: Final = (1, 2, 3, 4, 5, 6)  # read

TAG_CREATE_ACCOUNT: Final = 1
TAG_CREATE_TRANSACTION: Final = 2
TAG_POST_PENDING: Final = 3
TAG_VOID_PENDING: Final = 4
TAG_REVERSE: Final = 5
TAG_BATCH: Final = 6
TAG_EXPIRE_HOLDS: Final = 7  # standalone only: never inside a Batch
TAG_SET_SLOTS: Final = 8  # standalone only: never inside a Batch
# The steps of a cross-shard transaction (alone or in a Batch):
TAG_PREPARE_LEG: Final = 9
TAG_DECIDE: Final = 10
TAG_FINISH_LEG: Final = 11
TAG_COMPLETE: Final = 12
TAG_CLAIM_ID: Final = 13
# The change feed (standalone only: never inside a Batch):
TAG_SET_FEED_OFFSET: Final = 14
TAG_COMPACT_FEED: Final = 15

DIRECTIONS: Final = (Direction.debit, Direction.credit)
DIRECTION_BYTE: Final = {Direction.debit: 0, Direction.credit: 1}


class CodecError(ValueError):
    pass


class UnknownVersion(CodecError):
    """An entry written by newer code: applying it under older rules would diverge."""


@dataclass(frozen=True, slots=True)
class Invalid:
    """A command that did not decode; kept in place so results line up with requests."""

    reason: str


def _dir_byte(direction: Direction) -> int:
    return DIRECTION_BYTE[direction]


def command_to_wire(command: AnyCommand) -> list[Any]:
    if isinstance(command, CreateTransaction):
        entries = [[e.account_id, _dir_byte(e.direction), e.amount, e.currency]
                   for e in command.entries]
        return [TAG_CREATE_TRANSACTION, command.id, entries, command.pending,
                command.timeout_seconds, command.code, command.metadata]
    if isinstance(command, CreateAccount):
        return [TAG_CREATE_ACCOUNT, command.id, command.currency, _dir_byte(command.normal),
                command.flags, command.metadata]
    if isinstance(command, PostPending):
        return [TAG_POST_PENDING, command.id, command.pending_id, command.amount]
    if isinstance(command, VoidPending):
        return [TAG_VOID_PENDING, command.id, command.pending_id]
    if isinstance(command, ReverseTransaction):
        return [TAG_REVERSE, command.id, command.transaction_id]
    if isinstance(command, Batch):
        return [TAG_BATCH, command.atomic, [command_to_wire(c) for c in command.commands]]
    if isinstance(command, ExpireHolds):
        return [TAG_EXPIRE_HOLDS]
    if isinstance(command, SetSlots):
        return [TAG_SET_SLOTS, command.epoch, [[first, last] for first, last in command.ranges]]
    if isinstance(command, SetFeedOffset):
        return [TAG_SET_FEED_OFFSET, command.consumer, command.offset, command.remove]
    if isinstance(command, CompactFeed):
        return [TAG_COMPACT_FEED, command.through, command.age_min_ns]
    return _protocol_to_wire(command)


def _entry_specs_to_wire(entries: tuple[EntrySpec, ...]) -> list[Any]:
    return [[e.account_id, _dir_byte(e.direction), e.amount, e.currency] for e in entries]


def _protocol_to_wire(command: AnyCommand) -> list[Any]:
    if isinstance(command, PrepareLeg):
        return [TAG_PREPARE_LEG, command.id, command.coordinator, command.digest,
                _entry_specs_to_wire(command.entries), command.pending, command.code, command.metadata,
                list(command.shards)]
    if isinstance(command, FinishLeg):
        return [TAG_FINISH_LEG, command.id, command.digest, command.outcome, command.by, command.amount]
    if isinstance(command, Decide):
        entries = [[e.account_id, _dir_byte(e.direction), e.amount, e.currency, e.seq, e.hash]
                   for e in command.entries]
        return [TAG_DECIDE, command.id, command.digest, command.kind, command.outcome, command.details,
                entries, command.pending, command.timeout_seconds, command.code, command.metadata,
                list(command.shards), command.target, command.amount, command.local]
    if isinstance(command, Complete):
        return [TAG_COMPLETE, command.id]
    if isinstance(command, ClaimId):
        return [TAG_CLAIM_ID, command.id, command.digest, command.at]
    raise CodecError(f"not a command: {type(command).__name__}")


def _shards(value: Any) -> tuple[int, ...]:
    return tuple(_int(s, "shard") for s in _want(value, list, "shards"))


def _optional_int(value: Any, what: str) -> int | None:
    return None if value is None else _int(value, what)


def _leg_entry(raw: Any) -> TxEntry:
    if not isinstance(raw, list) or len(raw) != 6:
        raise CodecError("leg entry: wrong shape")
    spec = _entry(raw[:4])
    return TxEntry(spec.account_id, spec.direction, spec.amount, spec.currency, _int(raw[4], "seq"),
                    _want(raw[5], bytes, "hash"))


def _decode_protocol(w: list[Any]) -> ProtocolCommand:
    """A step of a cross-shard transaction (``w[0]`` is one of their tags)."""
    tag = w[0]
    if tag == TAG_PREPARE_LEG and len(w) == 9:
        entries = tuple(_entry(e) for e in _want(w[4], list, "entries"))
        return PrepareLeg(_want(w[1], str, "id"), _int(w[2], "coordinator"), _want(w[3], bytes, "digest"),
                          entries, _want(w[5], bool, "pending"), _want(w[6], str, "code"),
                          _want(w[7], dict, "metadata"), _shards(w[8]))
    if tag == TAG_FINISH_LEG and len(w) == 6:
        return FinishLeg(_want(w[1], str, "id"), _want(w[2], bytes, "digest"), _int(w[3], "outcome"),
                         _want(w[4], str, "by"), _optional_int(w[5], "amount"))
    if tag == TAG_DECIDE and len(w) == 15:
        return Decide(_want(w[1], str, "id"), _want(w[2], bytes, "digest"), _int(w[3], "kind"),
                      _int(w[4], "outcome"), _want(w[5], dict, "details"),
                      tuple(_leg_entry(e) for e in _want(w[6], list, "entries")),
                      _want(w[7], bool, "pending"), _int(w[8], "timeout_seconds"), _want(w[9], str, "code"),
                      _want(w[10], dict, "metadata"), _shards(w[11]), _want(w[12], str, "target"),
                      _optional_int(w[13], "amount"), _want(w[14], bool, "local"))
    if tag == TAG_COMPLETE and len(w) == 2:
        return Complete(_want(w[1], str, "id"))
    if tag == TAG_CLAIM_ID and len(w) == 4:
        return ClaimId(_want(w[1], str, "id"), _want(w[2], bytes, "digest"), _int(w[3], "at"))
    raise CodecError(f"unknown command tag {tag!r}")


def _want(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CodecError(f"{what}: wrong type")
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"{what}: not an integer")
    return value


def _direction(value: Any) -> Direction:
    if value not in (0, 1) or isinstance(value, bool):
        raise CodecError("direction must be 0 or 1")
    return DIRECTIONS[value]


def _entry(raw: Any) -> EntrySpec:
    if not isinstance(raw, list) or len(raw) != 4:
        raise CodecError("entry: wrong shape")
    account_id, direction, amount, currency = raw
    if not (type(account_id) is str and type(amount) is int and type(currency) is str
            and type(direction) is int and 0 <= direction <= 1):
        raise CodecError("entry: wrong field types")
    return EntrySpec(account_id, DIRECTIONS[direction], amount, currency)


def _decode_create_transaction(w: list[Any]) -> CreateTransaction:
    """The hot path of every apply: exact type checks spelled out (no generic ``_want``)."""
    ident, raw_entries, pending, timeout, code, metadata = w[1], w[2], w[3], w[4], w[5], w[6]
    if not (type(ident) is str and type(raw_entries) is list and type(pending) is bool
            and type(timeout) is int and type(code) is str and type(metadata) is dict):
        raise CodecError("transaction: wrong field types")
    entries = tuple([_entry(e) for e in raw_entries])
    return CreateTransaction(ident, entries, pending, timeout, code, metadata)


def _decode_one(w: Any) -> Command:
    if not isinstance(w, list) or not w:
        raise CodecError("command: wrong shape")
    tag = w[0]
    if tag == TAG_CREATE_TRANSACTION and len(w) == 7:
        return _decode_create_transaction(w)
    if tag == TAG_CREATE_ACCOUNT and len(w) == 6:
        return CreateAccount(_want(w[1], str, "id"), _want(w[2], str, "currency"),
                             _direction(w[3]), _int(w[4], "flags"), _want(w[5], dict, "metadata"))
    if tag == TAG_POST_PENDING and len(w) == 4:
        amount = None if w[3] is None else _int(w[3], "amount")
        return PostPending(_want(w[1], str, "id"), _want(w[2], str, "pending_id"), amount)
    if tag == TAG_VOID_PENDING and len(w) == 3:
        return VoidPending(_want(w[1], str, "id"), _want(w[2], str, "pending_id"))
    if tag == TAG_REVERSE and len(w) == 3:
        return ReverseTransaction(_want(w[1], str, "id"), _want(w[2], str, "transaction_id"))
    raise CodecError(f"unknown command tag {tag!r}")


def _range(raw: Any) -> tuple[int, int]:
    if not (type(raw) is list and len(raw) == 2 and type(raw[0]) is int and type(raw[1]) is int):
        raise CodecError("slot range: wrong shape")
    return raw[0], raw[1]


def _decode_set_slots(w: list[Any]) -> SetSlots:
    epoch = _int(w[1], "epoch")
    ranges = tuple([_range(r) for r in _want(w[2], list, "ranges")])
    return SetSlots(epoch, ranges)


def _decode_inner(w: Any) -> Command | ProtocolCommand:
    """What a Batch may hold: a client command or a step of a cross-shard transaction."""
    if isinstance(w, list) and w and type(w[0]) is int and TAG_PREPARE_LEG <= w[0] <= TAG_CLAIM_ID:
        return _decode_protocol(w)
    return _decode_one(w)


def command_from_wire(w: Any) -> AnyCommand | Invalid:
    """A command, a Batch of commands (client commands or steps of a cross-shard transaction),
    ExpireHolds, SetSlots, SetFeedOffset or CompactFeed; the last four are never inside a Batch."""
    try:
        if isinstance(w, list) and w:
            tag = w[0]
            if tag == TAG_BATCH and len(w) == 3:
                inner = tuple(_decode_inner(c) for c in _want(w[2], list, "commands"))
                return Batch(inner, _want(w[1], bool, "atomic"))
            if type(tag) is int and tag == TAG_EXPIRE_HOLDS and len(w) == 1:
                return ExpireHolds()
            if type(tag) is int and tag == TAG_SET_SLOTS and len(w) == 3:
                return _decode_set_slots(w)
            if type(tag) is int and tag == TAG_SET_FEED_OFFSET and len(w) == 4:
                return SetFeedOffset(_want(w[1], str, "consumer"), _int(w[2], "offset"),
                                     _want(w[3], bool, "remove"))
            if type(tag) is int and tag == TAG_COMPACT_FEED and len(w) == 3:
                return CompactFeed(_int(w[1], "through"), _int(w[2], "age_min_ns"))
        return _decode_inner(w)
    except CodecError as exc:
        return Invalid(str(exc))


def encode_command(command: AnyCommand) -> bytes:
    packed: bytes = msgpack.packb(command_to_wire(command))
    return bytes([VERSION]) + packed


def decode_command(data: bytes) -> AnyCommand | Invalid:
    if not data or data[0] not in VERSIONS:
        return Invalid("unknown codec version")
    try:
        wire = msgpack.unpackb(data[1:], strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        return Invalid(f"undecodable: {exc}")
    return command_from_wire(wire)


def encode_requests(requests: list[Request]) -> bytes:
    """One Raft entry: the requests a leader grouped together, each with its timestamp."""
    wire = [[r.timestamp_ns, command_to_wire(r.command)] for r in requests]
    packed: bytes = msgpack.packb(wire)
    return bytes([VERSION]) + packed


def entry_version(data: bytes) -> int:
    """The rules version of an entry; raises UnknownVersion for one this code cannot apply."""
    if not data or data[0] not in VERSIONS:
        raise UnknownVersion(f"entry version {data[0] if data else None} is not one of {VERSIONS}")
    return data[0]


def decode_requests(data: bytes) -> list[tuple[int, AnyCommand | Invalid]]:
    """Decode an entry; raises CodecError only if the entry as a whole is unreadable (UnknownVersion
    if it was written by newer code)."""
    entry_version(data)
    try:
        wire = msgpack.unpackb(data[1:], strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CodecError(f"undecodable entry: {exc}") from exc
    if not isinstance(wire, list):
        raise CodecError("entry: not a list")
    out: list[tuple[int, AnyCommand | Invalid]] = []
    for item in wire:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)):
            raise CodecError("entry: bad request")
        out.append((item[0], command_from_wire(item[1])))
    return out


def canonical(value: Any) -> Any:
    """The same value with every map's keys sorted, so equal payloads encode to equal bytes."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def payload_hash(command: Command, packb: Callable[[Any], bytes] = msgpack.packb) -> bytes:
    """Identity of a command's payload for idempotency: SHA-256 of its canonical wire form."""
    wire = command_to_wire(command)
    if isinstance(command, CreateTransaction | CreateAccount) and command.metadata:
        wire[-1] = canonical(wire[-1])
    return hashlib.sha256(packb(wire)).digest()
