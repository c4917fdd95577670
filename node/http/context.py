"""What the HTTP layer of one node knows: its id, its hosted shard replicas, its peers, its limits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from raftledger.cluster.router import shard_for_account

from ..metrics import Metrics
from ..service import ShardService


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds of the edge. Every wait and every queue has one."""

    body_bytes_max: int = 8 * 2**20
    body_read_timeout_s: float = 10.0
    request_timeout_s: float = 15.0
    requests_in_flight_max: int = 2048
    overloaded_retry_after_s: float = 1.0
    consistency_wait_s: float = 2.0
    forward_timeout_s: float = 12.0
    forward_attempts_max: int = 4
    leader_wait_s: float = 3.0
    peer_status_timeout_s: float = 1.0
    forward_connections_max: int = 256
    # Connections of one listener (node/http/guard.py): at the bound the oldest idle connection is
    # closed for a new one. Never more than the soft descriptor limit less descriptors_reserved,
    # which stay for the journal, snapshots, LMDB, Raft and forwarding.
    connections_max: int = 10_000
    header_timeout_s: float = 10.0  # from opening or the previous response; trickled bytes do not count
    descriptors_reserved: int = 512


@dataclass
class NodeContext:
    """The node seen by its HTTP API.

    ``shards`` are the replicas this node hosts (shard id -> service); ``peers`` maps every node id
    (this one included) to the base URL of its HTTP API; ``placement`` lists, per shard, the nodes
    hosting a replica (default: every peer).
    """

    node_id: str
    shards: Mapping[int, ShardService]
    shard_count: int
    peers: Mapping[str, str] = field(default_factory=dict)
    placement: Mapping[int, Sequence[str]] | None = None
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = None  # type: ignore[assignment]  # None: made in __post_init__
    session: aiohttp.ClientSession | None = None
    forwarders: dict[tuple[str, int], Any] = field(default_factory=dict)  # forward.Forwarder

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = Metrics(self.node_id)

    def shard_of(self, account_id: str) -> int:
        return int(shard_for_account(account_id, self.shard_count))

    def nodes_of(self, shard: int) -> Sequence[str]:
        if self.placement is not None and shard in self.placement:
            return self.placement[shard]
        return sorted(self.peers)

    def peer_url(self, node_id: str) -> str | None:
        return self.peers.get(node_id)

    def client(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            connector = aiohttp.TCPConnector(limit=self.limits.forward_connections_max)
            self.session = aiohttp.ClientSession(connector=connector)
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


CONTEXT = web.AppKey("raftledger_node", NodeContext)


def context_of(request: web.Request) -> NodeContext:
    return request.app[CONTEXT]
