"""``raftledger chaos``: its options and exit status (0 when every checker passed)."""

from __future__ import annotations

import argparse
import random
from typing import Any


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("chaos", help="a real cluster under random faults, checked end to end "
                                          "(docs/reliability.md)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of workload and faults")
    parser.add_argument("--seed", type=int, default=None, help="plans the faults (printed; default: random)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for history.json, report.json, timeline.png")
    parser.add_argument("--data-dir", default=None,
                        help="run on the cluster planned in this folder instead of a new one in a temp "
                             "dir: stopped, the harness starts it with its proxies; running, it "
                             "attaches (kill, pause and churn only; docs/reliability.md)")
    parser.add_argument("--no-faults", action="store_true", help="the workloads and checkers only")
    parser.add_argument("--nemeses", type=_kinds, default=None, metavar="KIND,...",
                        help="plan faults of these kinds only, e.g. disk,skew,kill (docs/reliability.md)")


def _kinds(value: str) -> frozenset[str]:
    from .nemesis import KINDS  # here: the node processes never need it
    kinds = frozenset(k.strip() for k in value.split(",") if k.strip())
    unknown = sorted(kinds - set(KINDS))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}; choose from {','.join(KINDS)}")
    return kinds


def run_command(args: argparse.Namespace) -> int:
    from .runner import Options, run  # here: the node processes never need it
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    result = run(Options(duration_s=args.duration, seed=seed, nodes=args.nodes, shards=args.shards,
                         out=args.out, data_dir=args.data_dir, faults=not args.no_faults,
                         nemeses=args.nemeses))
    return 0 if result.ok else 1
