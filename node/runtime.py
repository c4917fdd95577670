"""One running node: its shard replicas, a small HTTP surface, and clean shutdown.

``start_runtime`` opens a ``ReplicaService`` per hosted shard (each on its own Raft port) on the running
loop. ``build_app`` returns the node's aiohttp application: ``/healthz``, ``/readyz`` and ``/v1/cluster``
plus ``/_node/*`` operational routes used by ``raftledger up`` and the cluster tests. The full HTTP API
mounts itself on the same application through ``mount_api(app, runtime)`` in ``raftledger.node.http``
when that function exists. ``serve`` runs a node until SIGTERM/SIGINT: stop accepting, drain the
batchers, stop Raft, close LMDB.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from raftledger.statemachine import codec
from raftledger.statemachine.audit import currency_totals
from raftledger.statemachine.records import Result

from .config import NodeConfig
from .metrics import Metrics
from .replica import ReplicaService, ReplicaSettings
from .service import NotLeader, Unavailable

log = logging.getLogger(__name__)

BENCH_ENV = "RAFTLEDGER_BENCH"
RAFT_PASSWORD_ENV = "RAFTLEDGER_RAFT_PASSWORD"  # shared secret of every Raft group (optional)
shutdown_drain_s = 5.0
gil_switch_interval_s = 0.0005
gc_young_threshold = 50_000
http_shutdown_s = 2.0
http_backlog = 1024


@dataclass
class NodeRuntime:
    """What the HTTP API needs from a node: its config, its shard services by id, and the metrics
    the Raft glue reports to (``mount_api`` serves these at ``/metrics``)."""

    config: NodeConfig
    services: dict[int, ReplicaService]
    metrics: Metrics | None = None

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def shard_count(self) -> int:
        return self.config.cluster.shards

    @property
    def peers(self) -> dict[str, str]:
        return self.config.cluster.http_urls()

    @property
    def placement(self) -> dict[int, tuple[str, ...]]:
        return dict(self.config.cluster.placement)

    def ready(self) -> bool:
        """Every hosted shard knows a leader."""
        return all(s.leader_node_id() is not None for s in self.services.values())

    async def close(self) -> None:
        for service in self.services.values():
            await service.drain(shutdown_drain_s)
        for service in self.services.values():
            await service.close()


RUNTIME = web.AppKey("raftledger_runtime", NodeRuntime)


def replica_settings(config: NodeConfig, shard: int) -> ReplicaSettings:
    cluster = config.cluster
    own = cluster.node(config.node_id).raft[shard]
    partners = tuple(cluster.node(n).raft[shard] for n in cluster.replicas(shard) if n != config.node_id)
    return ReplicaSettings(
        shard=shard, self_address=own, partner_addresses=partners,
        directory=os.path.join(config.data_dir, f"shard-{shard}"), durability=config.durability,
        address_to_node=cluster.address_to_node(shard),
        log_compaction_entries_min=config.raft.log_compaction_entries_min,
        log_compaction_interval_s=config.raft.log_compaction_interval_s,
        log_compaction_bytes_max=config.raft.log_compaction_bytes_max,
        batch_requests_max=config.raft.batch_requests_max,
        batch_bytes_max=config.raft.batch_bytes_max, linger_ms=config.raft.linger_ms,
        preferred_leader=cluster.preferred_leader(shard) == config.node_id,
        password=os.environ.get(RAFT_PASSWORD_ENV) or None)


async def start_runtime(config: NodeConfig) -> NodeRuntime:
    """Open every hosted shard replica on the running loop (the tick threads start here)."""
    os.makedirs(config.data_dir, exist_ok=True)
    metrics = Metrics(config.node_id)
    services = {}
    for shard in config.hosted_shards():
        services[shard] = ReplicaService(replica_settings(config, shard), config.node_id,
                                         metrics=metrics)
    return NodeRuntime(config, services, metrics)


# -- HTTP -------------------------------------------------------------------------------------------
def _runtime(request: web.Request) -> NodeRuntime:
    return request.app[RUNTIME]


def shard_status(service: ReplicaService) -> dict[str, Any]:
    index, chain = service.fingerprint()
    return {**service.status(), "fingerprint": {"index": index, "chain": chain}}


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "node": _runtime(request).node_id})


async def readyz(request: web.Request) -> web.Response:
    rt = _runtime(request)
    shards = {str(s): svc.leader_node_id() for s, svc in rt.services.items()}
    status = 200 if rt.ready() else 503
    return web.json_response({"ready": status == 200, "node": rt.node_id, "leaders": shards},
                             status=status)


async def cluster_view(request: web.Request) -> web.Response:
    """This node's view: its own replicas in full, the other nodes by URL."""
    rt = _runtime(request)
    nodes = [{"id": n, "url": url} for n, url in sorted(rt.peers.items())]
    shards = []
    for shard, svc in sorted(rt.services.items()):
        status = shard_status(svc)
        shards.append({"id": shard, "leader": status["leader"], "replicas": [status]})
    return web.json_response({"node": rt.node_id, "nodes": nodes, "shards": shards})


async def node_status(request: web.Request) -> web.Response:
    rt = _runtime(request)
    return web.json_response({"node": rt.node_id, "pid": os.getpid(),
                              "shards": {str(s): shard_status(v) for s, v in rt.services.items()}})


def _service(request: web.Request) -> ReplicaService:
    shard = int(request.match_info["shard"])
    service = _runtime(request).services.get(shard)
    if service is None:
        raise web.HTTPNotFound(text=f"shard {shard} is not hosted here")
    return service


def result_json(result: Result) -> dict[str, Any]:
    return {"id": result.id, "code": result.code.name, "ok": result.ok, "replayed": result.replayed}


async def node_submit(request: web.Request) -> web.Response:
    """Submit one command (``codec.encode_command`` bytes) to a local shard replica."""
    service = _service(request)
    command = codec.decode_command(await request.read())
    if isinstance(command, codec.Invalid):
        return web.json_response({"error": {"code": "invalid_command", "message": command.reason}},
                                 status=400)
    try:
        committed = await service.submit(command)
    except Unavailable as exc:
        leader = exc.leader if isinstance(exc, NotLeader) else None
        return web.json_response({"error": {"code": exc.code, "message": str(exc), "leader": leader}},
                                 status=503, headers={"Retry-After": str(max(1, int(exc.retry_after_s)))})
    outcome = committed.outcome
    results = outcome if isinstance(outcome, list) else [outcome]
    return web.json_response({"index": committed.index, "results": [result_json(r) for r in results]})


async def node_totals(request: web.Request) -> web.Response:
    """Per-currency sums over every account of a shard, for ledger invariant checks."""
    service = _service(request)
    with service.store.reader() as reader:
        totals = currency_totals(reader)
        accounts = sum(1 for _ in reader.account_ids())
    names = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
    return web.json_response({"accounts": accounts, "applied_index": service.applied_index(),
                              "currencies": {c: dict(zip(names, v, strict=True))
                                             for c, v in totals.items()}})


_bench_runs: dict[str, asyncio.Task] = {}


async def node_bench(request: web.Request) -> web.Response:
    """Start the in-process load generator against this replica (nodes run with RAFTLEDGER_BENCH=1);
    it runs in the background (longer than any request timeout) and is polled at /_node/bench/{run}."""
    from raftledger.bench.load import run_load

    service = _service(request)
    params = await request.json()
    run = f"{service.shard}.{len(_bench_runs)}"
    _bench_runs[run] = asyncio.create_task(run_load(
        service, transfers=int(params["transfers"]), concurrency=int(params["concurrency"]),
        prefix=str(params["prefix"])))
    return web.json_response({"run": run}, status=202)


async def node_bench_result(request: web.Request) -> web.Response:
    task = _bench_runs.get(request.match_info["run"])
    if task is None:
        raise web.HTTPNotFound(text="no such run")
    if not task.done():
        return web.json_response({"done": False}, status=202)
    return web.json_response({"done": True, **task.result()})


def _api_mount() -> Callable[[web.Application, NodeRuntime], None] | None:
    try:
        module = importlib.import_module("raftledger.node.http")
    except ImportError:
        return None
    return getattr(module, "mount_api", None)


def build_app(runtime: NodeRuntime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/_node/status", node_status)
    app.router.add_post("/_node/shards/{shard}/submit", node_submit)
    app.router.add_get("/_node/shards/{shard}/totals", node_totals)
    if os.environ.get(BENCH_ENV) == "1":
        app.router.add_post("/_node/shards/{shard}/bench", node_bench)
        app.router.add_get("/_node/bench/{run}", node_bench_result)
    mount = _api_mount()
    if mount is not None:
        mount(app, runtime)
    else:
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/v1/cluster", cluster_view)
    return app


# -- process ----------------------------------------------------------------------------------------
async def serve(config: NodeConfig) -> None:
    """Run one node until SIGTERM/SIGINT, then shut down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime = await start_runtime(config)
    runner = web.AppRunner(build_app(runtime), access_log=None, shutdown_timeout=http_shutdown_s)
    await runner.setup()
    from .http import guard  # the listener's connection bound, header deadline, descriptor reserve

    guard.raise_descriptor_limit()
    site = guard.GuardedSite(runner, config.http_host, config.http_port, reuse_address=True,
                             backlog=http_backlog)
    await site.start()
    log.info("node %s serving http://%s:%d shards %s", config.node_id, config.http_host,
             config.http_port, sorted(runtime.services))
    try:
        await stop.wait()
    finally:
        log.info("node %s stopping", config.node_id)
        await site.stop()  # stop accepting
        await runtime.close()  # drain batchers, stop Raft, close LMDB
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
