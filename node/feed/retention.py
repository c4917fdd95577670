"""Retention of the change feed: a shard's leader drops the events every consumer has passed once
they are older than ``[feed] retention_age_min_s``, by proposing ``CompactFeed`` into the shard's log,
so every replica drops the same events at the same point of its log."""

from __future__ import annotations

import contextlib
import logging

from raftledger.client.errors import LedgerError
from raftledger.statemachine.commands import CompactFeed

from ..http.context import NodeContext
from ..service import ShardService

log = logging.getLogger(__name__)


async def compact(ctx: NodeContext) -> None:
    """Forever: on every shard this node leads, compact what retention allows. A timer, not a poll
    of something that could signal: what it waits for is events growing old."""
    while True:
        await ctx.clock.sleep(ctx.settings.feed.compaction_interval_s)
        for _, svc in sorted(ctx.shards.items()):
            if svc.is_leader():
                with contextlib.suppress(LedgerError):  # deposed or busy: the next round tries again
                    await compact_shard(ctx, svc)


def compaction_point(svc: ShardService, now_ns: int, age_min_ns: int) -> int | None:
    """The offset up to which ``CompactFeed`` would drop events now, or None when it would drop none:
    the oldest event held is too young, or a consumer has not passed it."""
    with svc.store.reader() as reader:
        first, last = reader.feed_bounds()
        oldest = reader.event_timestamp(first)
        through = min([last, *(offset for offset, _ in reader.consumers().values())])
    if oldest is None or through < first or oldest > now_ns - age_min_ns:
        return None
    return through


async def compact_shard(ctx: NodeContext, svc: ShardService) -> int:
    """Propose one ``CompactFeed`` on ``svc``'s shard if it would drop anything; events dropped."""
    age_min_ns = int(ctx.settings.feed.retention_age_min_s * 1e9)
    through = compaction_point(svc, ctx.clock.time_ns(), age_min_ns)
    if through is None:
        return 0
    committed = await svc.submit(CompactFeed(through, age_min_ns))
    removed = int(getattr(committed.outcome, "details", {}).get("removed", 0))
    if removed:
        log.info("feed: shard %d dropped %d events up to offset %d", svc.shard, removed, through)
    return removed
