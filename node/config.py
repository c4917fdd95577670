"""Node and cluster bootstrap configuration (TOML), validated before anything starts.

A node file names the node, its data directory, the cluster secret, the durability mode and the whole
cluster: every node's id, HTTP URL, internal address, one Raft address per shard it hosts and, on the
nodes that host the metadata Raft group (the cluster map; usually three), its Raft address ``meta``;
the shard count, how the 4096 hash slots are first laid out over the shards (``slot_layout``:
``even`` ranges, or ``modulo`` for clusters upgraded from routing by ``sha256 % shards``), and
(optionally) which nodes host which shard — by default every node hosts every shard. The
``[cluster]`` section is what the map is bootstrapped from: it is the same in every node's file.
Tables named after a concern (``[http]``, ``[batching]``, ``[raft]``, ``[snapshots]``, ``[forwarding]``,
``[internal]``, ``[meta]``) set the limits of ``raftledger.node.settings``; docs/configuration.md
lists them all::

    node_id = "n0"
    data_dir = "data/n0"
    secret_file = "cluster.secret"  # the cluster secret (relative to this file's folder), mode 0600
    durability = "fsync"            # or "none" (throw-away dev clusters)
    [http]
    host = "127.0.0.1"
    port = 8080
    [snapshots]                     # optional: any setting of docs/configuration.md
    log_compaction_entries_min = 5000
    [cluster]
    shards = 2
    slot_layout = "even"            # or "modulo" (only when shards divides 4096)
    [[cluster.nodes]]
    id = "n0"
    http = "http://127.0.0.1:8080"
    internal = "127.0.0.1:7080"     # node-to-node protocol (its own listener, sealed with the secret)
    raft = { 0 = "127.0.0.1:9000", 1 = "127.0.0.1:9001" }
    meta = "127.0.0.1:9100"         # this node hosts a member of the metadata group
    [cluster.placement]             # optional
    0 = ["n0", "n1", "n2"]

``ConfigError`` carries every problem found, one per line, so an operator fixes them in one go.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .settings import DURABILITY_MODES, SECTIONS, NodeSettings, load_sections, section_toml, tls_problems

TOP_LEVEL_KEYS = frozenset({"node_id", "data_dir", "secret_file", "durability", "cluster",
                            *(cls.SECTION for cls in SECTIONS)})
NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ADDRESS_PATTERN = re.compile(r"^[A-Za-z0-9.-]+:(\d{1,5})$")
shards_max = 1024
nodes_max = 64
port_max = 65535
SLOTS = 4096  # statemachine.slots.SLOTS (not imported: the config is read before anything else)
SLOT_LAYOUTS = ("even", "modulo")


class ConfigError(ValueError):
    """The configuration cannot run; the message lists every problem found."""


@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: str
    http: str
    internal: str  # "host:port" of the node-to-node listener
    raft: dict[int, str]  # shard -> "host:port"
    meta: str | None = None  # "host:port" of its metadata group member, if it hosts one


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    shards: int
    nodes: tuple[NodeSpec, ...]
    placement: dict[int, tuple[str, ...]]  # shard -> node ids (filled in: every shard present)
    slot_layout: str = "even"  # how the map first lays out the slots

    def meta_hosts(self) -> list[NodeSpec]:
        """The nodes hosting a member of the metadata Raft group."""
        return [n for n in self.nodes if n.meta]

    def node(self, node_id: str) -> NodeSpec:
        return next(n for n in self.nodes if n.id == node_id)

    def replicas(self, shard: int) -> tuple[str, ...]:
        return self.placement[shard]

    def preferred_leader(self, shard: int) -> str:
        """Shard i prefers its (i mod n)-th replica: with the default placement, leaders spread over
        the nodes instead of piling up on whichever node started first."""
        replicas = self.replicas(shard)
        return replicas[shard % len(replicas)]

    def address_to_node(self, shard: int) -> dict[str, str]:
        return {self.node(n).raft[shard]: n for n in self.replicas(shard)}

    def http_urls(self) -> dict[str, str]:
        return {n.id: n.http for n in self.nodes}

    def internal_urls(self, scheme: str = "http") -> dict[str, str]:
        return {n.id: f"{scheme}://{n.internal}" for n in self.nodes}


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    data_dir: str
    secret_file: str
    durability: str
    cluster: ClusterSpec
    settings: NodeSettings = field(default_factory=NodeSettings)

    @property
    def internal_address(self) -> tuple[str, int]:
        host, port = self.cluster.node(self.node_id).internal.rsplit(":", 1)
        return host, int(port)

    @property
    def meta_address(self) -> str | None:
        """This node's Raft address in the metadata group (None: it only follows the map)."""
        return self.cluster.node(self.node_id).meta

    def hosted_shards(self) -> list[int]:
        return [s for s in range(self.cluster.shards) if self.node_id in self.cluster.replicas(s)]


def load(path: str) -> NodeConfig:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = parse(raw, source=path)
    # A relative secret_file is next to the node file, wherever the node is started from.
    secret_file = os.path.join(os.path.dirname(os.path.abspath(path)), config.secret_file)
    return dataclasses.replace(config, secret_file=secret_file)


def parse(raw: dict[str, Any], source: str = "config") -> NodeConfig:
    problems: list[str] = []
    cluster = _parse_cluster(raw.get("cluster"), problems)
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        problems.append(f"unknown settings {unknown}; known: {sorted(TOP_LEVEL_KEYS)}")
    config = NodeConfig(
        node_id=_str(raw, "node_id", problems),
        data_dir=_str(raw, "data_dir", problems),
        secret_file=_str(raw, "secret_file", problems),
        durability=str(raw.get("durability", "fsync")),
        cluster=cluster,
        settings=load_sections(raw, problems),
    )
    problems += validate(config)
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n  - " + "\n  - ".join(problems))
    return config


def validate(config: NodeConfig) -> list[str]:
    problems = validate_cluster(config.cluster)
    if config.durability not in DURABILITY_MODES:
        problems.append(f"durability must be one of {', '.join(DURABILITY_MODES)}, "
                        f"not {config.durability!r}")
    if config.node_id not in {n.id for n in config.cluster.nodes}:
        problems.append(f"node_id {config.node_id!r} is not one of cluster.nodes")
    return problems + tls_problems(config.settings.tls)


def validate_cluster(cluster: ClusterSpec) -> list[str]:
    problems: list[str] = []
    if not 1 <= cluster.shards <= shards_max:
        problems.append(f"cluster.shards must be in 1..{shards_max}, not {cluster.shards}")
    if not 1 <= len(cluster.nodes) <= nodes_max:
        problems.append(f"cluster.nodes must list 1..{nodes_max} nodes")
    problems += _node_problems(cluster)
    problems += _placement_problems(cluster)
    problems += _map_problems(cluster)
    return problems


def _map_problems(cluster: ClusterSpec) -> list[str]:
    problems: list[str] = []
    if cluster.nodes and not cluster.meta_hosts():
        problems.append("no node has a meta address: the metadata Raft group (the cluster map) needs "
                        'at least one; give the first three nodes meta = "host:port"')
    if cluster.slot_layout not in SLOT_LAYOUTS:
        problems.append(f"cluster.slot_layout must be one of {', '.join(SLOT_LAYOUTS)}, "
                        f"not {cluster.slot_layout!r}")
    elif cluster.slot_layout == "modulo" and cluster.shards >= 1 and SLOTS % cluster.shards:
        problems.append(f"cluster.slot_layout modulo needs a shard count that divides {SLOTS}, "
                        f"not {cluster.shards}")
    return problems


def _node_problems(cluster: ClusterSpec) -> list[str]:
    problems: list[str] = []
    seen_ids: set[str] = set()
    seen_addresses: dict[str, str] = {}
    for node in cluster.nodes:
        if not NODE_ID_PATTERN.match(node.id):
            problems.append(f"node id {node.id!r} must be 1-64 chars of A-Z a-z 0-9 _ . -")
        if node.id in seen_ids:
            problems.append(f"node id {node.id!r} appears twice")
        seen_ids.add(node.id)
        if not node.http.startswith(("http://", "https://")):
            problems.append(f"node {node.id}: http {node.http!r} must be an http(s):// URL")
        listeners = [(f"shard {s} raft", a) for s, a in node.raft.items()]
        if node.meta is not None:
            listeners.append(("meta raft", node.meta))
        for what, address in [("internal", node.internal), *listeners]:
            match = ADDRESS_PATTERN.match(address)
            if match is None or not 0 < int(match.group(1)) <= port_max:
                problems.append(f"node {node.id}: {what} address {address!r} must be host:port")
            if address in seen_addresses:
                problems.append(f"address {address} is used twice "
                                f"({seen_addresses[address]} and {node.id} {what})")
            seen_addresses[address] = f"{node.id} {what}"
    return problems


def _placement_problems(cluster: ClusterSpec) -> list[str]:
    problems: list[str] = []
    ids = {n.id for n in cluster.nodes}
    for shard in range(cluster.shards):
        replicas = cluster.placement.get(shard, ())
        if not replicas:
            problems.append(f"shard {shard} has no replicas")
        if len(set(replicas)) != len(replicas):
            problems.append(f"shard {shard} lists a node twice: {list(replicas)}")
        for node_id in replicas:
            if node_id not in ids:
                problems.append(f"shard {shard} placement names unknown node {node_id!r}")
            elif shard not in cluster.node(node_id).raft:
                problems.append(f"node {node_id} hosts shard {shard} but has no raft address for it")
    for shard in cluster.placement:
        if not 0 <= shard < cluster.shards:
            problems.append(f"placement names shard {shard}, outside 0..{cluster.shards - 1}")
    return problems


def _parse_cluster(raw: Any, problems: list[str]) -> ClusterSpec:
    if not isinstance(raw, dict):
        problems.append("missing [cluster] table")
        return ClusterSpec(0, (), {})
    shards = _int(raw, "shards", problems, default=1)
    nodes = tuple(_parse_node(n, i, problems) for i, n in enumerate(raw.get("nodes", [])))
    placement = {int(k): tuple(v) for k, v in _int_keys(raw.get("placement", {}), problems).items()}
    for shard in range(shards):
        placement.setdefault(shard, tuple(n.id for n in nodes))
    unknown = sorted(set(raw) - CLUSTER_KEYS)
    if unknown:
        problems.append(f"[cluster] has unknown settings {unknown}; known: {sorted(CLUSTER_KEYS)}")
    return ClusterSpec(shards, nodes, placement, str(raw.get("slot_layout", "even")))


CLUSTER_KEYS = frozenset({"shards", "nodes", "placement", "slot_layout"})
NODE_KEYS = frozenset({"id", "http", "internal", "raft", "meta"})


def _parse_node(raw: Any, position: int, problems: list[str]) -> NodeSpec:
    if not isinstance(raw, dict):
        problems.append(f"cluster.nodes[{position}] must be a table")
        return NodeSpec(f"?{position}", "", "", {})
    raft = raw.get("raft", {})
    if isinstance(raft, list):
        raft = dict(enumerate(raft))
    unknown = sorted(set(raw) - NODE_KEYS)
    if unknown:
        problems.append(f"cluster.nodes[{position}] has unknown settings {unknown}; "
                        f"known: {sorted(NODE_KEYS)}")
    meta = raw.get("meta")
    return NodeSpec(id=str(raw.get("id", f"?{position}")), http=str(raw.get("http", "")),
                    internal=str(raw.get("internal", "")),
                    raft={int(k): str(v) for k, v in _int_keys(raft, problems).items()},
                    meta=None if meta is None else str(meta))


def _int_keys(raw: Any, problems: list[str]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for key, value in (raw or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            problems.append(f"shard key {key!r} is not an integer")
    return out


def _str(raw: dict[str, Any], key: str, problems: list[str]) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        problems.append(f"{key} is required (a string)")
        return ""
    return value


def _int(raw: dict[str, Any], key: str, problems: list[str], default: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        problems.append(f"{key} must be an integer, not {value!r}")
        return default
    return value


def dump_toml(config: NodeConfig) -> str:
    """The TOML text ``load`` reads back into an equal config (used by ``raftledger up``)."""
    lines = [f"node_id = {_q(config.node_id)}", f"data_dir = {_q(config.data_dir)}",
             f"secret_file = {_q(config.secret_file)}", f"durability = {_q(config.durability)}"]
    for cls in SECTIONS:
        section = section_toml(getattr(config.settings, cls.SECTION))
        lines += ["", *section] if section else []
    lines += ["", "[cluster]", f"shards = {config.cluster.shards}",
              f"slot_layout = {_q(config.cluster.slot_layout)}"]
    for node in config.cluster.nodes:
        raft = ", ".join(f'"{s}" = {_q(a)}' for s, a in sorted(node.raft.items()))
        lines += ["", "[[cluster.nodes]]", f"id = {_q(node.id)}", f"http = {_q(node.http)}",
                  f"internal = {_q(node.internal)}", f"raft = {{ {raft} }}"]
        if node.meta is not None:
            lines.append(f"meta = {_q(node.meta)}")
    lines += ["", "[cluster.placement]"]
    for shard, replicas in sorted(config.cluster.placement.items()):
        lines.append(f'"{shard}" = [{", ".join(_q(r) for r in replicas)}]')
    return "\n".join(lines) + "\n"


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
