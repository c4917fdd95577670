"""Apply throughput of the state machine alone: one process, one core, LMDB on disk.

The workload is a realistic mix over 10,000 accounts: mostly two-entry transfers, with some holds that
are later posted (fully or partly) or voided. Payloads are encoded up front, as the leader would have
done; only ``LedgerStore.apply_entry`` is timed, one Raft entry per batch, with the garbage collector
set up as a node process sets it (``node.runtime.tune_gc``).

    python -m raftledger.bench.bench_statemachine [--accounts 10000] [--commands 200000] \
        [--batch-sizes 1,100,1000] [--sync] [--slots]

``--slots`` first gives the store every hash slot (``SetSlots``), as a node's shards always have:
each account of each command is then checked against the shard's slots.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time

from raftledger.node.runtime import tune_gc
from raftledger.statemachine.codec import encode_requests
from raftledger.statemachine.commands import (
    Batch,
    Command,
    CreateAccount,
    CreateTransaction,
    Direction,
    EntrySpec,
    PostPending,
    Request,
    SetSlots,
    VoidPending,
)
from raftledger.statemachine.store import LedgerStore

hold_share = 0.05
resolve_share = 0.05


def own_every_slot(store: LedgerStore) -> None:
    index = store.applied_index() + 1
    store.apply_entry(index, encode_requests([Request(time.time_ns(), SetSlots(1, ((0, 4095),)))]))


def open_accounts(store: LedgerStore, count: int) -> None:
    index = store.applied_index()
    accounts = [CreateAccount(f"acct:{i}", "BRL", Direction.credit if i % 2 else Direction.debit)
                for i in range(count)]
    for start in range(0, count, 1000):
        index += 1
        chunk = Batch(tuple(accounts[start:start + 1000]))
        store.apply_entry(index, encode_requests([Request(time.time_ns(), chunk)]))


def workload(count: int, accounts: int, seed: int) -> list[Command]:
    rng = random.Random(seed)
    holds: list[str] = []
    out: list[Command] = []
    for n in range(count):
        roll = rng.random()
        if roll < resolve_share and holds:
            hold = holds.pop(rng.randrange(len(holds)))
            out.append(PostPending(f"{hold}:post", hold, rng.choice([None, 1])) if rng.random() < 0.7
                       else VoidPending(f"{hold}:void", hold))
            continue
        a, b = rng.sample(range(accounts), 2)
        amount = rng.randint(1, 100_000)
        entries = (EntrySpec(f"acct:{a}", Direction.debit, amount, "BRL"),
                   EntrySpec(f"acct:{b}", Direction.credit, amount, "BRL"))
        pending = roll < resolve_share + hold_share
        txid = f"t{seed}-{n}"
        out.append(CreateTransaction(txid, entries, pending=pending, code="transfer"))
        if pending:
            holds.append(txid)
    return out


def run(batch_size: int, commands: list[Command], path: str, accounts: int, sync: bool,
        slots: bool = False) -> dict[str, float]:
    store = LedgerStore(path, sync=sync)
    if slots:
        own_every_slot(store)
    open_accounts(store, accounts)
    payloads = []
    ts = time.time_ns()
    for start in range(0, len(commands), batch_size):
        chunk = commands[start:start + batch_size]
        payloads.append(encode_requests([Request(ts + i, c) for i, c in enumerate(chunk, start)]))
    index = store.applied_index()
    failures = 0
    began, began_cpu = time.perf_counter(), time.process_time()
    for payload in payloads:
        index += 1
        outcomes = store.apply_entry(index, payload)
        assert outcomes is not None
        failures += sum(1 for o in outcomes if not isinstance(o, list) and not o.ok)
    elapsed, cpu = time.perf_counter() - began, time.process_time() - began_cpu
    store.close()
    return {"batch": batch_size, "commands": len(commands), "seconds": elapsed,
            "per_s": len(commands) / elapsed, "per_cpu_s": len(commands) / cpu,
            "entry_us": elapsed / len(payloads) * 1e6, "rejected": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--commands", type=int, default=200_000)
    parser.add_argument("--batch-sizes", default="1,100,1000")
    parser.add_argument("--sync", action="store_true", help="fsync every LMDB commit")
    parser.add_argument("--slots", action="store_true", help="own every hash slot, as a node's shard does")
    parser.add_argument("--dir", default=None, help="where to put the LMDB files (default: a temp dir)")
    args = parser.parse_args()
    tune_gc()
    root = tempfile.mkdtemp(dir=args.dir)
    print(f"accounts={args.accounts} sync={args.sync} slots={args.slots} dir={root}")
    print(f"{'batch':>6} {'commands':>9} {'seconds':>8} {'commands/s':>11} {'per cpu-s':>10} "
          f"{'us/entry':>9} {'rejected':>8}")
    try:
        for size in (int(s) for s in args.batch_sizes.split(",")):
            count = args.commands if size > 1 else min(args.commands, 20_000)
            commands = workload(count, args.accounts, seed=size)
            r = run(size, commands, f"{root}/b{size}.lmdb", args.accounts, args.sync, args.slots)
            print(f"{r['batch']:>6} {r['commands']:>9} {r['seconds']:>8.2f} {r['per_s']:>11,.0f} "
                  f"{r['per_cpu_s']:>10,.0f} {r['entry_us']:>9,.0f} {r['rejected']:>8}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
