"""One running node: its shard replicas, its public API, its internal listener, and clean shutdown.

``start_runtime`` reads the cluster secret and opens a ``ReplicaService`` per hosted shard (each on its
own Raft port, its traffic sealed with the secret) on the running loop. The node follows the cluster
map (``cluster.follower.MapFollower``): as a member of the metadata group when its config names a
``meta`` address (``cluster.meta.MetaService``; later, when the map names it a member:
``MetaHosting``), else by long-polling the group's hosts; each hosted
shard keeps its slots in step with the map (``cluster.shard_slots.keep_slots``). ``serve`` runs a node until
SIGTERM/SIGINT: the public API (``raftledger.node.http``) on the node's HTTP address and the internal
listener (``raftledger.node.http.internal``) on its internal address; then stop accepting, drain the
batchers, stop Raft, close LMDB.

**Replicas follow the map.** Which shards a node hosts, and who its partners are, is what the map
says (``Replicas.reconcile``, on every new map): a shard the map gives the node starts a replica (an
empty one waits to be contacted by the group's leader, which sends it a snapshot and the log), a
shard the map takes away is drained, stopped and its directory set aside (``shard-N.removed-E``,
never deleted), so a later add starts empty. Every map is saved (``cluster-map.bin``): a restarted
node starts the replicas its last map named, even before the metadata group answers. The node files'
placement counts only on a node's first start, when the map is the one it bootstraps; a node started
with ``--join URL`` registers itself through that URL and starts no replica until the map names it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from raftledger.client.discovery import TOKEN_ENV
from raftledger.client.errors import LedgerError, from_wire
from raftledger.cluster import meta as cluster_meta
from raftledger.cluster.follower import MapFollower, long_poll
from raftledger.cluster.map import NODE_REMOVED, ClusterMap, MapError, initial_map
from raftledger.cluster.shard_slots import keep_slots

from . import frames, keys, secret, tls, wire
from .config import NodeConfig
from .files import write_file_durably
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
MAP_FILE = "cluster-map.bin"
join_timeout_s = 120.0  # a node started with --join keeps trying to register for this long
join_retry_s = 1.0


@dataclass
class NodeRuntime:
    """A started node: its config, its shard services by id, and the context its HTTP sides share."""

    config: NodeConfig
    services: dict[int, ReplicaService]
    context: NodeContext
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # following the map
    replicas: Replicas | None = None
    hosting: MetaHosting | None = None

    @property
    def meta(self) -> cluster_meta.MetaService | None:
        """This node's member of the metadata group, while it hosts one."""
        return self.context.meta  # type: ignore[no-any-return]

    @property
    def node_id(self) -> str:
        return self.config.node_id

    async def close(self) -> None:
        self.context.maps.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.replicas is not None:
            self.replicas.close()
            await asyncio.gather(*self.replicas.retiring, return_exceptions=True)
        for service in self.services.values():
            await service.drain()
        for service in self.services.values():
            await service.close()
        if self.hosting is not None:
            await self.hosting.close()


def replica_settings(config: NodeConfig, shard: int, cluster_secret: bytes,
                     cluster_map: ClusterMap | None = None) -> ReplicaSettings:
    """A replica of ``shard`` on this node, its partners as ``cluster_map`` names them (as the node
    files do without one). A replica with no journal yet, started by a map, waits for the group's
    leader to contact it (``MemberSettings.await_leader``)."""
    settings = config.settings
    directory = os.path.join(config.data_dir, f"shard-{shard}")
    common: dict[str, Any] = dict(
        shard=shard, directory=directory, raft_key=frames.shard_key(cluster_secret, shard),
        durability=config.durability, raft=settings.raft, snapshots=settings.snapshots,
        batching=settings.batching, slots_required=True)
    entry = None if cluster_map is None else cluster_map.shard(shard)
    if cluster_map is None or entry is None:
        cluster = config.cluster
        own = cluster.node(config.node_id).raft[shard]
        partners = tuple(cluster.node(n).raft[shard] for n in cluster.replicas(shard)
                         if n != config.node_id)
        return ReplicaSettings(self_address=own, partner_addresses=partners,
                               preferred_leader=cluster.preferred_leader(shard) == config.node_id,
                               address_to_node=cluster.address_to_node(shard), **common)
    addresses = replica_addresses(cluster_map, shard)
    mine = next((a for a, n in addresses.items() if n == config.node_id), None)
    if mine is None:
        raise MapError(f"the map gives node {config.node_id} shard {shard} without a Raft address")
    fresh = not os.path.exists(os.path.join(directory, "raft.journal"))
    return ReplicaSettings(
        self_address=mine, partner_addresses=tuple(a for a in addresses if a != mine),
        preferred_leader=entry.replicas[shard % len(entry.replicas)] == config.node_id,
        address_to_node=addresses, await_leader=fresh, **common)


def replica_addresses(cluster_map: ClusterMap, shard: int) -> dict[str, str]:
    """Raft address -> node id of every replica the map gives ``shard``."""
    entry = cluster_map.shard(shard)
    out: dict[str, str] = {}
    for node_id in entry.replicas if entry is not None else ():
        node = cluster_map.node(node_id)
        address = None if node is None else node.raft_address(shard)
        if address is not None:
            out[address] = node_id
    return out


def hosted_by_map(cluster_map: ClusterMap, node_id: str) -> set[int]:
    node = cluster_map.node(node_id)
    if node is None or node.state == NODE_REMOVED:
        return set()
    return {s.id for s in cluster_map.shards if node_id in s.replicas}


def load_saved_map(data_dir: str) -> ClusterMap | None:
    """The last map this node saw (None before its first)."""
    try:
        with open(os.path.join(data_dir, MAP_FILE), "rb") as f:
            return ClusterMap.unpack(f.read())
    except FileNotFoundError:
        return None
    except (OSError, MapError, ValueError) as exc:
        log.warning("the saved cluster map is unreadable (%s); waiting for the metadata group", exc)
        return None


class Replicas:
    """Starts and stops this node's shard replicas as the map says (module docstring)."""

    def __init__(self, config: NodeConfig, cluster_secret: bytes, services: dict[int, ReplicaService],
                 follower: MapFollower, metrics: Metrics) -> None:
        self.config = config
        self.cluster_secret = cluster_secret
        self.services = services  # shared with the NodeContext: what the API serves
        self.follower = follower
        self.metrics = metrics
        self.slot_keepers: dict[int, asyncio.Task[None]] = {}
        self.retiring: set[asyncio.Future[None]] = set()
        self.acted_epoch = 0  # the epoch of the last map reconciled with: older ones are ignored
        self.hosting: MetaHosting | None = None  # reconciled with each map too
        self._lock = asyncio.Lock()

    def start(self, shard: int, cluster_map: ClusterMap | None) -> None:
        settings = replica_settings(self.config, shard, self.cluster_secret, cluster_map)
        service = ReplicaService(settings, self.config.node_id, metrics=self.metrics)
        self.services[shard] = service
        retry_s = self.config.settings.meta.retry_s
        self.slot_keepers[shard] = asyncio.get_running_loop().create_task(
            keep_slots(service, self.follower, retry_s), name=f"slots-{shard}")
        log.info("shard %d: replica started (partners %s)", shard, list(settings.partner_addresses))

    async def stop(self, shard: int, epoch: int) -> None:
        """Stop serving ``shard`` (no new request finds it), drain, close, set its data aside; a
        shutdown meanwhile waits for it (``retiring``) instead of leaving it half closed."""
        service = self.services.pop(shard)
        keeper = self.slot_keepers.pop(shard, None)
        if keeper is not None:
            keeper.cancel()
        retire = asyncio.ensure_future(self._retire(service, epoch))
        self.retiring.add(retire)
        retire.add_done_callback(self.retiring.discard)
        await asyncio.shield(retire)

    async def _retire(self, service: ReplicaService, epoch: int) -> None:
        await service.drain()
        await service.close()
        directory = service.settings.directory
        if os.path.isdir(directory):
            os.replace(directory, f"{directory}.removed-{epoch}")
        log.info("shard %d: replica stopped; the map (epoch %d) no longer places it here",
                 service.shard, epoch)

    async def reconcile(self, cluster_map: ClusterMap) -> None:
        """Save the map, then start and stop replicas to match it (one reconciliation at a time)."""
        async with self._lock:
            if cluster_map.epoch < self.acted_epoch:
                return
            self.acted_epoch = cluster_map.epoch
            await asyncio.to_thread(write_file_durably, os.path.join(self.config.data_dir, MAP_FILE),
                                    cluster_map.pack())
            wanted = hosted_by_map(cluster_map, self.config.node_id)
            for shard in sorted(wanted - set(self.services)):
                self.start(shard, cluster_map)
            for shard in sorted(set(self.services) - wanted):
                await self.stop(shard, cluster_map.epoch)
            for shard, service in self.services.items():  # new partners get names, not addresses
                service.settings.address_to_node.update(replica_addresses(cluster_map, shard))
            if self.hosting is not None:
                await self.hosting.reconcile(cluster_map)

    async def follow(self) -> None:
        """Forever (cancel to stop): reconcile with every newer map."""
        while not self.follower.closed:
            changed = self.follower.changed()
            current = self.follower.current
            if current is not None and not current.empty:
                try:
                    await self.reconcile(current)
                except (OSError, MapError, LedgerError):
                    log.exception("replicas: reconciling with map epoch %d failed", current.epoch)
            await asyncio.wait({changed})  # shared by every waiter: never cancelled from here

    def close(self) -> None:
        for keeper in self.slot_keepers.values():
            keeper.cancel()


class MetaHosting:
    """Starts and stops this node's member of the metadata group as the map says
    (``ClusterMap.meta_members``), and follows the map by long polls while the node has no member
    that holds a map: before it is a member, and while its new member waits to be added. A member
    the map drops is stopped and its directory set aside (``meta.removed-E``), so a later add starts
    empty, as a replica's does."""

    def __init__(self, config: NodeConfig, cluster_secret: bytes, context: NodeContext,
                 follower: MapFollower) -> None:
        self.config = config
        self.cluster_secret = cluster_secret
        self.context = context
        self.follower = follower
        self.polling: asyncio.Task[None] | None = None

    def start(self, cluster_map: ClusterMap | None) -> None:
        """A member with partners as ``cluster_map`` names them (None: as the node files do)."""
        config = self.config
        settings = cluster_meta.member_settings(config, self.cluster_secret, cluster_map)
        names = cluster_map.meta_addresses() if cluster_map is not None else \
            {n.meta: n.id for n in config.cluster.meta_hosts() if n.meta}
        self.context.meta = cluster_meta.MetaService(settings, initial_map(config.cluster), names,
                                                     self.follower.update, config.settings.meta)
        log.info("metadata group: member started (partners %s)", list(settings.partner_addresses))

    async def stop(self, epoch: int) -> None:
        meta, self.context.meta = self.context.meta, None
        if meta is None:
            return
        await meta.close()
        directory = meta.settings.directory
        if os.path.isdir(directory):
            os.replace(directory, f"{directory}.removed-{epoch}")
        log.info("metadata group: member stopped; the map (epoch %d) no longer names this node", epoch)

    async def reconcile(self, cluster_map: ClusterMap) -> None:
        member = self.config.node_id in cluster_map.meta_members
        if member and self.context.meta is None:
            self.start(cluster_map)
        elif not member and self.context.meta is not None:
            await self.stop(cluster_map.epoch)
        self.follow()

    def follow(self) -> None:
        """Long-poll for the map unless this node's member holds one."""
        meta = self.context.meta
        wanted = meta is None or meta.map.empty
        if wanted and self.polling is None:
            self.polling = asyncio.get_running_loop().create_task(
                follow_map(self.context, self.config), name="map-follower")
        elif not wanted and self.polling is not None:
            self.polling.cancel()
            self.polling = None

    async def close(self) -> None:
        if self.polling is not None:
            self.polling.cancel()
            await asyncio.gather(self.polling, return_exceptions=True)
        meta, self.context.meta = self.context.meta, None
        if meta is not None:
            await meta.close()


def hosts_meta_at_start(config: NodeConfig, saved: ClusterMap | None, join: bool) -> bool:
    """A member by the map this node saved; on a first start, by its node file (a new cluster),
    never when it joins one (the map makes it a member later, if ever)."""
    if saved is not None:
        return config.node_id in saved.meta_members
    return not join and config.meta_address is not None


async def start_runtime(config: NodeConfig, join: bool = False) -> NodeRuntime:
    """Open the replicas this node hosts on the running loop (the tick threads start here): those of
    its last saved map, else (first start) those of its node file, none when it joins a cluster."""
    cluster_secret = secret.load(config.secret_file)
    os.makedirs(config.data_dir, exist_ok=True)
    metrics = Metrics(config.node_id)
    saved = load_saved_map(config.data_dir)
    follower = MapFollower()
    services: dict[int, ReplicaService] = {}
    replicas = Replicas(config, cluster_secret, services, follower, metrics)
    if saved is not None:
        first = sorted(hosted_by_map(saved, config.node_id))
    else:
        first = [] if join else config.hosted_shards()
    for shard in first:
        replicas.start(shard, saved)
    cluster = config.cluster
    scheme = tls.internal_scheme(config.settings.tls)
    context = NodeContext(config.node_id, services, cluster.shards, peers=cluster.http_urls(),
                          placement=dict(cluster.placement), internal_urls=cluster.internal_urls(scheme),
                          internal_scheme=scheme, tls_client=tls.client_context(config.settings.tls),
                          sealer=wire.Sealer(wire.internal_key(cluster_secret), config.node_id),
                          metrics=metrics, settings=config.settings, maps=follower,
                          keys=keys.load_or_create(config.data_dir, config.node_id, time.time_ns()))
    hosting = replicas.hosting = MetaHosting(config, cluster_secret, context, follower)
    if hosts_meta_at_start(config, saved, join):
        hosting.start(saved)
    runtime = NodeRuntime(config, services, context, replicas=replicas, hosting=hosting)
    loop = asyncio.get_running_loop()
    if saved is not None:
        replicas.acted_epoch = saved.epoch  # a member replaying its log must not undo it
        if context.meta is None:
            follower.update(saved)  # route by it until the metadata group's hosts answer
    runtime.tasks.append(loop.create_task(replicas.follow(), name="replicas"))
    hosting.follow()
    return runtime


async def join_cluster(config: NodeConfig, url: str) -> dict[str, Any]:
    """Register this node (its addresses from its node file) through any node's public API
    (``POST /v1/cluster/nodes``), retrying while the cluster cannot answer; raises LedgerError when
    it refuses (a removed id, an id or an address another node holds). On a cluster that takes
    credentials, the admin token comes from ``RAFTLEDGER_TOKEN``."""
    own = config.cluster.node(config.node_id)
    token = os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"id": own.id, "url": own.http, "internal": own.internal,
            "raft": {str(s): a for s, a in sorted(own.raft.items())},
            **({"meta": own.meta} if own.meta else {})}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + join_timeout_s
    last: Exception | None = None
    connector = aiohttp.TCPConnector(ssl=tls.client_context(config.settings.tls) or True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while loop.time() < deadline:
            try:
                async with session.post(url.rstrip("/") + "/v1/cluster/nodes", json=body, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    answer = await resp.json(content_type=None)
                    if resp.status in (200, 201):
                        return dict(answer)
                    refusal = from_wire(resp.status, answer, resp.headers.get("Retry-After"))
                    if not refusal.retryable:
                        raise refusal
                    last = refusal
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last = exc
            log.warning("join %s: not registered yet (%s); retrying", url, last)
            await asyncio.sleep(join_retry_s)  # another process: nothing here can signal it
    raise LedgerError("unavailable", f"could not register with {url} in {join_timeout_s:.0f}s: {last}")


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


async def _listen(app: web.Application, host: str, port: int, http: HttpSettings,
                  ssl_context: ssl.SSLContext | None) -> tuple[web.AppRunner, guard.GuardedSite]:
    """Serve ``app`` behind the listener guard (bounded connections, a header deadline), over TLS
    with ``ssl_context``."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=http_shutdown_s)
    await runner.setup()
    site = guard.GuardedSite(runner, host, port, http=http, reuse_address=True, backlog=http_backlog,
                             ssl_context=ssl_context)
    await site.start()
    return runner, site


async def serve(config: NodeConfig, join: str | None = None) -> None:
    """Run one node until SIGTERM/SIGINT, then shut down in order. With ``join`` (a node's URL),
    register with that cluster once the listeners are up; a refusal stops the node."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime = await start_runtime(config, join=join is not None)
    guard.raise_descriptor_limit()
    internal_host, internal_port = config.internal_address
    internal_http, public_http = listener_settings(config.settings)
    tls_settings = config.settings.tls
    listeners = [await _listen(internal_api.create_app(runtime.context), internal_host, internal_port,
                               internal_http, tls.server_context(tls_settings, internal=True)),
                 await _listen(create_app(runtime.context, config.settings.auth.required),
                               public_http.host, public_http.port, public_http,
                               tls.server_context(tls_settings, internal=False))]
    log.info("node %s serving %s (internal %s) shards %s", config.node_id, listeners[1][1].name,
             listeners[0][1].name, sorted(runtime.services))
    failed: LedgerError | None = None
    try:
        if join is not None:
            registered = await _join_or_stop(config, join, stop)
            failed = registered if isinstance(registered, LedgerError) else None
        if failed is None:
            await stop.wait()
    finally:
        log.info("node %s stopping", config.node_id)
        for _, site in reversed(listeners):
            await site.stop()  # stop accepting
        await runtime.close()  # drain batchers, stop Raft, close LMDB
        for runner, _ in reversed(listeners):
            await runner.cleanup()
    if failed is not None:
        raise SystemExit(f"node {config.node_id}: joining the cluster failed: {failed.message}")


async def _join_or_stop(config: NodeConfig, url: str, stop: asyncio.Event) -> LedgerError | None:
    """Register (``join_cluster``) unless the node is stopped first; the refusal, if refused."""
    joining = asyncio.ensure_future(join_cluster(config, url))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({joining, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not joining.done():
        joining.cancel()
        return None
    try:
        answer = joining.result()
    except LedgerError as exc:
        log.error("node %s: joining through %s refused: %s", config.node_id, url, exc)
        return exc
    log.info("node %s: registered through %s (map epoch %s)", config.node_id, url, answer.get("epoch"))
    return None


def tune_gc() -> None:
    """Fewer, larger garbage collections, with what is loaded at startup left out of them.

    Applying a transfer allocates a few dozen short-lived objects and an entry keeps its results alive
    until it commits, so with the default threshold (700) collections ran every few transfers and took
    about a fifth of apply time (bench_statemachine: about 21k vs 27k transfers per CPU-second at batch
    1000). Cyclic garbage now waits for 50,000 allocations instead of 700: a few MB at most.
    """
    gc.freeze()
    gc.set_threshold(gc_young_threshold, 20, 20)


def run(config: NodeConfig, join: str | None = None) -> None:
    import uvloop

    # The Raft tick threads block in syscalls (poll, send, fdatasync) many times per tick; each time they
    # wait up to the GIL switch interval to get back in while the event loop is busy. A shorter
    # interval keeps heartbeats and acks timely under load.
    sys.setswitchinterval(gil_switch_interval_s)
    tune_gc()
    uvloop.run(serve(config, join))
