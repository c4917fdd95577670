"""Faults, planned from a seed and injected one at a time: the same seed plans the same schedule.

Kinds: ``kill`` (SIGKILL, then restart on the same data; biased to shard leaders), ``pause``
(SIGSTOP/SIGCONT), ``isolate`` (every link of one node cut: Raft, metadata Raft and internal),
``blackhole`` (the same, but bytes vanish instead of connections closing), ``split`` (a minority
cut from the majority), ``bridge`` (two halves that only one node still joins), ``slow`` (every link
of one node delayed), ``churn`` (a replica removed through the admin API, then added back), ``disk``
(one node's filesystem filled to ENOSPC, then emptied; a node that stopped on it is restarted) and
``skew`` (one node's wall clock moved 30 s to 10 min ahead or behind, then back; libfaketime).
A target is chosen when the fault starts, from the plan's draw and the cluster as it is then (which
node leads is the one thing a seed cannot fix).
"""

from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster
from raftledger.node.config import ClusterSpec

from .clocks import Clocks
from .disks import Disks
from .history import History
from .proxy import ProxyHub

KINDS = {"kill": 3, "pause": 2, "isolate": 2, "blackhole": 1, "split": 1, "bridge": 1, "slow": 1,
         "churn": 1, "disk": 1, "skew": 1}
LEADER_BIASED = frozenset({"kill", "pause", "disk", "skew"})
fault_s_min, fault_s_max = 2.0, 6.0
gap_s_min, gap_s_max = 1.0, 4.0
leader_bias = 0.7  # share of the LEADER_BIASED faults aimed at a shard leader
skew_s = (30.0, 600.0)  # how far a skewed clock is moved, ahead or behind
slow_link_ms = (50, 300)
membership_timeout_s = 90.0
faults_max = 10_000


@dataclass(frozen=True)
class Planned:
    at_s: float
    kind: str
    duration_s: float
    draw: float  # picks the target
    leader: bool  # aim at a shard leader (LEADER_BIASED kinds)
    amount: float = 0.0  # in [-1, 1): how far and which way a clock is moved (skew)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_schedule(seed: int, duration_s: float, warmup_s: float = 2.0,
                  kinds: frozenset[str] | set[str] | None = None) -> list[Planned]:
    """Faults with gaps between them, filling ``duration_s`` (the last one healed before it ends),
    of the given ``kinds`` only (default: all)."""
    rng = random.Random(seed)
    chosen = [k for k in KINDS if kinds is None or k in kinds]
    weights = [KINDS[k] for k in chosen]
    at, planned = warmup_s, []
    while chosen and len(planned) < faults_max:
        hold = rng.uniform(fault_s_min, fault_s_max)
        if at + hold > duration_s:
            break
        planned.append(Planned(round(at, 3), rng.choices(chosen, weights)[0], round(hold, 3),
                               rng.random(), rng.random() < leader_bias, round(rng.uniform(-1, 1), 6)))
        at += hold + rng.uniform(gap_s_min, gap_s_max)
    return planned


def skew_seconds(planned: Planned) -> float:
    """The clock offset of a ``skew`` fault: ``skew_s`` in magnitude, its sign from ``amount``."""
    low, high = skew_s
    return (1 if planned.amount >= 0 else -1) * (low + abs(planned.amount) * (high - low))


def listening_ports(spec: ClusterSpec) -> set[int]:
    """Every port the cluster's nodes listen on: HTTP, internal, each shard's Raft, the metadata group."""
    addresses = [urlsplit(n.http).netloc for n in spec.nodes]
    for n in spec.nodes:
        addresses += [n.internal, *n.raft.values(), *([n.meta] if n.meta else [])]
    return {int(address.rsplit(":", 1)[1]) for address in addresses}


class Network:
    """A proxy for every link a node dials (per peer: each shard's Raft, the metadata Raft, the
    internal listener), and each node's dial table pointing at its proxies."""

    def __init__(self, hub: ProxyHub, cluster: LocalCluster, directory: str) -> None:
        self.hub = hub
        spec = cluster.plan.cluster
        # The nodes have not started yet: a free port may be one a node will listen on. A proxy
        # there once left a replica unable to bind its Raft port for a whole run (docs/reliability.md).
        hub.reserved |= listening_ports(spec)
        self.nodes = [n.id for n in spec.nodes]
        self.links: dict[tuple[str, str], list[str]] = {}  # (dialer, peer) -> proxy names
        for a in spec.nodes:
            table: dict[str, str] = {}
            for b in spec.nodes:
                if a.id == b.id:
                    continue
                targets = {f"raft{s}": addr for s, addr in b.raft.items() if s in a.raft}
                targets["internal"] = b.internal
                if a.meta and b.meta:
                    targets["meta"] = b.meta
                names = []
                for what, address in targets.items():
                    proxy = hub.add(f"{a.id}>{b.id}:{what}", address)
                    table[address] = proxy.address
                    names.append(proxy.name)
                self.links[(a.id, b.id)] = names
            path = os.path.join(directory, f"dial-{a.id}.json")
            with open(path, "w") as f:
                json.dump(table, f)
            cluster.dial_files[a.id] = path

    def set_between(self, a: str, b: str, mode: str, delay_ms: int = 0) -> None:
        for name in self.links.get((a, b), []) + self.links.get((b, a), []):
            self.hub.set(name, mode, delay_ms)

    def separate(self, side: list[str], mode: str = "cut", delay_ms: int = 0) -> None:
        """Every link between ``side`` and the other nodes set to ``mode``."""
        for a in side:
            for b in self.nodes:
                if b not in side:
                    self.set_between(a, b, mode, delay_ms)

    def heal(self) -> None:
        self.hub.heal_all()


class Nemesis(threading.Thread):
    def __init__(self, cluster: LocalCluster, network: Network, history: History,
                 schedule: list[Planned], stop: threading.Event, disks: Disks | None = None,
                 clocks: Clocks | None = None) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.cluster, self.network, self.history = cluster, network, history
        self.schedule, self.stop_event = schedule, stop
        self.disks, self.clocks = disks, clocks
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for planned in self.schedule:
                if self.stop_event.wait(max(0.0, planned.at_s - self.history.now())):
                    return
                self.inject(planned)
        except BaseException as exc:
            self.error = exc

    def inject(self, planned: Planned) -> None:
        nodes = sorted(self.cluster.procs)
        target = self._pick_target(planned, nodes)
        fault = self.history.fault_started(planned.kind, target)
        heal = getattr(self, f"_{planned.kind}")(target, planned)
        try:
            self.stop_event.wait(planned.duration_s)
        finally:
            note = heal()
            self.history.fault_ended(fault, note or "")

    def _pick_target(self, planned: Planned, nodes: list[str]) -> str:
        if planned.leader and planned.kind in LEADER_BIASED:
            leaders = sorted({n for n in launcher.leaders(self.cluster.plan).values() if n in nodes})
            if leaders:
                return leaders[int(planned.draw * len(leaders))]
        return nodes[int(planned.draw * len(nodes))]

    # each returns what heals it (run once the fault has lasted its time)
    def _kill(self, node: str, planned: Planned) -> Any:
        pid = self.cluster.procs[node].pid
        self.cluster.kill(node)
        if self.clocks is not None:
            self.clocks.forget(pid)
        return lambda: self.cluster.start_node(node)

    def _pause(self, node: str, planned: Planned) -> Any:
        self.cluster.pause(node)
        return lambda: self.cluster.resume(node)

    def _isolate(self, node: str, planned: Planned) -> Any:
        self.network.separate([node], "cut")
        return self.network.heal

    def _blackhole(self, node: str, planned: Planned) -> Any:
        self.network.separate([node], "drop")
        return self.network.heal

    def _split(self, node: str, planned: Planned) -> Any:
        """A minority, starting at ``node``, cut from the rest (with 3 nodes: ``node`` alone)."""
        nodes = self.network.nodes
        start = nodes.index(node)
        minority = (nodes[start:] + nodes[:start])[:(len(nodes) - 1) // 2]
        self.network.separate(minority, "cut")
        return self.network.heal

    def _bridge(self, node: str, planned: Planned) -> Any:
        """Two halves that cannot talk, and ``node`` talking to both."""
        others = [n for n in self.network.nodes if n != node]
        left, right = others[:len(others) // 2], others[len(others) // 2:]
        for a, b in ((a, b) for a in left for b in right):
            self.network.set_between(a, b, "cut")
        return self.network.heal

    def _slow(self, node: str, planned: Planned) -> Any:
        low, high = slow_link_ms
        self.network.separate([node], "pass", delay_ms=int(low + planned.draw * (high - low)))
        return self.network.heal

    def _churn(self, node: str, planned: Planned) -> Any:
        shard = int(planned.draw * 997) % self.cluster.plan.cluster.shards
        status, answer = self._admin("DELETE", f"/v1/shards/{shard}/replicas/{node}", avoid=node)
        removed = status == 200

        def add_back() -> str:
            if not removed:
                return f"shard {shard}: remove refused ({status}: {_error_code(answer)})"
            launcher.wait_until(lambda: self._admin("POST", f"/v1/shards/{shard}/replicas",
                                                    {"node": node}, avoid=node)[0] in (200, 201),
                                membership_timeout_s, f"{node} back in shard {shard}")
            return f"shard {shard}: removed and added back"
        return add_back

    def _disk(self, node: str, planned: Planned) -> Any:
        """The node's filesystem full; once emptied, a node that stopped on it is started again."""
        assert self.disks is not None, "a disk fault planned without filesystems of the nodes' own"
        filled = self.disks.fill(node)

        def drain() -> str:
            self.disks.drain(node)  # type: ignore[union-attr]
            stopped = self.cluster.procs[node]
            if stopped.poll() is None:
                return f"filled {filled} bytes; {node} went on"
            if self.clocks is not None:
                self.clocks.forget(stopped.pid)
            self.cluster.start_node(node)
            return f"filled {filled} bytes; {node} stopped (exit status {stopped.returncode}), restarted"
        return drain

    def _skew(self, node: str, planned: Planned) -> Any:
        assert self.clocks is not None, "a skew fault planned without libfaketime under the nodes"
        seconds = skew_seconds(planned)
        self.clocks.set_offset(node, seconds)

        def back() -> str:
            self.clocks.set_offset(node, 0.0)  # type: ignore[union-attr]
            return f"{node}'s clock {seconds:+.0f}s"
        return back

    def _admin(self, method: str, path: str, body: Any = None, avoid: str = "") -> tuple[int | None, Any]:
        """One admin request through a running node other than ``avoid``."""
        urls = [u for n, u in self.cluster.urls.items() if n != avoid and n in self.cluster.procs]
        raw = None if body is None else json.dumps(body).encode()
        try:
            status, _, answer = launcher.http_request(method, urls[0] + path, raw,
                                                      timeout_s=membership_timeout_s,
                                                      token=self.cluster.admin_token)
        except OSError as exc:
            return None, str(exc)
        return status, answer


def _error_code(answer: Any) -> str:
    return str(answer.get("error", {}).get("code")) if isinstance(answer, dict) else str(answer)


def heal_everything(cluster: LocalCluster, network: Network, disks: Disks | None = None,
                    clocks: Clocks | None = None) -> None:
    """After the run (or a harness error): links healed, disks emptied, clocks set right, paused
    nodes resumed, killed or stopped ones restarted."""
    network.heal()
    for node in list(disks.mounts) if disks is not None else []:
        disks.drain(node)
    if clocks is not None:
        clocks.reset_all()
    for node in list(cluster.procs):
        cluster.resume(node)
    for node in cluster.node_ids:
        if node in cluster.procs and cluster.procs[node].poll() is not None and clocks is not None:
            clocks.forget(cluster.procs[node].pid)
        if node not in cluster.procs or cluster.procs[node].poll() is not None:
            cluster.start_node(node)


__all__ = ["KINDS", "LEADER_BIASED", "Nemesis", "Network", "Planned", "heal_everything", "plan_schedule",
           "skew_seconds"]
