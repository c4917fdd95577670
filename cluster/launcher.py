"""A local multi-process cluster on loopback: plan it, write its configs, start, watch and stop it.

``raftledger up`` and ``raftledger.cluster.testing`` both use this module. The plan (node ids, HTTP URLs,
Raft addresses, placement) is written to ``<data-dir>/cluster.json`` together with the node pids; a
second start on the same data directory reuses that plan, so the cluster comes back with its data.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raftledger.node.config import ClusterSpec, NodeConfig, NodeSpec, RaftTuning, dump_toml, validate

CLUSTER_FILE = "cluster.json"
PLAN_VERSION = 1
HOST = "127.0.0.1"
ready_timeout_s = 60.0
stop_timeout_s = 15.0
poll_s = 0.05
http_timeout_s = 2.0


class LaunchError(RuntimeError):
    pass


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@dataclass
class Plan:
    """Everything needed to (re)start the same cluster."""

    data_dir: str
    durability: str
    cluster: ClusterSpec
    raft: RaftTuning = field(default_factory=RaftTuning)
    pids: dict[str, int] = field(default_factory=dict)

    def node_config(self, node_id: str) -> NodeConfig:
        url = self.cluster.node(node_id).http
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return NodeConfig(node_id=node_id, data_dir=os.path.join(self.data_dir, node_id),
                          http_host=host, http_port=int(port), durability=self.durability,
                          cluster=self.cluster, raft=self.raft)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION, "durability": self.durability, "shards": self.cluster.shards,
            "raft": {k: getattr(self.raft, k) for k in RaftTuning.__dataclass_fields__},
            "placement": {str(s): list(r) for s, r in self.cluster.placement.items()},
            "nodes": [{"id": n.id, "http": n.http, "raft": {str(s): a for s, a in n.raft.items()},
                       "pid": self.pids.get(n.id)} for n in self.cluster.nodes],
        }

    @classmethod
    def from_json(cls, data_dir: str, raw: dict[str, Any]) -> Plan:
        if raw.get("version") != PLAN_VERSION:
            raise LaunchError(f"{data_dir}/{CLUSTER_FILE}: unknown version {raw.get('version')!r}")
        nodes = tuple(NodeSpec(n["id"], n["http"], {int(s): a for s, a in n["raft"].items()})
                      for n in raw["nodes"])
        placement = {int(s): tuple(r) for s, r in raw["placement"].items()}
        cluster = ClusterSpec(int(raw["shards"]), nodes, placement)
        return cls(data_dir, raw["durability"], cluster, RaftTuning(**raw.get("raft", {})))


def new_plan(data_dir: str, *, nodes: int, shards: int, durability: str,
             port_base: int | None, raft: RaftTuning | None = None) -> Plan:
    """Node i serves HTTP on port_base + i (free ports when port_base is None); Raft ports are free."""
    specs = []
    for i in range(nodes):
        http_port = free_port() if port_base is None else port_base + i
        raft_ports = {s: f"{HOST}:{free_port()}" for s in range(shards)}
        specs.append(NodeSpec(f"n{i}", f"http://{HOST}:{http_port}", raft_ports))
    ids = tuple(n.id for n in specs)
    cluster = ClusterSpec(shards, tuple(specs), {s: ids for s in range(shards)})
    plan = Plan(os.path.abspath(data_dir), durability, cluster, raft or RaftTuning())
    problems = validate(plan.node_config(ids[0])) if ids else ["no nodes"]
    if problems:
        raise LaunchError("invalid cluster:\n  - " + "\n  - ".join(problems))
    return plan


def load_plan(data_dir: str) -> Plan | None:
    path = os.path.join(data_dir, CLUSTER_FILE)
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LaunchError(f"{path}: unreadable: {exc}") from None
    try:
        return Plan.from_json(os.path.abspath(data_dir), raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise LaunchError(f"{path}: malformed: {exc!r}") from None


def save_plan(plan: Plan) -> None:
    os.makedirs(plan.data_dir, exist_ok=True)
    path = os.path.join(plan.data_dir, CLUSTER_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(plan.to_json(), f, indent=2)
    os.replace(path + ".tmp", path)


def write_node_config(plan: Plan, node_id: str) -> str:
    config = plan.node_config(node_id)
    os.makedirs(config.data_dir, exist_ok=True)
    path = os.path.join(config.data_dir, "node.toml")
    with open(path, "w") as f:
        f.write(dump_toml(config))
    return path


def busy_ports(plan: Plan) -> list[str]:
    """Ports of the plan that something else holds (a resumed plan reuses its ports)."""
    busy = []
    for node in plan.cluster.nodes:
        addresses = [node.http.removeprefix("http://")] + list(node.raft.values())
        busy += [a for a in addresses if not port_is_free(int(a.rsplit(":", 1)[1]))]
    return busy


def start_node(plan: Plan, node_id: str, log_dir: str | None = None,
               preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen:
    """Start one node process; ``preexec_fn`` runs in the child before it execs (tests use it to
    set resource limits)."""
    path = write_node_config(plan, node_id)
    log_path = os.path.join(log_dir or plan.node_config(node_id).data_dir, "node.log")
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raftledger.cluster.cli", "node", "--config", path],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=preexec_fn)
    plan.pids[node_id] = proc.pid
    return proc


# -- HTTP helpers (stdlib only, so the launcher needs no event loop) -------------------------------
def http_request(method: str, url: str, body: bytes | None = None,
                 content_type: str = "application/json",
                 timeout_s: float = http_timeout_s) -> tuple[int, dict[str, str], Any]:
    """(status, headers, decoded JSON body or text) for one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), _decode(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), _decode(exc.read())


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")


def http_json(method: str, url: str, body: bytes | None = None,
              content_type: str = "application/json",
              timeout_s: float = http_timeout_s) -> tuple[int, Any]:
    status, _, decoded = http_request(method, url, body, content_type, timeout_s)
    return status, decoded


def node_status(url: str) -> dict[str, Any] | None:
    try:
        status, body = http_json("GET", url + "/_node/status")
    except (OSError, ValueError):
        return None
    return body if status == 200 else None


def leaders(plan: Plan) -> dict[int, str | None]:
    """Shard -> leader node id, as reported by the leaders themselves."""
    found: dict[int, str | None] = {s: None for s in range(plan.cluster.shards)}
    for node in plan.cluster.nodes:
        status = node_status(node.http)
        for shard, info in (status or {}).get("shards", {}).items():
            if info["role"] == "leader":
                found[int(shard)] = node.id
    return found


def wait_until(predicate: Any, timeout_s: float, what: str,
               cancel: threading.Event | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cancel is not None and cancel.is_set():
            raise LaunchError(f"interrupted while waiting for {what}")
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise LaunchError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def wait_for_leaders(plan: Plan, timeout_s: float = ready_timeout_s,
                     cancel: threading.Event | None = None) -> dict[int, str]:
    def all_led() -> dict[int, str] | None:
        found = leaders(plan)
        return found if all(found.values()) else None  # type: ignore[return-value]
    return wait_until(all_led, timeout_s, "a leader on every shard", cancel)


def stop_process(proc: subprocess.Popen, timeout_s: float = stop_timeout_s) -> int:
    """SIGTERM, wait (bounded), then SIGKILL: only the process we started, by its pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)  # a paused (SIGSTOP) node must run to handle SIGTERM
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout_s)
