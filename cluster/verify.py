"""``raftledger verify``: every replica audits itself; this command compares what they report.

Each node runs the audit of ``statemachine.audit.verify_store`` on its own replicas
(``GET /v1/admin/verify``: hash chains, balances re-derived from entries, per-shard totals against the
shard's cross-shard legs, holds and expiries), so only small reports cross the wire. Here:

- every replica the map lists must report, and report no problem;
- the replicas of a shard must have one fingerprint at one index: replicas apply at different speeds,
  so each is asked for its fingerprint at the highest index any of them reported
  (``.../fingerprint?index=N``, answered once applied, from a bounded history);
- per currency, debits must equal credits over all shards, posted and pending. Shards report at
  their own points of their own logs, so a cross-shard transaction in flight between two reports
  unbalances one reading; the sums are read again (``.../totals``) a few times, and only an
  imbalance that persists is a problem;
- a cross-shard leg still holding funds longer than ``--grace-s`` must agree with its home: held for
  a transaction that is still pending there, never left open once the home decided otherwise.

Exit 0 when all agree, 1 on any problem, 2 when the cluster cannot be found.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from raftledger.cluster.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandFailed,
    add_target_options,
    emit,
    target,
)
from rich.console import Console
from rich.markup import escape
from rich.table import Table

http_timeout_s = 120.0  # an audit of a large shard takes a while
balance_rounds_max = 5
balance_retry_s = 0.5
grace_s_default = 60
fingerprint_chars_shown = 16


class HttpFailure(Exception):
    """A node answered with an error status; ``error`` is its error body (or text)."""

    def __init__(self, url: str, status: int, error: Any) -> None:
        super().__init__(f"{url}: {status} {error}")
        self.status = status
        self.error = error

    @property
    def code(self) -> str | None:
        body = self.error.get("error") if isinstance(self.error, dict) else None
        return body.get("code") if isinstance(body, dict) else None


@dataclass
class Http:
    """Every HTTP call of the admin commands goes through ``open`` (one place to change transport)."""

    token: str | None
    timeout_s: float = http_timeout_s

    @contextmanager
    def open(self, base_url: str, path: str, params: dict[str, Any] | None = None) -> Iterator[IO[bytes]]:
        """The response to ``GET base_url + path``, to read; HttpFailure on an error status, OSError
        when the node cannot be reached."""
        url = base_url.rstrip("/") + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                              timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                error = json.loads(raw)
            except ValueError:
                error = raw[:200].decode(errors="replace")
            raise HttpFailure(url, exc.code, error) from None
        with response:
            yield response

    def json(self, base_url: str, path: str, params: dict[str, Any] | None = None) -> Any:
        with self.open(base_url, path, params) as response:
            return json.load(response)


def cluster_map(http: Http, endpoints: tuple[str, ...]) -> dict[str, Any]:
    """The public cluster map from the first endpoint that answers."""
    failures = []
    for url in endpoints:
        try:
            found: dict[str, Any] = http.json(url, "/v1/cluster/map")
            return found
        except (OSError, HttpFailure) as exc:
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

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.problems, "problems": self.problems, "replicas": self.replicas,
                "shards": {str(s): v for s, v in sorted(self.shards.items())},
                "currencies": self.currencies}


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("verify", help="audit every replica and compare them (exit 1 on a problem)")
    add_target_options(parser)
    parser.add_argument("--grace-s", type=int, default=grace_s_default,
                        help="cross-shard legs younger than this may be in flight and are not judged")


def run(args: argparse.Namespace) -> int:
    found = target(args)
    http = Http(found.token)
    cmap = cluster_map(http, found.endpoints)
    result = verify_cluster(http, cmap, args.grace_s)
    emit(args, result.to_json(), lambda console: render(console, result))
    return EXIT_OK if not result.problems else EXIT_FAILED


def verify_cluster(http: Http, cmap: dict[str, Any], grace_s: int) -> Verification:
    result = Verification()
    urls = node_urls(cmap)
    for node_id, url in sorted(urls.items()):
        try:
            report = http.json(url, "/v1/admin/verify", {"grace_s": grace_s})
        except (OSError, HttpFailure) as exc:
            result.problems.append(f"node {node_id} did not report ({exc}); its replicas are not verified")
            continue
        for replica in report["replicas"]:
            result.replicas.append(replica)
            result.problems.extend(f"shard {replica['shard']} on {node_id}: {p}" for p in replica["problems"])
            hidden = replica["problems_count"] - len(replica["problems"])
            if hidden > 0:
                result.problems.append(f"shard {replica['shard']} on {node_id}: {hidden} more problems")
    for shard in cmap["shards"]:
        _compare_replicas(http, urls, result, shard)
    _check_balance(http, urls, result)
    _check_open_legs(http, urls, result)
    return result


def _compare_replicas(http: Http, urls: dict[str, str], result: Verification, shard: dict[str, Any]) -> None:
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
            answer = http.json(urls[node], f"/v1/admin/shards/{shard_id}/fingerprint", {"index": index})
        except (OSError, HttpFailure) as exc:
            result.problems.append(f"shard {shard_id} on {node}: no fingerprint at index {index} ({exc})")
            continue
        fingerprints[node] = answer["fingerprint"]
    result.shards[shard_id] = {"index": index, "fingerprints": fingerprints}
    if len(set(fingerprints.values())) > 1:
        shown = ", ".join(f"{n} {f[:fingerprint_chars_shown]}" for n, f in sorted(fingerprints.items()))
        result.problems.append(f"shard {shard_id}: replicas differ at index {index}: {shown}")


def _sum_currencies(readings: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    sums: dict[str, dict[str, int]] = {}
    for reading in readings:
        for currency, totals in reading["currencies"].items():
            acc = sums.setdefault(currency, dict.fromkeys(totals, 0))
            for name, value in totals.items():
                acc[name] += int(value)
    return dict(sorted(sums.items()))


def _imbalances(sums: dict[str, dict[str, int]]) -> list[str]:
    out = []
    for currency, t in sums.items():
        posted = t["debits_posted"] - t["credits_posted"]
        pending = t["debits_pending"] - t["credits_pending"]
        if posted or pending:
            out.append(f"{currency}: debits exceed credits by {posted} posted and {pending} pending "
                       "over all shards")
    return out


def _check_balance(http: Http, urls: dict[str, str], result: Verification) -> None:
    """Per currency over all shards, one replica each (a leader when one reported): read again while
    an imbalance could be a cross-shard transaction in flight between the shards' readings."""
    chosen: dict[int, dict[str, Any]] = {}
    for replica in sorted(result.replicas, key=lambda r: r["role"] != "leader"):
        chosen.setdefault(replica["shard"], replica)
    readings = list(chosen.values())
    for _ in range(balance_rounds_max):
        result.currencies = _sum_currencies(readings)
        imbalances = _imbalances(result.currencies)
        if not imbalances:
            return
        time.sleep(balance_retry_s)  # other processes' writes settle; nothing here to wait on
        try:
            readings = [http.json(urls[r["node"]], f"/v1/admin/shards/{r['shard']}/totals")
                        for r in chosen.values()]
        except (OSError, HttpFailure) as exc:
            result.problems.append(f"totals could not be read again ({exc})")
            break
    result.problems.extend(imbalances)


def _check_open_legs(http: Http, urls: dict[str, str], result: Verification) -> None:
    """A leg holding funds past the grace period agrees with its transaction at its home."""
    base = next(iter(urls.values()), None)
    for replica in result.replicas:
        for leg in replica["open_legs"]:
            where = f"shard {replica['shard']} on {replica['node']}: leg {leg['id']} ({leg['status']})"
            quoted = urllib.parse.quote(leg["id"], safe="")
            try:
                record = http.json(base or "", f"/v1/transactions/{quoted}", {"consistency": "linearizable"})
            except HttpFailure as exc:
                if exc.code == "transaction_not_found":
                    result.problems.append(f"{where}: no decision at its home shard {leg['coordinator']}")
                else:
                    result.problems.append(f"{where}: its home could not be asked ({exc})")
                continue
            except OSError as exc:
                result.problems.append(f"{where}: its home could not be asked ({exc})")
                continue
            if record.get("status") != "pending" or leg["status"] != "held":
                result.problems.append(f"{where}: still open although its home says {record.get('status')}")


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
    totals = Table(title="per currency, all shards")
    for column in ("currency", "debits posted", "credits posted", "debits pending", "credits pending"):
        totals.add_column(column)
    for currency, t in result.currencies.items():
        totals.add_row(currency, *(str(t[k]) for k in ("debits_posted", "credits_posted",
                                                        "debits_pending", "credits_pending")))
    console.print(totals)
    for problem in result.problems:
        console.print(f"[red]problem:[/red] {escape(problem)}")
    console.print("[green]verify: OK[/green]" if not result.problems
                  else f"[red]verify: {len(result.problems)} problems[/red]")
