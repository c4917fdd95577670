"""The exporters: on each shard's leader, every configured sink receives every event of the shard, at
least once and in offset order.

An exporter's position is a durable consumer like any other (``sink.<name>``, a ``SetFeedOffset``
in the shard's log), committed after each delivered batch: a new leader reads it once everything
committed before its term is applied (a read barrier), and goes on from there. A batch delivered
but not yet committed when a leader fails is delivered again: consumers de-duplicate by event id
(JetStream does it by message id within its duplicate window).

A webhook batch that failed ``webhook_attempts_max`` times goes to the dead-letter store and the
exporter moves on. A dead letter is a consumer too, named ``dlq.<sink>.<first>-<last>`` at offset
``first - 1``: retention keeps its events until it is re-driven (sent again, once, then removed)
or removed, and every replica lists it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from raftledger.client.errors import LedgerError, NotLeader, Unavailable
from raftledger.statemachine.commands import SetFeedOffset
from raftledger.statemachine.store import Reader

from ..http.context import NodeContext
from ..http.forward import submit
from ..metrics import FeedSinkSeries
from ..service import ShardService
from . import retention
from .sinks import DeliveryFailed, Sink, configured_sinks

log = logging.getLogger(__name__)

SINK_PREFIX = "sink."
DLQ_PREFIX = "dlq."
DLQ_RE = re.compile(r"dlq\.([a-z]+)\.([0-9]+)-([0-9]+)")
idle_wait_s = 5.0  # an exporter with nothing to send looks again at least this often
leader_wait_s = 5.0  # a follower's exporter looks again at least this often for leadership
barrier_wait_s = 30.0  # a new leader's exporter waits this long for its read barrier


@dataclass(frozen=True, slots=True)
class DeadLetter:
    sink: str
    shard: int
    first: int
    last: int
    since: int  # when it was stored (ns)

    @property
    def name(self) -> str:
        return dead_letter_name(self.sink, self.first, self.last)

    def to_json(self) -> dict[str, Any]:
        return {"sink": self.sink, "shard": self.shard, "first": self.first, "last": self.last,
                "events": self.last - self.first + 1, "since": self.since}


def dead_letter_name(sink: str, first: int, last: int) -> str:
    return f"{DLQ_PREFIX}{sink}.{first}-{last}"


def dead_letters(reader: Reader) -> list[DeadLetter]:
    out = []
    for name, (_, since) in reader.consumers().items():
        match = DLQ_RE.fullmatch(name)
        if match is not None:
            out.append(DeadLetter(match.group(1), reader.shard, int(match.group(2)), int(match.group(3)),
                                  since))
    return sorted(out, key=lambda d: (d.sink, d.first))


def backoff_s(ctx: NodeContext, attempt: int) -> float:
    """Exponential (from the first failed attempt, 1), capped, with jitter: between half and all."""
    settings = ctx.settings.feed
    capped = min(settings.export_backoff_max_s, settings.export_backoff_initial_s * 2 ** min(attempt - 1, 32))
    return capped * random.uniform(0.5, 1.0)


async def background(ctx: NodeContext, _: web.Application) -> AsyncIterator[None]:
    """Retention and every sink's exporter on every hosted shard, while the API serves."""
    sinks = configured_sinks(ctx)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(retention.compact(ctx), name="feed-retention")]
    tasks += [loop.create_task(export(ctx, sink, shard), name=f"feed-{sink.name}-{shard}")
              for sink in sinks for shard in range(ctx.shard_count)]  # hosted now or later
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for sink in sinks:
        with contextlib.suppress(Exception):
            await sink.close()


async def export(ctx: NodeContext, sink: Sink, shard: int) -> None:
    """Forever: while this node's replica of the shard leads it, deliver its events to ``sink``.
    The map may give the node a replica of the shard, or take it away, at any time."""
    series = ctx.metrics.feed_sink(sink.name, shard)
    for failures in itertools.count():
        svc = ctx.shards.get(shard)
        if svc is None:  # not hosted here (yet): replicas come and go with the map
            await asyncio.wait({ctx.maps.changed()}, timeout=leader_wait_s)
            continue
        if not svc.is_leader():
            series.lag.set(0)  # the leader's exporter reports it
            await asyncio.wait({svc.leader_changed()}, timeout=leader_wait_s)
            continue
        try:
            await _lead(ctx, sink, svc, series)
        except (LedgerError, DeliveryFailed) as exc:  # deposed, or the shard is busy: look again
            log.info("feed: %s exporter of shard %d paused (%s)", sink.name, shard, exc)
            await ctx.clock.sleep(backoff_s(ctx, min(failures + 1, 8)))


async def _lead(ctx: NodeContext, sink: Sink, svc: ShardService, series: FeedSinkSeries) -> None:
    """From the committed offset, batch by batch, until this replica no longer leads."""
    consumer = SINK_PREFIX + sink.name
    index = await svc.read_barrier(barrier_wait_s)  # every offset committed before this term
    if not await svc.wait_applied(index, barrier_wait_s):
        raise Unavailable(message=f"shard {svc.shard}: the read barrier was not applied in time")
    offset = await _start_offset(svc, consumer)
    log.info("feed: %s exporter of shard %d leads, from offset %d", sink.name, svc.shard, offset)
    batch_max = ctx.settings.feed.export_batch_events_max
    while svc.is_leader():
        with svc.store.reader() as reader:
            last = reader.feed_bounds()[1]
            applied = reader.state().applied_index
            events = [e.to_json(svc.shard) for e in reader.events(offset, batch_max)]
        series.lag.set(last - offset)
        if not events:
            await svc.wait_applied(applied + 1, idle_wait_s)  # woken by the next apply
            continue
        await _deliver(ctx, sink, svc, events, series)
        offset = events[-1]["offset"]
        await svc.submit(SetFeedOffset(consumer, offset))


async def _start_offset(svc: ShardService, consumer: str) -> int:
    """The committed offset; a first run registers at the first event held, so that retention keeps
    what it has not delivered from then on."""
    with svc.store.reader() as reader:
        found = reader.consumer(consumer)
        first = reader.feed_bounds()[0]
    if found is not None:
        return found[0]
    committed = await svc.submit(SetFeedOffset(consumer, first - 1))
    code = getattr(committed.outcome, "code", None)
    if code is None or code.name != "ok":
        raise Unavailable(message=f"shard {svc.shard}: registering {consumer} failed ({code})")
    return first - 1


async def _deliver(ctx: NodeContext, sink: Sink, svc: ShardService, events: list[dict[str, Any]],
                   series: FeedSinkSeries) -> None:
    """Send until delivered (backing off between attempts); a sink with a dead-letter store gives a
    batch ``webhook_attempts_max`` attempts, then stores it there."""
    attempts_max = ctx.settings.feed.webhook_attempts_max
    for attempt in itertools.count(1):
        try:
            await sink.send(svc.shard, events)
        except DeliveryFailed as exc:
            series.failed.inc()
            if sink.dead_letters and attempt >= attempts_max:
                await _dead_letter(svc, sink, events, series, exc)
                return
            log.info("feed: %s delivery of shard %d failed (attempt %d): %s", sink.name, svc.shard,
                     attempt, exc)
            if not svc.is_leader():
                raise NotLeader(message=f"shard {svc.shard}: no longer the leader") from exc
            await ctx.clock.sleep(backoff_s(ctx, attempt))
        else:
            series.delivered.inc(len(events))
            return


async def _dead_letter(svc: ShardService, sink: Sink, events: list[dict[str, Any]],
                       series: FeedSinkSeries, exc: DeliveryFailed) -> None:
    first, last = events[0]["offset"], events[-1]["offset"]
    await svc.submit(SetFeedOffset(dead_letter_name(sink.name, first, last), first - 1))
    series.dead_lettered.inc(len(events))
    log.warning("feed: %s batch %d:%d-%d moved to the dead-letter store after its last attempt: %s",
                sink.name, svc.shard, first, last, exc)


async def redrive(ctx: NodeContext, svc: ShardService, sink: Sink, letter: DeadLetter) -> None:
    """Send a dead-lettered batch again (once, marked as a re-drive), then remove it from the store.
    Raises DeliveryFailed (it stays) or LedgerError."""
    count = letter.last - letter.first + 1
    with svc.store.reader() as reader:
        events = [e.to_json(svc.shard) for e in reader.events(letter.first - 1, count)]
    if [e["offset"] for e in events] != list(range(letter.first, letter.last + 1)):
        raise LedgerError("unavailable", f"shard {svc.shard} does not hold events {letter.name}")
    await sink.send(svc.shard, events, redrive=True)
    reply = await submit(ctx, svc.shard, SetFeedOffset(letter.name, remove=True))
    if reply.results[0].code != "ok":
        raise LedgerError(reply.results[0].code, details=reply.results[0].details)
