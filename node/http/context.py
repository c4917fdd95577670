"""What the HTTP side of one node knows: its id, its hosted shard replicas, its peers, its settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from raftledger.cluster.router import shard_for_account

from ..clock import SYSTEM_CLOCK, Clock
from ..metrics import Metrics
from ..service import ShardService
from ..settings import NodeSettings
from ..wire import Sealer


@dataclass
class NodeContext:
    """The node seen by its HTTP API.

    ``shards`` are the replicas this node hosts (shard id -> service); ``peers`` maps every node id
    (this one included) to the base URL of its HTTP API and ``internal_urls`` to the base URL of its
    internal listener, whose requests ``sealer`` seals with the cluster secret; ``placement`` lists,
    per shard, the nodes hosting a replica (default: every peer).
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

    def internal_url(self, node_id: str) -> str | None:
        return self.internal_urls.get(node_id)

    def client(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            connector = aiohttp.TCPConnector(limit=self.settings.forwarding.connections_max)
            self.session = aiohttp.ClientSession(connector=connector)
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


CONTEXT = web.AppKey("raftledger_node", NodeContext)


def context_of(request: web.Request) -> NodeContext:
    return request.app[CONTEXT]
