"""A local multi-process cluster on loopback: plan it, write its configs, start, watch and stop it.

``raftledger up`` and ``raftledger.cluster.testing`` both use this module. The plan (node ids, HTTP URLs,
internal and Raft addresses, the metadata group's hosts, placement, slot layout) is written to
``<data-dir>/cluster.json`` together with the node pids; the cluster secret is generated once into
``<data-dir>/cluster.secret`` (mode 0600), never into cluster.json. A second start on the same data
directory reuses both, so the cluster comes back with its data.

A new cluster hosts the metadata group (the cluster map) on its first three nodes (all, when fewer)
and lays the hash slots out evenly. Plans written before that are upgraded in place on their next
start: version 1 (before internal listeners and a secret) and version 2 (before the map) get meta
addresses, and the ``modulo`` slot layout, which keeps every account on the shard that routing by
``sha256 % shards`` gave it; a shard count that does not divide 4096 cannot be carried over and is
refused (``upgrade_layout``).

Node-to-node calls made from here (status, raw submits in tests, shard totals) use the internal
protocol, sealed with the cluster secret (``call_internal``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict
from raftledger.client.core import Send, TransportFailure
from raftledger.client.discovery import CLUSTER_FILE, TOKEN_ENV
from raftledger.client.transport import SyncTransport, trust
from raftledger.cluster import tokens
from raftledger.cluster.map import PutValue
from raftledger.cluster.map import encode_command as encode_map_command
from raftledger.node import secret, tls, wire
from raftledger.node.config import ClusterSpec, NodeConfig, NodeSpec, dump_toml, validate
from raftledger.node.dial import DIAL_FILE_ENV
from raftledger.node.settings import SECTIONS, NodeSettings, load_sections
from raftledger.statemachine.slots import SLOTS

SECRET_FILE = "cluster.secret"
TLS_DIR = "tls"  # raftledger up --tls: the local CA and each node's certificate and key
PLAN_VERSION = 3
META_HOSTS = 3  # nodes of a new plan that host the metadata group (the first ones)
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


def free_ports(count: int, avoid: set[int] | None = None, host: str = HOST) -> list[int]:
    """``count`` distinct free ports: all are held open until every one is picked (one at a time, the
    kernel may hand out the same port twice)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            held.append(s)
            s.bind((host, 0))
            port = int(s.getsockname()[1])
            if port not in (avoid or set()):
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


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
    settings: NodeSettings = field(default_factory=NodeSettings)  # every node's, but its own http
    pids: dict[str, int] = field(default_factory=dict)
    admin_token: str | None = None  # the first admin token's secret (credentials on: ensure_admin_token)
    _sealer: wire.Sealer | None = field(default=None, repr=False, compare=False)

    @property
    def secret_file(self) -> str:
        return os.path.join(self.data_dir, SECRET_FILE)

    @property
    def ca_file(self) -> str | None:
        """The cluster CA every node and client verifies the nodes against (None: no TLS)."""
        return self.settings.tls.ca_file or None

    def local_ca(self) -> tls.LocalCA:
        return tls.LocalCA(os.path.join(self.data_dir, TLS_DIR))

    def node_config(self, node_id: str) -> NodeConfig:
        url = urlsplit(self.cluster.node(node_id).http)
        http = dataclasses.replace(self.settings.http, host=url.hostname or HOST, port=int(url.port or 0))
        settings = dataclasses.replace(self.settings, http=http)
        if self.ca_file:
            cert_file, key_file = self.local_ca().node_files(node_id)
            settings = dataclasses.replace(settings, tls=dataclasses.replace(
                self.settings.tls, cert_file=cert_file, key_file=key_file))
        return NodeConfig(node_id=node_id, data_dir=os.path.join(self.data_dir, node_id),
                          secret_file=self.secret_file, durability=self.durability,
                          cluster=self.cluster, settings=settings)

    @property
    def scheme(self) -> str:
        return "https" if self.ca_file else "http"

    def internal_url(self, node_id: str) -> str:
        return f"{self.scheme}://{self.cluster.node(node_id).internal}"

    def sealer(self) -> wire.Sealer:
        """Seals internal requests with this cluster's secret (generated on first use)."""
        if self._sealer is None:
            if not os.path.exists(self.secret_file):
                os.makedirs(self.data_dir, exist_ok=True)
                secret.generate(self.secret_file)
            self._sealer = wire.Sealer(wire.internal_key(secret.load(self.secret_file)), wire.TOOL_SENDER)
        return self._sealer

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION, "durability": self.durability, "shards": self.cluster.shards,
            "slot_layout": self.cluster.slot_layout, "secret_file": self.secret_file,
            "settings": {cls.SECTION: _changed(getattr(self.settings, cls.SECTION)) for cls in SECTIONS},
            "placement": {str(s): list(r) for s, r in self.cluster.placement.items()},
            "nodes": [{"id": n.id, "http": n.http, "internal": n.internal,
                       "raft": {str(s): a for s, a in n.raft.items()}, "meta": n.meta,
                       "pid": self.pids.get(n.id)} for n in self.cluster.nodes],
            **({"admin_token": self.admin_token} if self.admin_token else {}),
            **({"ca_file": self.ca_file} if self.ca_file else {}),
        }

    @classmethod
    def from_json(cls, data_dir: str, raw: dict[str, Any]) -> Plan:
        """A plan of this version, or of an earlier one: version 1 (before internal listeners: each
        node gets a free port for one; the secret is generated when first needed) and versions 1 and
        2 (before the cluster map: ``upgrade_layout``)."""
        version = raw.get("version")
        if version not in (1, 2, PLAN_VERSION):
            raise LaunchError(f"{data_dir}/{CLUSTER_FILE}: unknown version {version!r}")
        nodes = tuple(NodeSpec(n["id"], n["http"], n.get("internal") or f"{HOST}:{free_port()}",
                               {int(s): a for s, a in n["raft"].items()}, n.get("meta"))
                      for n in raw["nodes"])
        placement = {int(s): tuple(r) for s, r in raw["placement"].items()}
        shards = int(raw["shards"])
        if version == PLAN_VERSION:
            cluster = ClusterSpec(shards, nodes, placement, str(raw["slot_layout"]))
        else:
            cluster = upgrade_layout(ClusterSpec(shards, nodes, placement), data_dir)
        sections = raw.get("settings") or _sections_of_version_1(raw.get("raft") or {})
        problems: list[str] = []
        settings = load_sections(sections, problems)
        if problems:
            raise LaunchError(f"{data_dir}/{CLUSTER_FILE}: " + "; ".join(problems))
        pids = {n["id"]: int(n["pid"]) for n in raw["nodes"] if isinstance(n.get("pid"), int)}
        admin_token = raw.get("admin_token") if isinstance(raw.get("admin_token"), str) else None
        return cls(data_dir, raw["durability"], cluster, settings, pids, admin_token)


def new_plan(data_dir: str, *, nodes: int, shards: int, durability: str,
             port_base: int | None, settings: NodeSettings | None = None, use_tls: bool = False) -> Plan:
    """Node i serves HTTP on port_base + i (free ports when port_base is None); internal and Raft
    ports are free ones. ``use_tls``: every listener but Raft's speaks TLS, with certificates of a
    CA made in ``<data_dir>/tls`` (``node.tls.LocalCA``)."""
    settings = settings or NodeSettings()
    if use_tls:
        ca_file = tls.LocalCA(os.path.join(os.path.abspath(data_dir), TLS_DIR)).cert_file
        settings = dataclasses.replace(settings, tls=dataclasses.replace(settings.tls, ca_file=ca_file))
    scheme = "https" if use_tls else "http"
    taken = {port_base + i for i in range(nodes)} if port_base is not None else set()
    ports = iter(free_ports(nodes * (shards + 3), avoid=taken))
    specs = []
    for i in range(nodes):
        http_port = next(ports) if port_base is None else port_base + i
        raft_ports = {s: f"{HOST}:{next(ports)}" for s in range(shards)}
        meta = f"{HOST}:{next(ports)}" if i < META_HOSTS else None
        specs.append(NodeSpec(f"n{i}", f"{scheme}://{HOST}:{http_port}", f"{HOST}:{next(ports)}",
                              raft_ports, meta))
    ids = tuple(n.id for n in specs)
    cluster = ClusterSpec(shards, tuple(specs), {s: ids for s in range(shards)}, "even")
    plan = Plan(os.path.abspath(data_dir), durability, cluster, settings)
    problems = validate(plan.node_config(ids[0])) if ids else ["no nodes"]
    if problems:
        raise LaunchError("invalid cluster:\n  - " + "\n  - ".join(problems))
    return plan


def upgrade_layout(cluster: ClusterSpec, data_dir: str) -> ClusterSpec:
    """A cluster planned before the map: its first three nodes host the metadata group (on free
    ports), and its slots are laid out ``modulo`` the shard count, which routes every account where
    ``sha256 % shards`` did; refused when the shard count does not divide 4096."""
    if SLOTS % cluster.shards:
        raise LaunchError(
            f"{data_dir}/{CLUSTER_FILE}: this cluster was created before the cluster map, with "
            f"{cluster.shards} shards. It routed accounts by sha256 % {cluster.shards}, and the map's "
            f"{SLOTS} hash slots can keep that routing only when the shard count divides {SLOTS}. "
            "Keep it on the release that created it, or create a new cluster (another --data-dir) "
            "and load its accounts and transactions into it through the API (README, \"Upgrades\").")
    used = {int(a.rsplit(":", 1)[1]) for n in cluster.nodes for a in (n.internal, *n.raft.values())}
    fresh = iter(free_ports(META_HOSTS, avoid=used))
    nodes = tuple(dataclasses.replace(n, meta=n.meta or f"{HOST}:{next(fresh)}")
                  if i < META_HOSTS else n for i, n in enumerate(cluster.nodes))
    return dataclasses.replace(cluster, nodes=nodes, slot_layout="modulo")


# cluster.json of version 1 kept a few tunings under "raft"; where each went.
VERSION_1_TUNINGS = {"log_compaction_entries_min": ("snapshots", "log_compaction_entries_min"),
                     "log_compaction_interval_s": ("snapshots", "log_compaction_interval_s"),
                     "log_compaction_bytes_max": ("snapshots", "log_compaction_bytes_max"),
                     "batch_requests_max": ("batching", "requests_max"),
                     "batch_bytes_max": ("batching", "bytes_max"), "linger_ms": ("batching", "linger_ms")}


def _changed(section: Any) -> dict[str, Any]:
    default = type(section)()
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if getattr(section, f.name) != getattr(default, f.name)}


def _sections_of_version_1(tunings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {}
    for name, value in tunings.items():
        if name in VERSION_1_TUNINGS:
            section, field_name = VERSION_1_TUNINGS[name]
            sections.setdefault(section, {})[field_name] = value
    return sections


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
    """Write cluster.json, readable by its owner only (mode 0600: it holds the admin token)."""
    os.makedirs(plan.data_dir, exist_ok=True)
    path = os.path.join(plan.data_dir, CLUSTER_FILE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path + ".tmp")
    with open(os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(plan.to_json(), f, indent=2)
    os.replace(path + ".tmp", path)


def ensure_admin_token(plan: Plan, timeout_s: float = ready_timeout_s) -> str | None:
    """With credentials on, the first admin token: created once through the metadata group (over the
    internal protocol: whoever holds the cluster secret may), its secret kept in cluster.json. Returns
    it once every node's map holds it (None when credentials are off)."""
    if not plan.settings.auth.required:
        return None
    if plan.admin_token is None:
        record, secret_text = tokens.new_record(tokens.TokenRequest("admin", tokens.ROLE_ADMIN),
                                                time.time_ns())
        command = encode_map_command(PutValue(tokens.SECTION, record.id, record.to_wire()))
        epoch = wait_until(lambda: _propose(plan, command), timeout_s, "the admin token in the map")
        plan.admin_token = secret_text
        save_plan(plan)
        wait_until(lambda: all((node_status(plan, n.id) or {}).get("map_epoch", 0) >= epoch
                               for n in plan.cluster.nodes if n.id in plan.pids),
                   timeout_s, "every node to hold the admin token")
    return plan.admin_token


def _propose(plan: Plan, command: bytes) -> int | None:
    """The map's epoch after ``command``, proposed through any meta host (None: not now)."""
    for node in plan.cluster.nodes:
        if not node.meta:
            continue
        try:
            status, answer = call_internal(plan, node.id, "/meta/propose", command)
        except (OSError, LaunchError):
            continue
        if status == 200 and answer.get("ok"):
            return int(answer["epoch"])
        if status == 200:
            raise LaunchError(f"the map refused the admin token: {answer.get('reason')}")
    return None


def write_node_config(plan: Plan, node_id: str) -> str:
    plan.sealer()  # the secret the config names exists before the node reads it
    if plan.ca_file:  # ... and so do the CA and the node's certificate
        plan.local_ca().issue(node_id)
    config = plan.node_config(node_id)
    os.makedirs(config.data_dir, exist_ok=True)
    path = node_config_path(plan, node_id)
    with open(path, "w") as f:
        f.write(dump_toml(config))
    return path


def busy_ports(plan: Plan) -> list[str]:
    """Ports of the plan that something else holds (a resumed plan reuses its ports)."""
    busy = []
    for node in plan.cluster.nodes:
        addresses = [urlsplit(node.http).netloc, node.internal, *node.raft.values(),
                     *([node.meta] if node.meta else [])]
        busy += [a for a in addresses if not port_is_free(int(a.rsplit(":", 1)[1]))]
    return busy


def start_node(plan: Plan, node_id: str, log_dir: str | None = None,
               preexec_fn: Callable[[], None] | None = None, join: str | None = None,
               dial_file: str | None = None, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    """Start one node process; ``preexec_fn`` runs in the child before it execs (tests use it to
    set resource limits); ``join``: the URL of a node of the cluster it registers with;
    ``dial_file``: where it connects to reach each peer (``raftledger.node.dial``: the chaos
    harness's proxies); ``env_extra``: more environment for it (the chaos harness's libfaketime)."""
    path = write_node_config(plan, node_id)
    log_path = os.path.join(log_dir or plan.node_config(node_id).data_dir, "node.log")
    env = dict(os.environ)
    if join and plan.admin_token:  # it registers through the public API, as an admin
        env[TOKEN_ENV] = plan.admin_token
    if dial_file:
        env[DIAL_FILE_ENV] = dial_file
    env.update(env_extra or {})
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raftledger.cluster.cli", "node", "--config", path,
             *(["--join", join] if join else [])],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=preexec_fn, env=env)
    plan.pids[node_id] = proc.pid
    return proc


def plan_node(plan: Plan, node_id: str) -> NodeSpec:
    """A new node for ``plan`` (``raftledger cluster add-node``): an HTTP, an internal, a Raft port
    per shard and one for a member of the metadata group, all free and none the plan already uses;
    it hosts nothing until the map says."""
    used = {int(a.rsplit(":", 1)[1]) for n in plan.cluster.nodes
            for a in (n.http, n.internal, *n.raft.values(), *([n.meta] if n.meta else []))}
    ports = iter(free_ports(plan.cluster.shards + 3, avoid=used))
    return NodeSpec(node_id, f"{plan.scheme}://{HOST}:{next(ports)}", f"{HOST}:{next(ports)}",
                    {s: f"{HOST}:{next(ports)}" for s in range(plan.cluster.shards)},
                    f"{HOST}:{next(ports)}")


def with_node(plan: Plan, node: NodeSpec) -> None:
    """Add ``node`` to the plan; its placement stays as it is (the map places replicas)."""
    plan.cluster = dataclasses.replace(plan.cluster, nodes=(*plan.cluster.nodes, node))


def without_node(plan: Plan, node_id: str, placement: dict[int, tuple[str, ...]]) -> None:
    """Drop a removed node from the plan; ``placement`` (the map's replica sets) replaces the plan's,
    which named it."""
    plan.cluster = dataclasses.replace(
        plan.cluster, nodes=tuple(n for n in plan.cluster.nodes if n.id != node_id),
        placement={s: placement.get(s, r) for s, r in plan.cluster.placement.items()})
    plan.pids.pop(node_id, None)


def stop_pid(pid: int, config_path: str, timeout_s: float = stop_timeout_s) -> bool:
    """SIGTERM the node process this cluster recorded (perhaps not a child of this process), wait
    for it to go (bounded), then SIGKILL; True once it is gone. A pid whose command line does not
    name ``config_path`` is some other process now: it is left alone."""
    if not _runs(pid, config_path):
        return True
    deadline = time.monotonic() + timeout_s
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        while time.monotonic() < deadline:
            if not is_running(pid):
                return True
            time.sleep(poll_s)
        deadline = time.monotonic() + timeout_s
    return not is_running(pid)


def _runs(pid: int, config_path: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return config_path.encode() in f.read().split(b"\0")
    except OSError:
        return False


def node_config_path(plan: Plan, node_id: str) -> str:
    """Where ``write_node_config`` puts a node's file (its process names it on its command line)."""
    return os.path.join(plan.node_config(node_id).data_dir, "node.toml")


def is_running(pid: int) -> bool:
    """The process runs (a child that exited is reaped; a zombie does not count)."""
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # a child of ours: reap it
        if finished:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# -- raw HTTP (the client library's transport, so the launcher needs no event loop) --------------------
_raw: dict[str | None, SyncTransport] = {}  # by the CA trusted: kept-alive connections, shared below


def http_request(method: str, url: str, body: bytes | None = None,
                 content_type: str = "application/json",
                 timeout_s: float = http_timeout_s,
                 token: str | None = None, ca_file: str | None = None) -> tuple[int, Mapping[str, str], Any]:
    """(status, headers (case-insensitive), decoded JSON body or text) of one request sent as it is
    (tests send malformed bodies through it; API calls go through ``raftledger.client``), with
    ``token`` as its bearer credential and ``https://`` nodes verified against ``ca_file``; HTTP
    errors are answers too. Raises OSError when no answer came."""
    headers = {"Content-Type": content_type} if body else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    transport = _raw.get(ca_file)
    if transport is None:
        transport = _raw[ca_file] = SyncTransport(trust(ca_file))
    answer = transport.send(Send(method, url, headers, body, timeout_s))
    if isinstance(answer, TransportFailure):
        raise OSError(f"{method} {url}: {answer.reason}")
    return answer.status, CIMultiDict(answer.headers), _decode(answer.body)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")


def http_json(method: str, url: str, body: bytes | None = None,
              content_type: str = "application/json",
              timeout_s: float = http_timeout_s, token: str | None = None,
              ca_file: str | None = None) -> tuple[int, Any]:
    status, _, decoded = http_request(method, url, body, content_type, timeout_s, token, ca_file)
    return status, decoded


_trusting = functools.lru_cache(maxsize=8)(trust)  # one context per CA file


def call_internal(plan: Plan, node_id: str, path: str, payload: Any = None,
                  timeout_s: float = http_timeout_s) -> tuple[int, Any]:
    """(status, opened answer) of one sealed request to a node's internal listener (``path`` after
    ``/internal/v1``). Raises OSError when the node cannot be reached, LaunchError when it does not
    take the cluster's secret."""
    sealer = plan.sealer()
    sealed = sealer.seal_request("POST", wire.PREFIX + path, payload)
    url = f"{plan.internal_url(node_id)}{wire.PREFIX}{path}"
    request = urllib.request.Request(url, data=sealed.body, method="POST", headers=sealed.headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=_trusting(plan.ca_file)) as response:
            status, headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, exc.headers, exc.read()
    try:
        return status, sealer.open_answer(sealed, status, headers, body)
    except wire.Unauthenticated:
        raise LaunchError(f"node {node_id} did not take the cluster secret ({status}: "
                          f"{body[:200]!r})") from None


def node_status(plan: Plan, node_id: str) -> dict[str, Any] | None:
    """The node's replicas as it reports them (role, term, indexes, fingerprint), or None."""
    try:
        status, body = call_internal(plan, node_id, "/status")
    except (OSError, ValueError, LaunchError):
        return None
    return body if status == 200 else None


def leaders(plan: Plan) -> dict[int, str | None]:
    """Shard -> leader node id, as reported by the leaders themselves."""
    found: dict[int, str | None] = {s: None for s in range(plan.cluster.shards)}
    for node in plan.cluster.nodes:
        status = node_status(plan, node.id)
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


def ready_leaders(plan: Plan) -> dict[int, str] | None:
    """Shard -> leader once every node that answers has a cluster map and every shard a leader whose
    store holds its slots from the map (it takes client commands); else None."""
    found: dict[int, str | None] = {s: None for s in range(plan.cluster.shards)}
    for node in plan.cluster.nodes:
        status = node_status(plan, node.id)
        if status is None:
            continue
        if not status.get("map_epoch"):
            return None
        for shard, info in status.get("shards", {}).items():
            if info["role"] == "leader" and info.get("slots_epoch"):
                found[int(shard)] = node.id
    return found if all(found.values()) else None  # type: ignore[return-value]


def wait_for_leaders(plan: Plan, timeout_s: float = ready_timeout_s,
                     cancel: threading.Event | None = None) -> dict[int, str]:
    return wait_until(lambda: ready_leaders(plan), timeout_s,
                      "a cluster map on every node and a leader with its slots on every shard", cancel)


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
