"""Shape checks that need no stored state: ids, currencies, amounts, limits, metadata, and that no
account is on both sides of a transaction.

Each check returns None when the command is well formed, or the rejection code and details. The HTTP
layer runs the same checks at the edge; the state machine runs them again because the log, not the edge,
is the authority.

A rule added after entries were written must not change how those entries apply: every Raft entry
records the version of the rules its leader proposed it under (its first byte, ``codec``), and a
check added in version ``v`` applies only to entries of version ``v`` and later. So a replica that
replays or catches up on an old log reaches exactly the state the log's first appliers reached.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgpack

from .codes import ResultCode
from .commands import (
    DECIDE_KINDS,
    AccountFlag,
    ClaimId,
    Command,
    CreateAccount,
    CreateTransaction,
    Decide,
    Direction,
    EntrySpec,
    PostPending,
    PrepareLeg,
    ReverseTransaction,
    SetFeedOffset,
    VoidPending,
    amount_max,
    entries_per_transaction_max,
    entries_per_transaction_min,
    timeout_seconds_max,
)

RULES_VERSION: Final = 6  # the rules this code applies to the entries it proposes
RULES_SELF_TRANSFER: Final = 2  # from this version, an account may not be on both sides
# From this version a shard may hold slots (SetSlots) and refuse accounts of other slots. Older code
# would apply SetSlots as an invalid command and keep accepting every account: it must stop instead.
RULES_SLOTS: Final = 3
# From this version the change feed has durable consumers (SetFeedOffset), compaction (CompactFeed),
# and transaction events carry the balances their accounts had right after them. Older code would
# apply the two commands as invalid and write events without balances: it must stop instead.
RULES_FEED: Final = 4
# From this version each shard appends every transaction record it applies to a Merkle tree (merkle.py).
# Older code would apply the entry without the leaves: replicas would then disagree on the tree.
RULES_MERKLE: Final = 5
# From this version a coordinator finishes its own leg in the entry of its decision (FinishLeg with
# LEG_AS_DECIDED). Older code would stop on the unknown outcome: it must, rather than skip the leg.
RULES_LOCAL_FINISH: Final = 6
ID_RE: Final = re.compile(r"[A-Za-z0-9._:{}\-]{1,128}")
ACCOUNT_ID_RE: Final = re.compile(r"[A-Za-z0-9._:\-]*(\{[A-Za-z0-9._:\-]+\}[A-Za-z0-9._:\-]*)?")
CURRENCY_RE: Final = re.compile(r"[A-Z0-9]{3,12}")
CODE_RE: Final = re.compile(r"[A-Za-z0-9._:\-]{0,64}")
metadata_bytes_max: Final = 4096
metadata_depth_max: Final = 8
LIMITS_BOTH: Final = int(AccountFlag.debits_must_not_exceed_credits
                         | AccountFlag.credits_must_not_exceed_debits)
FLAGS_ALL: Final = LIMITS_BOTH | int(AccountFlag.closed | AccountFlag.history)

Problem = tuple[ResultCode, dict[str, Any]]


class Vocabulary:
    """Values already seen to match a pattern. Account ids, currencies and codes repeat from command
    to command, so most checks become a set lookup instead of a regex match."""

    def __init__(self, pattern: re.Pattern[str], size_max: int = 100_000) -> None:
        self.pattern = pattern
        self.size_max = size_max
        self.known: set[str] = set()

    def matches(self, value: str) -> bool:
        if value in self.known:
            return True
        if self.pattern.fullmatch(value) is None:
            return False
        if len(self.known) >= self.size_max:
            self.known.clear()
        self.known.add(value)
        return True


ACCOUNT_IDS: Final = Vocabulary(ACCOUNT_ID_RE)
CURRENCIES: Final = Vocabulary(CURRENCY_RE, 1000)
CODES: Final = Vocabulary(CODE_RE, 1000)


def valid_id(value: str) -> bool:
    return ID_RE.fullmatch(value) is not None


def valid_account_id(value: str) -> bool:
    """An account id may hold one non-empty hash tag ``{tag}``; routing hashes the tag alone."""
    return 0 < len(value) <= 128 and ACCOUNT_IDS.matches(value)


def valid_amount(value: object) -> bool:
    return type(value) is int and 0 < value <= amount_max


def _metadata_ok(value: Any, depth: int) -> bool:
    if depth > metadata_depth_max:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _metadata_ok(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_metadata_ok(v, depth + 1) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**64
    return value is None or isinstance(value, str | bool)


def metadata_problem(metadata: Any) -> Problem | None:
    """Metadata is a JSON object without floats, at most 8 levels deep and 4 KiB encoded."""
    if type(metadata) is dict and not metadata:
        return None
    if not isinstance(metadata, dict) or not _metadata_ok(metadata, 1):
        return ResultCode.invalid_metadata, {}
    if len(msgpack.packb(metadata)) > metadata_bytes_max:
        return ResultCode.invalid_metadata, {"bytes_max": metadata_bytes_max}
    return None


def _id_problem(value: str, field: str) -> Problem | None:
    if not valid_id(value):
        return ResultCode.invalid_id, {"field": field}
    return None


def account_problem(cmd: CreateAccount) -> Problem | None:
    if not valid_account_id(cmd.id):
        return ResultCode.invalid_id, {"field": "id"}
    if not CURRENCIES.matches(cmd.currency):
        return ResultCode.invalid_currency, {"field": "currency"}
    if cmd.flags & ~FLAGS_ALL or cmd.flags < 0:
        return ResultCode.invalid_command, {"field": "flags"}
    if cmd.flags & LIMITS_BOTH == LIMITS_BOTH:
        return ResultCode.flags_conflict, {}
    return metadata_problem(cmd.metadata)


def _entries_problem(cmd: CreateTransaction, rules: int) -> Problem | None:
    count = len(cmd.entries)
    if count < entries_per_transaction_min:
        return ResultCode.too_few_entries, {"count": count}
    if count > entries_per_transaction_max:
        return ResultCode.too_many_entries, {"count": count}
    problem = _entry_fields_problem(cmd.entries)
    if problem:
        return problem
    return _self_transfer_problem(cmd.entries) if rules >= RULES_SELF_TRANSFER else None


def _entry_fields_problem(entries: tuple[EntrySpec, ...]) -> Problem | None:
    for i, e in enumerate(entries):
        if not valid_account_id(e.account_id):
            return ResultCode.invalid_id, {"field": f"entries[{i}].account_id"}
        if not valid_amount(e.amount):
            return ResultCode.invalid_amount, {"field": f"entries[{i}].amount"}
        if not CURRENCIES.matches(e.currency):
            return ResultCode.invalid_currency, {"field": f"entries[{i}].currency"}
    return None


def _self_transfer_problem(entries: tuple[EntrySpec, ...]) -> Problem | None:
    """An account on both sides would move money to itself; twice on one side is fine. Names the
    first entry whose account is already on the other side."""
    if len(entries) == 2:  # the shorthand transfer: no sets to build
        first, second = entries
        if first.account_id != second.account_id or first.direction is second.direction:
            return None
        return _self_transfer(second.account_id, 1)
    if len({e.account_id for e in entries}) == len(entries):
        return None  # no account twice, the usual case: one set, no per-side bookkeeping
    sides: dict[str, Direction] = {}
    for i, e in enumerate(entries):
        side = sides.setdefault(e.account_id, e.direction)
        if side is not e.direction:
            return _self_transfer(e.account_id, i)
    return None


def _self_transfer(account_id: str, index: int) -> Problem:
    return ResultCode.accounts_must_be_different, {"account_id": account_id,
                                                   "field": f"entries[{index}].account_id"}


def transaction_problem(cmd: CreateTransaction, rules: int = RULES_VERSION) -> Problem | None:
    problem = _id_problem(cmd.id, "id") or _entries_problem(cmd, rules)
    if problem:
        return problem
    timeout = cmd.timeout_seconds
    if timeout < 0 or timeout > timeout_seconds_max or (timeout and not cmd.pending):
        return ResultCode.invalid_timeout, {"field": "timeout_seconds"}
    if not CODES.matches(cmd.code):
        return ResultCode.invalid_command, {"field": "code"}
    return metadata_problem(cmd.metadata)


def follow_up_problem(cmd: PostPending | VoidPending | ReverseTransaction) -> Problem | None:
    target = cmd.transaction_id if isinstance(cmd, ReverseTransaction) else cmd.pending_id
    problem = _id_problem(cmd.id, "id") or _id_problem(target, "target")
    if problem:
        return problem
    if isinstance(cmd, PostPending) and cmd.amount is not None and not valid_amount(cmd.amount):
        return ResultCode.invalid_amount, {"field": "amount"}
    return None


digest_bytes: Final = 32


def leg_problem(cmd: PrepareLeg) -> Problem | None:
    """A leg's shape: one to ``entries_per_transaction_max`` entries of well-formed accounts,
    amounts and currencies, and a digest (the client's command was checked whole by its node)."""
    problem = _id_problem(cmd.id, "id")
    if problem:
        return problem
    if len(cmd.digest) != digest_bytes or not 0 < len(cmd.entries) <= entries_per_transaction_max:
        return ResultCode.invalid_command, {"field": "entries"}
    return _entry_fields_problem(cmd.entries)


def decide_problem(cmd: Decide) -> Problem | None:
    if len(cmd.digest) != digest_bytes or cmd.kind not in DECIDE_KINDS:
        return ResultCode.invalid_command, {"field": "decision"}
    return _id_problem(cmd.id, "id") or (_id_problem(cmd.target, "target") if cmd.target else None)


def claim_problem(cmd: ClaimId) -> Problem | None:
    if len(cmd.digest) != digest_bytes or cmd.at < 0:
        return ResultCode.invalid_command, {"field": "claim"}
    return _id_problem(cmd.id, "id")


def feed_offset_problem(cmd: SetFeedOffset) -> Problem | None:
    """A consumer's name is shaped like an id; an offset is never negative."""
    if not valid_id(cmd.consumer):
        return ResultCode.invalid_id, {"field": "consumer"}
    if cmd.offset < 0:
        return ResultCode.invalid_command, {"field": "offset"}
    return None


def command_problem(cmd: Command, rules: int = RULES_VERSION) -> Problem | None:
    """The shape check of any command, under the rules of version ``rules``."""
    if isinstance(cmd, CreateTransaction):
        return transaction_problem(cmd, rules)
    if isinstance(cmd, CreateAccount):
        return account_problem(cmd)
    return follow_up_problem(cmd)
