"""One chaos run: a real cluster with a proxy on every link, the workloads, the nemesis, then the
checkers over the history and the final state, and the report (``raftledger chaos``)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from raftledger.client import Client, LedgerError
from raftledger.cluster import launcher, verify
from raftledger.cluster.testing import LocalCluster

from . import checkers
from .attach import ATTACHED_KINDS, AttachedCluster, find_pid, schedule_for_attached
from .faults import Faults
from .history import History
from .nemesis import Nemesis, Network, heal_everything, plan_schedule
from .proxy import ProxyHub
from .report import write_report
from .workload import Bank, BankWorker, FeedFollower, RetryStorm, open_bank, recent_ids_max

bank_workers = 4
join_timeout_s = 30.0
settle_timeout_s = 120.0
feed_page = 1000


@dataclass
class Options:
    duration_s: float = 60.0
    seed: int = 7
    nodes: int = 3
    shards: int = 2
    out: str | None = None
    data_dir: str | None = None  # a cluster planned there instead of a new one (running: attach)
    faults: bool = True
    nemeses: frozenset[str] | None = None  # the fault kinds to plan from (default: every kind)


@dataclass
class Result:
    verdicts: list[checkers.Verdict]
    summary: dict[str, Any]
    out: str | None = None
    harness_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.harness_errors and all(v.verdict == checkers.OK for v in self.verdicts)


def run(options: Options, say: Any = print) -> Result:
    say(f"chaos: seed {options.seed}, {options.duration_s:.0f}s, {options.nodes} nodes, "
        f"{options.shards} shards")
    with contextlib.ExitStack() as stack:
        root = options.data_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-"))
        hub = ProxyHub()
        stack.callback(hub.close)
        cluster = attached_to(options.data_dir, say) or LocalCluster(
            root, nodes=options.nodes, shards=options.shards, durability="fsync", credentials=True,
            resume=bool(options.data_dir) and os.path.exists(os.path.join(root, launcher.CLUSTER_FILE)))
        faults = Faults(options.nemeses if options.faults else frozenset(), bool(options.data_dir), say)
        stack.callback(faults.close)  # after the nodes stopped (callbacks run last first)
        if not isinstance(cluster, AttachedCluster):  # running already: no disks to give, no clocks
            faults.prepare(cluster, os.path.join(root, "chaos"))
        network = Network(hub, cluster, stack.enter_context(tempfile.TemporaryDirectory(prefix="dial-"))
                          if isinstance(cluster, AttachedCluster) else root)
        stack.callback(cluster.close)
        cluster.start()
        try:
            return _run_on(cluster, network, options, say, faults)
        finally:
            if options.out:
                keep_node_logs(cluster, options.out)


def attached_to(data_dir: str | None, say: Any) -> AttachedCluster | None:
    """The cluster running in ``data_dir``, when one is (``attach``); None when none of its nodes
    runs (the harness starts it behind its proxies)."""
    if data_dir is None or launcher.load_plan(data_dir) is None:
        return None
    plan = launcher.load_plan(data_dir)
    assert plan is not None
    if not any(find_pid(plan, n.id) for n in plan.cluster.nodes):
        return None
    cluster = AttachedCluster(data_dir)
    say(f"chaos: attached to the running cluster in {data_dir} (pids "
        f"{', '.join(f'{n} {p.pid}' for n, p in sorted(cluster.procs.items()))})")
    return cluster


def keep_node_logs(cluster: LocalCluster, out: str) -> None:
    """Each node's log next to the report: a temp data dir goes away with the run."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    for node in cluster.node_ids:
        source = cluster.log_path(node)
        if os.path.exists(source):
            shutil.copyfile(source, os.path.join(out, "logs", f"{node}.log"))


def _run_on(cluster: LocalCluster, network: Network, options: Options, say: Any, faults: Faults) -> Result:
    run_id = f"c{options.seed}x{random.Random().randrange(16 ** 6):06x}"
    with cluster.client() as client:
        bank = open_bank(client, run_id)
    history = History()  # times count from here: the bank is open
    stop = threading.Event()
    schedule = plan_schedule(options.seed, options.duration_s, kinds=faults.kinds) if faults.kinds else []
    if isinstance(cluster, AttachedCluster):
        schedule, skipped = schedule_for_attached(schedule)
        say(f"chaos: attached: faults {sorted(ATTACHED_KINDS)} only; skipped (they need the "
            f"harness's proxies or a start by the harness): {', '.join(skipped) or 'none planned'}")
    say(f"chaos: {len(bank.accounts)} accounts over {options.shards} shards, {len(schedule)} faults planned")
    feed_client = cluster.client()
    follower = FeedFollower(feed_client)
    rng = random.Random(options.seed)
    storm: deque[dict[str, Any]] = deque(maxlen=recent_ids_max)
    urls = list(cluster.urls.values())
    workers: list[Any] = [BankWorker(f"{run_id}-bank{i}", history, urls, cluster.admin_token, stop,
                                     random.Random(rng.random()), bank=bank, storm=storm)
                          for i in range(bank_workers)]
    workers.append(RetryStorm(f"{run_id}-storm", history, urls, cluster.admin_token, stop,
                              random.Random(rng.random()), storm=storm))
    nemesis = Nemesis(cluster, network, history, schedule, stop, faults.disks, faults.clocks)
    for thread in (follower, *workers, nemesis):
        thread.start()
    stop.wait(options.duration_s)
    stop.set()
    for thread in (*workers, nemesis):
        thread.join(join_timeout_s + options.duration_s)
    heal_everything(cluster, network, faults.disks, faults.clocks)
    errors = [f"{t.name}: {t.error!r}" for t in (*workers, nemesis) if t.error is not None]
    final: dict[str, Any] | None = None
    try:
        final = settle_and_read(cluster, bank, follower)
    except LedgerError as exc:  # a shard that cannot answer once healed: the report says so
        unreadable = f"the final state could not be read: {exc}"
    finally:
        follower.finish()
        follower.join(join_timeout_s)
        feed_client.close()
    if follower.error is not None:
        errors.append(f"feed: {follower.error!r}")
    ops = [o.to_json() for o in history.ops]
    verdicts = judge(ops, bank, final) if final is not None else unjudged(unreadable)
    summary = summarize(history, verdicts, options, schedule)
    result = Result(verdicts, summary, options.out, errors + (final or {}).get("errors", []))
    summary["harness_errors"] = result.harness_errors
    if options.out:
        write_report(options.out, history, summary, say)
    say_summary(summary, say)
    return result


def settle_and_read(cluster: LocalCluster, bank: Bank, follower: FeedFollower) -> dict[str, Any]:
    """Once healed: holds resolved, replicas converged, then the final state as the checkers need it."""
    cluster.wait_ready(settle_timeout_s)
    errors: list[str] = []
    final: dict[str, Any] = {"errors": errors}
    with cluster.client(consistency="linearizable") as client:
        final["pending"] = _wait_no_pending(client, bank)
        final["converged"] = {s: _converged(cluster, s) for s in range(cluster.plan.cluster.shards)}
        final["entries"] = {a: [{"seq": e.seq, "transaction_id": e.transaction_id, "status": e.status,
                                 "direction": e.direction, "amount": e.amount,
                                 "balance_after": e.balance_after}
                                for e in client.entries(a, consistency="linearizable")]
                            for a in bank.accounts}
        final["balances"] = {a: client.balance(a, consistency="linearizable").balance
                             for a in bank.accounts}
        final["feed"] = {s: _feed_held(client, s) for s in range(cluster.plan.cluster.shards)}
        nodes = verify.Nodes(cluster.admin_token)
        try:
            final["verify"] = verify.verify_cluster(nodes, client.cluster_map(), 0).problems
        finally:
            nodes.close()
    last = {s: events[-1]["offset"] for s, events in final["feed"].items() if events}
    try:
        launcher.wait_until(lambda: all(any(e["shard"] == s and e["offset"] >= o
                                            for e in follower.received[-5000:])
                                        for s, o in last.items()),
                            settle_timeout_s, "the feed subscriber to catch up")
    except launcher.LaunchError as exc:
        errors.append(str(exc))
    final["received"] = list(follower.received)
    return final


def _wait_no_pending(client: Client, bank: Bank) -> dict[str, dict[str, int]]:
    def pending() -> dict[str, dict[str, int]]:
        held = {}
        for account in bank.accounts:
            b = client.balance(account, consistency="linearizable")
            if b.debits_pending or b.credits_pending:
                held[account] = {"debits_pending": b.debits_pending, "credits_pending": b.credits_pending}
        return held
    with contextlib.suppress(launcher.LaunchError):
        launcher.wait_until(lambda: not pending(), settle_timeout_s, "holds to be resolved")
    return pending()


def _converged(cluster: LocalCluster, shard: int) -> str | None:
    try:
        cluster.wait_converged(shard, settle_timeout_s)
    except launcher.LaunchError as exc:
        return str(exc)
    return None


def _feed_held(client: Client, shard: int) -> list[dict[str, Any]]:
    """Every event the shard's feed holds, read from the start."""
    events: list[dict[str, Any]] = []
    after = 0
    for _ in range(100_000):
        page = client.request("GET", "/v1/feed", params={"shard": shard, "after": after,
                                                          "limit": feed_page, "wait_ms": 0})
        if not page["events"]:
            return events
        events += [{"offset": e["offset"], "type": e["type"], "txid": (e.get("data") or {}).get("id")}
                   for e in page["events"]]
        after = page["next_after"]
    raise LedgerError("unavailable", f"shard {shard}: the feed did not end")


def judge(ops: list[dict[str, Any]], bank: Bank, final: dict[str, Any]) -> list[checkers.Verdict]:
    return [
        checkers.check_transactions(ops, final["entries"], bank.setup_ids),
        checkers.check_reads(ops, bank.funded, final["balances"]),
        checkers.check_linearizable(ops, bank.initial(), statements=final["entries"]),
        checkers.check_final_state(final["converged"], final["verify"], final["pending"]),
        checkers.check_feed(final["received"], final["feed"], ops),
    ]


def unjudged(unreadable: str) -> list[checkers.Verdict]:
    """The verdicts when the cluster could not be read at the end: final_state is an anomaly (a
    healed cluster answers), and what needs the final state to judge is unknown."""
    names = ("transactions", "reads", "linearizable", "final_state", "feed")
    return [checkers.Verdict(n, checkers.ANOMALY, [unreadable], {"problems": 1}) if n == "final_state"
            else checkers.Verdict(n, checkers.UNKNOWN, [], {"reason": unreadable}) for n in names]


def summarize(history: History, verdicts: list[checkers.Verdict], options: Options,
              schedule: list[Any]) -> dict[str, Any]:
    by_outcome = Counter(f"{o.type}:{o.outcome}" for o in history.ops)
    faults = Counter(f.kind for f in history.faults)
    return {"seed": options.seed, "duration_s": options.duration_s, "nodes": options.nodes,
            "shards": options.shards, "operations": len(history.ops),
            "operations_by_outcome": dict(sorted(by_outcome.items())),
            "faults_by_kind": dict(sorted(faults.items())), "faults": len(history.faults),
            "schedule": [p.to_json() for p in schedule],
            "verdicts": {v.name: v.to_json() for v in verdicts},
            "ok": all(v.verdict == checkers.OK for v in verdicts)}


def say_summary(summary: dict[str, Any], say: Any) -> None:
    say(f"operations: {summary['operations']} {json.dumps(summary['operations_by_outcome'])}")
    say(f"faults: {summary['faults']} {json.dumps(summary['faults_by_kind'])}")
    for name, verdict in summary["verdicts"].items():
        say(f"  {name:13} {verdict['verdict']:8} {json.dumps(verdict['stats'])}")
        for problem in verdict["problems"]:
            say(f"      {problem}")
    for error in summary.get("harness_errors", []):
        say(f"  harness error: {error}")
    passed = summary["ok"] and not summary.get("harness_errors")
    say(f"chaos: seed {summary['seed']}: {'PASS' if passed else 'FAIL'}")
