"""In-process load against a shard service: the node runs it next to the leader it measures.

A node started with RAFTLEDGER_BENCH=1 serves ``/internal/v1/shards/{shard}/bench`` on its internal
listener (sealed with the cluster secret, never on the public port), which calls ``run_load`` on its
local replica, so the figures are replication + fsync + apply, not HTTP.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from raftledger.statemachine.commands import CreateAccount, CreateTransaction, Direction, EntrySpec

CURRENCY = "USD"
accounts_default = 1000
concurrency_max = 100_000
transfers_max = 10_000_000


def transfer(tx_id: str, debit: str, credit: str) -> CreateTransaction:
    return CreateTransaction(id=tx_id, entries=(EntrySpec(debit, Direction.debit, 1, CURRENCY),
                                                EntrySpec(credit, Direction.credit, 1, CURRENCY)))


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run_load(service: Any, *, transfers: int, concurrency: int, prefix: str,
                   accounts: int = accounts_default, tag: str = "") -> dict[str, Any]:
    """Create ``accounts`` accounts, then ``transfers`` two-entry transfers, ``concurrency`` in flight.
    Every id ends with ``tag`` (a ``{tag}`` whose slot the shard owns, on a shard that has slots)."""
    transfers, concurrency = min(transfers, transfers_max), min(concurrency, concurrency_max)
    ids = [f"{prefix}{i}{tag}" for i in range(accounts)]
    await asyncio.gather(*(service.submit(CreateAccount(id=a, currency=CURRENCY)) for a in ids))
    rng = random.Random(prefix)
    latencies: list[float] = []
    reasons: dict[str, int] = {}
    numbers = iter(range(transfers))
    entries_before = service.entries_proposed

    async def worker() -> None:
        """One of ``concurrency`` clients: each submits its next transfer when the last one answered."""
        for i in numbers:
            debit = rng.randrange(accounts)
            credit = (debit + 1 + rng.randrange(accounts - 1)) % accounts
            started = time.perf_counter()
            try:
                committed = await service.submit(transfer(f"{prefix}t{i}{tag}", ids[debit], ids[credit]))
                outcome = committed.outcome
                # A replay did no work: counting it would flatter the figures (a reused directory).
                reason = None if outcome.ok and not outcome.replayed else \
                    "replayed" if outcome.ok else outcome.code.name
            except Exception as exc:
                reason = type(exc).__name__
            if reason is None:
                latencies.append(time.perf_counter() - started)
            else:
                reasons[reason] = reasons.get(reason, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, transfers))))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"transfers": len(latencies), "failures": sum(reasons.values()), "elapsed_s": elapsed,
            "per_s": len(latencies) / elapsed if elapsed else 0.0,
            "p50_ms": percentile(latencies, 0.50) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "entries": service.entries_proposed - entries_before, "failure_reasons": reasons}
