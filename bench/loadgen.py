"""HTTP load generator: single transfers or batches against a running cluster (``raftledger up``).

    python -m raftledger.bench.loadgen --url http://127.0.0.1:8080,http://127.0.0.1:8081 \\
        --mode single --connections 64 --duration 20
    python -m raftledger.bench.loadgen --url ... --mode batch --batch-size 100 --rate 150

Closed loop (default): every connection sends its next request when the previous one answered.
Fixed rate (``--rate`` requests/s): requests start on a schedule and latency is measured from the
scheduled start, so a slow server is not hidden by a slower client (no coordinated omission);
requests that cannot start because every connection is busy are counted as ``late``.

Accounts share hash tags in small groups (``acct-<n>:{g<k>}``), so every transfer stays on one shard.
Requests go round-robin to every URL given: followers forward writes to the leader, as clients would
see in production behind a load balancer. With ``--direct`` each request goes to the leader of its
shard (looked up once in ``/v1/cluster``; a batch then holds transfers of one shard), as a client that
knows the shard map would do.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from raftledger.bench.host import process_cpu_s
from raftledger.cluster.router import route, shard_for_account, table_of

accounts_per_group = 8
setup_chunk_accounts = 500
amount_max = 1000
request_timeout_s = 30.0
progress_period_s = 5.0
# Bodies are encoded with orjson: the generator shares the cores with the cluster it measures.
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class Stats:
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    transfers_ok: int = 0
    late: int = 0

    def record(self, status: int, latency_s: float, transfers_ok: int) -> None:
        self.statuses[status] += 1
        self.latencies_s.append(latency_s)
        self.transfers_ok += transfers_ok


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass
class Workload:
    urls: list[str]
    mode: str
    batch_size: int
    groups: int
    prefix: str
    seq: itertools.count = field(default_factory=itertools.count)
    leader_urls: dict[int, str] | None = None  # --direct: shard -> its leader's URL
    shard_count: int = 1
    names: list[list[str]] = field(init=False)  # account ids by group, made once
    shard_groups: dict[int, list[int]] | None = None  # --direct: shard -> the groups it holds
    slot_table: tuple[int, ...] | None = None  # --direct: the cluster map's slot -> shard

    def __post_init__(self) -> None:
        self.names = [[f"{self.prefix}-{n}:{{g{g}}}" for n in range(accounts_per_group)]
                      for g in range(self.groups)]

    def accounts(self) -> list[dict[str, Any]]:
        return [{"id": name, "currency": "USD"} for names in self.names for name in names]

    def _groups_of(self, shard: int) -> list[int]:
        """Made on first use: the shard count is known once the leaders were looked up."""
        if self.shard_groups is None:
            self.shard_groups = {}
            for g, names in enumerate(self.names):
                shard = route(self.slot_table, names[0]) if self.slot_table is not None else \
                    shard_for_account(names[0], self.shard_count)
                self.shard_groups.setdefault(shard, []).append(g)
        return self.shard_groups[shard]

    def transfer(self, rng: random.Random, shard: int | None = None) -> dict[str, Any]:
        groups = self._groups_of(shard) if shard is not None else None
        group = groups[rng.randrange(len(groups))] if groups else rng.randrange(self.groups)
        names = self.names[group]
        debit = rng.randrange(accounts_per_group)
        credit = (debit + 1 + rng.randrange(accounts_per_group - 1)) % accounts_per_group
        return {"id": f"{self.prefix}-t{next(self.seq)}:{{g{group}}}", "debit_account_id": names[debit],
                "credit_account_id": names[credit], "amount": 1 + rng.randrange(amount_max),
                "currency": "USD"}

    def request(self, rng: random.Random, url: str) -> tuple[str, dict[str, Any], int]:
        """(url, body, transfers in it)."""
        shard = rng.randrange(self.shard_count) if self.leader_urls else None
        if shard is not None:
            assert self.leader_urls is not None
            url = self.leader_urls[shard]
        if self.mode == "single":
            return url + "/v1/transactions", self.transfer(rng, shard), 1
        items = [self.transfer(rng, shard) for _ in range(self.batch_size)]
        return url + "/v1/transactions/batch", {"transactions": items}, self.batch_size


def ok_transfers(status: int, body: bytes, count: int) -> int:
    if status != 200 or count == 1:
        return count if status == 201 else 0
    results = orjson.loads(body)["results"]  # statuses only: no big integers to keep exact
    return sum(1 for r in results if r["status"] == 201)


async def setup(session: aiohttp.ClientSession, work: Workload) -> None:
    accounts = work.accounts()
    for start in range(0, len(accounts), setup_chunk_accounts):
        chunk = accounts[start:start + setup_chunk_accounts]
        async with session.post(work.urls[0] + "/v1/accounts", json={"accounts": chunk}) as resp:
            body = await resp.json()
            bad = [r for r in body.get("results", []) if r["status"] not in (200, 201)]
            if resp.status != 200 or bad:
                raise SystemExit(f"account setup failed: {resp.status} {str(body)[:300]}")


async def one_request(session: aiohttp.ClientSession, work: Workload, rng: random.Random,
                      url: str, stats: Stats, started: float) -> None:
    target, body, count = work.request(rng, url)
    try:
        async with session.post(target, data=orjson.dumps(body), headers=JSON_HEADERS) as resp:
            data = await resp.read()
            stats.record(resp.status, time.perf_counter() - started,
                         ok_transfers(resp.status, data, count))
    except (TimeoutError, aiohttp.ClientError):
        stats.record(0, time.perf_counter() - started, 0)


async def closed_loop(session: aiohttp.ClientSession, work: Workload, stats: Stats,
                      connections: int, until: float) -> None:
    async def worker(i: int) -> None:
        rng = random.Random(i)
        url = work.urls[i % len(work.urls)]
        while time.perf_counter() < until:
            await one_request(session, work, rng, url, stats, time.perf_counter())

    await asyncio.gather(*(worker(i) for i in range(connections)))


async def fixed_rate(session: aiohttp.ClientSession, work: Workload, stats: Stats,
                     connections: int, until: float, rate: float) -> None:
    slots = asyncio.Semaphore(connections)
    rng = random.Random(0)
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    for n in itertools.count():
        scheduled = start + n / rate
        if scheduled >= until:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # the schedule itself, not synchronisation
        if slots.locked():
            stats.late += 1
            continue
        await slots.acquire()
        url = work.urls[n % len(work.urls)]
        task = asyncio.create_task(one_request(session, work, rng, url, stats, scheduled))
        task.add_done_callback(lambda t: (slots.release(), tasks.discard(t)))
        tasks.add(task)
    await asyncio.gather(*tasks)


def node_pids(cluster_file: str) -> list[int]:
    """The node processes named in ``raftledger up``'s cluster.json (to report their CPU use)."""
    with open(cluster_file) as f:
        return [n["pid"] for n in json.load(f)["nodes"] if n.get("pid")]


def summary(stats: Stats, elapsed_s: float, work: Workload, args: argparse.Namespace,
            node_cpu_s: float | None = None) -> dict:
    lat = sorted(stats.latencies_s)
    ms = {f"p{p}": round(percentile(lat, p / 100) * 1000, 2) for p in (50, 99, 99.9)}
    return {
        "mode": work.mode, "batch_size": work.batch_size if work.mode == "batch" else 1,
        "connections": args.connections, "rate_rps": args.rate or None,
        "duration_s": round(elapsed_s, 2), "requests": len(lat),
        "requests_per_s": round(len(lat) / elapsed_s, 1),
        "transfers_per_s": round(stats.transfers_ok / elapsed_s, 1),
        "latency_ms": ms, "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "late": stats.late, "direct": bool(work.leader_urls),
        "node_cpu_us_per_transfer": (round(node_cpu_s / stats.transfers_ok * 1e6)
                                     if node_cpu_s is not None and stats.transfers_ok else None),
    }


async def find_leaders(session: aiohttp.ClientSession, work: Workload) -> None:
    async with session.get(work.urls[0] + "/v1/cluster") as resp:
        view = await resp.json()
    urls = {n["id"]: n["url"] for n in view["nodes"]}
    work.shard_count = len(view["shards"])
    work.leader_urls = {s["id"]: urls[s["leader"]] for s in view["shards"]}
    async with session.get(work.urls[0] + "/v1/cluster/map") as resp:
        cluster_map = await resp.json()  # route as the nodes do
    work.slot_table = table_of({s["id"]: [tuple(r) for r in s["slot_ranges"]]
                                for s in cluster_map["shards"]})


async def run(args: argparse.Namespace, pids: list[int] | None = None) -> dict:
    """One load run; the CPU of ``pids`` (default: the nodes of ``--cluster-file``) is reported."""
    urls = [u.rstrip("/") for u in args.url.split(",")]
    work = Workload(urls, args.mode, args.batch_size, args.groups,
                    args.prefix or f"lg{int(time.time())}")
    connector = aiohttp.TCPConnector(limit=args.connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await setup(session, work)
        if args.direct:
            await find_leaders(session, work)
        if args.warmup > 0:
            await closed_loop(session, work, Stats(), args.connections,
                              time.perf_counter() + args.warmup)
        stats = Stats()
        if pids is None:
            pids = node_pids(args.cluster_file) if args.cluster_file else []
        cpu_before = sum(process_cpu_s(p) for p in pids)
        started = time.perf_counter()
        until = started + args.duration
        if args.rate:
            await fixed_rate(session, work, stats, args.connections, until, args.rate)
        else:
            await closed_loop(session, work, stats, args.connections, until)
        elapsed = time.perf_counter() - started
        try:
            node_cpu = sum(process_cpu_s(p) for p in pids) - cpu_before if pids else None
        except OSError:  # a node exited during the run: its CPU is gone with it
            node_cpu = None
        return summary(stats, elapsed, work, args, node_cpu)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="comma-separated node base URLs")
    parser.add_argument("--mode", choices=("single", "batch"), default="single")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s; 0 = closed loop")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds not measured")
    parser.add_argument("--groups", type=int, default=512, help="hash-tag groups of accounts")
    parser.add_argument("--prefix", default="", help="id prefix (default: unique per run)")
    parser.add_argument("--direct", action="store_true", help="send each request to its leader")
    parser.add_argument("--cluster-file", default="",
                        help="raftledger up's cluster.json: also report the nodes' CPU per transfer")
    return parser.parse_args(argv)


def execute(args: argparse.Namespace, pids: list[int] | None = None) -> dict:
    try:
        import uvloop

        return uvloop.run(run(args, pids))
    except ImportError:
        return asyncio.run(run(args, pids))


def main(argv: list[str] | None = None) -> None:
    json.dump(execute(parse_args(argv)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
