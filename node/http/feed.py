"""The change feed over HTTP (API.md, "Change feed"; docs/feed.md): served by any replica of a shard.

- ``GET /v1/feed``: one page of a shard's events after an offset; with ``wait_ms`` an empty page waits
  (bounded) for the shard's next applied entry instead of answering at once (a long-poll).
- ``GET /v1/feed/stream``: the same events as Server-Sent Events, resumable with ``Last-Event-ID``,
  with a comment line while idle. One page is read at a time and written before the next is read,
  so a slow reader holds back the stream, never the node's memory.
- ``PUT /v1/feed/consumers/{name}/offsets``, ``GET`` and ``DELETE /v1/feed/consumers/{name}``:
  durable consumers, whose offsets are replicated commands on each shard (``SetFeedOffset``).

Every read honours the consistency parameters of reads. A shard not hosted here is read on a node
that hosts it (a stream is redirected there). An offset before the first event still held is
answered 410 ``feed_compacted`` with the earliest offset held.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from raftledger.client.errors import LedgerError
from raftledger.cluster.meta import AUDIT_FEED
from raftledger.statemachine.commands import SetFeedOffset
from raftledger.statemachine.validate import valid_id

from ..feed import exporter
from ..feed.sinks import DeliveryFailed, configured_sinks
from ..metrics import FeedPosition
from ..service import ShardService
from . import auth, forward, parse
from .body import read_json
from .context import NodeContext, context_of
from .reads import PROXIED_HEADERS, ensure_consistency, freshness_headers, proxy_read, still_hosted
from .render import json_bytes, respond

FEED_PARAMS = parse.READ_PARAMS | {"shard", "after", "limit", "wait_ms"}
STREAM_PARAMS = parse.READ_PARAMS | {"shard", "after"}
CONSUMER_PARAMS = parse.READ_PARAMS | {"shard"}
EVENT_ID_RE = re.compile(r"(?:([0-9]{1,9}):)?([0-9]{1,19})")
page_limit_default = 100
long_poll_wakeups_max = 100_000  # a long-poll re-reads at most this often before answering
stream_page_events = 256  # events a stream reads, then writes, at a time


@dataclass(slots=True)
class Page:
    shard: int
    events: list[dict[str, Any]]
    after: int
    first: int  # the first offset still held
    last: int  # the last offset written
    applied: int

    def body(self) -> dict[str, Any]:
        next_after = self.events[-1]["offset"] if self.events else self.after
        return {"shard": self.shard, "events": self.events, "next_after": next_after,
                "first_offset": self.first, "last_offset": self.last}


@dataclass
class StreamState:
    """The streams a node serves: counted against ``[feed] streams_max``, ended on shutdown."""

    open: int = 0
    closing: asyncio.Event = field(default_factory=asyncio.Event)


STREAMS = web.AppKey("raftledger_feed_streams", StreamState)


def install(app: web.Application, ctx: NodeContext) -> None:
    """Streams end when the server shuts down (they would otherwise hold it up); the feed's gauges
    are read from the hosted shards at scrape time."""
    state = app[STREAMS] = StreamState()
    ctx.metrics.watch_feed(lambda: {s: feed_position(svc) for s, svc in ctx.shards.items()})

    async def close_streams(_: web.Application) -> None:
        state.closing.set()

    app.on_shutdown.append(close_streams)


def feed_position(svc: ShardService) -> FeedPosition:
    with svc.store.reader() as reader:
        first, last = reader.feed_bounds()
        return FeedPosition(first, last, {name: offset for name, (offset, _) in reader.consumers().items()})


# -- reading -------------------------------------------------------------------------------------------
def read_page(svc: ShardService, after: int, limit: int) -> Page:
    """Events of ``svc``'s shard after ``after``, from one read transaction; 410 when some of them
    were compacted."""
    with svc.store.reader() as reader:
        first, last = reader.feed_bounds()
        applied = reader.state().applied_index
        if after < first - 1:
            raise LedgerError("feed_compacted", f"shard {svc.shard} holds events from offset {first} on",
                              details={"shard": svc.shard, "after": after, "earliest_offset": first,
                                       "next_after": first - 1})
        events = [e.to_json(svc.shard) for e in reader.events(after, limit)]
    return Page(svc.shard, events, after, first, last, applied)


def _shard_param(query: Mapping[str, str], ctx: NodeContext, audit: bool = False) -> int:
    """The ``shard`` asked for; with ``audit``, the audit trail's ``AUDIT_FEED`` (-1) too."""
    if "shard" not in query and ctx.shard_count == 1:
        return 0
    if "shard" not in query:
        raise LedgerError("invalid_query", "shard is required: the feed is ordered per shard",
                          details={"param": "shard"})
    if audit and query["shard"] == str(AUDIT_FEED):
        return AUDIT_FEED
    shard = parse.query_int(query, "shard", 0, ctx.shard_count - 1)
    assert shard is not None
    return shard


async def get_feed(request: web.Request) -> web.Response:
    ctx = context_of(request)
    query = request.query
    parse.check_query(query, FEED_PARAMS)
    settings = ctx.settings.feed
    shard = _shard_param(query, ctx, audit=True)
    after = parse.query_int(query, "after", default=0) or 0
    limit = parse.query_int(query, "limit", 1, settings.page_events_max, page_limit_default) or 1
    wait_ms = parse.query_int(query, "wait_ms", 0, settings.wait_ms_max, 0) or 0
    params = parse.parse_read_params(query, ctx.shard_count)
    if shard == AUDIT_FEED:
        return await _audit_page(request, ctx, after, limit, wait_ms)
    svc = ctx.shards.get(shard)
    if svc is None:
        return await proxy_read(request, shard)
    await ensure_consistency(ctx, svc, params)
    deadline = ctx.clock.monotonic() + wait_ms / 1000.0
    if not still_hosted(ctx, svc):
        return await proxy_read(request, shard)
    page = read_page(svc, after, limit)
    for _ in range(long_poll_wakeups_max):
        remaining = deadline - ctx.clock.monotonic()
        if page.events or remaining <= 0:
            break
        await svc.wait_applied(page.applied + 1, remaining)  # woken by the shard's next apply
        if not still_hosted(ctx, svc):  # moved away during the wait (its store closed): the page
            break  # read before it is the answer, and the next poll is served where the shard is
        page = read_page(svc, after, limit)
    body = page.body()
    body["events"] = [e for e in page.events if auth.visible(request, auth.event_accounts(e))]
    return respond(request, 200, body, freshness_headers(ctx, svc, page.applied))


def _stream_after(request: web.Request, shard: int) -> int:
    """``Last-Event-ID`` (``shard:offset``, or an offset) when the client resumes, else ``after``."""
    last_id = request.headers.get("Last-Event-ID", "").strip()
    if not last_id:
        return parse.query_int(request.query, "after", default=0) or 0
    match = EVENT_ID_RE.fullmatch(last_id)
    if match is None or (match.group(1) is not None and int(match.group(1)) != shard):
        raise LedgerError("invalid_query", "Last-Event-ID is an event id of this shard (<shard>:<offset>)",
                          details={"header": "Last-Event-ID", "value": last_id[:40]})
    return int(match.group(2))


def sse_event(event: dict[str, Any]) -> bytes:
    return (f"id: {event['id']}\nevent: {event['type']}\ndata: ".encode() + json_bytes(event) + b"\n\n")


async def _audit_page(request: web.Request, ctx: NodeContext, after: int, limit: int,
                      wait_ms: int) -> web.Response:
    """A page of the audit trail (admin and auditor tokens), from this node's member of the
    metadata group, else from a node hosting one."""
    caller = auth.caller_of(request)
    if caller is not None and not caller.may(auth.AUDIT):
        raise LedgerError("forbidden", f"role {caller.token.role} may not read the audit trail",
                          details={"role": caller.token.role, "needs": auth.AUDIT})
    meta = ctx.meta
    if meta is None:
        hosts = [n.id for n in ctx.cluster_map.meta_hosts() if n.id != ctx.node_id]
        return await proxy_read(request, AUDIT_FEED, hosts)
    deadline = ctx.clock.monotonic() + wait_ms / 1000.0
    events, first, last = meta.audit_page(after, limit)
    for _ in range(long_poll_wakeups_max):
        remaining = deadline - ctx.clock.monotonic()
        if events or remaining <= 0:
            break
        await meta.wait_audit(last, remaining)
        events, first, last = meta.audit_page(after, limit)
    body = Page(AUDIT_FEED, events, after, first, last, last).body()
    body["events"] = [e for e in events if auth.visible(request, auth.event_accounts(e))]
    return respond(request, 200, body)


async def stream_feed(request: web.Request) -> web.StreamResponse:
    ctx = context_of(request)
    parse.check_query(request.query, STREAM_PARAMS)
    shard = _shard_param(request.query, ctx)
    after = _stream_after(request, shard)
    params = parse.parse_read_params(request.query, ctx.shard_count)
    svc = ctx.shards.get(shard)
    state = request.app[STREAMS]
    if state.open >= ctx.settings.feed.streams_max:
        ctx.metrics.overloaded("feed_stream")
        raise LedgerError("overloaded", f"this node serves {state.open} event streams already",
                          retry_after_s=ctx.settings.batching.overloaded_retry_after_s)
    if svc is None:
        return await _proxy_stream(request, ctx, shard, after, state)
    await ensure_consistency(ctx, svc, params)
    if not still_hosted(ctx, svc):
        return await _proxy_stream(request, ctx, shard, after, state)
    page = read_page(svc, after, stream_page_events)  # a 410 is still an answer with a status
    state.open += 1
    try:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", **freshness_headers(ctx, svc, page.applied)})
        await response.prepare(request)
        await _pump(ctx, svc, request, response, page, state)
        return response
    finally:
        state.open -= 1


async def _pump(ctx: NodeContext, svc: ShardService, request: web.Request, response: web.StreamResponse,
                page: Page, state: StreamState) -> None:
    """Write pages as they come; a comment when nothing was written for a heartbeat. Ends when the
    client leaves, the node shuts down, or the events it needs were compacted (an ``error`` event)."""
    heartbeat_s = ctx.settings.feed.stream_heartbeat_s
    last_write = ctx.clock.monotonic()
    while not state.closing.is_set() and not _gone(request):
        for event in page.events:
            if auth.visible(request, auth.event_accounts(event)):
                await response.write(sse_event(event))  # waits while the client's buffer is full
        if page.events:
            last_write = ctx.clock.monotonic()
        else:
            idle = ctx.clock.monotonic() - last_write
            if idle >= heartbeat_s:
                await response.write(b": heartbeat\n\n")
                last_write = ctx.clock.monotonic()
            else:
                await _wait_applied_or_closing(svc, page.applied + 1, heartbeat_s - idle, state)
        after = page.events[-1]["offset"] if page.events else page.after
        if not still_hosted(ctx, svc):  # moved away: the client resumes elsewhere (Last-Event-ID)
            return
        try:
            page = read_page(svc, after, stream_page_events)
        except LedgerError as exc:  # compacted under a reader too slow for the retention
            await response.write(b"event: error\ndata: " + json_bytes(exc.body()) + b"\n\n")
            return


async def _wait_applied_or_closing(svc: ShardService, index: int, timeout_s: float,
                                   state: StreamState) -> None:
    closing = asyncio.ensure_future(state.closing.wait())
    applied = asyncio.ensure_future(svc.wait_applied(index, timeout_s))
    try:
        await asyncio.wait((closing, applied), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (closing, applied):
            task.cancel()


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _proxy_stream(request: web.Request, ctx: NodeContext, shard: int, after: int,
                        state: StreamState) -> web.StreamResponse:
    """A stream of a shard not hosted here, relayed from a node that hosts it (resuming where asked,
    with the caller's credential): a redirect would lose the ``Authorization`` header, which HTTP
    clients drop when they follow one to another origin. A refusal there is answered as it is."""
    hosts = [n for n in ctx.nodes_of(shard) if n != ctx.node_id and ctx.peer_url(n)]
    if forward.FORWARDED_HEADER in request.headers or not hosts:
        raise LedgerError("unavailable", f"shard {shard} is not hosted here", details={"shard": shard})
    url = request.rel_url.with_query({**request.query, "shard": str(shard), "after": str(after)})
    headers = {forward.FORWARDED_HEADER: ctx.node_id, "Accept": "text/event-stream",
               **auth.forwarded_credentials()}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=ctx.settings.forwarding.timeout_s)
    state.open += 1
    try:
        async with ctx.client().get(f"{ctx.peer_url(hosts[0])}{url}", headers=headers,
                                    timeout=timeout) as upstream:
            if upstream.status != 200:
                kept = {k: v for k, v in upstream.headers.items() if k in PROXIED_HEADERS}
                return web.Response(status=upstream.status, body=await upstream.read(), headers=kept)
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"})
            await response.prepare(request)
            await _relay(upstream, request, response, state)
            return response
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise LedgerError("unavailable", f"the stream of shard {shard} via {hosts[0]} failed",
                          details={"shard": shard}) from exc
    finally:
        state.open -= 1


async def _relay(upstream: aiohttp.ClientResponse, request: web.Request, response: web.StreamResponse,
                 state: StreamState) -> None:
    """Copy the host's stream until it ends (or its host goes away), the client leaves or this node
    shuts down."""
    closing = asyncio.ensure_future(state.closing.wait())
    try:
        while not _gone(request):
            chunk = asyncio.ensure_future(upstream.content.readany())
            await asyncio.wait((chunk, closing), return_when=asyncio.FIRST_COMPLETED)
            if not chunk.done():
                chunk.cancel()
                return
            try:
                data = chunk.result()
            except (TimeoutError, aiohttp.ClientError):
                return
            if not data:
                return
            await response.write(data)
    finally:
        closing.cancel()


# -- durable consumers ---------------------------------------------------------------------------------
def _consumer_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not valid_id(name):
        raise LedgerError("invalid_id", "a consumer's name is 1-128 chars of A-Z a-z 0-9 . _ : - { }",
                          details={"field": "name"})
    return name


def parse_offsets(body: Any, shard_count: int) -> dict[int, int]:
    """``{"offsets": {"<shard>": <offset>, ...}}``: at least one shard, each one of the cluster's."""
    if not isinstance(body, dict):
        raise LedgerError("invalid_field", "the body is an object {\"offsets\": {...}}",
                          details={"field": ""})
    unknown = sorted(set(body) - {"offsets"})
    if unknown:
        raise LedgerError("unknown_field", details={"fields": unknown})
    offsets = body.get("offsets")
    if offsets is None:
        raise LedgerError("missing_field", details={"field": "offsets"})
    if not isinstance(offsets, dict) or not offsets:
        raise LedgerError("invalid_field", "offsets maps shards to offsets", details={"field": "offsets"})
    out: dict[int, int] = {}
    for key, value in offsets.items():
        where = f"offsets.{str(key)[:20]}"
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 9 and int(key) < shard_count):
            raise LedgerError("invalid_field", f"the shards are 0 to {shard_count - 1}",
                              details={"field": where})
        if type(value) is not int or not 0 <= value < 2**63:
            raise LedgerError("invalid_field", "an offset is an integer >= 0", details={"field": where})
        out[int(key)] = value
    return out


async def _submit_each(ctx: NodeContext, commands: dict[int, SetFeedOffset]) -> dict[int, Any]:
    """Each shard's command on that shard; the replies (or errors) by shard."""
    shards = sorted(commands)
    replies = await asyncio.gather(*(forward.submit(ctx, s, commands[s]) for s in shards),
                                   return_exceptions=True)
    return dict(zip(shards, replies, strict=True))


def _answer_each(request: web.Request, name: str, replies: dict[int, Any],
                 ok_body: dict[str, Any]) -> web.Response:
    """200 when every shard applied its command; else the first failure, naming what each shard did
    (offsets are per shard: the ones applied stay, and sending the same request again is safe)."""
    per_shard: dict[str, Any] = {}
    tokens: dict[int, int] = {}
    failure: LedgerError | None = None
    for shard, reply in sorted(replies.items()):
        if isinstance(reply, LedgerError):
            per_shard[str(shard)] = {"applied": False, "error": reply.body()["error"]}
            failure = failure or reply
            continue
        if isinstance(reply, BaseException):
            raise reply
        result = reply.results[0]
        tokens.update(reply.tokens())
        if result.code != "ok":
            per_shard[str(shard)] = {"applied": False, "error": {"code": result.code,
                                                                 "details": result.details}}
            failure = failure or LedgerError(result.code, details=dict(result.details))
        else:
            per_shard[str(shard)] = {"applied": True, **result.details}
    headers = {"X-Ledger-Token": parse.format_token(tokens)} if tokens else {}
    if failure is not None:
        failure.details = {**failure.details, "consumer": name, "shards": per_shard}
        failure.extra_headers = headers
        raise failure
    return respond(request, 200, {**ok_body, "shards": per_shard}, headers)


async def put_offsets(request: web.Request) -> web.Response:
    ctx = context_of(request)
    parse.check_query(request.query, frozenset())
    name = _consumer_name(request)
    offsets = parse_offsets(await read_json(request), ctx.shard_count)
    replies = await _submit_each(ctx, {s: SetFeedOffset(name, o) for s, o in offsets.items()})
    return _answer_each(request, name, replies,
                        {"name": name, "offsets": {str(s): o for s, o in sorted(offsets.items())}})


async def delete_consumer(request: web.Request) -> web.Response:
    """Forget the consumer on every shard: it no longer holds back retention."""
    ctx = context_of(request)
    parse.check_query(request.query, frozenset())
    name = _consumer_name(request)
    replies = await _submit_each(ctx, {s: SetFeedOffset(name, remove=True) for s in range(ctx.shard_count)})
    return _answer_each(request, name, replies, {"name": name})


def consumer_position(svc: ShardService, name: str) -> dict[str, Any]:
    """A consumer's offset on ``svc``'s shard and its lag behind the last event, as applied here."""
    with svc.store.reader() as reader:
        first, last = reader.feed_bounds()
        found = reader.consumer(name)
    offset, updated = (None, None) if found is None else found
    return {"shard": svc.shard, "offset": offset, "updated_at": updated, "first_offset": first,
            "last_offset": last, "lag": last - (offset or 0) if offset is not None else None}


async def get_consumer(request: web.Request) -> web.Response:
    """Per shard: the offset (null where the consumer never committed one), the lag behind the last
    event as the answering replica has applied it, and the first offset still held."""
    ctx = context_of(request)
    parse.check_query(request.query, CONSUMER_PARAMS)
    name = _consumer_name(request)
    params = parse.parse_read_params(request.query, ctx.shard_count)
    shards = [_shard_param(request.query, ctx)] if "shard" in request.query else range(ctx.shard_count)
    positions = await asyncio.gather(*(_position(request, ctx, s, name, params) for s in shards))
    if all(p["offset"] is None for p in positions):
        raise LedgerError("not_found", f"no consumer {name!r}", details={"consumer": name})
    lags = [p["lag"] for p in positions if p["lag"] is not None]
    return respond(request, 200, {"name": name, "shards": {str(p["shard"]): p for p in positions},
                                  "lag": sum(lags)})


async def _position(request: web.Request, ctx: NodeContext, shard: int, name: str,
                    params: parse.ReadParams) -> dict[str, Any]:
    svc = ctx.shards.get(shard)
    if svc is not None:
        await ensure_consistency(ctx, svc, params)
        if still_hosted(ctx, svc):
            return consumer_position(svc, name)
    query = {k: v for k, v in request.query.items() if k != "shard"}
    answer = await peer_get(ctx, shard, f"/v1/feed/consumers/{name}", {**query, "shard": str(shard)})
    position: dict[str, Any] = answer["shards"][str(shard)]
    return position


async def peer_get(ctx: NodeContext, shard: int, path: str, query: Mapping[str, str]) -> Any:
    """A consumer's position read on a node hosting ``shard``; a 404 there is an empty position."""
    status, body = await peer_request(ctx, shard, "GET", path, query)
    if status == 404:
        return {"shards": {str(shard): {"shard": shard, "offset": None, "updated_at": None,
                                        "first_offset": None, "last_offset": None, "lag": None}}}
    return body


async def peer_request(ctx: NodeContext, shard: int, method: str, path: str,
                       query: Mapping[str, str]) -> tuple[int, Any]:
    """A public request answered by a node hosting ``shard`` (each host in turn, until one answers
    200 or 404): its status and decoded JSON body."""
    hosts = [n for n in ctx.nodes_of(shard) if n != ctx.node_id and ctx.peer_url(n)]
    timeout = aiohttp.ClientTimeout(total=ctx.settings.forwarding.timeout_s)
    last: Any = None
    for node in hosts:
        try:
            async with ctx.client().request(method, f"{ctx.peer_url(node)}{path}", params=dict(query),
                                            timeout=timeout,
                                            headers={forward.FORWARDED_HEADER: ctx.node_id,
                                                     **auth.forwarded_credentials()}) as resp:
                body = await resp.json(content_type=None)
                if resp.status in (200, 404):
                    return resp.status, body
                last = f"{node} answered {resp.status}: {str(body)[:200]}"
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            last = f"{node}: {type(exc).__name__}"
    raise LedgerError("unavailable", f"no host of shard {shard} answered ({last})", details={"shard": shard})


# -- the dead-letter store of the exporters (node/feed/exporter.py) ------------------------------------
DLQ_PARAMS = frozenset({"shard", "sink"})


def _dlq_shards(request: web.Request, ctx: NodeContext) -> list[int]:
    parse.check_query(request.query, DLQ_PARAMS)
    sink = request.query.get("sink")
    if sink is not None and sink not in ("webhook", "nats"):
        raise LedgerError("invalid_query", "sink is webhook or nats", details={"param": "sink"})
    return [_shard_param(request.query, ctx)] if "shard" in request.query else list(range(ctx.shard_count))


async def list_dead_letters(request: web.Request) -> web.Response:
    """Every dead-lettered batch of every shard (as its replicas list them), oldest first per sink."""
    ctx = context_of(request)
    shards = _dlq_shards(request, ctx)
    sink = request.query.get("sink")

    async def of_shard(shard: int) -> list[dict[str, Any]]:
        svc = ctx.shards.get(shard)
        if svc is None:
            _, body = await peer_request(ctx, shard, "GET", "/v1/feed/dlq", {"shard": str(shard)})
            return list(body["dead_letters"])
        with svc.store.reader() as reader:
            return [d.to_json() for d in exporter.dead_letters(reader)]

    found = [d for letters in await asyncio.gather(*(of_shard(s) for s in shards)) for d in letters
             if sink is None or d["sink"] == sink]
    return respond(request, 200, {"dead_letters": found})


async def redrive_dead_letters(request: web.Request) -> web.Response:
    """Send every dead-lettered batch (of a shard, of a sink, or all) again, once each; those
    delivered leave the store, the others stay with the reason."""
    ctx = context_of(request)
    shards = _dlq_shards(request, ctx)
    sink_name = request.query.get("sink")

    async def of_shard(shard: int) -> dict[str, list[dict[str, Any]]]:
        svc = ctx.shards.get(shard)
        if svc is None:
            query = {"shard": str(shard), **({"sink": sink_name} if sink_name else {})}
            _, body = await peer_request(ctx, shard, "POST", "/v1/feed/dlq/redrive", query)
            return {"redriven": body["redriven"], "failed": body["failed"]}
        return await _redrive_shard(ctx, svc, sink_name)

    done: dict[str, list[dict[str, Any]]] = {"redriven": [], "failed": []}
    for outcome in await asyncio.gather(*(of_shard(s) for s in shards)):
        done["redriven"] += outcome["redriven"]
        done["failed"] += outcome["failed"]
    return respond(request, 200, done)


async def _redrive_shard(ctx: NodeContext, svc: ShardService,
                         sink_name: str | None) -> dict[str, list[dict[str, Any]]]:
    sinks = {sink.name: sink for sink in configured_sinks(ctx)}
    with svc.store.reader() as reader:
        letters = [d for d in exporter.dead_letters(reader) if sink_name is None or d.sink == sink_name]
    done: dict[str, list[dict[str, Any]]] = {"redriven": [], "failed": []}
    try:
        for letter in letters:  # in order, one at a time: a receiver sees them as they were written
            sink = sinks.get(letter.sink)
            try:
                if sink is None:
                    raise LedgerError("unavailable", f"no {letter.sink} sink is configured on {ctx.node_id}")
                await exporter.redrive(ctx, svc, sink, letter)
            except (DeliveryFailed, LedgerError) as exc:
                done["failed"].append({**letter.to_json(), "error": str(exc)})
            else:
                done["redriven"].append(letter.to_json())
    finally:
        for sink in sinks.values():
            await sink.close()
    return done
