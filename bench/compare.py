"""What users see, against what they would pick instead: raftledger and a PostgreSQL ledger under wrk.

    python -m raftledger.bench.compare [--rounds 3] [--duration 10] [--connections 60]

Starts, in a temporary directory, a fresh raftledger cluster (3 nodes x 2 shards, every shard on all
3 nodes, fsync durability, loopback) and a throw-away PostgreSQL (initdb; ``postgres`` on a free
loopback port with its unix socket in the directory; ``fsync=on``, ``synchronous_commit=on``), served
over HTTP by ``bench/pg_ledger.py`` (aiohttp + asyncpg on uvloop, ``--pg-workers`` processes on one
port). As root, PostgreSQL runs as the unprivileged ``postgres`` user (``--pg-user``): initdb and
the server are started with that uid and gid and the database directory is given to it.

Both get the same accounts (``--groups`` hash-tag groups of 8: ``a<i>:{g<k>}``, flagged
``debits_must_not_exceed_credits``) and are funded the same way (one transfer per account from its
group's ``fund:{g<k>}``), through their own HTTP API. Then wrk (``bench/transfers.lua``) drives each
workload on each system with the same threads, connections and duration: transfers with unique ids
and random amounts between two accounts of one group (one hash tag, so one raftledger shard), single
(``POST /v1/transactions``) or in batches (``POST /v1/transactions/batch``); ``--workloads`` adds
``cross`` (each transfer credits an account of a group on another raftledger shard: two-phase commit)
and ``untagged`` (ids without the group's tag, so the id's home is any shard). wrk thread *i* sends to
raftledger node *i* mod 3 (round-robin over the public URLs, as behind a load balancer: a node that
does not lead the shard forwards the write); every thread sends to the one PostgreSQL port.

Rounds are interleaved (each round runs every workload on both systems, alternating which goes
first) and every run is printed, with errors (non-2xx answers, replays, failed batch items, socket
errors and timeouts) counted and shown; the command exits 1 if any run had one. Everything it starts
it stops by pid, on Ctrl-C and SIGTERM too, and the directory is deleted. PostgreSQL, its HTTP
servers and wrk run in sessions of their own, so a Ctrl-C reaches this process, which stops them in
order (the cluster's nodes, started by ``LocalCluster``, also see it and drain).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import pwd
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from raftledger.bench.host import machine, process_cpu_s
from raftledger.cluster import launcher
from raftledger.cluster.router import shard_for_account
from raftledger.cluster.testing import LocalCluster

NODES = 3
SHARDS = 2
per_group = 8
amount_max = 1000
funding_amount = 10**12  # per account: far more than any run debits from it
currency = "USD"
setup_chunk_items = 1000
setup_timeout_s = 120.0
pg_ready_timeout_s = 60.0
pg_stop_timeout_s = 30.0
server_stop_timeout_s = 15.0
wrk_timeout_s = 10  # a request slower than this counts as an error
wrk_grace_s = 60.0  # beyond the run's duration, before the wrk process is stopped
poll_s = 0.05
LUA_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfers.lua")
RESULT_MARK = "BENCH_RESULT "
SYSTEMS = ("raftledger", "PostgreSQL")
ERROR_KEYS = ("non2xx", "replays", "failed_items", "connect_errors", "read_errors", "write_errors",
              "timeouts")


class Missing(SystemExit):
    """A tool the comparison needs is not installed: the message says what to install."""


# -- what runs ---------------------------------------------------------------------------------------
@dataclass
class Target:
    """One system under load: its public URLs and the processes whose CPU it costs."""

    name: str
    urls: list[str]
    cpu_roots: Callable[[], list[int]]
    token: str | None = None  # the bearer token every request carries (--credentials)
    counters: Callable[[], dict[str, float]] | None = None  # the work done so far (raftledger's metrics)


@dataclass
class Workload:
    name: str
    batch: int  # 0: one transfer per request
    connections: int
    mode: str = "tagged"  # transfers.lua's BENCH_MODE: tagged, untagged or cross

    @property
    def transfers_per_request(self) -> int:
        return self.batch or 1


@dataclass
class Run:
    round: int
    workload: Workload
    system: str
    result: dict[str, Any]
    command: str
    cpu_s: float | None
    load_avg: float
    work: dict[str, float] | None = None  # WORK's counters over the run

    def work_per_transfer(self, name: str) -> float | None:
        ok = self.result["transfers_ok"]
        return self.work[name] / ok if self.work is not None and ok else None

    @property
    def duration_s(self) -> float:
        return self.result["duration_us"] / 1e6

    @property
    def errors(self) -> int:
        return sum(self.result[k] for k in ERROR_KEYS)

    @property
    def transfers_per_s(self) -> float:
        return self.result["transfers_ok"] / self.duration_s

    @property
    def requests_per_s(self) -> float:
        return self.result["requests"] / self.duration_s

    @property
    def cpu_us_per_transfer(self) -> float | None:
        ok = self.result["transfers_ok"]
        return self.cpu_s / ok * 1e6 if self.cpu_s is not None and ok else None


# -- tools -------------------------------------------------------------------------------------------
def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise Missing("wrk is not installed (Debian: apt-get install -y wrk)")
    return found


def postgres_bindir() -> str:
    """The newest /usr/lib/postgresql/<version>/bin (Debian's layout), else initdb on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    initdb = found[-1] if found else shutil.which("initdb")
    if not initdb:
        raise Missing("PostgreSQL is not installed: no initdb under /usr/lib/postgresql/*/bin or on "
                      "PATH (Debian: apt-get install -y postgresql)")
    return os.path.dirname(initdb)


def tool_version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0]


# -- PostgreSQL --------------------------------------------------------------------------------------
class Postgres:
    """A throw-away PostgreSQL server in ``root``: initdb, then ``postgres`` as a child process (so
    this process holds its pid), listening on 127.0.0.1 and a unix socket in ``root``."""

    def __init__(self, root: str, user: str) -> None:
        self.bindir = postgres_bindir()
        self.root = root
        self.data = os.path.join(root, "data")
        self.port = launcher.free_port()
        self.proc: subprocess.Popen | None = None
        self.as_user = self._run_as(user)

    @staticmethod
    def _run_as(user: str) -> dict[str, Any]:
        """PostgreSQL refuses to run as root: as root, run it as ``user`` (uid, gid, no root group)."""
        if os.geteuid() != 0:
            return {}
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise Missing(f"running as root, and PostgreSQL refuses to: there is no user {user!r} to "
                          f"run it as (Debian's postgresql package creates 'postgres'; or "
                          f"useradd --system {user}; or --pg-user NAME)") from None
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/ledger"

    def _own(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        if self.as_user:
            os.chown(self.root, self.as_user["user"], self.as_user["group"])
            parent = os.path.dirname(self.root)
            os.chmod(parent, os.stat(parent).st_mode | 0o711)  # the user must reach its directory

    def start(self) -> None:
        self._own()
        initdb = [os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres",
                  "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"]
        done = subprocess.run(initdb, cwd=self.root, capture_output=True, text=True, check=False,
                              **self.as_user)
        if done.returncode:
            raise SystemExit(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        argv = [os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port),
                "-k", self.root, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on",
                "-c", "synchronous_commit=on", "-c", "full_page_writes=on"]
        with open(os.path.join(self.root, "postgres.log"), "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         **self.as_user)
        self._wait_ready()
        asyncio.run(self._create_database())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + pg_ready_timeout_s
        isready = [os.path.join(self.bindir, "pg_isready"), "-q", "-h", "127.0.0.1",
                   "-p", str(self.port)]
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"postgres exited ({self.proc.returncode}):\n{self.log_tail()}")
            if subprocess.run(isready, check=False).returncode == 0:
                return
            time.sleep(poll_s)  # a process we do not control: poll it until it answers
        raise SystemExit(f"postgres not ready after {pg_ready_timeout_s}s:\n{self.log_tail()}")

    async def _create_database(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn.rsplit("/", 1)[0] + "/postgres")
        try:
            await conn.execute("CREATE DATABASE ledger")
        finally:
            await conn.close()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.root, "postgres.log")) as f:
            return "".join(f.readlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGINT: PostgreSQL's fast shutdown; SIGKILL if it does not finish in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(pg_stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(pg_stop_timeout_s)


class PgLedgerServers:
    """``pg_ledger`` worker processes sharing one port (SO_REUSEPORT)."""

    def __init__(self, root: str, dsn: str, workers: int, pool_size: int) -> None:
        self.root, self.dsn, self.workers, self.pool_size = root, dsn, workers, pool_size
        self.port = launcher.free_port()
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from raftledger.bench import pg_ledger

        asyncio.run(pg_ledger.install_schema(self.dsn))
        for n in range(self.workers):
            with open(os.path.join(self.root, f"pg_ledger-{n}.log"), "ab") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "raftledger.bench.pg_ledger", "--dsn", self.dsn,
                     "--port", str(self.port), "--pool-size", str(self.pool_size)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True))
        launcher.wait_until(self._all_serving, pg_ready_timeout_s, "the PostgreSQL ledger's servers")

    def _all_serving(self) -> bool:
        """Every worker answers (connections land on workers by hash: ask until each has)."""
        for proc in self.procs:
            if proc.poll() is not None:
                raise SystemExit(f"a pg_ledger server exited ({proc.returncode}); see its log in "
                                 f"{self.root}")
        seen = set()
        for _ in range(8 * self.workers):
            try:  # a new connection each time (urllib keeps none alive): one may land on any worker
                with urllib.request.urlopen(self.url + "/healthz", timeout=launcher.http_timeout_s) as answer:
                    seen.add(json.load(answer)["pid"])
            except (OSError, ValueError, KeyError):
                return False
        return seen == {p.pid for p in self.procs}

    def stop(self) -> None:
        for proc in self.procs:
            launcher.stop_process(proc, server_stop_timeout_s)


# -- accounts and funding ----------------------------------------------------------------------------
def account_ids(groups: int) -> list[str]:
    return [f"a{i}:{{g{g}}}" for g in range(groups) for i in range(per_group)]


def setup_requests(groups: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, body): the accounts, then the funding transfers."""
    accounts = [{"id": a, "currency": currency, "flags": ["debits_must_not_exceed_credits"]}
                for a in account_ids(groups)]
    accounts += [{"id": f"fund:{{g{g}}}", "currency": currency} for g in range(groups)]
    funding = [{"id": f"fund.{a}", "debit_account_id": "fund:" + a.split(":", 1)[1],
                "credit_account_id": a, "amount": funding_amount, "currency": currency}
               for a in account_ids(groups)]
    for path, items, key in (("/v1/accounts", accounts, "accounts"),
                             ("/v1/transactions/batch", funding, "transactions")):
        for start in range(0, len(items), setup_chunk_items):
            yield path, {key: items[start:start + setup_chunk_items]}


def set_up_ledger(url: str, groups: int, token: str | None = None) -> None:
    for path, body in setup_requests(groups):
        status, answer = launcher.http_json("POST", url + path, json.dumps(body).encode(),
                                            timeout_s=setup_timeout_s, token=token)
        bad = [r for r in answer.get("results", [])
               if r["status"] != 201] if isinstance(answer, dict) else answer
        if status != 200 or bad:
            raise SystemExit(f"setup of {url} failed: {status} {str(bad or answer)[:500]}")


# -- CPU of a process tree ---------------------------------------------------------------------------
def _parents() -> dict[int, int]:
    out = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError), open(stat) as f:
            fields = f.read().rpartition(")")[2].split()
            out[int(stat.split("/")[2])] = int(fields[1])
    return out


def tree_cpu_s(roots: list[int]) -> float:
    """User + system CPU of ``roots`` and every living descendant (PostgreSQL's backends)."""
    parents = _parents()
    members, frontier = set(roots), list(roots)
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in members]
        members.update(children)
        frontier.extend(children)
    total = 0.0
    for pid in members:
        with contextlib.suppress(OSError):
            total += process_cpu_s(pid)
    return total


# -- wrk ---------------------------------------------------------------------------------------------
def partner_groups(groups: int, shards: int) -> list[int]:
    """For each group, the next group (cyclically) whose tag routes to another raftledger shard: a
    transfer from one to the other is cross-shard."""
    shard = [shard_for_account(f"a0:{{g{g}}}", shards) for g in range(groups)]
    if len(set(shard)) < 2:
        raise SystemExit(f"--groups {groups} all route to one shard: no cross-shard transfer exists")
    return [next(h % groups for h in range(g + 1, g + groups) if shard[h % groups] != shard[g])
            for g in range(groups)]


def wrk_env(target: Target, workload: Workload, prefix: str, args: argparse.Namespace) -> dict[str, str]:
    hosts = ",".join(u.removeprefix("http://") for u in target.urls)
    env = {"BENCH_HOSTS": hosts, "BENCH_BATCH": str(workload.batch), "BENCH_PREFIX": prefix,
           "BENCH_GROUPS": str(args.groups), "BENCH_PER_GROUP": str(per_group),
           "BENCH_AMOUNT_MAX": str(amount_max), "BENCH_CURRENCY": currency, "BENCH_MODE": workload.mode}
    if target.token:
        env["BENCH_TOKEN"] = target.token
    if workload.mode == "cross":
        env["BENCH_PARTNERS"] = ",".join(map(str, partner_groups(args.groups, args.shards)))
    return env


def wrk_argv(target: Target, workload: Workload, threads: int, duration_s: int) -> list[str]:
    return [wrk_binary(), f"--threads={threads}", f"--connections={workload.connections}",
            f"--duration={duration_s}s", f"--timeout={wrk_timeout_s}s", "--latency",
            f"--script={LUA_SCRIPT}", target.urls[0]]


def run_wrk(argv: list[str], env: dict[str, str], duration_s: int) -> tuple[dict[str, Any], str]:
    """(wrk's BENCH_RESULT line, its whole output); the process is stopped however this ends."""
    proc = subprocess.Popen(argv, env=os.environ | env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=duration_s + wrk_grace_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    marked = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode or not marked:
        raise SystemExit(f"wrk failed ({proc.returncode}): {shlex.join(argv)}\n{out[-2000:]}")
    return json.loads(marked[-1][len(RESULT_MARK):]), out


def command_line(argv: list[str], env: dict[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(
        ["wrk", *argv[1:]])


def measure(target: Target, workload: Workload, args: argparse.Namespace, round_no: int,
            run_id: str) -> Run:
    tag = f"{run_id}r{round_no}{workload.name.replace(' ', '')}"
    if args.warmup:
        run_wrk(wrk_argv(target, workload, args.threads, args.warmup),
                wrk_env(target, workload, tag + "w", args), args.warmup)
    env = wrk_env(target, workload, tag + "m", args)
    argv = wrk_argv(target, workload, args.threads, args.duration)
    load_avg = os.getloadavg()[0]
    roots = target.cpu_roots()
    cpu_before = tree_cpu_s(roots) if roots else None
    work_before = target.counters() if target.counters else None
    result, _ = run_wrk(argv, env, args.duration)
    cpu = tree_cpu_s(roots) - cpu_before if cpu_before is not None else None
    work = None
    if target.counters and work_before is not None:
        after = target.counters()
        work = {name: after.get(name, 0.0) - work_before.get(name, 0.0) for name in WORK}
    return Run(round_no, workload, target.name, result, command_line(argv, env), cpu, load_avg, work)


# What each transfer cost the cluster, counted by its own metrics (summed over the nodes): steadier
# than throughput on a shared machine, and what a change to the protocol moves.
WORK = {
    "raft commands": ("raftledger_raft_batch_commands", "sum"),
    "raft entries": ("raftledger_raft_batch_commands", "count"),
    "forwarded commands": ("raftledger_forwarded", "total"),
    "fsyncs": ("raftledger_fsync_seconds", "count"),
}


def cluster_counters(urls: list[str]) -> dict[str, float]:
    """WORK's counters, summed over every node's /metrics."""
    totals = dict.fromkeys(WORK, 0.0)
    wanted = {f"{family}_{suffix}": name for name, (family, suffix) in WORK.items()}
    for url in urls:
        with urllib.request.urlopen(url + "/metrics", timeout=setup_timeout_s) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    totals[wanted[sample.name]] += sample.value
    return totals


# -- the report --------------------------------------------------------------------------------------
TABLE_HEADER = ("| round | workload | system | requests/s | transfers/s | p50 ms | p99 ms | errors "
                "| server CPU µs/transfer | load avg |")


def run_row(run: Run) -> str:
    r = run.result
    cpu = f"{run.cpu_us_per_transfer:,.0f}" if run.cpu_us_per_transfer is not None else "-"
    return (f"| {run.round} | {run.workload.name} | {run.system} | {run.requests_per_s:,.0f} | "
            f"{run.transfers_per_s:,.0f} | {r['p50_us'] / 1000:.1f} | {r['p99_us'] / 1000:.1f} | "
            f"{run.errors:,} | {cpu} | {run.load_avg:.1f} |")


def ratio_rows(runs: list[Run], workloads: list[Workload]) -> list[str]:
    rows = ["| workload | raftledger/PostgreSQL transfers/s, per round | median |", "|---|---|---:|"]
    for w in workloads:
        ratios = []
        for round_no in sorted({r.round for r in runs}):
            pair = {r.system: r for r in runs if r.round == round_no and r.workload.name == w.name}
            if len(pair) == 2 and pair["PostgreSQL"].transfers_per_s:
                ratios.append(pair["raftledger"].transfers_per_s / pair["PostgreSQL"].transfers_per_s)
        median = f"{statistics.median(ratios):.2f}" if ratios else "-"
        rows.append(f"| {w.name} | {' / '.join(f'{x:.2f}' for x in ratios) or '-'} | {median} |")
    return rows


def work_rows(runs: list[Run]) -> list[str]:
    """raftledger's work per transfer, each run (WORK)."""
    rows = ["| round | workload | " + " | ".join(WORK) + " |", "|---:|---|" + "---:|" * len(WORK)]
    for run in runs:
        if run.work is not None:
            cells = (run.work_per_transfer(name) for name in WORK)
            rows.append(f"| {run.round} | {run.workload.name} | "
                        + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return rows


def error_lines(runs: list[Run]) -> list[str]:
    out = []
    for run in runs:
        if run.errors:
            counts = ", ".join(f"{k} {run.result[k]}" for k in ERROR_KEYS if run.result[k])
            out.append(f"ERRORS in round {run.round}, {run.workload.name}, {run.system}: {counts}; "
                       f"first: {run.result['first_error'][:300]}")
    return out


def say(line: str = "") -> None:
    print(line, flush=True)


# -- the command -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every run")
    parser.add_argument("--duration", type=int, default=10, help="seconds measured per run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each run")
    parser.add_argument("--threads", type=int, default=NODES,
                        help="wrk threads (thread i sends to raftledger node i mod 3)")
    parser.add_argument("--connections", type=int, default=60, help="for single transfers")
    parser.add_argument("--batch-connections", type=int, default=6, help="for batches")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--workloads", default="single,batch",
                        help="comma-separated: single, batch, cross (single transfers between accounts "
                             "of two shards), untagged (single transfers whose ids have no hash tag)")
    parser.add_argument("--credentials", action="store_true",
                        help="raftledger takes bearer tokens, as `raftledger up` without --dev: every "
                             "request carries an admin token (the default runs as --dev does)")
    parser.add_argument("--shards", type=int, default=SHARDS, help="raftledger shards (3 nodes host each)")
    parser.add_argument("--groups", type=int, default=512,
                        help=f"hash-tag groups of {per_group} accounts")
    parser.add_argument("--pg-workers", type=int, default=2, help="pg_ledger server processes")
    parser.add_argument("--pg-pool", type=int, default=4,
                        help="PostgreSQL connections per pg_ledger process")
    parser.add_argument("--pg-user", default="postgres", help="who runs PostgreSQL when root")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--duration and --rounds take 1 or more, --warmup 0 or more (whole seconds)")
    for n in (args.connections, args.batch_connections):
        if n < args.threads or n % args.threads:
            parser.error(f"connections ({n}) must be a multiple of --threads ({args.threads}): "
                         "wrk gives every thread connections / threads")
    return args


def workloads_of(args: argparse.Namespace) -> list[Workload]:
    known = {"single": Workload("single", 0, args.connections),
             "batch": Workload(f"batch of {args.batch_size}", args.batch_size,
                               args.batch_connections),
             "cross": Workload("cross-shard", 0, args.connections, "cross"),
             "untagged": Workload("untagged ids", 0, args.connections, "untagged")}
    return [known[name] for name in args.workloads.split(",")]


@dataclass
class Systems:
    """What ``start_systems`` started, for the report and for callers that look inside."""

    targets: dict[str, Target]
    pg: Postgres
    cluster: LocalCluster
    facts: list[str] = field(default_factory=list)


@contextlib.contextmanager
def start_systems(args: argparse.Namespace) -> Iterator[Systems]:
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(tempfile.TemporaryDirectory(prefix="raftledger-compare-"))
        cluster = LocalCluster(os.path.join(root, "raftledger"), nodes=NODES, shards=args.shards,
                               durability="fsync", credentials=args.credentials)
        stack.callback(cluster.close)
        cluster.start()
        pg = Postgres(os.path.join(root, "postgres"), args.pg_user)
        stack.callback(pg.stop)
        pg.start()
        servers = PgLedgerServers(root, pg.dsn, args.pg_workers, args.pg_pool)
        stack.callback(servers.stop)
        servers.start()
        assert pg.proc is not None
        postmaster = pg.proc.pid
        targets = {
            "raftledger": Target("raftledger", list(cluster.urls.values()),
                                 lambda: list(cluster.pids.values()), cluster.admin_token,
                                 lambda: cluster_counters(list(cluster.urls.values()))),
            "PostgreSQL": Target("PostgreSQL", [servers.url],
                                 lambda: [p.pid for p in servers.procs] + [postmaster]),
        }
        facts = [f"PostgreSQL: {tool_version([os.path.join(pg.bindir, 'postgres'), '--version'])}, "
                 f"data in {root} (as user {args.pg_user if pg.as_user else 'self'}), "
                 f"{args.pg_workers} pg_ledger processes x {args.pg_pool} connections",
                 f"raftledger: {NODES} nodes x {args.shards} shards, fsync, credentials "
                 f"{'on (bearer tokens)' if args.credentials else 'off (as --dev)'}, shard leaders "
                 f"{launcher.wait_for_leaders(cluster.plan)}"]
        yield Systems(targets, pg, cluster, facts)


def header(args: argparse.Namespace, argv: list[str], facts: list[str]) -> list[str]:
    return [f"machine: {machine()}",
            f"started: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            f"wrk: {tool_version(['wrk', '--version'])}", *facts,
            f"accounts: {args.groups * per_group:,} in {args.groups} groups of {per_group} (+ one "
            f"funding account per group); {args.threads} wrk threads, {args.duration} s per run "
            f"after {args.warmup} s of warm-up",
            "command: " + shlex.join(["python", "-m", "raftledger.bench.compare", *argv])]


def run_all(args: argparse.Namespace, systems: Systems) -> list[Run]:
    run_id = f"c{int(time.time())}"
    runs = []
    say(TABLE_HEADER)
    say("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for round_no in range(1, args.rounds + 1):
        order = SYSTEMS if round_no % 2 else SYSTEMS[::-1]
        for workload in workloads_of(args):
            for name in order:
                runs.append(measure(systems.targets[name], workload, args, round_no, run_id))
                say(run_row(runs[-1]))
    return runs


def report(runs: list[Run], args: argparse.Namespace) -> int:
    say()
    for line in ratio_rows(runs, workloads_of(args)):
        say(line)
    say()
    say("raftledger's work per transfer (its own metrics, summed over the nodes):")
    for line in work_rows(runs):
        say(line)
    say()
    say("wrk commands (the last round's):")
    last = max(r.round for r in runs)
    for run in runs:
        if run.round == last:
            say(f"  {run.command}")
    problems = error_lines(runs)
    for line in problems:
        say(line)
    return 1 if problems else 0


def main(argv: list[str] | None = None,
         inspect: Callable[[str, Systems], None] | None = None) -> int:
    """Runs the comparison; returns 1 if a run had errors. ``inspect(phase, systems)``, for tests, is
    called once the ledgers are funded ("funded") and after the last run ("finished")."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    wrk_binary()  # fail before starting anything
    postgres_bindir()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with start_systems(args) as systems:
            for line in header(args, argv, systems.facts):
                say(line)
            say()
            for target in systems.targets.values():
                set_up_ledger(target.urls[0], args.groups, target.token)
            if inspect is not None:
                inspect("funded", systems)
            runs = run_all(args, systems)
            if inspect is not None:
                inspect("finished", systems)
        return report(runs, args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted: everything this command started is stopped")
