"""A real local cluster for tests and benchmarks: node processes on loopback, free ports, one directory.

    with LocalCluster(tmp_path, nodes=3, shards=2) as cluster:
        leader = cluster.leader(0)
        cluster.submit(0, CreateAccount(id="a", currency="USD"))
        cluster.kill(leader)                 # SIGKILL (pause/resume: SIGSTOP/SIGCONT)
        cluster.start_node(leader)           # same data, same ports
        cluster.wait_converged(0)
        with cluster.client() as ledger:     # the public API, through the client library
            ledger.create_account(id="b", currency="USD")

Everything waits by polling with a deadline (``wait_until``, for tests of real clusters too); only
processes this object started are signalled, by pid.

``MetaGroup`` is the metadata Raft group in this process (members on free loopback ports), as
``raftledger.node.testing.ReplicaGroup`` is a shard's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftledger.client import Client
from raftledger.node import frames
from raftledger.node.raft import MemberSettings
from raftledger.node.settings import MetaSettings, NodeSettings
from raftledger.statemachine import codec
from raftledger.statemachine.commands import AnyCommand

from . import launcher
from .follower import MapFollower
from .launcher import wait_until
from .map import ClusterMap
from .meta import META_GROUP, MetaService

__all__ = ["LocalCluster", "MetaGroup", "SubmitFailed", "UpProcess", "wait_until"]

submit_attempts_max = 200
RETRYABLE = frozenset({"not_leader", "unavailable", "overloaded", "outcome_unknown"})
submit_retry_s = 0.05
converge_timeout_s = 60.0


class SubmitFailed(RuntimeError):
    pass


class LocalCluster:
    def __init__(self, root: str | Path, *, nodes: int = 3, shards: int = 2,
                 durability: str = "fsync", settings: NodeSettings | None = None,
                 preexec_fn: Callable[[], None] | None = None, resume: bool = False,
                 credentials: bool = False, use_tls: bool = False) -> None:
        """``preexec_fn`` runs in each node process before it execs (e.g. to lower its rlimits);
        ``resume`` starts the cluster planned in ``root/cluster.json`` (upgrading it as ``raftledger
        up`` does) instead of planning a new one. ``credentials``: the nodes take bearer tokens, and
        the first admin token (``admin_token``, also in cluster.json) is what ``client()`` and
        ``get()`` present; without it the nodes run as ``raftledger up --dev`` does. ``use_tls``: as
        ``raftledger up --tls`` (a local CA; ``client()`` and ``get()`` trust it)."""
        plan = launcher.load_plan(str(root)) if resume else None
        if resume and plan is None:
            raise launcher.LaunchError(f"no {launcher.CLUSTER_FILE} in {root}")
        self.plan = plan or launcher.new_plan(str(root), nodes=nodes, shards=shards,
                                              durability=durability, port_base=None, settings=settings,
                                              use_tls=use_tls)
        auth = dataclasses.replace(self.plan.settings.auth, required=credentials)
        self.plan.settings = dataclasses.replace(self.plan.settings, auth=auth)
        self.procs: dict[str, subprocess.Popen] = {}
        self.preexec_fn = preexec_fn
        self.dial_files: dict[str, str] = {}  # node -> its dial table (``raftledger.node.dial``)
        self.log_dir: str | None = None  # node logs in <log_dir>/<node>/, not in each data dir
        self.node_env: dict[str, dict[str, str]] = {}  # node -> more environment for its process

    # -- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self, timeout_s: float = launcher.ready_timeout_s) -> LocalCluster:
        """Every node answering with a cluster map and every shard with a leader (a majority elects
        one, so the leaders alone do not say that the last node to start is listening yet)."""
        for node_id in self.node_ids:
            self.start_node(node_id, wait=False)
        self.wait_ready(timeout_s)
        for node_id in self.node_ids:
            self._wait_answering(node_id, timeout_s)
        launcher.ensure_admin_token(self.plan, timeout_s)
        return self

    def start_node(self, node_id: str, wait: bool = True) -> None:
        if node_id in self.procs and self.procs[node_id].poll() is None:
            raise RuntimeError(f"{node_id} is already running")
        if self.log_dir:
            os.makedirs(os.path.dirname(self.log_path(node_id)), exist_ok=True)
        self.procs[node_id] = launcher.start_node(self.plan, node_id, preexec_fn=self.preexec_fn,
                                                   dial_file=self.dial_files.get(node_id),
                                                   log_dir=os.path.dirname(self.log_path(node_id)),
                                                   env_extra=self.node_env.get(node_id))
        launcher.save_plan(self.plan)
        if wait:
            self._wait_answering(node_id, launcher.ready_timeout_s)

    def _wait_answering(self, node_id: str, timeout_s: float) -> None:
        """Until the node answers, and routes: it has the cluster map."""
        launcher.wait_until(lambda: (self.status(node_id) or {}).get("map_epoch"),
                            timeout_s, f"{node_id} to answer with a cluster map")

    def kill(self, node_id: str) -> None:
        """SIGKILL: no drain, no flush beyond what already reached the disk."""
        proc = self.procs.pop(node_id)
        proc.send_signal(signal.SIGKILL)
        proc.wait(launcher.stop_timeout_s)

    def pause(self, node_id: str) -> None:
        """SIGSTOP: the node keeps its sockets open but answers nothing (a hung machine)."""
        self.procs[node_id].send_signal(signal.SIGSTOP)

    def resume(self, node_id: str) -> None:
        self.procs[node_id].send_signal(signal.SIGCONT)

    def stop(self, node_id: str) -> int:
        """SIGTERM and wait for the clean shutdown; returns the exit status."""
        return launcher.stop_process(self.procs.pop(node_id))

    def stop_all(self) -> None:
        for node_id in list(self.procs):
            self.stop(node_id)

    def close(self) -> None:
        for node_id in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(node_id)

    # -- views --------------------------------------------------------------------------------------
    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.plan.cluster.nodes]

    @property
    def urls(self) -> dict[str, str]:
        return {n.id: n.http for n in self.plan.cluster.nodes}

    @property
    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items()}

    @property
    def data_dir(self) -> str:
        return self.plan.data_dir

    def log_path(self, node_id: str) -> str:
        folder = os.path.join(self.log_dir, node_id) if self.log_dir else os.path.join(self.data_dir, node_id)
        return os.path.join(folder, "node.log")

    def log(self, node_id: str) -> str:
        with open(self.log_path(node_id), errors="replace") as f:
            return f.read()

    def status(self, node_id: str) -> dict[str, Any] | None:
        return launcher.node_status(self.plan, node_id)

    def wait_ready(self, timeout_s: float = launcher.ready_timeout_s) -> dict[int, str]:
        return launcher.wait_for_leaders(self.plan, timeout_s)

    def leader(self, shard: int, timeout_s: float = launcher.ready_timeout_s) -> str:
        def running_leader() -> str | None:
            found = launcher.leaders(self.plan)[shard]
            return found if found in self.procs else None
        return launcher.wait_until(running_leader, timeout_s, f"a leader of shard {shard}")

    def shard_status(self, shard: int) -> dict[str, dict[str, Any]]:
        """Running node -> that replica's status (with fingerprint) for ``shard``."""
        out = {}
        for node_id in self.procs:
            status = self.status(node_id)
            if status is not None and str(shard) in status["shards"]:
                out[node_id] = status["shards"][str(shard)]
        return out

    def wait_converged(self, shard: int, timeout_s: float = converge_timeout_s) -> tuple[int, str]:
        """Every running replica of ``shard`` at the same commit index with the same fingerprint."""
        expected = {n for n in self.procs if n in self.plan.cluster.replicas(shard)}
        seen: dict[str, Any] = {}

        def same() -> tuple[int, str] | None:
            statuses = self.shard_status(shard)
            seen.update(statuses)
            if set(statuses) != expected:
                return None
            prints = {(s["fingerprint"]["index"], s["fingerprint"]["chain"]) for s in statuses.values()}
            commits = {s["commit_index"] for s in statuses.values()}
            lags = {s["lag"] for s in statuses.values()}
            if len(prints) == 1 and len(commits) == 1 and lags == {0}:
                return prints.pop()
            return None
        try:
            return launcher.wait_until(same, timeout_s, f"shard {shard} replicas to converge")
        except launcher.LaunchError as exc:  # say how they differ: a stuck replica or a divergence
            raise launcher.LaunchError(f"{exc}; last seen: {seen}") from None

    # -- writes and reads ---------------------------------------------------------------------------
    def submit(self, shard: int, command: AnyCommand, timeout_s: float = 30.0,
               cancel: threading.Event | None = None) -> dict[str, Any]:
        """Submit through the shard leader's internal listener, exactly as a forwarding node does,
        retrying the same command while there is no leader or the connection is lost (safe: ids are
        idempotency keys) until ``timeout_s`` or ``cancel`` is set. Returns {"index", "results"},
        results as ``Rendered.to_wire`` (``code``, ``id``, ``replayed``, ``details``, ``record``), or
        {"error": ...} when the node refused the command itself."""
        body = codec.encode_command(command)
        deadline = time.monotonic() + timeout_s
        for _ in range(submit_attempts_max):
            if time.monotonic() > deadline or (cancel is not None and cancel.is_set()):
                break
            try:
                leader = self.leader(shard, min(1.0, max(0.1, deadline - time.monotonic())))
                status, answer = self.call(leader, f"/shards/{shard}/submit", [body])
            except (OSError, launcher.LaunchError):
                time.sleep(submit_retry_s)
                continue
            reply = answer["replies"][0] if status == 200 else answer
            if status == 200 and reply.get("error", {}).get("code") not in RETRYABLE:
                return dict(reply)
            time.sleep(submit_retry_s)
        raise SubmitFailed(f"{command!r} not committed on shard {shard} within {timeout_s}s")

    def call(self, node_id: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """A sealed request to a node's internal listener (``path`` after ``/internal/v1``)."""
        return launcher.call_internal(self.plan, node_id, path, payload)

    def totals(self, node_id: str, shard: int) -> dict[str, Any]:
        status, body = self.call(node_id, f"/shards/{shard}/totals")
        assert status == 200, (status, body)
        return dict(body)

    @property
    def admin_token(self) -> str | None:
        return self.plan.admin_token

    def get(self, node_id: str, path: str) -> tuple[int, Any]:
        """One GET to that node alone (what it answers, unlike a client that picks a node), with
        the admin token when the cluster takes credentials."""
        status, _, body = launcher.http_request("GET", self.urls[node_id] + path,
                                                token=self.admin_token, ca_file=self.plan.ca_file)
        return status, body

    def client(self, **options: Any) -> Client:
        """A ``raftledger.client.Client`` of this cluster (every node as an endpoint; the admin token
        unless ``token=`` names another)."""
        options.setdefault("token", self.admin_token)
        options.setdefault("ca_file", self.plan.ca_file)
        return Client(list(self.urls.values()), **options)


class MetaGroup:
    """The metadata Raft group's members in this process, each with the ``MapFollower`` it feeds.

    ``settings`` fields go to every member's ``MemberSettings`` (``durability=...``, ``raft=...``,
    ``snapshots=...``); members are named ``n0``, ``n1``... after their position."""

    def __init__(self, root: str | Path, first_map: ClusterMap, size: int = 3,
                 secret: bytes = bytes(range(32)), timeouts: MetaSettings | None = None,
                 **settings: Any) -> None:
        self.root = str(root)
        self.first_map = first_map
        self.raft_key = frames.shard_key(secret, META_GROUP)
        self.addresses = [f"{launcher.HOST}:{port}" for port in launcher.free_ports(size)]
        self.timeouts = timeouts or MetaSettings()
        self.overrides = settings
        self.members: dict[int, MetaService] = {}
        self.followers: dict[int, MapFollower] = {}

    def settings(self, i: int) -> MemberSettings:
        return MemberSettings(
            shard=META_GROUP, self_address=self.addresses[i],
            partner_addresses=tuple(a for j, a in enumerate(self.addresses) if j != i),
            directory=os.path.join(self.root, f"meta{i}"), raft_key=self.raft_key, **self.overrides)

    def start(self, i: int) -> MetaService:
        follower = self.followers[i] = MapFollower()
        names = {a: f"n{j}" for j, a in enumerate(self.addresses)}
        self.members[i] = MetaService(self.settings(i), self.first_map, names, follower.update,
                                      self.timeouts)
        return self.members[i]

    def start_all(self) -> None:
        for i in range(len(self.addresses)):
            self.start(i)

    async def stop(self, i: int) -> None:
        await self.members.pop(i).close()

    async def stop_all(self) -> None:
        for i in list(self.members):
            await self.stop(i)

    def leader(self) -> MetaService | None:
        leaders = [m for m in self.members.values() if m.is_leader()]
        return leaders[0] if len(leaders) == 1 else None

    def epochs(self) -> dict[int, int]:
        """Member -> the epoch of the map its follower holds."""
        return {i: self.followers[i].epoch for i in self.members}


class UpProcess:
    """A ``raftledger up`` process as a user runs it (``UpProcess("--data-dir", d, ...)``), its
    output collected line by line; ``stop`` sends SIGTERM, as Ctrl-C would."""

    def __init__(self, *args: str, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "raftledger.cluster.cli", "up", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, text: str) -> None:
        """Until a line containing ``text`` is printed; AssertionError (with the output) when the
        process ends first or the deadline passes."""
        def printed() -> bool:
            if any(text in line for line in self.lines):
                return True
            if self.proc.poll() is not None and not self.reader.is_alive():
                raise AssertionError(f"raftledger up exited before printing {text!r}:\n"
                                     + "\n".join(self.lines))
            return False
        try:
            wait_until(printed, self.timeout_s, f"raftledger up to print {text!r}")
        except launcher.LaunchError:
            raise AssertionError(f"{text!r} not printed; output:\n" + "\n".join(self.lines)) from None

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(self.timeout_s)
