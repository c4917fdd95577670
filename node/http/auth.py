"""Who may call which route: bearer tokens checked against the cluster map, roles, account scopes
and per-token rate limits (docs/operations.md, "Security"; the tokens themselves: cluster/tokens.py).

``guard`` is the middleware (after the edge, so its refusals are rendered like any error): an open
route passes; else the ``Authorization: Bearer <token>`` header is hashed once and looked up in the
index of the map this node holds (rebuilt when a newer map arrives, so a revoked token stops at the
next map: within the long poll's round trip). Missing, unknown or expired → 401 ``unauthorized``;
a role without the route's permission → 403 ``forbidden``; over the token's rate → 429
``rate_limited`` with ``Retry-After``. ``ROUTE_PERMISSIONS`` is the one table of what each route
needs; a route it does not list needs ``read``.

Handlers that name or touch accounts check them with ``require_accounts`` (403 when one is outside
the token's ``account_patterns``; a batch is refused whole) and filter what they show with
``visible``. A node that proxies a request to another node passes the caller's credential along
(``forwarded_credentials``), and that node checks it again; the proxying node also vouches, with
the cluster secret, that it counted the request against the token's rate, so it is counted once.

The secret never leaves this module: it is neither logged nor echoed, and refusals never quote it.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from raftledger.client.errors import LedgerError
from raftledger.cluster import tokens
from raftledger.cluster.map import ClusterMap, PutValue
from raftledger.cluster.tokens import ADMIN, AUDIT, READ, WRITE, Caller, TokenIndex

from ..settings import AuthSettings
from .bodies import parse_token_request
from .body import read_json
from .context import NodeContext, context_of
from .middleware import route_name
from .render import respond

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN = ""
ID = "{id}"
# (method, route) -> the permission it needs; OPEN: none. Unlisted routes need READ.
ROUTE_PERMISSIONS: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): OPEN, ("GET", "/readyz"): OPEN, ("GET", "/metrics"): OPEN,
    ("GET", "/openapi.json"): OPEN,
    ("POST", "/v1/accounts"): WRITE, ("POST", "/v1/transactions"): WRITE,
    ("POST", "/v1/transactions/batch"): WRITE, ("POST", "/transacoes"): WRITE,
    ("POST", f"/v1/transactions/{ID}/post"): WRITE, ("POST", f"/v1/transactions/{ID}/void"): WRITE,
    ("POST", f"/v1/transactions/{ID}/reverse"): WRITE,
    ("PUT", "/v1/feed/consumers/{name}/offsets"): ADMIN, ("GET", "/v1/feed/consumers/{name}"): ADMIN,
    ("DELETE", "/v1/feed/consumers/{name}"): ADMIN, ("GET", "/v1/feed/dlq"): ADMIN,
    ("POST", "/v1/feed/dlq/redrive"): ADMIN,
    ("POST", "/v1/cluster/nodes"): ADMIN, ("DELETE", "/v1/cluster/nodes/{node}"): ADMIN,
    ("POST", "/v1/shards/{shard}/replicas"): ADMIN,
    ("DELETE", "/v1/shards/{shard}/replicas/{node}"): ADMIN,
    ("POST", "/v1/cluster/meta/move"): ADMIN,
    ("GET", "/v1/admin/verify"): ADMIN, ("GET", "/v1/admin/shards/{shard}/fingerprint"): ADMIN,
    ("GET", "/v1/admin/shards/{shard}/totals"): ADMIN, ("GET", "/v1/admin/shards/{shard}/cut"): ADMIN,
    ("GET", "/v1/admin/shards/{shard}/backup"): ADMIN, ("GET", "/v1/admin/cluster/map"): ADMIN,
    ("POST", "/v1/tokens"): ADMIN, ("GET", "/v1/tokens"): ADMIN, ("DELETE", "/v1/tokens/{token}"): ADMIN,
    ("GET", "/v1/keys"): AUDIT, ("GET", "/v1/shards/{shard}/tree-head"): AUDIT,
    ("GET", "/v1/shards/{shard}/consistency"): AUDIT,
    ("GET", "/v1/shards/{shard}/leaves/{index}/proof"): AUDIT,
    ("GET", f"/v1/transactions/{ID}/proof"): AUDIT, ("GET", f"/v1/accounts/{ID}/chain"): AUDIT,
}
PERMISSIONS = (READ, WRITE, AUDIT, ADMIN)
CALLER = "raftledger_caller"  # request key: the Caller, on a node that checks credentials
BEARER = "bearer "
# The caller's Authorization header, for requests this node makes on its behalf to other nodes.
credentials_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("credentials", default=None)
# What vouches for the requests this node proxies for its caller (the node's Sealer).
voucher_var: contextvars.ContextVar[Any] = contextvars.ContextVar("voucher", default=None)
PROXIED_HEADER = "X-Ledger-Proxied"  # a node counted this request against the token's rate already
# The caller's token id, for the audit trail of the changes it asks for (cluster.map.Attributed).
actor_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("actor", default=None)


@dataclass
class Bucket:
    tokens: float
    at: float


@dataclass
class Gate:
    """One node's view of the tokens: the index of the map it holds, and the rate buckets."""

    settings: AuthSettings
    _map: ClusterMap | None = None
    _index: TokenIndex = field(default_factory=lambda: TokenIndex(None))
    _buckets: dict[str, Bucket] = field(default_factory=dict)

    def index(self, current: ClusterMap | None) -> TokenIndex:
        if current is not self._map:
            self._map = current
            self._index = TokenIndex(None if current is None else current.sections.get(tokens.SECTION))
            live = {r.id for r in self._index.records}
            self._buckets = {k: b for k, b in self._buckets.items() if k in live}
        return self._index

    def take(self, caller: Caller, now: float) -> float:
        """0 when the caller's bucket had a request left, else the seconds until it has one."""
        rate = caller.token.rate_per_s or self.settings.rate_per_s_default
        if rate <= 0:
            return 0.0
        capacity = max(1.0, rate * self.settings.rate_burst_s)
        bucket = self._buckets.get(caller.token.id)
        if bucket is None:
            bucket = self._buckets[caller.token.id] = Bucket(capacity, now)
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate


GATE = web.AppKey("raftledger_gate", Gate)


def permission_of(request: web.Request) -> str:
    return ROUTE_PERMISSIONS.get((request.method, route_name(request)), READ)


def _secret(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:len(BEARER)].lower() != BEARER:
        return None
    return header[len(BEARER):].strip() or None


def authenticate(request: web.Request, gate: Gate) -> Caller:
    ctx = context_of(request)
    secret = _secret(request)
    current = ctx.maps.current
    caller = None if secret is None else gate.index(current).caller(secret)
    if caller is None and secret is not None and (current is None
                                                  or not current.sections.get(tokens.SECTION)):
        # A node that (re)starts holds no map, or one from before the first token, until it has
        # caught up: it cannot judge the credential yet, and a 401 would tell a client with a
        # valid token to give up. (Found by raftledger chaos: writes refused after a restart.)
        raise LedgerError("unavailable", "this node has not caught up with the cluster map yet",
                          retry_after_s=1.0)
    if caller is None or caller.token.expired(cluster_time_ns(ctx) - tolerance_ns(ctx)):
        raise LedgerError("unauthorized", "a valid bearer token is required",
                          headers={"WWW-Authenticate": 'Bearer realm="raftledger"'})
    return caller


def cluster_time_ns(ctx: NodeContext) -> int:
    """The wall clock as the cluster has it: this node's, unless the majority of the peers it hears
    from say it is off by more than the replay window (``wire.PeerClocks``)."""
    return ctx.clock.time_ns() - (ctx.peer_clocks.own_offset_ns() or 0)


def tolerance_ns(ctx: NodeContext) -> int:
    """A token is honoured this long past its expiry: the clock difference tolerated between nodes
    (``internal.window_s``), so that no node whose clock runs a little ahead answers 401 (which
    tells a client to give up) to a token the cluster still holds valid."""
    return int(ctx.settings.internal.window_s * 1e9)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    gate = request.app[GATE]
    permission = permission_of(request)
    if permission == OPEN:
        return await handler(request)
    caller = authenticate(request, gate)
    if not caller.may(permission):
        raise LedgerError("forbidden", f"role {caller.token.role} may not do this",
                          details={"role": caller.token.role, "needs": permission})
    ctx = context_of(request)
    wait_s = 0.0 if _counted_by_peer(request, ctx) else gate.take(caller, time.monotonic())
    if wait_s > 0:
        context_of(request).metrics.overloaded("rate_limited")
        raise LedgerError("rate_limited", "this token is over its rate", retry_after_s=wait_s)
    request[CALLER] = caller
    reset = credentials_var.set(request.headers["Authorization"])
    reset_actor = actor_var.set(caller.token.id)
    reset_voucher = voucher_var.set(ctx.sealer)
    try:
        return await handler(request)
    finally:
        voucher_var.reset(reset_voucher)
        actor_var.reset(reset_actor)
        credentials_var.reset(reset)


def _counted_by_peer(request: web.Request, ctx: NodeContext) -> bool:
    """A request another node of the cluster proxied, vouching with the cluster secret that it
    counted it against the token's rate (``forwarded_credentials``): counted once, there."""
    value = request.headers.get(PROXIED_HEADER)
    if value is None or ctx.sealer is None or len(value) > 256:
        return False
    return bool(ctx.sealer.vouched(value, request.headers["Authorization"],
                                   ctx.settings.internal.window_s))


def caller_of(request: web.Request) -> Caller | None:
    """The request's caller (None: this node checks no credentials)."""
    found: Caller | None = request.get(CALLER)
    return found


def require_accounts(request: web.Request, account_ids: Iterable[str]) -> None:
    """403 unless the caller's scope holds every one of ``account_ids``."""
    caller = caller_of(request)
    if caller is None:
        return
    outside = caller.outside(account_ids)
    if outside:
        raise LedgerError("forbidden", "an account is outside this token's account_patterns",
                          details={"accounts": outside[:10]})


def require_unscoped(request: web.Request, what: str) -> None:
    """403 for a token confined to accounts: ``what`` may be about any account."""
    caller = caller_of(request)
    if caller is not None and caller.scope is not None:
        raise LedgerError("forbidden", f"{what} may show any account: a token with account_patterns "
                          "cannot read it")


def visible(request: web.Request, account_ids: Iterable[str]) -> bool:
    """Whether the caller may see something that touches ``account_ids`` (every one in scope)."""
    caller = caller_of(request)
    return caller is None or not caller.outside(account_ids)


def command_accounts(commands: Iterable[Any]) -> list[str]:
    """The accounts of parsed transaction commands."""
    return [e.account_id for c in commands for e in c.entries]


def record_accounts(record: dict[str, Any]) -> list[str]:
    """The accounts of a transaction as the API renders it."""
    return [str(e.get("account_id")) for e in record.get("entries") or () if isinstance(e, dict)]


def event_accounts(event: dict[str, Any]) -> list[str]:
    """The accounts a feed event is about (an audit event: none, so only an unscoped token sees it)."""
    data = event.get("data") or {}
    entries = data.get("entries")
    if isinstance(entries, list):
        return [str(e.get("account_id")) for e in entries if isinstance(e, dict)]
    if str(event.get("type", "")).startswith("account.") and "id" in data:
        return [str(data["id"])]
    return ["\x00"]  # about no account: matches no pattern


def forwarded_credentials() -> dict[str, str]:
    """Headers that carry the caller's credential on a request made for it to another node, and
    this node's word (sealed with the cluster secret) that it counted the request already."""
    found = credentials_var.get()
    if not found:
        return {}
    voucher = voucher_var.get()
    return {"Authorization": found, **({PROXIED_HEADER: voucher.vouch(found)} if voucher else {})}


# -- /v1/tokens ------------------------------------------------------------------------------------
async def _propose(ctx: NodeContext, command: PutValue) -> None:
    from .forward import propose_map  # forward imports the context too; kept out of import time

    outcome = await propose_map(ctx, command)
    if not outcome.ok:
        raise LedgerError("map_change_refused", outcome.reason)
    await ctx.maps.wait_epoch(outcome.epoch, ctx.settings.meta.propose_timeout_s)


async def create_token(request: web.Request) -> web.Response:
    ctx = context_of(request)
    asked = parse_token_request(await read_json(request))
    record, secret = tokens.new_record(asked, ctx.clock.time_ns())
    await _propose(ctx, PutValue(tokens.SECTION, record.id, record.to_wire()))
    return respond(request, 201, {**record.public(), "token": secret})


async def list_tokens(request: web.Request) -> web.Response:
    ctx = context_of(request)
    index = TokenIndex(ctx.cluster_map.sections.get(tokens.SECTION))
    return respond(request, 200, {"tokens": [r.public() for r in index.records]})


async def revoke_token(request: web.Request) -> web.Response:
    ctx = context_of(request)
    token_id = request.match_info["token"]
    index = TokenIndex(ctx.cluster_map.sections.get(tokens.SECTION))
    record = next((r for r in index.records if r.id == token_id), None)
    if record is None:
        raise LedgerError("not_found", "no such token", details={"token": token_id[:40]})
    await _propose(ctx, PutValue(tokens.SECTION, token_id, None))
    return respond(request, 200, {**record.public(), "revoked": True})


TOKEN_ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/v1/tokens", create_token),
    ("GET", "/v1/tokens", list_tokens),
    ("DELETE", "/v1/tokens/{token}", revoke_token),
)


def install(app: web.Application, ctx: NodeContext, credentials: bool) -> None:
    """Check credentials on ``app``. Without them every route is open (dev clusters, test doubles), and
    no request pays for the middleware."""
    if credentials:
        app.middlewares.append(guard)
        app[GATE] = Gate(ctx.settings.auth)
