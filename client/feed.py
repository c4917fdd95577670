"""Following the change feed of every shard: the sans-I/O core of ``client.subscribe`` (docs/feed.md).

A ``Subscription`` decides everything and performs nothing: where to read next, which events are new,
when and what to commit, when it is done. Its steps are core programs (``client.core.Program``) that
the synchronous and the asyncio ``Subscriber`` drive like any other call, so both share every decision.

- **Every shard**: the shards are those of the cluster map, read again every ``map_check_s``; a shard
  that appears is followed from its first event.
- **Reads** are long-polls (``GET /v1/feed?wait_ms=``), one page at a time, on any replica of the
  shard, through the core's retries: a node that fails is left for another replica, and a lagging
  replica only answers later, never differently (offsets are the same on every replica). A long-poll
  is one bounded request and answer, which both transports already perform; Server-Sent Events would
  need a streaming reader in each of them for little gain, since a page carries up to
  ``page_events`` events. A shard whose last page left more to read is read again at once; when every
  shard is idle, each is long-polled in turn for its share of ``wait_ms`` (so a quiet cluster's
  next event arrives within about ``wait_ms``).
- **De-duplication by event id**: an id is ``<shard>:<offset>`` and offsets are dense, so the last
  offset taken per shard identifies every id taken before it: an event at or below it is dropped,
  and one past the next offset (a gap, which no replica ever serves) is an error.
- **Commits** (with a consumer name): an event counts as processed once the next one is asked for,
  or when the subscriber is closed without an exception. Processed offsets are committed through
  ``PUT /v1/feed/consumers/{name}/offsets`` every ``CommitPolicy.every_events`` events or
  ``interval_s`` seconds, and on close. A restarted subscriber resumes after the committed offsets:
  events processed after the last commit come again (at least once), never out of order.
- **The audit trail** (``audit=True``): the administrative changes of the cluster (tokens,
  membership, configuration), served as the reserved shard ``AUDIT_FEED`` (-1) to admin and auditor
  tokens; followed alone, with no durable consumer (its offsets are not stored in the cluster).
- A read before the first event still held raises ``FeedCompacted`` (410, with the shard and the
  earliest offset held). Nodes that stay unreachable for ``unavailable_s_max`` raise the last error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from .core import Operation, Program, Session, Sleep, decode_json, run
from .errors import FeedCompacted, LedgerError, NotFound, RuleViolation
from .types import Event

Start = int | Mapping[int, int] | Literal["committed", "latest"]

page_events_default = 500
wait_ms_default = 2000
wait_ms_min = 100  # an idle shard's share of the long-poll, at least
map_check_s = 30.0
unavailable_s_max = 300.0
latest_probe_after = 2**62  # past any offset: a page that only tells the bounds
AUDIT_FEED = -1  # the audit trail's shard id (cluster.meta.AUDIT_FEED)


@dataclass(frozen=True, slots=True)
class CommitPolicy:
    """When processed offsets are committed: after ``every_events`` events (1: after each), or once
    ``interval_s`` passed since the last commit, whichever comes first; always on close."""

    every_events: int = 100
    interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.every_events < 1 or self.interval_s < 0:
            raise ValueError("every_events >= 1 and interval_s >= 0")


def feed_page(shard: int, after: int, limit: int, wait_ms: int,
              consistency: Literal["local", "linearizable"] = "local") -> Operation[Any]:
    params: dict[str, str | int] = {"shard": shard, "after": after, "limit": limit, "wait_ms": wait_ms}
    return Operation("GET", "/v1/feed", decode_json, params=params, consistency=consistency, shard=shard)


def _consumer_path(name: str) -> str:
    return f"/v1/feed/consumers/{quote(name, safe='')}"


class Subscription:
    """The state of one subscriber: per shard the last offset read (``after``) and processed
    (``processed``), what is committed, and the events read but not handed out yet."""

    def __init__(self, session: Session, consumer: str | None = None, *, start: Start = "committed",
                 until_caught_up: bool = False, commit: CommitPolicy | None = None,
                 page_events: int = page_events_default, wait_ms: int = wait_ms_default,
                 audit: bool = False) -> None:
        if audit and consumer is not None:
            raise ValueError("the audit trail is followed without a durable consumer")
        if consumer is None and start == "committed":
            start = 0
        self.audit = audit
        self.session = session
        self.consumer = consumer
        self.start = start
        self.until_caught_up = until_caught_up
        self.policy = commit or CommitPolicy()
        self.page_events = page_events
        self.wait_ms = min(wait_ms, max(0, int(session.policy.attempt_timeout_s * 1000) - 1000))
        self.after: dict[int, int] = {}
        self.processed: dict[int, int] = {}
        self.committed: dict[int, int] = {}
        self.ends: dict[int, int] | None = None  # until_caught_up: the last offset to hand out
        self.ready: deque[Event] = deque()
        self.current: Event | None = None  # handed out, not yet processed
        self.busy: set[int] = set()  # shards whose last page left more to read
        self.started = False
        self.stopping = False  # asked from elsewhere: hand out what is ready, then end
        self.finished = False
        self._turn = 0
        self._since_commit = 0
        self._committed_at = session.clock()
        self._map_checked_at = session.clock()
        self._answered_at = session.clock()

    # -- the programs the subscribers drive ---------------------------------------------------------
    def next_event(self) -> Program[Event | None]:
        """The next new event (the one handed out before counts as processed), or None once
        ``until_caught_up`` reached every shard's end or ``stopping`` was set."""
        if not self.started:
            yield from self._begin()
        self._processed_current()
        while True:
            if self._commit_due():
                yield from self.commit(deferrable=True)
            if self.ready:
                break
            if self.session.clock() - self._map_checked_at >= map_check_s:
                yield from self._check_map(deferrable=True)
            choice = None if self.stopping else self._choose()
            if choice is None:
                self.finished = True
                return None
            yield from self._read(*choice)
        self.current = self.ready.popleft()
        return self.current

    def commit(self, deferrable: bool = False) -> Program[None]:
        """Commit every processed offset not yet committed. ``deferrable``: a failure that may go
        away is left for a later commit (the events would only come again)."""
        if self.consumer is None:
            return
        due = {s: o for s, o in self.processed.items() if self.committed.get(s) != o}
        if not due:
            return
        op = Operation("PUT", _consumer_path(self.consumer) + "/offsets", decode_json, kind="write",
                       body={"offsets": {str(s): o for s, o in sorted(due.items())}})
        try:
            yield from run(op, self.session)
        except LedgerError as exc:
            if not (deferrable and exc.retryable):
                raise
            return
        self.committed.update(due)
        self._since_commit = 0
        self._committed_at = self.session.clock()

    def close(self, processed: bool = True) -> Program[None]:
        """The end: the event handed out last counts as processed unless ``processed`` is False
        (it failed), and what is processed is committed."""
        if processed:
            self._processed_current()
        self.current = None
        self.finished = True
        if self.started:
            yield from self.commit()

    # -- where to start -----------------------------------------------------------------------------
    def _begin(self) -> Program[None]:
        self.started = True
        yield from self._check_map()
        shards = [AUDIT_FEED] if self.audit else sorted(self.session.replicas)
        positions = yield from self._start_positions(shards)
        for shard in shards:
            self._follow(shard, positions.get(shard, 0))
        if self.until_caught_up:
            self.ends = yield from self._last_offsets(shards)
        if self.consumer is not None and self.processed != self.committed:
            yield from self._register()

    def _start_positions(self, shards: list[int]) -> Program[dict[int, int]]:
        if self.start == "committed":
            return (yield from self._committed_offsets())
        if self.start == "latest":
            return (yield from self._last_offsets(shards))
        if isinstance(self.start, int):
            return {s: self.start for s in shards}
        return {int(s): int(o) for s, o in self.start.items()}

    def _committed_offsets(self) -> Program[dict[int, int]]:
        assert self.consumer is not None
        op = Operation("GET", _consumer_path(self.consumer), decode_json, consistency="linearizable")
        try:
            answer = yield from run(op, self.session)
        except NotFound:
            return {}
        found = {int(s): p["offset"] for s, p in answer.get("shards", {}).items()
                 if isinstance(p.get("offset"), int)}
        self.committed.update(found)
        return found

    def _last_offsets(self, shards: list[int]) -> Program[dict[int, int]]:
        """Each shard's last event as its leader has it (a linearizable read)."""
        out = {}
        for shard in shards:
            page = yield from run(feed_page(shard, latest_probe_after, 1, 0, "linearizable"), self.session)
            out[shard] = int(page["last_offset"])
        return out

    def _register(self) -> Program[None]:
        """A consumer's starting offsets are committed at once, so retention keeps what it has not
        read. An offset the shard refuses (past its last event, or compacted) is left to the reads:
        they wait for it, or raise FeedCompacted."""
        try:
            yield from self.commit()
        except RuleViolation as exc:
            if exc.code != "feed_offset_out_of_range":
                raise
            self.committed.update(self.processed)  # nothing is due until an event is processed

    def _follow(self, shard: int, offset: int) -> None:
        self.after[shard] = offset
        self.processed[shard] = offset

    def _check_map(self, deferrable: bool = False) -> Program[None]:
        """The shards of the cluster map; ``deferrable``: when no node answers, look again later."""
        self._map_checked_at = self.session.clock()
        try:
            raw = yield from run(Operation("GET", "/v1/cluster/map", decode_json), self.session)
        except LedgerError as exc:
            if not (deferrable and exc.retryable):
                raise
            return
        self.session.learn_map(raw)
        if self.started and not self.until_caught_up and not self.audit:
            for shard in sorted(self.session.replicas):
                if shard not in self.after:
                    self._follow(shard, 0)

    # -- reading ------------------------------------------------------------------------------------
    def _choose(self) -> tuple[int, int] | None:
        """The shard to read next and how long it may wait; None when every shard reached its end."""
        active = [s for s in sorted(self.after) if self.ends is None or self.after[s] < self.ends.get(s, 0)]
        if not active:
            return None
        self._turn = (self._turn + 1) % len(active)
        rotated = active[self._turn:] + active[:self._turn]
        busy = [s for s in rotated if s in self.busy]
        if busy:
            return busy[0], 0
        return rotated[0], max(wait_ms_min, self.wait_ms // len(active))

    def _read(self, shard: int, wait_ms: int) -> Program[None]:
        op = feed_page(shard, self.after[shard], self.page_events, wait_ms)
        try:
            page = yield from run(op, self.session)
        except FeedCompacted:
            raise
        except LedgerError as exc:
            if not exc.retryable or self.session.clock() - self._answered_at >= unavailable_s_max:
                raise
            yield Sleep(self.session.policy.backoff_cap_s)
            return
        self._answered_at = self.session.clock()
        self.take(shard, page)

    def take(self, shard: int, page: Mapping[str, Any]) -> list[Event]:
        """The new events of a page of ``shard``, queued to be handed out in offset order."""
        end = None if self.ends is None else self.ends.get(shard, 0)
        taken = []
        for raw in page.get("events", []):
            event = Event.from_json(raw)
            if event.shard != shard or event.id != f"{shard}:{event.offset}":
                raise LedgerError("internal_error", f"shard {shard} answered event {event.id}")
            if event.offset <= self.after[shard] or (end is not None and event.offset > end):
                continue  # seen already, or past the end of a replay
            if event.offset != self.after[shard] + 1:
                raise LedgerError("internal_error", f"shard {shard}: event {event.id} follows offset "
                                  f"{self.after[shard]}: a gap in the feed")
            self.after[shard] = event.offset
            taken.append(event)
        self.ready.extend(taken)
        last = page.get("last_offset")
        if isinstance(last, int) and last > self.after[shard] and taken:
            self.busy.add(shard)
        else:
            self.busy.discard(shard)
        return taken

    # -- commits ------------------------------------------------------------------------------------
    def _processed_current(self) -> None:
        if self.current is not None:
            self.processed[self.current.shard] = self.current.offset
            self._since_commit += 1
            self.current = None

    def _commit_due(self) -> bool:
        if self.consumer is None or self.processed == self.committed:
            return False
        return (self._since_commit >= self.policy.every_events
                or self.session.clock() - self._committed_at >= self.policy.interval_s)
