"""Integrity routes (API.md "Integrity", docs/integrity.md): public keys, signed tree heads, inclusion
and consistency proofs, and account hash chains with the bytes each hash covers.

A tree head is signed by every replica that has the same root at that size: the node answering signs
with its own key and asks the shard's other replicas over the internal protocol
(``/internal/v1/shards/{s}/sign-head``); each waits until it has applied as far as the asker had,
recomputes the root from its own store, and signs only when it matches. A head goes out only with the
signatures of a majority of the shard's replicas. Signed heads are cached per (shard, size), and a
round in flight is shared by every request for the same head.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from raftledger.client.errors import LedgerError
from raftledger.cluster.map import PutValue
from raftledger.statemachine import hashing, merkle
from raftledger.statemachine.codec import DIRECTION_BYTE
from raftledger.statemachine.layout import ENTRY_STATUS_BYTE
from raftledger.statemachine.store import QueryError, Reader

from .. import keys as node_keys
from ..service import ShardService
from . import auth, parse
from .context import NodeContext, context_of
from .forward import call_peer, propose_map
from .reads import _read, freshness_headers, proxy_read, transaction_at
from .render import respond

log = logging.getLogger(__name__)

HEAD_PREFIX = "raftledger.tree-head.v1"
signed_heads_cached_max = 4096
sign_timeout_s = 10.0
publish_attempts_max = 600  # about ten minutes of retries while the metadata group is unreachable
publish_retry_s = 1.0
chain_page_limit_default = 100
chain_page_limit_max = 1000


def head_message(shard: int, tree_size: int, root: bytes, timestamp: int) -> bytes:
    return f"{HEAD_PREFIX}\n{shard}\n{tree_size}\n{root.hex()}\n{timestamp}".encode("ascii")


def _ring(ctx: NodeContext) -> node_keys.KeyRing:
    ring = ctx.keys
    if ring is None:
        raise LedgerError("unavailable", "this node has no signing key")
    return ring  # type: ignore[no-any-return]


def _tree_error(exc: QueryError) -> LedgerError:
    code = exc.code if exc.code in ("tree_size_unavailable", "invalid_tree_size") else "invalid_query"
    return LedgerError("invalid_query" if code == "invalid_tree_size" else code, str(exc))


# ---- keys ------------------------------------------------------------------------------------------

async def get_keys(request: web.Request) -> web.Response:
    ctx = context_of(request)
    parse.check_query(request.query, frozenset())
    listed = node_keys.published(ctx.cluster_map.sections)
    if ctx.keys is not None and not any(k["node"] == ctx.node_id for k in listed):  # not yet in the map
        listed += [{"node": ctx.node_id, **r} for r in ctx.keys.public_records()]
    return respond(request, 200, {"keys": listed}, {})


async def publish_keys(ctx: NodeContext) -> None:
    """Put this node's public key records into the cluster map until the map holds them (once per
    set of records: the key file remembers it, see ``node.keys``)."""
    ring = ctx.keys
    if ring is None:
        return
    for _ in range(publish_attempts_max):
        records = ring.public_records()
        if ring.published:
            return
        current = ctx.maps.current
        if current is not None and list(current.sections.get(node_keys.MAP_SECTION, {})
                                        .get(ctx.node_id, ())) == records:
            ring.mark_published(records)
            continue
        changed = ctx.maps.changed()
        if current is not None:
            try:
                outcome = await propose_map(ctx, PutValue(node_keys.MAP_SECTION, ctx.node_id, records))
                if outcome.ok:
                    await ctx.maps.wait_epoch(outcome.epoch, publish_retry_s * 10)
                    continue
            except LedgerError as exc:
                log.info("keys: not published yet (%s)", exc.code)
        # A new map (or a leader of the metadata group) is what lets the next try work.
        await ctx.clock.wait(asyncio.shield(changed), publish_retry_s)
    log.error("keys: gave up publishing this node's public keys in the cluster map")


async def rotate_keys(ctx: NodeContext, request: web.Request, _: Any) -> dict[str, Any]:
    """Internal: a new signing key for this node; the old one is retired and stays published."""
    ring = _ring(ctx)
    new_id = ring.rotate(ctx.clock.time_ns())
    ctx.heads.clear()
    task = asyncio.get_running_loop().create_task(publish_keys(ctx), name="publish-keys")
    ctx.background.add(task)
    task.add_done_callback(ctx.background.discard)
    return {"node": ctx.node_id, "key_id": new_id, "keys": ring.public_records()}


# ---- tree heads ------------------------------------------------------------------------------------

def _shard_param(ctx: NodeContext, request: web.Request) -> int:
    raw = request.match_info["shard"]
    if not raw.isdigit() or len(raw) > 6 or int(raw) >= max(ctx.shard_count, len(ctx.cluster_map.shards)):
        raise LedgerError("not_found", f"no shard {raw[:16]!r}", details={"shard": raw[:16]})
    return int(raw)


def _local_head(svc: ShardService, size: int | None) -> tuple[int, bytes, int, int]:
    """(tree size, root, timestamp, applied index) from this replica's store."""
    with svc.store.reader() as reader:
        try:
            tree_size, root, ts = reader.tree_head(size)
        except QueryError as exc:
            raise _tree_error(exc) from exc
        return tree_size, root, ts, reader.state().applied_index


async def signed_head(ctx: NodeContext, svc: ShardService, size: int | None) -> dict[str, Any]:
    """The head of this replica's tree at ``size`` (default: as applied), with a majority's signatures."""
    tree_size, root, ts, applied = _local_head(svc, size)
    key = (svc.shard, tree_size)
    cached = ctx.heads.get(key)
    if cached is None or (cached.done() and (cached.cancelled() or cached.exception() is not None)):
        cached = asyncio.get_running_loop().create_task(_collect(ctx, svc, tree_size, root, ts, applied))
        ctx.heads[key] = cached
        while len(ctx.heads) > signed_heads_cached_max:
            ctx.heads.popitem(last=False)
    head: dict[str, Any] = await asyncio.shield(cached)
    if head["root"] != root.hex():  # cannot happen on a sound store: a size's root never changes
        ctx.heads.pop(key, None)
        raise LedgerError("root_mismatch", details={"shard": svc.shard, "tree_size": tree_size})
    return head


async def _collect(ctx: NodeContext, svc: ShardService, tree_size: int, root: bytes, ts: int,
                   applied: int) -> dict[str, Any]:
    replicas = list(ctx.nodes_of(svc.shard))
    needed = len(replicas) // 2 + 1
    key_id, signature = _ring(ctx).sign(head_message(svc.shard, tree_size, root, ts))
    signatures = [{"node": ctx.node_id, "key_id": key_id, "signature": signature.hex()}]
    ask = {"tree_size": tree_size, "root": root.hex(), "timestamp": ts, "applied_index": applied}
    others = [n for n in replicas if n != ctx.node_id]
    answers = await asyncio.gather(*(call_peer(ctx, n, f"/shards/{svc.shard}/sign-head", ask, sign_timeout_s)
                                     for n in others), return_exceptions=True)
    for node, answer in zip(others, answers, strict=True):
        if isinstance(answer, BaseException):
            log.info("tree head %d/%d: no signature from %s (%s)", svc.shard, tree_size, node, answer)
            continue
        signatures.append({"node": node, "key_id": str(answer["key_id"]),
                           "signature": str(answer["signature"])})
    if len(signatures) < needed:
        raise LedgerError("unavailable", f"{len(signatures)} of {len(replicas)} replicas signed the tree "
                          f"head, {needed} needed", details={"shard": svc.shard}, retry_after_s=1.0)
    return {"shard": svc.shard, "tree_size": tree_size, "root": root.hex(), "timestamp": ts,
            "signatures": signatures}


async def sign_head(ctx: NodeContext, request: web.Request, payload: Any) -> dict[str, Any]:
    """Internal: sign a peer's head if this replica's tree has the same root at that size."""
    raw = request.match_info["shard"]
    svc = ctx.shards.get(int(raw)) if raw.isdigit() and len(raw) <= 6 else None
    if svc is None:
        raise LedgerError("not_found", f"shard {raw[:16]!r} is not hosted here")
    if not isinstance(payload, dict):
        raise LedgerError("malformed_body", "expected a tree head")
    size = parse.parse_int_field(payload.get("tree_size"), "", "tree_size", 0, 2**63 - 1)
    applied = parse.parse_int_field(payload.get("applied_index"), "", "applied_index", 0, 2**63 - 1)
    if svc.applied_index() < applied and not await svc.wait_applied(applied, sign_timeout_s):
        raise LedgerError("stale_replica", details={"shard": svc.shard, "applied_index": svc.applied_index()})
    tree_size, root, ts, _ = _local_head(svc, size)
    if root.hex() != payload.get("root") or ts != payload.get("timestamp"):
        log.error("tree head %d/%d: a peer's root %s differs from ours %s", svc.shard, size,
                  str(payload.get("root"))[:16], root.hex()[:16])
        raise LedgerError("root_mismatch", details={"shard": svc.shard, "tree_size": size})
    key_id, signature = _ring(ctx).sign(head_message(svc.shard, tree_size, root, ts))
    return {"key_id": key_id, "signature": signature.hex()}


async def get_tree_head(request: web.Request) -> web.Response:
    ctx = context_of(request)
    parse.check_query(request.query, frozenset({"tree_size"}))
    shard = _shard_param(ctx, request)
    svc = ctx.shards.get(shard)
    if svc is None:
        return await proxy_read(request, shard)
    head = await signed_head(ctx, svc, parse.query_int(request.query, "tree_size"))
    return respond(request, 200, head, freshness_headers(ctx, svc, svc.applied_index()))


# ---- proofs ----------------------------------------------------------------------------------------

async def _proof_at(request: web.Request, svc: ShardService, index: int | None, txid: str | None
                    ) -> web.Response:
    ctx = context_of(request)
    size = parse.query_int(request.query, "tree_size")
    if size is None:
        size = (await signed_head(ctx, svc, None))["tree_size"]
    with svc.store.reader() as reader:
        if index is None:
            assert txid is not None
            index = _leaf_of(reader, txid)
        try:
            if index >= size:
                raise QueryError("tree_size_unavailable", f"leaf {index} is not in a tree of {size}")
            path = reader.inclusion_proof(index, size)
            root, leaf = reader.tree_head(size)[1], reader.leaf(index)
        except QueryError as exc:
            raise _tree_error(exc) from exc
        headers = freshness_headers(ctx, svc, reader.state().applied_index)
    body = {"shard": svc.shard, "leaf_index": index, "tree_size": size, "leaf": leaf.hex(),
            "audit_path": [h.hex() for h in path], "root": root.hex()}
    return respond(request, 200, body, headers)


def _leaf_of(reader: Reader, txid: str) -> int:
    """The leaf of the transaction's record here: its first that is not a cross-shard hold (a leg)."""
    indexes = reader.leaf_indexes(txid)
    if not indexes:
        raise LedgerError("transaction_not_found", f"no leaf of {txid!r} on shard {reader.shard}",
                          details={"id": txid, "shard": reader.shard})
    for index in indexes:
        if reader.leaf(index)[1] != merkle.LEAF_LEG:
            return index
    return indexes[0]


async def get_transaction_proof(request: web.Request) -> web.Response:
    """At the shard where the transaction is recorded (its home, or where its home's claim says)."""
    ctx = context_of(request)
    txid = parse.parse_id(request.match_info["id"], "", "id")
    parse.check_query(request.query, frozenset({"tree_size"}))
    where, record = await transaction_at(ctx, ctx.shard_of(txid), txid)
    if record is None or record.get("status") == "rejected":
        raise LedgerError("transaction_not_found", details={"id": txid})
    auth.require_accounts(request, auth.record_accounts(record))
    svc = ctx.shards.get(where)
    if svc is None:
        return await proxy_read(request, where)
    return await _proof_at(request, svc, None, txid)


async def get_leaf_proof(request: web.Request) -> web.Response:
    """Extension: the proof of leaf ``index`` (an auditor samples leaves without knowing their ids)."""
    ctx = context_of(request)
    parse.check_query(request.query, frozenset({"tree_size"}))
    auth.require_unscoped(request, "a sampled leaf")
    shard = _shard_param(ctx, request)
    raw = request.match_info["index"]
    if not parse.DIGITS_RE.fullmatch(raw):
        raise LedgerError("invalid_query", "the leaf index is a non-negative integer")
    svc = ctx.shards.get(shard)
    if svc is None:
        return await proxy_read(request, shard)
    return await _proof_at(request, svc, int(raw), None)


async def get_consistency(request: web.Request) -> web.Response:
    ctx = context_of(request)
    parse.check_query(request.query, frozenset({"first", "second"}))
    shard = _shard_param(ctx, request)
    first, second = parse.query_int(request.query, "first"), parse.query_int(request.query, "second")
    if first is None or second is None:
        raise LedgerError("invalid_query", "first and second are required", details={"param": "first"})
    svc = ctx.shards.get(shard)
    if svc is None:
        return await proxy_read(request, shard)
    with svc.store.reader() as reader:
        try:
            proof = reader.consistency_proof(first, second)
        except QueryError as exc:
            raise _tree_error(exc) from exc
        headers = freshness_headers(ctx, svc, reader.state().applied_index)
    body = {"shard": shard, "first": first, "second": second, "proof": [h.hex() for h in proof]}
    return respond(request, 200, body, headers)


# ---- account chains --------------------------------------------------------------------------------

async def get_chain(request: web.Request) -> web.Response:
    """A page of the account's entries with ``hash``, ``prev_hash`` and ``bytes``: the exact bytes
    SHA-256(prev_hash || bytes) covers (hashing.py), so the chain verifies from genesis."""
    parse.check_query(request.query, parse.READ_PARAMS | {"after_seq", "limit"})
    after = parse.query_int(request.query, "after_seq")
    limit = parse.query_int(request.query, "limit", 1, chain_page_limit_max, chain_page_limit_default)
    assert limit is not None
    account_id = request.match_info["id"]
    auth.require_accounts(request, [account_id])

    def query(reader: Reader) -> Any:
        page, next_seq = reader.entries(account_id, after_seq=after, limit=limit)
        entries = []
        for e in page:
            data = hashing.entry_bytes(e.account_id, e.seq, e.transaction_id, DIRECTION_BYTE[e.direction],
                                       e.amount, e.currency, ENTRY_STATUS_BYTE[e.status], e.balance_after,
                                       e.timestamp, e.released)
            entries.append({**e.to_json(), "bytes": data.hex()})
        return {"account_id": account_id, "genesis": hashing.genesis(account_id).hex(), "entries": entries,
                "next": next_seq}

    return await _read(request, account_id, query)


INTERNAL_ROUTES = (("/shards/{shard}/sign-head", sign_head), ("/keys/rotate", rotate_keys))
