"""Checkers over a recorded history (``History.to_json()["ops"]``) and the ledger's final state.

Each returns a ``Verdict``: ``ok``, ``anomaly`` (with the evidence) or ``unknown`` (the check could
not decide, e.g. the linearizability search ran out of time). They share no code with the ledger
they judge: balances and entry counts are re-derived here in a few lines.

1. ``check_transactions``: every acknowledged transfer is present exactly once on each of its two
   accounts, nothing that surely failed is present, an indeterminate one is present on both accounts
   or on neither, no transaction appears that nobody sent, and no id got two different outcomes.
2. ``check_reads``: every successful linearizable read shows no overdraft and no more money than
   exists, and is not older than a write acknowledged before it was sent; a read of every account
   at one consistent cut sees the per-currency totals conserved (the legs in flight settled as
   their home decided); every min_token read sees the entry of the write whose token it carried;
   at the end the totals are conserved.
3. ``check_linearizable``: per account, the transfers and linearizable balance reads admit a
   sequential order, consistent with real time, of a balance register (Wing & Gong's search with
   memoisation, as Porcupine does), within a search-time bound.
4. ``check_final_state``: replicas converged, ``verify`` found nothing, no hold left pending.
5. ``check_feed``: the subscriber got every event the feed holds, once after de-duplication by id,
   in order per shard, and every acknowledged transfer has its event.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

OK, ANOMALY, UNKNOWN = "ok", "anomaly", "unknown"
evidence_max = 20  # problems kept per checker
linearizability_budget_s = 30.0  # total search time, over every account


@dataclass
class Verdict:
    name: str
    verdict: str
    problems: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _verdict(name: str, problems: list[str], unknown: bool = False, **stats: Any) -> Verdict:
    kind = ANOMALY if problems else UNKNOWN if unknown else OK
    return Verdict(name, kind, problems[:evidence_max], {"problems": len(problems), **stats})


def transfers(ops: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Transaction id -> every attempt of it (a retry storm sends one id several times)."""
    out: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for op in ops:
        if op["type"] == "transfer":
            out[op["fields"]["txid"]].append(op)
    return out


def refused(op: Mapping[str, Any]) -> bool:
    """A refusal that speaks for the transaction id (a rule, 422; an id conflict, 409): any attempt
    of that id gets it again. Other definite failures (401, 429, overloaded) only say that this
    attempt did nothing."""
    return op["outcome"] == "fail" and op["fields"].get("status") in (409, 422)


def _fate(attempts: Sequence[Mapping[str, Any]]) -> str:
    """``ok``: acknowledged; ``fail``: refused, or no attempt did anything; else ``info``."""
    if any(a["outcome"] == "ok" for a in attempts):
        return "ok"
    if any(refused(a) for a in attempts) or all(a["outcome"] == "fail" for a in attempts):
        return "fail"
    return "info"


# -- 1 ----------------------------------------------------------------------------------------------
def check_transactions(ops: Sequence[Mapping[str, Any]],
                       entries: Mapping[str, Sequence[Mapping[str, Any]]],
                       setup_ids: Iterable[str] = ()) -> Verdict:
    """``entries``: account -> its final statement (each entry's ``transaction_id`` and ``status``).
    A cross-shard leg writes a hold (``pending``) and then its end (``posted`` or ``voided``): only
    ``posted`` entries move the balance, so those are what is counted."""
    sent = transfers(ops)
    counts: dict[tuple[str, str], int] = Counter(
        (account, e["transaction_id"]) for account, rows in entries.items() for e in rows
        if e["status"] == "posted")
    problems: list[str] = []
    known = set(sent) | set(setup_ids)
    for (account, txid), _n in sorted(counts.items()):
        if txid not in known:
            problems.append(f"{txid} on {account}: nobody sent it")
    fates = Counter()
    for txid, attempts in sorted(sent.items()):
        fate = _fate(attempts)
        fates[fate] += 1
        first = attempts[0]["fields"]
        on_debit, on_credit = counts[(first["debit"], txid)], counts[(first["credit"], txid)]
        rule_codes = {a["code"] for a in attempts if refused(a)}
        if fate == "ok" and rule_codes:
            problems.append(f"{txid}: acknowledged and also refused ({sorted(rule_codes)})")
        if fate == "ok" and (on_debit, on_credit) != (1, 1):
            what = "lost" if 0 in (on_debit, on_credit) else "duplicated"
            problems.append(f"{txid}: acknowledged but {what} (debit x{on_debit}, credit x{on_credit})")
        elif fate == "fail" and (on_debit or on_credit):
            codes = sorted({a["code"] for a in attempts})
            problems.append(f"{txid}: refused or never carried out ({codes}) but present "
                            f"(debit x{on_debit}, credit x{on_credit})")
        elif fate == "info" and (on_debit, on_credit) not in ((0, 0), (1, 1)):
            problems.append(f"{txid}: indeterminate and half or twice applied "
                            f"(debit x{on_debit}, credit x{on_credit})")
    return _verdict("transactions", problems, transactions=dict(fates))


# -- 2 ----------------------------------------------------------------------------------------------
def readings(op: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(account, value) of each account a successful read saw: one, or every bank account (a read
    at one consistent cut of the shards records ``values``)."""
    f = op["fields"]
    if "values" in f:
        return sorted(f["values"].items())
    return [(f["account"], f["value"])]


def check_reads(ops: Sequence[Mapping[str, Any]], funded: Mapping[str, int],
                final_balances: Mapping[str, int] | None = None) -> Verdict:
    """``funded``: currency -> the money among the bank's accounts (credit-normal, so the sum of
    their balances); ``final_balances``: each account's balance at the end (their sum must be it)."""
    problems: list[str] = []
    acked_seq = _acknowledged_seqs(ops)
    checked = Counter()
    for op in ops:
        if op["type"] != "read" or op["outcome"] != "ok":
            continue
        f = op["fields"]
        if f["consistency"] == "linearizable":
            checked["linearizable"] += 1
            for account, value in readings(op):
                problems += _linearizable_read_problems(op, account, value, funded,
                                                        acked_seq.get(account, []))
            if "values" in f:
                checked["conservation"] += 1
                problems += _conservation_problems(op, funded)
        elif f["consistency"] == "min_token":
            checked["min_token"] += 1
            value, account = f["value"], f["account"]
            if value["seq"] < f["min_seq"]:
                problems.append(f"op {op['index']}: min_token read of {account} at seq {value['seq']}"
                                f" misses its write at seq {f['min_seq']}")
    total = sum(funded.values())
    if final_balances is not None and sum(final_balances.values()) != total:
        problems.append(f"totals not conserved: the accounts hold {sum(final_balances.values())}, "
                        f"{total} was funded")
    return _verdict("reads", problems, reads=dict(checked))


def _conservation_problems(op: Mapping[str, Any], funded: Mapping[str, int]) -> list[str]:
    """Per currency, the balances of a read of every account at one consistent cut, with each leg
    in flight moved where its home decided (posted: its amount on its side; voided: nothing), add
    up to what was funded."""
    f = op["fields"]
    held: Counter[str] = Counter()
    for _account, value in readings(op):
        held[value["currency"]] += value["balance"]
    moving: Counter[str] = Counter()
    for leg in f.get("in_flight", []):
        if leg["outcome"] == "post":
            moving[leg["currency"]] += leg["amount"] if leg["side"] == "credit" else -leg["amount"]
    problems = []
    for currency in sorted(set(funded) | set(held)):
        settled = held[currency] + moving[currency]
        if settled != funded.get(currency, 0):
            problems.append(f"op {op['index']}: totals not conserved at the cut {f.get('cut')}: the "
                            f"accounts hold {held[currency]} {currency}, {moving[currency]:+} in flight, "
                            f"{funded.get(currency, 0)} was funded")
    return problems


def _acknowledged_seqs(ops: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, int, str]]]:
    """Account -> (complete time, seq, txid) of every acknowledged transfer's entry on it."""
    out: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for op in ops:
        if op["type"] == "transfer" and op["outcome"] == "ok":
            for account, seq in (op["fields"].get("seqs") or {}).items():
                out[account].append((op["complete"], seq, op["fields"]["txid"]))
    return out


def _linearizable_read_problems(op: Mapping[str, Any], account: str, value: Mapping[str, Any],
                                funded: Mapping[str, int],
                                acked: Sequence[tuple[float, int, str]]) -> list[str]:
    problems = []
    total = funded.get(value["currency"], 0)
    if value["available"] < 0 or value["balance"] < 0:
        problems.append(f"op {op['index']}: overdraft on {account}: {value}")
    if value["balance"] > total:
        problems.append(f"op {op['index']}: {account} holds {value['balance']}, more than the "
                        f"{total} that exists")
    before = [a for a in acked if a[0] < op["invoke"]]
    if before:
        done, seq, txid = max(before, key=lambda a: a[1])
        if value["seq"] < seq:
            problems.append(f"op {op['index']}: stale linearizable read of {account}: seq "
                            f"{value['seq']}, but {txid} (seq {seq}) was acknowledged at {done:.3f}s, "
                            f"before the read began at {op['invoke']:.3f}s")
    return problems


# -- 3 ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegisterOp:
    """One operation on an account's balance: a transfer adds ``delta``; a read observes ``value``.
    ``optional``: indeterminate, it may never have taken effect (it completes at infinity)."""

    index: int
    invoke: float
    complete: float
    delta: int = 0
    value: int | None = None
    optional: bool = False


def account_histories(ops: Sequence[Mapping[str, Any]]) -> dict[str, list[RegisterOp]]:
    """Per account: acknowledged and indeterminate transfers, and successful linearizable reads.
    Refused transfers had no effect and are left out."""
    out: dict[str, list[RegisterOp]] = defaultdict(list)
    for op in ops:
        f = op["fields"]
        if op["type"] == "transfer" and op["outcome"] in ("ok", "info"):
            optional = op["outcome"] == "info"
            complete = math.inf if optional else op["complete"]
            out[f["debit"]].append(RegisterOp(op["index"], op["invoke"], complete, -f["amount"],
                                              optional=optional))
            out[f["credit"]].append(RegisterOp(op["index"], op["invoke"], complete, f["amount"],
                                               optional=optional))
        elif (op["type"] == "read" and op["outcome"] == "ok"
              and f["consistency"] == "linearizable"):
            for account, value in readings(op):
                out[account].append(RegisterOp(op["index"], op["invoke"], op["complete"],
                                               value=value["balance"]))
    return out


def linearizable(history: Sequence[RegisterOp], initial: int, deadline: float) -> bool | None:
    """Whether the history of one balance register is linearizable; None when the search passed
    ``deadline`` (time.monotonic()) before deciding. A transfer id sent several times is one
    operation (``_one_op_per_transfer``)."""
    ops = sorted(history, key=lambda o: o.invoke)
    required = frozenset(i for i, o in enumerate(ops) if not o.optional)
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[int, int]] = [(0, initial)]  # (mask of linearized ops, balance)
    steps = 0
    while stack:
        mask, balance = stack.pop()
        if all(mask >> i & 1 for i in required):
            return True
        steps += 1
        if steps % 1024 == 0 and time.monotonic() > deadline:
            return None
        horizon = min(ops[i].complete for i in required if not mask >> i & 1)
        for i, o in enumerate(ops):
            if o.invoke > horizon:
                break
            if mask >> i & 1:
                continue
            if o.value is not None and o.value != balance:
                continue
            state = (mask | 1 << i, balance + o.delta)
            if state not in seen:
                seen.add(state)
                stack.append(state)
    return False


def check_linearizable(ops: Sequence[Mapping[str, Any]], initial: Mapping[str, int],
                       budget_s: float = linearizability_budget_s,
                       statements: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> Verdict:
    """``initial``: each account's balance before the run's first operation. With ``statements``
    (account -> its final entries), each account is judged by ``witness_problems`` (the order the
    ledger claims, checked); without, by the search, which a history with many indeterminate
    operations can exhaust."""
    if statements is not None:
        merged = _one_op_per_transfer(ops)
        problems = [p for account, rows in sorted(statements.items())
                    for p in witness_problems(account, rows, merged)]
        return _verdict("linearizable", problems, accounts=len(statements), method="witness")
    by_account = account_histories(_one_op_per_transfer(ops))
    problems: list[str] = []
    undecided: list[str] = []
    deadline = time.monotonic() + budget_s
    for account, history in sorted(by_account.items()):
        result = linearizable(history, initial.get(account, 0), deadline)
        if result is None:
            undecided.append(account)
        elif not result:
            problems.append(f"{account}: no linearization of its {len(history)} operations "
                            f"(ops {[o.index for o in history][:30]})")
    stats = {"accounts": len(by_account), "undecided": undecided, "method": "search"}
    return _verdict("linearizable", problems, unknown=bool(undecided), **stats)


def witness_problems(account: str, statement: Sequence[Mapping[str, Any]],
                     ops: Sequence[Mapping[str, Any]]) -> list[str]:
    """The account's statement is the ledger's claim of a sequential order: each posted entry a
    transfer's effect at its ``seq``, each linearizable read seeing the state after its ``seq``.
    Checked here: the balance re-folded from the entries (a credit-normal account) matches every
    entry and every read, each transfer's entry matches what was sent, and the order respects real
    time (an operation that completed before another began comes first). When all hold, the
    statement is a linearization of the account's history."""
    problems: list[str] = []
    balance, value_at, posted = 0, {}, {}
    for entry in sorted(statement, key=lambda e: e["seq"]):
        if entry["status"] == "posted":
            balance += entry["amount"] if entry["direction"] == "credit" else -entry["amount"]
            posted[entry["transaction_id"]] = entry
            if entry["balance_after"] != balance:
                problems.append(f"{account}: entry {entry['seq']} says balance {entry['balance_after']},"
                                f" its entries fold to {balance}")
        value_at[entry["seq"]] = balance
    points: list[tuple[float, float, float, int]] = []  # (invoke, complete, point, op index)
    for op in ops:
        f = op["fields"]
        if op["type"] == "transfer" and account in (f["debit"], f["credit"]) and f["txid"] in posted:
            entry = posted[f["txid"]]
            side = "debit" if account == f["debit"] else "credit"
            if (entry["direction"], entry["amount"]) != (side, f["amount"]):
                problems.append(f"{account}: {f['txid']} sent as {side} {f['amount']}, entry says "
                                f"{entry['direction']} {entry['amount']}")
            complete = op["complete"] if op["outcome"] == "ok" else math.inf
            points.append((op["invoke"], complete, float(entry["seq"]), op["index"]))
        elif op["type"] == "read" and op["outcome"] == "ok" and f["consistency"] == "linearizable":
            value = dict(readings(op)).get(account)
            if value is None:
                continue
            seq, seen = value["seq"], value["balance"]
            if value_at.get(seq) != seen:
                problems.append(f"{account}: op {op['index']} read balance {seen} at seq {seq}; "
                                f"the statement says {value_at.get(seq)}")
            points.append((op["invoke"], op["complete"], seq + 0.5, op["index"]))
    return problems + _real_time_problems(account, points)


def _real_time_problems(account: str, points: list[tuple[float, float, float, int]]) -> list[str]:
    """Every operation that completed before another was invoked has a point no later than it."""
    by_complete = sorted(points, key=lambda p: p[1])
    done, latest = 0, None
    problems = []
    for invoke, _complete, point, index in sorted(points):
        while done < len(by_complete) and by_complete[done][1] < invoke:
            if latest is None or by_complete[done][2] > latest[2]:
                latest = by_complete[done]
            done += 1
        if latest is not None and latest[2] > point:
            problems.append(f"{account}: op {latest[3]} (at {latest[2]}) completed at {latest[1]:.3f}s,"
                            f" before op {index} (at {point}) began at {invoke:.3f}s, yet comes after it")
    return problems


def _one_op_per_transfer(ops: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Every attempt of a transaction id folded into one operation: invoked at the first attempt's
    invoke, acknowledged at the first ``ok`` (else indeterminate; a surely refused one is dropped)."""
    out: list[Mapping[str, Any]] = [op for op in ops if op["type"] != "transfer"]
    for _txid, attempts in transfers(ops).items():
        fate = _fate(attempts)
        if fate == "fail":
            continue
        first = min(attempts, key=lambda a: a["invoke"])
        acks = [a["complete"] for a in attempts if a["outcome"] == "ok"]
        out.append({**first, "outcome": fate, "complete": min(acks) if acks else None})
    return out


# -- 4 ----------------------------------------------------------------------------------------------
def check_final_state(converged: Mapping[int, str | None], verify_problems: Sequence[str],
                      pending: Mapping[str, Mapping[str, int]]) -> Verdict:
    """``converged``: shard -> None when its replicas agree, else what differs; ``pending``: accounts
    still holding pending amounts at the end."""
    problems = [f"shard {s}: {why}" for s, why in sorted(converged.items()) if why]
    problems += [f"verify: {p}" for p in verify_problems]
    problems += [f"{account}: hold left pending {held}" for account, held in sorted(pending.items())]
    return _verdict("final_state", problems, shards=len(converged))


# -- 5 ----------------------------------------------------------------------------------------------
def check_feed(received: Sequence[Mapping[str, Any]], held: Mapping[int, Sequence[Mapping[str, Any]]],
               ops: Sequence[Mapping[str, Any]] = ()) -> Verdict:
    """``received``: the subscriber's events in arrival order (``shard``, ``offset``, ``type``,
    ``txid``); ``held``: shard -> every event the feed holds at the end (read again from the start)."""
    problems: list[str] = []
    taken: dict[int, list[int]] = defaultdict(list)
    delivered: set[str] = set()
    duplicates = 0
    for event in received:
        key = f"{event['shard']}:{event['offset']}"
        if key in delivered:
            duplicates += 1
            continue
        delivered.add(key)
        offsets = taken[event["shard"]]
        if offsets and event["offset"] < offsets[-1]:
            problems.append(f"shard {event['shard']}: offset {event['offset']} after {offsets[-1]}")
        offsets.append(event["offset"])
    for shard, events in sorted(held.items()):
        missing = [e["offset"] for e in events if f"{shard}:{e['offset']}" not in delivered]
        if missing:
            problems.append(f"shard {shard}: {len(missing)} events never delivered "
                            f"(offsets {missing[:10]})")
    in_feed = {e.get("txid") for events in held.values() for e in events}
    for txid, attempts in sorted(transfers(ops).items()):
        if _fate(attempts) == "ok" and txid not in in_feed:
            problems.append(f"{txid}: acknowledged but no event in the feed")
    return _verdict("feed", problems, delivered=len(delivered), duplicates_dropped=duplicates)
