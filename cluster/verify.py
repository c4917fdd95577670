"""``raftledger verify``: every replica audits itself; this command compares what they report.

Each node runs the audit of ``statemachine.audit.verify_store`` on its own replicas
(``GET /v1/admin/verify``: hash chains, balances re-derived from entries, per-shard totals against the
shard's cross-shard legs, holds and expiries), so only small reports cross the wire. Here:

- every replica the map lists must report, and report no problem;
- the replicas of a shard must have one fingerprint at one index: replicas apply at different speeds,
  so each is asked for its fingerprint at the highest index any of them reported
  (``.../fingerprint?index=N``, answered once applied, from a bounded history);
- per currency, debits must equal credits over all shards, posted and pending, exactly. Every shard
  is read at once (``.../cut``, one replica each, its leader when it has one), and the readings are
  checked to fit together as one consistent cut (``raftledger.cluster.cut``: no decision without
  its participants' prepares, no leg finished before its home decided); a reading that does not fit
  is taken again. On a consistent cut the sums balance once every open cross-shard leg is settled
  as its home decided (an undecided one voided), with no allowance for anything in flight;
- a cross-shard leg still holding funds longer than ``--grace-s`` after its home decided (or, with
  no decision, after it was prepared) is a problem: the resolvers finish legs well within it. A hold
  kept that long must still be pending at its home.

Exit 0 when all agree, 1 on any problem, 2 when the cluster cannot be found.
"""

from __future__ import annotations

import argparse
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from raftledger.client import Client, LedgerError, RetryPolicy
from raftledger.client.core import Reply
from raftledger.cluster.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandFailed,
    add_target_options,
    emit,
    target,
)
from raftledger.cluster.cut import (
    LEG_HELD,
    LEG_HOLD,
    OPEN,
    OUTCOME_NAMES,
    TOTALS,
    ShardCut,
    cut_problems,
    decision_for,
    imbalances,
    settled_totals,
)
from rich.console import Console
from rich.markup import escape
from rich.table import Table

http_timeout_s = 120.0  # an audit of a large shard takes a while
node_attempts_max = 3  # a node that refuses the connection is tried again this often
grace_s_default = 60
fingerprint_chars_shown = 16
cut_readings_max = 10  # readings of every shard at once, until one is a consistent cut
# A cut keeps the cross-shard steps of the last 30 minutes and judges those of the last 2.5: each judged
# step's cause (a leg's decision at its home) is in the cut as long as the leaders that stamped them
# disagree by less than the difference. Found with the chaos skew fault: with 5 minutes kept, a leg
# finished by a leader 8 minutes ahead was judged against a home that had left its (older) decision out.
recent_window_s = 1800
judged_window_s = 150
problems_shown_max = 3


@dataclass
class Nodes:
    """Every HTTP call of the admin commands, through the client library: one client per node, so
    that each call goes to the node it names (a node that cannot be reached raises ``Unavailable``,
    an error answer its ``LedgerError``)."""

    token: str | None
    timeout_s: float = http_timeout_s
    ca_file: str | None = None  # the CA https:// nodes are verified against
    _clients: dict[str, Client] = field(default_factory=dict)

    def client(self, url: str) -> Client:
        if url not in self._clients:
            policy = RetryPolicy(deadline_s=self.timeout_s, attempt_timeout_s=self.timeout_s,
                                 attempts_max=node_attempts_max)
            self._clients[url] = Client([url], self.token, policy=policy, consistency="local",
                                         ca_file=self.ca_file)
        return self._clients[url]

    def get(self, url: str, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.client(url).request("GET", path, params=params)

    def stream(self, url: str, path: str) -> AbstractContextManager[Reply]:
        return self.client(url).stream(path)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


@contextmanager
def nodes_for(args: argparse.Namespace) -> Iterator[tuple[Nodes, tuple[str, ...]]]:
    """The clients of one admin command and the endpoints it was pointed at."""
    found = target(args)
    nodes = Nodes(found.token, ca_file=found.ca_file)
    try:
        yield nodes, found.endpoints
    finally:
        nodes.close()


def cluster_map(nodes: Nodes, endpoints: tuple[str, ...]) -> dict[str, Any]:
    """The public cluster map from the first endpoint that answers."""
    failures = []
    for url in endpoints:
        try:
            found: dict[str, Any] = nodes.get(url, "/v1/cluster/map")
            return found
        except LedgerError as exc:
            failures.append(f"{url}: {exc}")
    raise CommandFailed("no node answered with the cluster map: " + "; ".join(failures))


def node_urls(cmap: dict[str, Any]) -> dict[str, str]:
    return {n["id"]: n["url"] for n in cmap["nodes"] if n.get("state") != "removed"}


@dataclass
class Verification:
    problems: list[str] = field(default_factory=list)
    replicas: list[dict[str, Any]] = field(default_factory=list)
    shards: dict[int, dict[str, Any]] = field(default_factory=dict)
    currencies: dict[str, dict[str, int]] = field(default_factory=dict)
    cut: dict[int, int] = field(default_factory=dict)  # shard -> applied index of its reading

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.problems, "problems": self.problems, "replicas": self.replicas,
                "shards": {str(s): v for s, v in sorted(self.shards.items())},
                "currencies": self.currencies, "cut": {str(s): i for s, i in sorted(self.cut.items())}}


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("verify", help="audit every replica and compare them (exit 1 on a problem)")
    add_target_options(parser)
    parser.add_argument("--grace-s", type=int, default=grace_s_default,
                        help="cross-shard legs decided (or prepared) more recently than this may be "
                             "in flight and are not judged")


def run(args: argparse.Namespace) -> int:
    with nodes_for(args) as (nodes, endpoints):
        cmap = cluster_map(nodes, endpoints)
        result = verify_cluster(nodes, cmap, args.grace_s)
    emit(args, result.to_json(), lambda console: render(console, result))
    return EXIT_OK if not result.problems else EXIT_FAILED


def verify_cluster(nodes: Nodes, cmap: dict[str, Any], grace_s: int) -> Verification:
    result = Verification()
    urls = node_urls(cmap)
    for node_id, url in sorted(urls.items()):
        try:
            report = nodes.get(url, "/v1/admin/verify", {"grace_s": grace_s})
        except LedgerError as exc:
            result.problems.append(f"node {node_id} did not report ({exc}); its replicas are not verified")
            continue
        for replica in report["replicas"]:
            result.replicas.append(replica)
            result.problems.extend(f"shard {replica['shard']} on {node_id}: {p}" for p in replica["problems"])
            hidden = replica["problems_count"] - len(replica["problems"])
            if hidden > 0:
                result.problems.append(f"shard {replica['shard']} on {node_id}: {hidden} more problems")
    for shard in cmap["shards"]:
        _compare_replicas(nodes, urls, result, shard)
    cuts = consistent_cut(nodes, urls, cmap, result)
    if cuts is not None:
        result.cut = {s: c.applied_index for s, c in cuts.items()}
        settled = settled_totals(cuts)
        result.currencies = {c: dict(zip(TOTALS, t, strict=True)) for c, t in settled.items()}
        result.problems.extend(imbalances(settled))
        _check_open_legs(nodes, urls, cuts, grace_s, result)
    return result


def _compare_replicas(nodes: Nodes, urls: dict[str, str], result: Verification,
                      shard: dict[str, Any]) -> None:
    """Every listed replica reported, and all have one fingerprint at the highest reported index."""
    shard_id = shard["id"]
    reports = [r for r in result.replicas if r["shard"] == shard_id]
    missing = sorted(set(shard["replicas"]) - {r["node"] for r in reports})
    if missing:
        result.problems.append(f"shard {shard_id}: no report from the replicas on {', '.join(missing)}")
    if not reports:
        return
    index = max(r["applied_index"] for r in reports)
    fingerprints: dict[str, str] = {}
    for report in reports:
        node = report["node"]
        try:
            answer = nodes.get(urls[node], f"/v1/admin/shards/{shard_id}/fingerprint", {"index": index})
        except LedgerError as exc:
            result.problems.append(f"shard {shard_id} on {node}: no fingerprint at index {index} ({exc})")
            continue
        fingerprints[node] = answer["fingerprint"]
    result.shards[shard_id] = {"index": index, "fingerprints": fingerprints}
    if len(set(fingerprints.values())) > 1:
        shown = ", ".join(f"{n} {f[:fingerprint_chars_shown]}" for n, f in sorted(fingerprints.items()))
        result.problems.append(f"shard {shard_id}: replicas differ at index {index}: {shown}")


# -- one consistent cut of every shard -----------------------------------------------------------------

def consistent_cut(nodes: Nodes, urls: dict[str, str], cmap: dict[str, Any],
                   result: Verification) -> dict[int, ShardCut] | None:
    """Every shard read at once, again until the readings fit together (bounded); None, with the
    reason among the problems, when no reading of some shard came or none fitted."""
    leaders = {r["shard"]: r["node"] for r in result.replicas if r["role"] == "leader"}
    problems: list[str] = []
    for _ in range(cut_readings_max):
        started_ns = time.time_ns()
        cuts, failures = read_every_shard(nodes, urls, cmap, leaders, started_ns - recent_window_s * 10**9)
        if failures:
            result.problems.extend(failures)
            return None
        problems = cut_problems(cuts, started_ns - judged_window_s * 10**9)
        if not problems:
            return cuts
    result.problems.append(f"no consistent cut of the shards in {cut_readings_max} readings; the last: "
                           + "; ".join(problems[:problems_shown_max]))
    return None


def read_every_shard(nodes: Nodes, urls: dict[str, str], cmap: dict[str, Any], leaders: dict[int, str],
                     since_ns: int) -> tuple[dict[int, ShardCut], list[str]]:
    """One reading per shard, all asked at the same moment (a thread each), from its leader first."""
    def one(shard: dict[str, Any]) -> ShardCut | str:
        failures = []
        for node in sorted(shard["replicas"], key=lambda n: n != leaders.get(shard["id"])):
            if node not in urls:
                continue
            try:
                return ShardCut.from_json(nodes.get(urls[node], f"/v1/admin/shards/{shard['id']}/cut",
                                                    {"since_ns": since_ns}))
            except LedgerError as exc:
                failures.append(f"{node}: {exc}")
        return f"shard {shard['id']}: no replica gave its cross-shard state ({'; '.join(failures)})"

    with ThreadPoolExecutor(max_workers=max(1, len(cmap["shards"]))) as pool:
        readings = list(pool.map(one, cmap["shards"]))
    cuts = {r.shard: r for r in readings if isinstance(r, ShardCut)}
    return cuts, [r for r in readings if isinstance(r, str)]


def _check_open_legs(nodes: Nodes, urls: dict[str, str], cuts: dict[int, ShardCut], grace_s: int,
                     result: Verification) -> None:
    """A leg holding funds longer than the grace period after its home decided (or, undecided,
    after it was prepared); a hold kept that long is still pending at its home."""
    now_ns = time.time_ns()
    for shard, cut in sorted(cuts.items()):
        for leg in cut.legs.values():
            if leg.status not in OPEN:
                continue
            home = cuts.get(leg.coordinator)
            decided = decision_for(shard, leg, home)
            since_ns = leg.timestamp if decided is None else decided.timestamp
            if now_ns - since_ns <= grace_s * 10**9:
                continue
            where = f"shard {shard}: leg {leg.id} ({leg.status})"
            age_s = (now_ns - since_ns) // 10**9
            if decided is not None and decided.outcome != LEG_HOLD:
                result.problems.append(f"{where}: its home shard {leg.coordinator} decided to "
                                       f"{OUTCOME_NAMES[decided.outcome]} it {age_s}s ago; still open")
            elif leg.status != LEG_HELD:
                state = "has not decided" if decided is None else "kept it as a hold"
                result.problems.append(f"{where}: prepared {age_s}s ago and its home shard "
                                       f"{leg.coordinator} {state}; still prepared")
            elif home is not None:
                problem = _hold_still_pending(nodes, urls, leg.id, home)
                if problem:
                    result.problems.append(f"{where}: {problem}")


def _hold_still_pending(nodes: Nodes, urls: dict[str, str], txid: str, home: ShardCut) -> str | None:
    """A held leg with no open decision: its transaction was pending at its home at the cut (a post,
    void or expiry recorded since, after the home's reading, is not judged)."""
    base = urls.get(home.node) or next(iter(urls.values()))
    quoted = urllib.parse.quote(txid, safe="")
    try:
        record = nodes.get(base, f"/v1/transactions/{quoted}", {"consistency": "linearizable"})
        if record.get("status") == "pending":
            return None
        changed_ns = record.get("expires_at") if record.get("status") == "expired" else None
        if record.get("resolved_by"):
            by = urllib.parse.quote(record["resolved_by"], safe="")
            resolved = nodes.get(base, f"/v1/transactions/{by}", {"consistency": "linearizable"})
            changed_ns = resolved.get("timestamp")
    except LedgerError as exc:
        if exc.code == "transaction_not_found":
            return f"no decision at its home shard {home.shard}"
        return f"its home could not be asked ({exc})"
    if changed_ns is not None and changed_ns > home.last_timestamp:
        return None
    return f"still held although its home shard {home.shard} says {record.get('status')}"


def render(console: Console, result: Verification) -> None:
    table = Table(title="replicas")
    for column in ("shard", "node", "role", "applied", "fingerprint", "accounts", "entries", "problems"):
        table.add_column(column)
    for r in sorted(result.replicas, key=lambda r: (r["shard"], r["node"])):
        table.add_row(str(r["shard"]), r["node"], r["role"], str(r["applied_index"]),
                      r["fingerprint"][:fingerprint_chars_shown], str(r["accounts"]), str(r["entries"]),
                      str(r["problems_count"]))
    console.print(table)
    for shard, seen in sorted(result.shards.items()):
        same = len(set(seen["fingerprints"].values())) <= 1
        console.print(f"shard {shard}: {len(seen['fingerprints'])} replicas compared at index "
                      f"{seen['index']}: {'same fingerprint' if same else '[red]DIFFERENT[/red]'}")
    totals = Table(title="per currency, all shards (one consistent cut, open legs settled as decided)")
    for column in ("currency", "debits posted", "credits posted", "debits pending", "credits pending"):
        totals.add_column(column)
    for currency, t in result.currencies.items():
        totals.add_row(currency, *(str(t[k]) for k in TOTALS))
    console.print(totals)
    for problem in result.problems:
        console.print(f"[red]problem:[/red] {escape(problem)}")
    console.print("[green]verify: OK[/green]" if not result.problems
                  else f"[red]verify: {len(result.problems)} problems[/red]")
