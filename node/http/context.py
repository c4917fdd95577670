"""What the HTTP side of one node knows: its id, its hosted shard replicas, its peers, its settings, and
the cluster map it routes by."""

from __future__ import annotations

import ssl
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from raftledger.client.errors import LedgerError
from raftledger.cluster.follower import MapFollower
from raftledger.cluster.map import NODE_REMOVED, ClusterMap, NodeEntry, ShardEntry, layout_ranges

from ..clock import SYSTEM_CLOCK, Clock
from ..metrics import Metrics
from ..service import ShardService
from ..settings import NodeSettings
from ..wire import PeerClocks, Sealer

peer_clocks_memory_windows = 3  # a peer's clock offset is remembered this many replay windows


@dataclass
class NodeContext:
    """The node seen by its HTTP API.

    ``shards`` are the replicas this node hosts (shard id -> service); ``peers`` maps every node id
    (this one included) to the base URL of its HTTP API and ``internal_urls`` to the base URL of its
    internal listener, whose requests ``sealer`` seals with the cluster secret; ``placement`` lists,
    per shard, the nodes hosting a replica (default: every peer).

    ``maps`` holds the cluster map this node routes by (``shard_of``) and signals its changes; a node
    follows the map of its cluster (``node/runtime.py``). Addresses come from the map first (nodes
    that joined after this node's file was written are only there), then from the node file.
    Without a map, the context routes by a fixed map of ``shard_count`` shards laid out evenly
    (tests and tools). ``meta`` is this node's member of
    the metadata group, when it hosts one (a ``raftledger.cluster.meta.MetaService``).
    """

    node_id: str
    shards: Mapping[int, ShardService]
    shard_count: int
    peers: Mapping[str, str] = field(default_factory=dict)
    placement: Mapping[int, Sequence[str]] | None = None
    internal_urls: Mapping[str, str] = field(default_factory=dict)
    sealer: Sealer | None = None
    settings: NodeSettings = field(default_factory=NodeSettings)
    clock: Clock = SYSTEM_CLOCK
    metrics: Metrics = None  # type: ignore[assignment]  # None: made in __post_init__
    session: aiohttp.ClientSession | None = None
    forwarders: dict[tuple[str, int], Any] = field(default_factory=dict)  # forward.Forwarder
    background: set[Any] = field(default_factory=set)  # asyncio tasks off the request path
    completions: dict[int, list[str]] = field(default_factory=dict)  # coordinator -> decisions to Complete
    maps: MapFollower = None  # type: ignore[assignment]  # None: a fixed even map, made in __post_init__
    keys: Any = None  # node.keys.KeyRing: signs tree heads (None: this node signs nothing)
    heads: OrderedDict[tuple[int, int], Any] = field(default_factory=OrderedDict)  # signed heads (tasks)
    meta: Any = None  # cluster.meta.MetaService on a node hosting a member of the metadata group
    internal_scheme: str = "http"  # "https": the cluster's internal listeners speak TLS (node.tls)
    tls_client: ssl.SSLContext | None = None  # what calls to other nodes verify them with
    peer_clocks: PeerClocks = None  # type: ignore[assignment]  # None: made in __post_init__

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = Metrics(self.node_id)
        if self.peer_clocks is None:
            window_s = self.settings.internal.window_s
            self.peer_clocks = PeerClocks(window_s, peer_clocks_memory_windows * window_s,
                                          self.clock.monotonic, own_id=self.node_id)
            self.metrics.watch_clocks(self.peer_clocks.offsets_ns, self.peer_clocks.own_offset_ns)
        if self.maps is None:
            self.maps = MapFollower(fixed_map(self.shard_count, self.placement, self.peers),
                                    clock=self.clock)

    @property
    def cluster_map(self) -> ClusterMap:
        """The map this node routes by; raises 503 ``unavailable`` while it has none."""
        current = self.maps.current
        if current is None:
            raise LedgerError("unavailable", "this node has no cluster map yet", retry_after_s=1.0)
        return current

    def shard_of(self, account_id: str) -> int:
        """The shard the current map gives the account (or transaction id) to."""
        return self.cluster_map.shard_of(account_id)

    def nodes_of(self, shard: int) -> Sequence[str]:
        current = self.maps.current
        entry = None if current is None else current.shard(shard)
        if entry is not None and entry.replicas:
            return entry.replicas
        if self.placement is not None and shard in self.placement:
            return self.placement[shard]
        return sorted(self.peers)

    def peer_url(self, node_id: str) -> str | None:
        node = self._mapped(node_id)
        return node.url if node is not None else self.peers.get(node_id)

    def internal_url(self, node_id: str) -> str | None:
        node = self._mapped(node_id)
        return f"{self.internal_scheme}://{node.internal}" if node is not None and node.internal \
            else self.internal_urls.get(node_id)

    def node_ids(self) -> list[str]:
        """Every node of the cluster this node knows of (the map's, less removed ones, and its file's)."""
        current = self.maps.current
        mapped = [] if current is None else [n.id for n in current.nodes if n.state != NODE_REMOVED]
        removed = set() if current is None else {n.id for n in current.nodes if n.state == NODE_REMOVED}
        return sorted({*mapped, *(n for n in self.peers if n not in removed)})

    def _mapped(self, node_id: str) -> NodeEntry | None:
        current = self.maps.current
        return None if current is None else current.node(node_id)

    def client(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            connector = aiohttp.TCPConnector(limit=self.settings.forwarding.connections_max,
                                             ssl=self.tls_client or True)
            self.session = aiohttp.ClientSession(connector=connector)
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def fixed_map(shard_count: int, placement: Mapping[int, Sequence[str]] | None = None,
              peers: Mapping[str, str] | None = None) -> ClusterMap:
    """A map of ``shard_count`` shards laid out evenly, at epoch 1 (for contexts that follow none)."""
    ranges = layout_ranges(shard_count, "even")
    replicas = {s: tuple((placement or {}).get(s, sorted(peers or {}))) for s in range(shard_count)}
    return ClusterMap(1, (), tuple(ShardEntry(s, replicas[s], 1, ranges[s]) for s in range(shard_count)))


CONTEXT = web.AppKey("raftledger_node", NodeContext)


def context_of(request: web.Request) -> NodeContext:
    return request.app[CONTEXT]
