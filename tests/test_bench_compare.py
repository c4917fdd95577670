"""bench/compare.py end to end: a real cluster, a real PostgreSQL and wrk, a second per workload.

Needs PostgreSQL and wrk installed (Debian: apt-get install -y postgresql wrk; .ci/run does it);
without them these tests fail, they do not skip.
"""

from __future__ import annotations

import asyncio
import shutil

import asyncpg
import pytest
from raftledger.bench import compare, pg_ledger
from raftledger.statemachine import hashing

TINY = ["--rounds", "1", "--duration", "1", "--warmup", "0", "--threads", "3",
        "--connections", "6", "--batch-connections", "3", "--groups", "16",
        "--pg-workers", "1", "--pg-pool", "2", "--workloads", "single,batch,cross,untagged"]
WORKLOADS = ["single", "batch of 100", "cross-shard", "untagged ids"]
CHAIN_ACCOUNT = "a1:{g3}"


def require_tools() -> None:
    assert shutil.which("wrk"), "wrk is not installed: apt-get install -y wrk (as .ci/run does)"
    try:
        compare.postgres_bindir()
    except SystemExit as exc:
        pytest.fail(str(exc))


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """The rows of the Markdown table whose header starts with ``first_cell``."""
    rows: list[list[str]] = []
    inside = False
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| " + first_cell + " |"):
            inside = True
        elif inside and line.startswith("|") and not set(cells[0]) <= set("-:"):
            rows.append(cells)
        elif inside and not line.startswith("|"):
            break
    return rows


async def ledger_facts(dsn: str) -> dict:
    """Re-derived with its own queries: per-currency sums, and every account against its entries."""
    conn = await asyncpg.connect(dsn)
    try:
        sums = {r["currency"]: (r["balances"], r["debits"], r["credits"]) for r in await conn.fetch(
            "SELECT currency, sum(CASE normal WHEN 'debit' THEN debits_posted - credits_posted "
            "ELSE credits_posted - debits_posted END) AS balances, sum(debits_posted) AS debits, "
            "sum(credits_posted) AS credits FROM accounts GROUP BY currency")}
        unfolded = await conn.fetchval(
            "SELECT count(*) FROM accounts a LEFT JOIN (SELECT account_id, count(*) AS n, "
            "sum(amount) FILTER (WHERE direction = 'debit') AS d, "
            "sum(amount) FILTER (WHERE direction = 'credit') AS c FROM entries GROUP BY account_id) e "
            "ON e.account_id = a.id WHERE a.seq <> coalesce(e.n, 0) "
            "OR a.debits_posted <> coalesce(e.d, 0) OR a.credits_posted <> coalesce(e.c, 0)")
        posted = await conn.fetchval("SELECT count(*) FROM transactions WHERE code = ''")
        chain = await conn.fetch(
            "SELECT e.*, t.created_ns AS ts FROM entries e JOIN transactions t "
            "ON t.id = e.transaction_id WHERE e.account_id = $1 ORDER BY e.seq", CHAIN_ACCOUNT)
        return {"sums": sums, "unfolded": unfolded, "posted": posted, "chain": chain}
    finally:
        await conn.close()


def verify_chain(account_id: str, entries: list) -> None:
    """The PostgreSQL ledger's hash chain follows statemachine/hashing.py's byte layout."""
    head = hashing.genesis(account_id)
    assert entries
    for e in entries:
        data = hashing.entry_bytes(account_id, e["seq"], e["transaction_id"],
                                   0 if e["direction"] == "debit" else 1, e["amount"], e["currency"],
                                   1, e["balance_after"], e["ts"], 0)
        head = hashing.chain(head, data)
        assert head == bytes(e["hash"]), (account_id, e["seq"])


@pytest.mark.slow
def test_compare_drives_both_systems_without_errors_and_postgres_conserves_money(capsys):
    require_tools()
    facts: dict[str, dict] = {}

    def inspect(phase: str, systems: compare.Systems) -> None:
        facts[phase] = asyncio.run(ledger_facts(systems.pg.dsn))

    status = compare.main(TINY, inspect=inspect)
    out = capsys.readouterr().out
    assert status == 0, out

    runs = table_rows(out, "round")
    assert {(r[1], r[2]) for r in runs} == {(w, s) for w in WORKLOADS
                                            for s in ("raftledger", "PostgreSQL")}, out
    for _, workload, system, requests_s, transfers_s, p50, p99, errors, *_ in runs:
        assert float(transfers_s.replace(",", "")) > 0, (workload, system, out)
        assert float(requests_s.replace(",", "")) > 0 and 0 < float(p50) <= float(p99)
        assert errors == "0", (workload, system, out)
    ratios = table_rows(out, "workload")
    assert [r[0] for r in ratios] == WORKLOADS
    assert all(float(r[2]) > 0 for r in ratios), out
    assert "wrk --threads=3 --connections=6" in out and "machine:" in out
    work = {r[1]: [float(c) for c in r[2:]] for r in table_rows(out.split("work per transfer")[1], "round")}
    assert set(work) == set(WORKLOADS), out
    commands, entries, _, fsyncs = work["single"]
    assert 1.0 <= commands < 1.1 and 0 < entries <= commands and fsyncs > 0, out  # one command each
    assert work["cross-shard"][0] > 2 * commands, out  # prepare, decide with the local leg, finish

    funded, finished = facts["funded"], facts["finished"]
    balances = {phase: {c: sums[0] for c, sums in facts[phase]["sums"].items()}
                for phase in ("funded", "finished")}
    assert balances["finished"] == balances["funded"] == {"USD": 0}, "money appeared or vanished"
    (_, debits, credits), = finished["sums"].values()
    assert debits == credits > funded["sums"]["USD"][1]
    assert funded["unfolded"] == finished["unfolded"] == 0  # balances and seq fold the entries
    assert finished["posted"] > funded["posted"] == 16 * compare.per_group
    assert len(finished["chain"]) > len(funded["chain"]) == 1
    verify_chain(CHAIN_ACCOUNT, finished["chain"])


def test_postgres_ledger_refuses_malformed_transfers_before_the_database():
    good = {"id": "t1", "debit_account_id": "a", "credit_account_id": "b", "amount": 5,
            "currency": "USD"}
    assert pg_ledger.parse_transfer(dict(good, amount="5")).amount == 5
    cases = [(dict(good, amount=a), "invalid_amount") for a in (1.5, 0, True, 2**63, "-1", None)]
    cases += [(dict(good, currency="usd"), "invalid_currency"), (dict(good, id="a b"), "invalid_id"),
              ({k: v for k, v in good.items() if k != "id"}, "missing_id")]
    for bad, code in cases:
        with pytest.raises(pg_ledger.Invalid) as exc:
            pg_ledger.parse_transfer(bad)
        assert exc.value.code == code, bad
    with pytest.raises(pg_ledger.Invalid) as exc:
        pg_ledger.parse_transfer(good, header_id="t2")
    assert exc.value.code == "idempotency_key_mismatch"


def test_cross_shard_partners_live_on_another_shard():
    from raftledger.cluster.router import shard_for_account

    partners = compare.partner_groups(16, 3)
    for g, h in enumerate(partners):
        assert shard_for_account(f"a0:{{g{g}}}", 3) != shard_for_account(f"a0:{{g{h}}}", 3)
    with pytest.raises(SystemExit):
        compare.partner_groups(1, 3)
