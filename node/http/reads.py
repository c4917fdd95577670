"""Read handlers: served by any replica from its own LMDB, with an explicit consistency contract.

- ``local`` (default): what this replica has applied; the headers say how fresh that is.
- ``min_token``: wait (bounded) until this replica has applied the token's index for the shard.
- ``max_staleness_ms``: refuse with 503 ``stale_replica`` when the leader was not heard from within it.
- ``linearizable``: a read barrier through the shard's leader, then wait to apply it.
A shard not hosted here is read on a node that hosts it (the request is proxied as is).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from raftledger.client.errors import STATUS, LedgerError
from raftledger.statemachine.store import QueryError, Reader

from ..service import ShardService
from . import parse
from .auth import forwarded_credentials, record_accounts, require_accounts
from .context import NodeContext, context_of
from .forward import FORWARDED_HEADER, call_peer, read_barrier, via_hosts
from .render import respond

NODE_HEADER = "X-Ledger-Node"
APPLIED_HEADER = "X-Ledger-Applied-Index"
STALENESS_HEADER = "X-Ledger-Staleness-Ms"
PROXIED_HEADERS = ("Content-Type", "Retry-After", NODE_HEADER, APPLIED_HEADER, STALENESS_HEADER)
stale_retry_after_s = 0.5
accounts_per_read_max = 1000


async def ensure_consistency(ctx: NodeContext, svc: ShardService, params: parse.ReadParams) -> None:
    wait_s = ctx.settings.http.consistency_wait_s
    if params.linearizable:
        await _wait_applied(ctx, svc, await read_barrier(ctx, svc.shard), wait_s)
    if params.min_token and svc.shard in params.min_token:
        await _wait_applied(ctx, svc, params.min_token[svc.shard], wait_s)
    if params.max_staleness_ms is not None:
        age = svc.leader_contact_age_ms()
        if age is None or age > params.max_staleness_ms:
            _stale(ctx, svc, {"staleness_ms": None if age is None else round(age),
                              "max_staleness_ms": params.max_staleness_ms})


def still_hosted(ctx: NodeContext, svc: ShardService) -> bool:
    """Whether ``svc`` still serves here. The map can move a replica away while a handler awaits
    (a read barrier, a long-poll): the node takes it out of ``ctx.shards``, then closes its store,
    so a handler that awaited since it looked the replica up checks this before reading it, and
    reads elsewhere when it is gone (reading a closed store raises ``lmdb.Error``: a 500)."""
    return ctx.shards.get(svc.shard) is svc


async def _wait_applied(ctx: NodeContext, svc: ShardService, index: int, wait_s: float) -> None:
    if svc.applied_index() >= index or await svc.wait_applied(index, wait_s):
        return
    _stale(ctx, svc, {"applied_index": svc.applied_index(), "wanted_index": index})


def _stale(ctx: NodeContext, svc: ShardService, details: dict[str, Any]) -> None:
    ctx.metrics.stale_reads.labels(str(svc.shard)).inc()
    raise LedgerError("stale_replica", details={"shard": svc.shard, "node": ctx.node_id, **details},
                   retry_after_s=stale_retry_after_s,
                   headers=freshness_headers(ctx, svc, svc.applied_index()))


def freshness_headers(ctx: NodeContext, svc: ShardService, applied: int) -> dict[str, str]:
    age = svc.leader_contact_age_ms()
    return {NODE_HEADER: ctx.node_id, APPLIED_HEADER: str(applied),
            STALENESS_HEADER: "-1" if age is None else str(round(age))}


async def _read(request: web.Request, account_id: str,
                query: Callable[[Reader], Any]) -> web.Response:
    """Route by account, honour the consistency asked for, run ``query`` in one read txn.

    The handler has checked the query string's parameter names already."""
    ctx = context_of(request)
    parse.parse_id(account_id, "", "id")
    require_accounts(request, [account_id])
    params = parse.parse_read_params(request.query, ctx.shard_count)
    svc = ctx.shards.get(ctx.shard_of(account_id))
    if svc is None:
        return await proxy_read(request, ctx.shard_of(account_id))
    await ensure_consistency(ctx, svc, params)
    if not still_hosted(ctx, svc):
        return await proxy_read(request, svc.shard)
    with svc.store.reader() as reader:
        headers = freshness_headers(ctx, svc, reader.state().applied_index)
        try:
            body = _run_query(query, reader, account_id)
        except LedgerError as exc:  # a 404 says how fresh the replica that did not find it was
            exc.extra_headers = headers
            raise
    return respond(request, 200, body, headers)


def _run_query(query: Callable[[Reader], Any], reader: Reader, account_id: str) -> Any:
    try:
        body = query(reader)
    except QueryError as exc:
        if exc.code == "account_not_found":
            raise LedgerError("not_found", str(exc), details={"account_id": account_id}) from exc
        code = exc.code if exc.code in STATUS else "invalid_query"
        raise LedgerError(code, str(exc)) from exc
    if body is None:
        raise LedgerError("not_found", f"no account {account_id!r}", details={"account_id": account_id})
    return body


def accounts_of_shard(ctx: NodeContext, shard: int, raw: str | None) -> list[str]:
    """A comma-separated list of account ids (``accounts_per_read_max`` at most), each routed to
    ``shard``: one read transaction of one replica can only answer for its own shard."""
    if not raw:
        return []
    accounts = list(dict.fromkeys(raw.split(",")))
    if len(accounts) > accounts_per_read_max:
        raise LedgerError("invalid_query", f"at most {accounts_per_read_max} accounts per read",
                          details={"param": "accounts", "count": len(accounts)})
    for account in accounts:
        parse.parse_id(account, "accounts", "id")
    elsewhere = [a for a in accounts if ctx.shard_of(a) != shard]
    if elsewhere:
        raise LedgerError("invalid_query", f"accounts routed to another shard than {shard}",
                          details={"param": "accounts", "shard": shard, "accounts": elsewhere[:10]})
    return accounts


def balances(reader: Reader, accounts: list[str]) -> dict[str, Any]:
    """Each account's balance in one read transaction (404 ``not_found`` naming the first missing)."""
    return {a: _run_query(lambda r, a=a: r.balance(a).to_json(), reader, a) for a in accounts}


async def get_account(request: web.Request) -> web.Response:
    def query(reader: Reader) -> Any:
        account = reader.account(account_id)
        return None if account is None else account.to_json(reader.shard)

    parse.check_query(request.query, parse.READ_PARAMS)
    account_id = request.match_info["id"]
    return await _read(request, account_id, query)


async def get_balance(request: web.Request) -> web.Response:
    at_seq, at_ns = parse.parse_balance_query(request.query)
    account_id = request.match_info["id"]
    return await _read(request, account_id,
                       lambda r: r.balance(account_id, at_seq=at_seq, at_ns=at_ns).to_json())


async def get_entries(request: web.Request) -> web.Response:
    q = parse.parse_entries_query(request.query)
    account_id = request.match_info["id"]

    def query(reader: Reader) -> Any:
        page, next_cursor = reader.entries(account_id, after_seq=q.after_seq,
                                           before_seq=q.before_seq, limit=q.limit, order=q.order,
                                           from_ns=q.from_ns, to_ns=q.to_ns)
        return {"entries": [e.to_json() for e in page], "next": next_cursor}

    return await _read(request, account_id, query)


async def get_transaction(request: web.Request) -> web.Response:
    """At the home of the id (the shard of its tag, else of its hash), which records every
    transaction's outcome or, for a follow-up or batch item recorded elsewhere, says where (a claim);
    then the other hosted shards, where data from before ids had homes lives."""
    ctx = context_of(request)
    txid = parse.parse_id(request.match_info["id"], "", "id")
    parse.check_query(request.query, parse.READ_PARAMS)
    params = parse.parse_read_params(request.query, ctx.shard_count)
    home = ctx.shard_of(txid)
    forwarded = FORWARDED_HEADER in request.headers
    if home not in ctx.shards and not forwarded:
        return await proxy_read(request, home)
    headers: dict[str, str] = {}
    for svc in sorted(ctx.shards.values(), key=lambda svc: svc.shard != home):
        await ensure_consistency(ctx, svc, params)
        if not still_hosted(ctx, svc):
            continue
        with svc.store.reader() as reader:
            record = reader.transaction(txid)
            elsewhere = reader.recorded_at(txid)
            headers = freshness_headers(ctx, svc, reader.state().applied_index)
        if record is not None:
            body = record.to_json(svc.shard)
            require_accounts(request, record_accounts(body))
            return respond(request, 200, body, headers)
        if elsewhere is not None:
            _, found = await transaction_at(ctx, elsewhere, txid)
            if found is not None:
                require_accounts(request, record_accounts(found))
                return respond(request, 200, found, headers)
    raise LedgerError("transaction_not_found", details={"id": txid}, headers=headers)


Found = tuple[int, dict[str, Any] | None]


async def transaction_at(ctx: NodeContext, shard: int, txid: str) -> Found:
    """Where ``txid`` is recorded and its record (API shape; a rejection's too), looked for on
    ``shard`` (following a claim there), read on a replica here or on a node hosting one; None if
    absent. Found as applied, else after a read barrier: a record, once written, keeps what post /
    void / reverse route by (its id, entries and shards), so a lagging replica is good enough when
    it has it."""
    svc = ctx.shards.get(shard)
    if svc is None:
        async def remote(node: str) -> Found:
            answer = await call_peer(ctx, node, f"/shards/{shard}/transaction", {"id": txid})
            return int(answer["shard"]), answer["record"]
        return await via_hosts(ctx, shard, remote)
    for linearizable in (False, True):
        if linearizable:
            index = await read_barrier(ctx, shard)
            await _wait_applied(ctx, svc, index, ctx.settings.http.consistency_wait_s)
            if not still_hosted(ctx, svc):
                raise LedgerError("unavailable", f"the replica of shard {shard} left this node",
                                  details={"shard": shard}, retry_after_s=stale_retry_after_s)
        with svc.store.reader() as reader:
            found = reader.transaction(txid)
            elsewhere = reader.recorded_at(txid)
        if found is not None:
            return shard, found.to_json(shard)
        if elsewhere is not None:  # claims never name a claim: one more read at most
            return await transaction_at(ctx, elsewhere, txid)
    return shard, None


async def locate_transaction(ctx: NodeContext, txid: str) -> Found:
    """The shard holding ``txid`` and its record (for post/void/reverse): at its home, or where its
    home's claim says; else on a hosted shard (data from before ids had homes); else its home, where
    the ledger answers ``pending_not_found`` / ``transaction_not_found``."""
    home = ctx.shard_of(txid)
    for shard in [home, *sorted(s for s in ctx.shards if s != home and ctx.shard_count > 1)]:
        where, record = await transaction_at(ctx, shard, txid)
        if record is not None:  # a rejected one is not there to post, void or reverse: its shard says so
            return where, None if record["status"] == "rejected" else record
    return home, None


async def proxy_read(request: web.Request, shard: int, hosts: list[str] | None = None) -> web.Response:
    """Serve a read of a shard this node does not host from a node that does (of ``hosts`` when
    given)."""
    ctx = context_of(request)
    nodes = [n for n in (ctx.nodes_of(shard) if hosts is None else hosts)
             if n != ctx.node_id and ctx.peer_url(n)]
    if FORWARDED_HEADER in request.headers or not nodes:
        raise LedgerError("unavailable", f"shard {shard} is not hosted here", details={"shard": shard})
    url = f"{ctx.peer_url(nodes[0])}{request.rel_url}"
    timeout = aiohttp.ClientTimeout(total=ctx.settings.forwarding.timeout_s)
    headers = {FORWARDED_HEADER: ctx.node_id, "Accept": request.headers.get("Accept", "*/*"),
               **forwarded_credentials()}
    started = time.monotonic()
    try:
        async with ctx.client().get(url, headers=headers, timeout=timeout) as resp:
            body = await resp.read()
            kept = {k: v for k, v in resp.headers.items() if k in PROXIED_HEADERS}
            return web.Response(status=resp.status, body=body, headers=kept)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise LedgerError("unavailable", f"read via {nodes[0]} failed after "
                       f"{time.monotonic() - started:.1f}s") from exc
