"""The chaos checkers on hand-made histories: a valid one passes each, and each kind of anomaly is
caught by the checker meant for it."""

from __future__ import annotations

from typing import Any

from raftledger.cluster.chaos import checkers

A, B = "a:{g0}", "b:{g1}"
INITIAL = {A: 100, B: 100}
TOTAL = 200
FUNDED = {"USD": TOTAL}


def transfer(index: int, txid: str, invoke: float, complete: float | None, outcome: str,
             amount: int = 10, code: str | None = None, seqs: dict[str, int] | None = None,
             debit: str = A, credit: str = B) -> dict[str, Any]:
    return {"index": index, "process": "p", "type": "transfer", "invoke": invoke, "complete": complete,
            "outcome": outcome, "code": code,
            "fields": {"txid": txid, "debit": debit, "credit": credit, "amount": amount,
                       "seqs": seqs or {}, "status": 422 if code else None}}


def read(index: int, account: str, invoke: float, complete: float, balance: int, seq: int,
         consistency: str = "linearizable", min_seq: int | None = None,
         available: int | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"account": account, "consistency": consistency,
                              "value": {"balance": balance, "seq": seq,
                                        "available": balance if available is None else available,
                                        "debits_pending": 0, "credits_pending": 0, "currency": "USD"}}
    if min_seq is not None:
        fields["min_seq"] = min_seq
    return {"index": index, "process": "r", "type": "read", "invoke": invoke, "complete": complete,
            "outcome": "ok", "code": None, "fields": fields}


def valid_history() -> list[dict[str, Any]]:
    return [
        transfer(0, "t1", 0.0, 1.0, "ok", seqs={A: 2, B: 2}),
        read(1, A, 0.5, 0.7, 100, 1),           # concurrent with t1: before it
        read(2, B, 1.5, 1.6, 110, 2),           # after t1
        transfer(3, "t2", 2.0, 3.0, "info"),    # indeterminate, never applied
        transfer(4, "t3", 2.0, 2.5, "fail", amount=500, code="exceeds_credits"),
        read(5, A, 3.5, 3.6, 90, 2, consistency="min_token", min_seq=2),
        read(6, A, 4.0, 4.1, 90, 2),
    ]


def entries_of(*present: str) -> dict[str, list[dict[str, Any]]]:
    rows = [{"transaction_id": t, "status": "posted"} for t in ("fund", *present)]
    return {A: list(rows), B: list(rows)}


def test_valid_history_passes_every_checker() -> None:
    ops = valid_history()
    assert checkers.check_transactions(ops, entries_of("t1"), ["fund"]).verdict == "ok"
    assert checkers.check_reads(ops, FUNDED, {A: 90, B: 110}).verdict == "ok"
    assert checkers.check_linearizable(ops, INITIAL).verdict == "ok"
    held = {0: [{"offset": 1, "txid": "fund"}, {"offset": 2, "txid": "t1"}]}
    received = [{"shard": 0, "offset": 1}, {"shard": 0, "offset": 2}, {"shard": 0, "offset": 2}]
    verdict = checkers.check_feed(received, held, ops)
    assert verdict.verdict == "ok" and verdict.stats["duplicates_dropped"] == 1


def test_indeterminate_transfer_may_be_present_on_both_sides() -> None:
    ops = valid_history()
    assert checkers.check_transactions(ops, entries_of("t1", "t2"), ["fund"]).verdict == "ok"


def test_lost_acknowledged_transfer_is_caught() -> None:
    verdict = checkers.check_transactions(valid_history(), entries_of(), ["fund"])
    assert verdict.verdict == "anomaly" and "t1: acknowledged but lost" in verdict.problems[0]


def test_duplicated_transfer_is_caught() -> None:
    verdict = checkers.check_transactions(valid_history(), entries_of("t1", "t1"), ["fund"])
    assert verdict.verdict == "anomaly" and "duplicated" in verdict.problems[0]


def test_refused_transfer_present_is_caught() -> None:
    verdict = checkers.check_transactions(valid_history(), entries_of("t1", "t3"), ["fund"])
    assert verdict.verdict == "anomaly" and "t3: refused" in verdict.problems[0]
    assert verdict.problems[0].startswith("t3: refused or never carried out (['exceeds_credits'])")


def test_half_applied_indeterminate_transfer_is_caught() -> None:
    entries = entries_of("t1")
    entries[A].append({"transaction_id": "t2", "status": "posted"})
    verdict = checkers.check_transactions(valid_history(), entries, ["fund"])
    assert verdict.verdict == "anomaly" and "half" in verdict.problems[0]


def test_hold_then_void_of_a_refused_cross_shard_leg_is_no_effect() -> None:
    entries = entries_of("t1")
    entries[B] += [{"transaction_id": "t3", "status": "pending"},
                   {"transaction_id": "t3", "status": "voided"}]
    assert checkers.check_transactions(valid_history(), entries, ["fund"]).verdict == "ok"


def test_transaction_nobody_sent_is_caught() -> None:
    verdict = checkers.check_transactions(valid_history(), entries_of("t1", "ghost"), ["fund"])
    assert any("ghost" in p and "nobody sent it" in p for p in verdict.problems)


def test_attempt_refused_for_credentials_says_nothing_of_the_transaction() -> None:
    ops = [*valid_history(), transfer(7, "t1", 5.0, 5.1, "fail", code="unauthorized")]
    ops[-1]["fields"]["status"] = 401
    assert checkers.check_transactions(ops, entries_of("t1"), ["fund"]).verdict == "ok"


def test_one_id_acknowledged_and_refused_is_caught() -> None:
    ops = [*valid_history(), transfer(7, "t1", 5.0, 5.1, "fail", code="exceeds_credits")]
    verdict = checkers.check_transactions(ops, entries_of("t1"), ["fund"])
    assert any("acknowledged and also refused" in p for p in verdict.problems)


def test_stale_linearizable_read_is_caught() -> None:
    ops = [*valid_history(), read(7, A, 5.0, 5.1, 100, 1)]  # t1 (seq 2) was acknowledged at 1.0
    verdict = checkers.check_reads(ops, FUNDED)
    assert verdict.verdict == "anomaly" and "stale linearizable read" in verdict.problems[0]
    assert checkers.check_linearizable(ops, INITIAL).verdict == "anomaly"


def test_overdraft_and_money_from_nowhere_are_caught() -> None:
    ops = [read(0, A, 0.0, 0.1, 100, 1, available=-5), read(1, B, 0.0, 0.1, 300, 1)]
    problems = checkers.check_reads(ops, FUNDED).problems
    assert any("overdraft" in p for p in problems) and any("more than" in p for p in problems)


def read_at_cut(index: int, invoke: float, complete: float, balances: dict[str, tuple[int, int]],
                in_flight: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """A read of every account at one consistent cut: account -> (balance, seq)."""
    values = {a: {"balance": b, "available": b, "seq": seq, "debits_pending": 0, "credits_pending": 0,
                  "currency": "USD"} for a, (b, seq) in balances.items()}
    return {"index": index, "process": "r", "type": "read", "invoke": invoke, "complete": complete,
            "outcome": "ok", "code": None,
            "fields": {"consistency": "linearizable", "accounts": sorted(balances), "values": values,
                       "in_flight": list(in_flight), "cut": {"0": 7, "1": 9}}}


def leg(side: str, amount: int, outcome: str) -> dict[str, Any]:
    return {"txid": "t1", "shard": 0 if side == "debit" else 1, "status": "prepared", "currency": "USD",
            "side": side, "amount": amount, "outcome": outcome}


def test_reads_at_a_cut_with_money_in_flight_settled_as_decided_pass() -> None:
    ops = [transfer(0, "t1", 0.0, 1.0, "ok", seqs={A: 2, B: 2}),
           read_at_cut(1, 0.2, 0.3, {A: (100, 1), B: (100, 1)}),  # before t1 anywhere
           read_at_cut(2, 0.4, 0.5, {A: (90, 2), B: (100, 1)},
                       [leg("credit", 10, "post")]),  # the debit leg posted
           read_at_cut(3, 0.3, 0.5, {A: (100, 1), B: (100, 1)}, [leg("debit", 10, "void"),  # undecided
                                                       leg("credit", 10, "void")]),
           read_at_cut(4, 1.5, 1.6, {A: (90, 2), B: (110, 2)})]
    verdict = checkers.check_reads(ops, FUNDED)
    assert verdict.verdict == "ok", verdict.problems
    assert verdict.stats["reads"]["conservation"] == 4
    assert checkers.check_linearizable(ops, INITIAL).verdict == "ok"


def test_a_read_at_a_cut_whose_total_is_off_is_caught() -> None:
    ops = [transfer(0, "t1", 0.0, 1.0, "ok", seqs={A: 2, B: 2}),
           read_at_cut(1, 0.4, 0.5, {A: (90, 2), B: (100, 1)}),  # the credit leg in flight, not counted
           read_at_cut(2, 1.5, 1.6, {A: (90, 2), B: (110, 2)})]
    problems = checkers.check_reads(ops, FUNDED).problems
    assert len(problems) == 1 and "op 1: totals not conserved" in problems[0], problems


def test_a_leg_settled_the_wrong_way_is_caught() -> None:
    ops = [read_at_cut(0, 0.4, 0.5, {A: (90, 2), B: (100, 1)}, [leg("credit", 10, "void")])]
    assert "totals not conserved" in checkers.check_reads(ops, FUNDED).problems[0]


def test_a_stale_account_in_a_read_at_a_cut_is_caught() -> None:
    ops = [transfer(0, "t1", 0.0, 1.0, "ok", seqs={A: 2, B: 2}),
           read_at_cut(1, 1.5, 1.6, {A: (100, 1), B: (100, 1)})]  # conserved, but older than the ack of t1
    problems = checkers.check_reads(ops, FUNDED).problems
    assert any("stale linearizable read of a:{g0}" in p for p in problems), problems
    assert checkers.check_linearizable(ops, INITIAL).verdict == "anomaly"


def test_min_token_read_missing_its_write_is_caught() -> None:
    ops = [read(0, A, 0.0, 0.1, 100, 1, consistency="min_token", min_seq=2)]
    assert "misses its write" in checkers.check_reads(ops, FUNDED).problems[0]


def test_totals_not_conserved_are_caught() -> None:
    assert "not conserved" in checkers.check_reads([], FUNDED, {A: 90, B: 100}).problems[0]


def test_non_linearizable_account_history_is_caught() -> None:
    """Two reads after t1 completed, one of them still seeing the balance from before it, with no
    seq to give it away: only the linearizability search can tell."""
    ops = [transfer(0, "t1", 0.0, 1.0, "ok"),
           read(1, A, 1.5, 1.6, 90, 0), read(2, A, 2.0, 2.1, 100, 0)]
    verdict = checkers.check_linearizable(ops, INITIAL)
    assert verdict.verdict == "anomaly" and verdict.problems[0].startswith(A)


def test_concurrent_reads_may_straddle_a_transfer() -> None:
    ops = [transfer(0, "t1", 0.0, 3.0, "ok"),
           read(1, A, 0.5, 0.6, 90, 0), read(2, B, 1.0, 1.1, 100, 0), read(3, B, 2.0, 2.1, 110, 0)]
    assert checkers.check_linearizable(ops, INITIAL).verdict == "ok"


def test_retried_transfer_counts_once() -> None:
    ops = [transfer(0, "t1", 0.0, 1.0, "info"), transfer(1, "t1", 1.5, 2.0, "ok"),
           read(2, A, 2.5, 2.6, 90, 0)]
    assert checkers.check_linearizable(ops, INITIAL).verdict == "ok"


def test_search_out_of_time_says_unknown() -> None:
    ops = [transfer(i, f"t{i}", 0.0, 100.0, "ok", amount=1) for i in range(40)]
    ops.append(read(99, A, 0.0, 100.0, 55, 0))  # unreachable value: the search explores everything
    verdict = checkers.check_linearizable(ops, INITIAL, budget_s=0.05)
    assert verdict.verdict == "unknown" and verdict.stats["undecided"]


def test_missing_and_reordered_feed_events_are_caught() -> None:
    held = {0: [{"offset": 1, "txid": "x"}, {"offset": 2, "txid": "y"}, {"offset": 3, "txid": "z"}]}
    received = [{"shard": 0, "offset": 2}, {"shard": 0, "offset": 1}]
    problems = checkers.check_feed(received, held).problems
    assert any("offset 1 after 2" in p for p in problems)
    assert any("never delivered (offsets [3])" in p for p in problems)


def test_acknowledged_transfer_without_feed_event_is_caught() -> None:
    held = {0: [{"offset": 1, "txid": "fund"}]}
    verdict = checkers.check_feed([{"shard": 0, "offset": 1}], held, valid_history())
    assert "t1: acknowledged but no event in the feed" in verdict.problems


def test_final_state_reports_divergence_verify_and_pending() -> None:
    verdict = checkers.check_final_state({0: None, 1: "fingerprints differ"}, ["chain broken"],
                                         {A: {"debits_pending": 5}})
    assert verdict.verdict == "anomaly" and len(verdict.problems) == 3
    assert checkers.check_final_state({0: None}, [], {}).verdict == "ok"


def statement(*rows: tuple[int, str, str, int, int, str]) -> list[dict[str, Any]]:
    return [{"seq": seq, "transaction_id": txid, "direction": direction, "amount": amount,
             "balance_after": after, "status": status} for seq, txid, direction, amount, after, status
            in rows]


def statements_of_valid_history() -> dict[str, list[dict[str, Any]]]:
    return {A: statement((1, "fund", "credit", 100, 100, "posted"), (2, "t1", "debit", 10, 90, "posted")),
            B: statement((1, "fund", "credit", 100, 100, "posted"), (2, "t1", "credit", 10, 110, "posted"))}


def test_witness_accepts_the_ledgers_order_when_it_fits_real_time() -> None:
    verdict = checkers.check_linearizable(valid_history(), INITIAL,
                                          statements=statements_of_valid_history())
    assert verdict.verdict == "ok" and verdict.stats["method"] == "witness"


def test_witness_catches_a_read_of_a_value_the_statement_never_had() -> None:
    ops = [*valid_history(), read(7, A, 5.0, 5.1, 95, 2)]
    verdict = checkers.check_linearizable(ops, INITIAL, statements=statements_of_valid_history())
    assert verdict.verdict == "anomaly" and "read balance 95 at seq 2" in verdict.problems[0]


def test_witness_catches_an_order_against_real_time() -> None:
    """t1 completed before the read began, yet the read claims the state before t1's entry."""
    ops = [*valid_history(), read(7, A, 5.0, 5.1, 100, 1)]
    verdict = checkers.check_linearizable(ops, INITIAL, statements=statements_of_valid_history())
    assert verdict.verdict == "anomaly" and "yet comes after it" in verdict.problems[0]


def test_witness_catches_an_entry_that_does_not_fold() -> None:
    statements = statements_of_valid_history()
    statements[A][1]["balance_after"] = 91
    verdict = checkers.check_linearizable(valid_history(), INITIAL, statements=statements)
    assert "fold to 90" in verdict.problems[0]
