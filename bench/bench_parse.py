"""How long the edge takes to turn request bodies into commands: JSON decoding and strict parsing.

    python -m raftledger.bench.bench_parse [--rounds 20000]

Prints microseconds per transfer for a single shorthand transfer, a full two-entry transaction and
a batch of 100 transfers (each: the median of five timed loops, after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from raftledger.bench.host import machine
from raftledger.node.http import bodies, parse

SHORTHAND = {"id": "t-000001", "debit_account_id": "cash:{u42}", "credit_account_id": "alice:{u42}",
             "amount": 1500, "currency": "BRL"}
FULL = {"id": "t-000002", "entries": [
    {"account_id": "cash:{u42}", "direction": "debit", "amount": 1500, "currency": "BRL"},
    {"account_id": "alice:{u42}", "direction": "credit", "amount": 1500, "currency": "BRL"}],
    "code": "internal_transfer", "metadata": {"order": "A-1"}}
BATCH = {"transactions": [{**SHORTHAND, "id": f"t-{i:06d}"} for i in range(100)]}


def per_call_us(fn: Callable[[], Any], rounds: int) -> float:
    for _ in range(rounds // 10):
        fn()
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            fn()
        samples.append((time.perf_counter() - started) / rounds * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    print("| body | µs per transfer (decode + parse) | µs per transfer (parse only) |")
    print("|---|---:|---:|")
    for name, body, per in (("shorthand transfer", SHORTHAND, 1), ("two-entry transaction", FULL, 1),
                            ("batch of 100 transfers", BATCH, 100)):
        raw = json.dumps(body).encode()
        decoded = parse.decode_body(raw, "application/json")
        read = bodies.parse_batch if "transactions" in body else bodies.parse_transaction
        rounds = max(1, args.rounds // per)
        both = per_call_us(lambda r=raw, f=read: f(parse.decode_body(r, "application/json")), rounds) / per
        only = per_call_us(lambda d=decoded, f=read: f(d), rounds) / per
        print(f"| {name} | {both:.2f} | {only:.2f} |", flush=True)


if __name__ == "__main__":
    main()
