"""Admin routes: what ``raftledger verify`` and ``raftledger backup`` ask each node about its replicas.

The work runs where the data is: each node audits its own replicas and answers with a small report
(``GET /v1/admin/verify``), answers its fingerprint at an index the caller names, so that replicas
applying at different speeds are compared at one index (``.../fingerprint?index=N``), sums its
currencies (``.../totals``), reads a replica's cross-shard state for a cut of the cluster
(``.../cut``, ``raftledger.cluster.cut``), and streams a consistent copy of a replica's store
(``.../backup``: one LMDB read transaction, copied through a pipe so the node holds one chunk in
memory, not the shard). ``GET /v1/admin/cluster/map`` is the whole map as the metadata group holds
it (addresses and sections included), for a backup.

What reads a whole store runs on a worker thread, under a store lease (``ShardService.store_lease``):
a snapshot installed meanwhile replaces the store, and the replaced one stays open until the read ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from aiohttp import web
from raftledger.client.errors import LedgerError
from raftledger.cluster.cut import summarize
from raftledger.statemachine.audit import currency_totals, verify_store
from raftledger.statemachine.layout import unpack_leg
from raftledger.statemachine.store import LedgerStore, Reader

from ..service import ShardService
from . import parse, reads
from .auth import require_accounts
from .context import NodeContext, context_of
from .render import respond

log = logging.getLogger(__name__)

APPLIED_INDEX_HEADER = "X-Ledger-Applied-Index"
FINGERPRINT_HEADER = "X-Ledger-Fingerprint"
MAP_EPOCH_HEADER = "X-Ledger-Map-Epoch"
NODE_HEADER = "X-Ledger-Node"
OCTETS = "application/octet-stream"

backup_chunk_bytes = 1 << 20
problems_reported_max = 200  # per replica; the count says how many there were
open_legs_reported_max = 1000
grace_s_default = 60  # above the resolver's prepare_timeout_s (30 s): younger legs may be in flight
fingerprint_wait_s_max = 30
TOTALS_NAMES = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
OPEN_LEG_STATUSES = ("prepared", "held")


def _hosted(ctx: NodeContext, request: web.Request) -> ShardService:
    shard = int(request.match_info["shard"])
    svc = ctx.shards.get(shard)
    if svc is None:
        raise LedgerError("not_found", f"node {ctx.node_id} hosts no replica of shard {shard}",
                          details={"shard": shard, "node": ctx.node_id})
    return svc


# -- verify ----------------------------------------------------------------------------------------

def _totals_json(reader: Reader) -> dict[str, dict[str, int]]:
    return {c: dict(zip(TOTALS_NAMES, v, strict=True)) for c, v in sorted(currency_totals(reader).items())}


def _open_legs(reader: Reader, prepared_before_ns: int) -> list[dict[str, Any]]:
    """Legs still holding funds (prepared, or kept as a cross-shard hold) placed before the cutoff:
    the caller asks each one's home whether a decision should have closed it."""
    found: list[dict[str, Any]] = []
    for _key, raw in reader.txn.cursor(db=reader.dbs.legs):
        leg = unpack_leg(raw)
        if leg.status in OPEN_LEG_STATUSES and leg.timestamp < prepared_before_ns:
            found.append({"id": leg.id, "status": leg.status, "coordinator": leg.coordinator,
                          "timestamp": leg.timestamp})
            if len(found) >= open_legs_reported_max:
                break
    return found


def audit_replica(node_id: str, svc: ShardService, store: LedgerStore, prepared_before_ns: int
                  ) -> dict[str, Any]:
    """One replica checks itself (``statemachine.audit.verify_store``) in one read transaction."""
    with store.reader() as reader:
        state = reader.state()
        problems = verify_store(reader)
        report = {
            "shard": svc.shard, "node": node_id, "role": "leader" if svc.is_leader() else "follower",
            "applied_index": state.applied_index, "fingerprint": state.chain.hex(),
            "accounts": reader.txn.stat(reader.dbs.accounts)["entries"],
            "entries": reader.txn.stat(reader.dbs.entries)["entries"],
            "transactions": reader.txn.stat(reader.dbs.transactions)["entries"],
            "currencies": _totals_json(reader),
            "open_legs": _open_legs(reader, prepared_before_ns),
            "problems": problems[:problems_reported_max], "problems_count": len(problems)}
    return report


async def verify(request: web.Request) -> web.Response:
    """This node's replicas, each audited against the ledger's invariants."""
    ctx = context_of(request)
    parse.check_query(request.query, frozenset({"grace_s"}))
    grace_s = parse.query_int(request.query, "grace_s", 0, 86_400, grace_s_default)
    assert grace_s is not None
    cutoff_ns = time.time_ns() - grace_s * 1_000_000_000
    replicas = []
    for _shard, svc in sorted(ctx.shards.items()):
        with svc.store_lease() as store:  # off the event loop: an audit reads the whole store
            replicas.append(await asyncio.to_thread(audit_replica, ctx.node_id, svc, store, cutoff_ns))
    return respond(request, 200, {"node": ctx.node_id, "map_epoch": ctx.maps.epoch,
                                  "replicas": replicas})


async def fingerprint(request: web.Request) -> web.Response:
    """The replica's fingerprint right after the last entry at or below ``index`` (waiting, bounded,
    until it has applied that far)."""
    ctx = context_of(request)
    svc = _hosted(ctx, request)
    parse.check_query(request.query, frozenset({"index", "wait_s"}))
    index = parse.query_int(request.query, "index", 0)
    wait_s = parse.query_int(request.query, "wait_s", 0, fingerprint_wait_s_max, 10)
    if index is None or wait_s is None:
        raise LedgerError("invalid_query", "index is required", details={"param": "index"})
    if not await svc.wait_applied(index, wait_s):
        raise LedgerError("stale_replica", f"shard {svc.shard} on {ctx.node_id} has not applied "
                          f"index {index} within {wait_s}s", details={"applied_index": svc.applied_index()})
    history = getattr(svc, "fingerprints", None)
    found = None if history is None else history.at(index)
    if found is None:
        raise LedgerError("fingerprint_not_kept", f"shard {svc.shard} on {ctx.node_id} no longer "
                          f"remembers its fingerprint at index {index}; ask at a later one",
                          details={"applied_index": svc.applied_index()})
    return respond(request, 200, {"shard": svc.shard, "node": ctx.node_id, "asked": index,
                                  "index": found[0], "fingerprint": found[1]})


async def totals(request: web.Request) -> web.Response:
    """Per-currency sums over every account of this node's replica of the shard."""
    ctx = context_of(request)
    svc = _hosted(ctx, request)
    parse.check_query(request.query, frozenset())
    with svc.store.reader() as reader:
        body = {"shard": svc.shard, "node": ctx.node_id, "applied_index": reader.state().applied_index,
                "currencies": _totals_json(reader)}
    return respond(request, 200, body)


async def cut(request: web.Request) -> web.Response:
    """This replica's cross-shard state in one read transaction (``raftledger.cluster.cut``): its
    per-currency totals, every open leg and open decision, and the legs, decisions and aborts since
    ``since_ns``. ``raftledger verify`` reads every shard at once and checks the readings fit.
    ``accounts`` adds their balances, read in the same transaction (after the consistency asked
    for): with the legs in flight, a set of accounts over several shards can be reconciled at one
    consistent cut (the chaos harness checks money conservation so)."""
    ctx = context_of(request)
    svc = _hosted(ctx, request)
    parse.check_query(request.query, frozenset({"since_ns", "accounts"}) | parse.READ_PARAMS)
    since_ns = parse.query_int(request.query, "since_ns", 0, 2**64 - 1, 0)
    assert since_ns is not None
    accounts = reads.accounts_of_shard(ctx, svc.shard, request.query.get("accounts"))
    require_accounts(request, accounts)
    await reads.ensure_consistency(ctx, svc, parse.parse_read_params(request.query, ctx.shard_count))
    svc = _hosted(ctx, request)  # still here after the barrier: its store is open

    def read(store: LedgerStore) -> dict[str, Any]:
        with store.reader() as reader:
            return {**summarize(reader, since_ns, ctx.node_id).to_json(),
                    "balances": reads.balances(reader, accounts)}

    with svc.store_lease() as store:
        body = await asyncio.to_thread(read, store)
    body["role"] = "leader" if svc.is_leader() else "follower"
    return respond(request, 200, body)


# -- backup ----------------------------------------------------------------------------------------

async def cluster_map(request: web.Request) -> web.Response:
    """The whole cluster map (msgpack, ``ClusterMap.pack``), its epoch in a header."""
    ctx = context_of(request)
    parse.check_query(request.query, frozenset())
    current = ctx.cluster_map
    return web.Response(body=current.pack(), content_type=OCTETS,
                        headers={MAP_EPOCH_HEADER: str(current.epoch), NODE_HEADER: ctx.node_id})


async def backup_shard(request: web.Request) -> web.StreamResponse:
    """A consistent, compacted copy of this replica's store, streamed; its applied index and
    fingerprint are in the headers (they come from the read transaction the copy is made in)."""
    ctx = context_of(request)
    svc = _hosted(ctx, request)
    parse.check_query(request.query, frozenset())
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    started: asyncio.Future[tuple[int, str]] = loop.create_future()

    def settle(value: tuple[int, str] | BaseException) -> None:
        if started.done():
            return
        if isinstance(value, BaseException):
            started.set_exception(value)
        else:
            started.set_result(value)

    def copy() -> None:  # a worker thread: LMDB writes the copy into the pipe
        try:
            store.copy_to_fd(write_fd, before_copy=lambda fp: loop.call_soon_threadsafe(settle, fp))
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, exc)
            raise
        finally:
            os.close(write_fd)

    with svc.store_lease() as store:  # kept open until the copy's thread is done with it
        copier = asyncio.ensure_future(asyncio.to_thread(copy))
        try:
            index, chain = await started
            response = web.StreamResponse(headers={
                APPLIED_INDEX_HEADER: str(index), FINGERPRINT_HEADER: chain, NODE_HEADER: ctx.node_id,
                "Content-Type": OCTETS})
            await response.prepare(request)
            while chunk := await asyncio.to_thread(os.read, read_fd, backup_chunk_bytes):
                await response.write(chunk)
        finally:
            os.close(read_fd)  # a copy still writing (the client went away) fails at once
            with contextlib.suppress(Exception):
                await copier
    if copier.exception() is not None:
        # Never end a broken copy as if it were whole: cut the connection instead.
        log.error("shard %d: backup copy failed: %s", svc.shard, copier.exception())
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response
