"""Independent checks of a store against the ledger invariants (ARCHITECTURE.md, 1-4).

Used by tests after every step and by operators' verification tools: they recompute everything from
the entries alone and report each disagreement as a line of text (an empty list means all is well).
"""

from __future__ import annotations

from . import hashing
from .codec import DIRECTION_BYTE
from .commands import AccountFlag
from .layout import ENTRY_STATUS_BYTE, AccountRow, entry_key
from .ledger import Move, apply_totals
from .records import Account
from .store import Reader, statement_page_limit_max

Totals = tuple[int, int, int, int]


def _totals(a: Account | AccountRow) -> Totals:
    return a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending


def verify_account(reader: Reader, account_id: str) -> list[str]:
    """Balances equal the fold of entries, seqs are dense, the hash chain verifies, flags hold."""
    acct = reader.account(account_id)
    if acct is None:
        return [f"{account_id}: missing"]
    problems: list[str] = []
    fold = AccountRow(acct.id, acct.num, 0, 0, acct.flags, acct.normal, acct.currency,
                      0, 0, 0, 0, hashing.genesis(acct.id), b"")
    after = 0
    while True:
        page, nxt = reader.entries(account_id, after_seq=after, limit=statement_page_limit_max)
        for e in page:
            if e.seq != fold.seq + 1:
                problems.append(f"{account_id}: seq gap before {e.seq}")
            fold.seq = e.seq
            apply_totals(fold, Move(acct.id, e.direction, e.amount, e.currency, e.status, e.released))
            data = hashing.entry_bytes(acct.id, e.seq, e.transaction_id, DIRECTION_BYTE[e.direction],
                                       e.amount, e.currency, ENTRY_STATUS_BYTE[e.status],
                                       e.balance_after, e.timestamp, e.released)
            if e.prev_hash != fold.head or hashing.chain(fold.head, data) != e.hash:
                problems.append(f"{account_id}: chain breaks at seq {e.seq}")
            fold.head = e.hash
            if e.balance_after != fold.balance:
                problems.append(f"{account_id}: balance_after wrong at seq {e.seq}")
            if e.totals is not None and e.totals != _totals(fold):
                problems.append(f"{account_id}: history totals wrong at seq {e.seq}")
        if nxt is None:
            break
        after = nxt
    if fold.seq != acct.seq or fold.head != acct.head:
        problems.append(f"{account_id}: head/seq {acct.seq} disagree with entries ({fold.seq})")
    if reader.txn.get(entry_key(acct.num, acct.seq + 1), db=reader.dbs.entries) is not None:
        problems.append(f"{account_id}: entries beyond seq {acct.seq}")
    if _totals(fold) != _totals(acct):
        problems.append(f"{account_id}: totals {_totals(acct)} != fold {_totals(fold)}")
    problems.extend(_flag_problems(acct))
    return problems


def _flag_problems(acct: Account) -> list[str]:
    if min(_totals(acct)) < 0:
        return [f"{acct.id}: negative total"]
    if (acct.flags & AccountFlag.debits_must_not_exceed_credits
            and acct.debits_posted + acct.debits_pending > acct.credits_posted):
        return [f"{acct.id}: debits exceed credits"]
    if (acct.flags & AccountFlag.credits_must_not_exceed_debits
            and acct.credits_posted + acct.credits_pending > acct.debits_posted):
        return [f"{acct.id}: credits exceed debits"]
    return []


def currency_totals(reader: Reader) -> dict[str, Totals]:
    """Per currency, the sum over all accounts of (debits_posted, credits_posted, d_pending, c_pending)."""
    sums: dict[str, list[int]] = {}
    for account_id in reader.account_ids():
        acct = reader.account(account_id)
        assert acct is not None
        acc = sums.setdefault(acct.currency, [0, 0, 0, 0])
        for i, value in enumerate(_totals(acct)):
            acc[i] += value
    return {c: (v[0], v[1], v[2], v[3]) for c, v in sums.items()}


def verify_store(reader: Reader) -> list[str]:
    """Every account verifies and, per currency, debits equal credits (posted and pending)."""
    problems: list[str] = []
    for account_id in reader.account_ids():
        problems.extend(verify_account(reader, account_id))
    for currency, (dp, cp, dpe, cpe) in currency_totals(reader).items():
        if dp != cp or dpe != cpe:
            problems.append(f"{currency}: debits {dp}/{dpe} != credits {cp}/{cpe}")
    return problems
