"""The subscriber's sans-I/O core (``client.feed.Subscription``), driven by hand: each ``Send`` it asks
for is answered by a small in-memory stand-in for a node's feed routes, and its ``Sleep``s advance a
fake clock. What is checked is the core's decisions: what it reads, hands out, drops and commits."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from raftledger.client.core import Program, Reply, Send, Session, Sleep
from raftledger.client.errors import FeedCompacted, LedgerError
from raftledger.client.feed import CommitPolicy, Subscription, map_check_s


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FeedNode:
    """Answers the routes a subscriber uses, from per-shard event lists; records what it was sent."""

    def __init__(self, shards: int = 2) -> None:
        self.events: dict[int, list[int]] = {s: [] for s in range(shards)}  # offsets held
        self.first: dict[int, int] = {s: 1 for s in range(shards)}
        self.overlap = 0  # pages start this many events before `after` (a replica repeating itself)
        self.gap_at: int | None = None
        self.reads: list[dict[str, str]] = []
        self.commits: list[dict[str, int]] = []
        self.consumer: dict[str, int] | None = None
        self.when_empty: list[Any] = []  # called, one each, when a read finds nothing new

    def add(self, shard: int, count: int) -> None:
        held = self.events[shard]
        held += range(len(held) + 1, len(held) + 1 + count)

    def answer(self, send: Send) -> Reply:
        url = urlsplit(send.url)
        query = dict(parse_qsl(url.query))
        if url.path == "/v1/cluster/map":
            shards = [{"id": s, "replicas": ["n0"], "slot_ranges": []} for s in self.events]
            return self._json(200, {"epoch": 1, "slots": 4096, "shards": shards,
                                    "nodes": [{"id": "n0", "url": "http://n0", "state": "up"}]})
        if url.path == "/v1/cluster":
            return self._json(200, {"shards": [{"id": s, "leader": "n0"} for s in self.events]})
        if url.path == "/v1/feed":
            return self._page(query)
        if send.method == "PUT":
            offsets = {int(s): o for s, o in json.loads(send.body or b"{}")["offsets"].items()}
            self.commits.append(offsets)
            self.consumer = {**(self.consumer or {}), **{str(s): o for s, o in offsets.items()}}
            return self._json(200, {})
        if self.consumer is None:
            return self._json(404, {"error": {"code": "not_found", "message": "no consumer"}})
        return self._json(200, {"shards": {s: {"offset": o} for s, o in self.consumer.items()}})

    def _page(self, query: dict[str, str]) -> Reply:
        shard, after, limit = int(query["shard"]), int(query["after"]), int(query["limit"])
        self.reads.append(query)
        first = self.first[shard]
        if after < first - 1:
            return self._json(410, {"error": {"code": "feed_compacted", "message": "compacted",
                                              "details": {"shard": shard, "earliest_offset": first}}})
        offsets = [o for o in self.events[shard] if o > max(after - self.overlap, first - 1)][:limit]
        if not offsets and self.when_empty:
            self.when_empty.pop(0)()
        if self.gap_at is not None:
            offsets = [o for o in offsets if o != self.gap_at]
        events = [{"id": f"{shard}:{o}", "shard": shard, "offset": o, "type": "account.created",
                   "timestamp": o, "data": {"id": f"a{o}", "currency": "BRL"}} for o in offsets]
        return self._json(200, {"shard": shard, "events": events,
                                "next_after": offsets[-1] if offsets else after,
                                "first_offset": first, "last_offset": len(self.events[shard])})

    @staticmethod
    def _json(status: int, body: Any) -> Reply:
        return Reply(status, {}, json.dumps(body).encode())


def drive(program: Program[Any], node: FeedNode, clock: Clock) -> Any:
    outcome: Any = None
    for _ in range(10_000):
        try:
            action = program.send(outcome)
        except StopIteration as stop:
            return stop.value
        if isinstance(action, Sleep):
            clock.now += action.seconds
            outcome = None
        else:
            outcome = node.answer(action)
    raise AssertionError("the program did not end")


def subscription(node: FeedNode, clock: Clock, consumer: str | None = "c", **options: Any) -> Subscription:
    session = Session(["http://n0"], clock=clock)
    return Subscription(session, consumer, **options)


def take(sub: Subscription, node: FeedNode, clock: Clock, count: int) -> list[str]:
    out = []
    for _ in range(count):
        event = drive(sub.next_event(), node, clock)
        if event is None:
            break
        out.append(event.id)
    return out


def test_events_repeated_by_a_replica_are_handed_out_once_in_offset_order() -> None:
    node, clock = FeedNode(shards=1), Clock()
    node.add(0, 5)
    node.overlap = 2
    sub = subscription(node, clock, page_events=3)
    assert take(sub, node, clock, 5) == ["0:1", "0:2", "0:3", "0:4", "0:5"]


def test_a_gap_in_a_shard_is_an_error_not_a_skip() -> None:
    node, clock = FeedNode(shards=1), Clock()
    node.add(0, 4)
    node.gap_at = 2
    sub = subscription(node, clock)
    with pytest.raises(LedgerError, match="gap"):
        take(sub, node, clock, 4)


def test_offsets_are_committed_every_n_events_and_on_close() -> None:
    node, clock = FeedNode(shards=1), Clock()
    node.add(0, 7)
    sub = subscription(node, clock, commit=CommitPolicy(every_events=3, interval_s=3600))
    assert len(take(sub, node, clock, 7)) == 7
    assert node.commits == [{0: 0}, {0: 3}, {0: 6}]  # registration, then each third processed event
    drive(sub.close(), node, clock)
    assert node.commits[-1] == {0: 7}  # the last one handed out counts as processed on a clean close


def test_a_close_after_a_failure_does_not_commit_the_event_being_processed() -> None:
    node, clock = FeedNode(shards=1), Clock()
    node.add(0, 3)
    sub = subscription(node, clock, commit=CommitPolicy(every_events=100, interval_s=3600))
    take(sub, node, clock, 2)
    drive(sub.close(processed=False), node, clock)
    assert node.commits[-1] == {0: 1}


def test_offsets_are_committed_after_the_interval_while_the_feed_is_idle() -> None:
    node, clock = FeedNode(shards=1), Clock()
    node.add(0, 1)
    sub = subscription(node, clock, commit=CommitPolicy(every_events=100, interval_s=5.0))
    take(sub, node, clock, 1)
    commits_when_idle: list[Any] = []

    def idle_for_a_while() -> None:
        commits_when_idle.append(list(node.commits))
        clock.now += 6.0
    node.when_empty = [idle_for_a_while, lambda: node.add(0, 1)]
    assert take(sub, node, clock, 1) == ["0:2"]
    assert commits_when_idle == [[{0: 0}]]  # nothing was due at the first idle read
    assert node.commits == [{0: 0}, {0: 1}]  # committed while idle, before the next event came


def test_a_restarted_subscriber_starts_after_the_committed_offsets() -> None:
    node, clock = FeedNode(), Clock()
    node.add(0, 4)
    node.add(1, 4)
    node.consumer = {"0": 3, "1": 1}
    sub = subscription(node, clock)
    assert sorted(take(sub, node, clock, 4)) == ["0:4", "1:2", "1:3", "1:4"]


def test_a_read_before_the_first_event_held_raises_feed_compacted_with_the_earliest_offset() -> None:
    node, clock = FeedNode(shards=1), Clock()
    node.add(0, 9)
    node.first[0] = 6
    sub = subscription(node, clock, consumer=None)
    with pytest.raises(FeedCompacted) as raised:
        take(sub, node, clock, 1)
    assert raised.value.earliest_offset == 6 and raised.value.shard == 0 and raised.value.status == 410


def test_a_replay_ends_at_each_shards_last_event_as_of_its_start() -> None:
    node, clock = FeedNode(), Clock()
    node.add(0, 3)
    node.add(1, 2)
    sub = subscription(node, clock, consumer=None, until_caught_up=True)
    first = take(sub, node, clock, 1)
    node.add(0, 5)  # written after the replay started: not part of it
    rest = take(sub, node, clock, 100)
    assert sorted(first + rest) == ["0:1", "0:2", "0:3", "1:1", "1:2"] and sub.finished


def test_latest_starts_after_each_shards_last_event() -> None:
    node, clock = FeedNode(), Clock()
    node.add(0, 3)
    node.add(1, 2)
    sub = subscription(node, clock, consumer=None, start="latest")
    node.when_empty = [lambda: None, lambda: None,  # the two reads of where each shard ends
                       lambda: node.add(1, 1)]
    assert take(sub, node, clock, 1) == ["1:3"]


def test_a_shard_with_more_to_read_is_read_again_at_once_and_idle_shards_share_the_long_poll() -> None:
    node, clock = FeedNode(), Clock()
    node.add(0, 10)
    sub = subscription(node, clock, consumer=None, page_events=4, wait_ms=2000)
    assert take(sub, node, clock, 10) == [f"0:{o}" for o in range(1, 11)]
    waits = [(r["shard"], r["wait_ms"]) for r in node.reads]
    assert ("0", "0") in waits  # a page that left more: read again without waiting
    assert all(w == "1000" for s, w in waits if s == "1")  # idle: half of wait_ms each


def test_a_shard_added_to_the_map_is_followed_from_its_first_event() -> None:
    node, clock = FeedNode(shards=1), Clock()
    node.add(0, 1)
    sub = subscription(node, clock, consumer=None)
    assert take(sub, node, clock, 1) == ["0:1"]
    node.events[1] = [1, 2]
    node.first[1] = 1
    clock.now += map_check_s
    assert take(sub, node, clock, 2) == ["1:1", "1:2"]
