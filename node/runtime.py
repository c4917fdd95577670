"""One running node: its shard replicas, its public API, its internal listener, and clean shutdown.

``start_runtime`` reads the cluster secret and opens a ``ReplicaService`` per hosted shard (each on its
own Raft port, its traffic sealed with the secret) on the running loop. The node follows the cluster
map (``cluster.follower.MapFollower``): as a member of the metadata group when its config names a
``meta`` address (``cluster.meta.MetaService``), else by long-polling the group's hosts; each hosted
shard keeps its slots in step with the map (``cluster.shard_slots.keep_slots``). ``serve`` runs a node until
SIGTERM/SIGINT: the public API (``raftledger.node.http``) on the node's HTTP address and the internal
listener (``raftledger.node.http.internal``) on its internal address; then stop accepting, drain the
batchers, stop Raft, close LMDB.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from raftledger.cluster import meta as cluster_meta
from raftledger.cluster.follower import MapFollower, long_poll
from raftledger.cluster.map import ClusterMap, initial_map
from raftledger.cluster.shard_slots import keep_slots

from . import frames, secret, wire
from .config import NodeConfig
from .http import NodeContext, create_app, guard
from .http import internal as internal_api
from .http.forward import call_peer
from .metrics import Metrics
from .replica import ReplicaService, ReplicaSettings
from .settings import HttpSettings, NodeSettings

log = logging.getLogger(__name__)

gil_switch_interval_s = 0.0005
gc_young_threshold = 50_000
http_shutdown_s = 2.0
http_backlog = 1024


@dataclass
class NodeRuntime:
    """A started node: its config, its shard services by id, and the context its HTTP sides share."""

    config: NodeConfig
    services: dict[int, ReplicaService]
    context: NodeContext
    meta: cluster_meta.MetaService | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # following the map, keeping slots

    @property
    def node_id(self) -> str:
        return self.config.node_id

    async def close(self) -> None:
        self.context.maps.close()
        for task in self.tasks:
            task.cancel()
        for service in self.services.values():
            await service.drain()
        for service in self.services.values():
            await service.close()
        if self.meta is not None:
            await self.meta.close()


def replica_settings(config: NodeConfig, shard: int, cluster_secret: bytes) -> ReplicaSettings:
    cluster = config.cluster
    own = cluster.node(config.node_id).raft[shard]
    partners = tuple(cluster.node(n).raft[shard] for n in cluster.replicas(shard) if n != config.node_id)
    settings = config.settings
    return ReplicaSettings(
        shard=shard, self_address=own, partner_addresses=partners,
        directory=os.path.join(config.data_dir, f"shard-{shard}"),
        raft_key=frames.shard_key(cluster_secret, shard), durability=config.durability,
        preferred_leader=cluster.preferred_leader(shard) == config.node_id, raft=settings.raft,
        snapshots=settings.snapshots, address_to_node=cluster.address_to_node(shard),
        batching=settings.batching, slots_required=True)


async def start_runtime(config: NodeConfig) -> NodeRuntime:
    """Open every hosted shard replica on the running loop (the tick threads start here)."""
    cluster_secret = secret.load(config.secret_file)
    os.makedirs(config.data_dir, exist_ok=True)
    metrics = Metrics(config.node_id)
    services = {shard: ReplicaService(replica_settings(config, shard, cluster_secret), config.node_id,
                                      metrics=metrics)
                for shard in config.hosted_shards()}
    cluster = config.cluster
    follower = MapFollower()
    meta = None
    if config.meta_address is not None:
        meta = cluster_meta.MetaService(
            cluster_meta.member_settings(config, cluster_secret), initial_map(cluster),
            {n.meta: n.id for n in cluster.meta_hosts() if n.meta}, follower.update,
            config.settings.meta)
    context = NodeContext(config.node_id, services, cluster.shards, peers=cluster.http_urls(),
                          placement=dict(cluster.placement), internal_urls=cluster.internal_urls(),
                          sealer=wire.Sealer(wire.internal_key(cluster_secret), config.node_id),
                          metrics=metrics, settings=config.settings, maps=follower, meta=meta)
    runtime = NodeRuntime(config, services, context, meta)
    loop = asyncio.get_running_loop()
    retry_s = config.settings.meta.retry_s
    runtime.tasks += [loop.create_task(keep_slots(svc, follower, retry_s), name=f"slots-{shard}")
                      for shard, svc in services.items()]
    if meta is None:
        runtime.tasks.append(loop.create_task(follow_map(context, config), name="map-follower"))
    return runtime


async def follow_map(ctx: NodeContext, config: NodeConfig) -> None:
    """A node hosting no member of the metadata group long-polls its hosts for the map."""
    long_poll_s = config.settings.meta.long_poll_s
    configured = [n.id for n in config.cluster.meta_hosts()]

    def hosts() -> list[str]:
        current = ctx.maps.current
        return [n.id for n in current.meta_hosts()] if current is not None else configured

    async def ask(host: str, epoch: int) -> ClusterMap | None:
        answer: Any = await call_peer(ctx, host, "/map", {"epoch": epoch},
                                      timeout_s=long_poll_s + ctx.settings.forwarding.timeout_s)
        return None if answer["map"] is None else ClusterMap.from_wire(answer["map"])

    await long_poll(ctx.maps, hosts, ask, config.settings.meta.follow_retry_s)


def listener_settings(settings: NodeSettings) -> tuple[HttpSettings, HttpSettings]:
    """The internal listener takes at most ``internal.connections_max`` connections; the public one
    keeps that many descriptors free besides its own reserve, so both together never use them up."""
    http, internal = settings.http, settings.internal
    return (dataclasses.replace(http, connections_max=internal.connections_max),
            dataclasses.replace(http, descriptors_reserved=http.descriptors_reserved
                                + internal.connections_max))


async def _listen(app: web.Application, host: str, port: int,
                  http: HttpSettings) -> tuple[web.AppRunner, guard.GuardedSite]:
    """Serve ``app`` behind the listener guard (bounded connections, a header deadline)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=http_shutdown_s)
    await runner.setup()
    site = guard.GuardedSite(runner, host, port, http=http, reuse_address=True, backlog=http_backlog)
    await site.start()
    return runner, site


async def serve(config: NodeConfig) -> None:
    """Run one node until SIGTERM/SIGINT, then shut down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime = await start_runtime(config)
    guard.raise_descriptor_limit()
    internal_host, internal_port = config.internal_address
    internal_http, public_http = listener_settings(config.settings)
    listeners = [await _listen(internal_api.create_app(runtime.context), internal_host, internal_port,
                               internal_http),
                 await _listen(create_app(runtime.context), public_http.host, public_http.port,
                               public_http)]
    log.info("node %s serving http://%s:%d (internal %s:%d) shards %s", config.node_id,
             config.settings.http.host, config.settings.http.port, internal_host, internal_port,
             sorted(runtime.services))
    try:
        await stop.wait()
    finally:
        log.info("node %s stopping", config.node_id)
        for _, site in reversed(listeners):
            await site.stop()  # stop accepting
        await runtime.close()  # drain batchers, stop Raft, close LMDB
        for runner, _ in reversed(listeners):
            await runner.cleanup()


def tune_gc() -> None:
    """Fewer, larger garbage collections, with what is loaded at startup left out of them.

    Applying a transfer allocates a few dozen short-lived objects and an entry keeps its results alive
    until it commits, so with the default threshold (700) collections ran every few transfers and took
    about a fifth of apply time (bench_statemachine: about 21k vs 27k transfers per CPU-second at batch
    1000). Cyclic garbage now waits for 50,000 allocations instead of 700: a few MB at most.
    """
    gc.freeze()
    gc.set_threshold(gc_young_threshold, 20, 20)


def run(config: NodeConfig) -> None:
    import uvloop

    # The Raft tick threads block in syscalls (poll, send, fdatasync) many times per tick; each time they
    # wait up to the GIL switch interval to get back in while the event loop is busy. A shorter
    # interval keeps heartbeats and acks timely under load.
    sys.setswitchinterval(gil_switch_interval_s)
    tune_gc()
    uvloop.run(serve(config))
