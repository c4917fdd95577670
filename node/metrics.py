"""Prometheus metrics of one node, in a registry of its own (several nodes may share a process in tests).

The HTTP layer records requests, results and overload; the Raft glue calls the hooks
(``observe_batch``, ``observe_fsync``, ``set_queue_depth``, ``leader_changed``). Per-shard Raft state
(is_leader, term, commit, applied, lag) is read from each ``ShardService.status()`` at scrape time, so
it is never stale and costs nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Histogram("raftledger_http_request_seconds", "HTTP request latency",
                                  ["method", "route", "status"], buckets=LATENCY_BUCKETS_S,
                                  registry=r)
        self._children: dict[tuple[Any, ...], Any] = {}  # see _child
        self.in_flight = Gauge("raftledger_http_requests_in_flight", "requests being served",
                               registry=r)
        self.results = Counter("raftledger_results_total", "command results by code and shard",
                               ["shard", "kind", "code"], registry=r)
        self.replays = Counter("raftledger_idempotent_replays_total",
                               "writes answered from a stored outcome", ["shard"], registry=r)
        self.forwarded = Counter("raftledger_forwarded_total", "writes forwarded to a leader node",
                                 ["shard", "outcome"], registry=r)
        self.overload = Counter("raftledger_overload_rejections_total",
                                "requests refused with 503 overloaded", ["where"], registry=r)
        self.stale_reads = Counter("raftledger_stale_read_rejections_total",
                                   "reads refused with 503 stale_replica", ["shard"], registry=r)
        self.batch_size = Histogram("raftledger_raft_batch_commands", "commands per Raft entry",
                                    ["shard"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_linger = Histogram("raftledger_raft_batch_linger_seconds",
                                      "time the first command of a batch waited",
                                      ["shard"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.fsync = Histogram("raftledger_fsync_seconds", "journal fsync latency", ["shard"],
                               buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("raftledger_queue_depth", "commands waiting for a batch",
                                 ["shard"], registry=r)
        self.internal_refused = Counter("raftledger_internal_refused_total",
                                        "internal requests refused before they were opened",
                                        ["reason"], registry=r)
        self.leader_changes = Counter("raftledger_leader_changes_total",
                                      "leader changes seen by this replica", ["shard"], registry=r)
        self._shard_series: dict[int, _ShardSeries] = {}
        self.sink_delivered = Counter("raftledger_feed_sink_delivered_total",
                                      "events an exporter delivered", ["sink", "shard"], registry=r)
        self.sink_failed = Counter("raftledger_feed_sink_failed_total",
                                   "failed delivery attempts of an exporter", ["sink", "shard"], registry=r)
        self.sink_dead_lettered = Counter("raftledger_feed_sink_dead_lettered_total",
                                          "events an exporter moved to the dead-letter store",
                                          ["sink", "shard"], registry=r)
        self.sink_lag = Gauge("raftledger_feed_sink_lag", "events written and not yet delivered by an "
                              "exporter (on the shard's leader)", ["sink", "shard"], registry=r)
        self._sinks: dict[tuple[str, int], FeedSinkSeries] = {}

    # -- hooks for the Raft glue (fsync and leader changes are called on a shard's tick thread) ---
    def _series(self, shard: int) -> _ShardSeries:
        series = self._shard_series.get(shard)
        if series is None:  # labels() is slow for a per-batch path; shards are few
            label = str(shard)
            series = self._shard_series[shard] = _ShardSeries(
                self.batch_size.labels(label), self.batch_linger.labels(label),
                self.fsync.labels(label), self.queue_depth.labels(label),
                self.leader_changes.labels(label))
        return series

    def observe_batch(self, shard: int, commands: int, linger_s: float) -> None:
        series = self._series(shard)
        series.batch_size.observe(commands)
        series.batch_linger.observe(linger_s)

    def observe_fsync(self, shard: int, seconds: float) -> None:
        self._series(shard).fsync.observe(seconds)

    def set_queue_depth(self, shard: int, depth: int) -> None:
        self._series(shard).queue_depth.set(depth)

    def leader_changed(self, shard: int) -> None:
        self._series(shard).leader_changes.inc()

    # -- the HTTP layer ------------------------------------------------------------------------
    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: labels() is slow for a per-request path, and the
        children are few."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._child(self.requests, method, route, str(status)).observe(seconds)

    def observe_results(self, shard: int, kind: str, codes: Mapping[str, int],
                        replayed: int) -> None:
        """Counts of one reply's results by code (a batch reply is counted at once)."""
        for code, count in codes.items():
            self._child(self.results, str(shard), kind, code).inc(count)
        if replayed:
            self.replays.labels(str(shard)).inc(replayed)

    def overloaded(self, where: str) -> None:
        self.overload.labels(where).inc()

    def watch_shards(self, statuses: Callable[[], Mapping[int, Mapping[str, Any]]]) -> None:
        """Export per-shard Raft state from ``statuses()`` (shard -> ShardService.status())."""
        self.registry.register(_ShardCollector(statuses))

    def watch_feed(self, positions: Callable[[], Mapping[int, FeedPosition]]) -> None:
        """Export each hosted shard's feed bounds and every durable consumer's lag, read at scrape
        time from ``positions()`` (shard -> its bounds and consumers, as this replica applied them)."""
        self.registry.register(_FeedCollector(positions))

    def watch_clocks(self, offsets_ns: Callable[[], Mapping[str, int]],
                     own_offset_ns: Callable[[], int | None]) -> None:
        """Export how far this node's clock is from each peer's, read at scrape time: the alarm an
        operator needs before the difference reaches ``internal.window_s``, where peers refuse the
        node's forwarded requests (docs/operations.md, "Clocks")."""
        self.registry.register(_ClockCollector(offsets_ns, own_offset_ns))

    def feed_sink(self, sink: str, shard: int) -> FeedSinkSeries:
        """The counters and lag gauge of one exporter on one shard (made on first use)."""
        key = (sink, shard)
        series = self._sinks.get(key)
        if series is None:
            labels = (sink, str(shard))
            series = self._sinks[key] = FeedSinkSeries(
                self.sink_delivered.labels(*labels), self.sink_failed.labels(*labels),
                self.sink_dead_lettered.labels(*labels), self.sink_lag.labels(*labels))
        return series

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class _ShardSeries:
    batch_size: Any
    batch_linger: Any
    fsync: Any
    queue_depth: Any
    leader_changes: Any


@dataclass(frozen=True, slots=True)
class FeedSinkSeries:
    delivered: Any
    failed: Any
    dead_lettered: Any
    lag: Any


@dataclass(frozen=True, slots=True)
class FeedPosition:
    """A shard's feed as one replica applied it: first offset held, last written, consumer offsets."""

    first: int
    last: int
    consumers: Mapping[str, int]


class _FeedCollector(Collector):
    def __init__(self, positions: Callable[[], Mapping[int, FeedPosition]]) -> None:
        self.positions = positions

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        positions = self.positions()
        first = GaugeMetricFamily("raftledger_feed_first_offset", "first event offset still held",
                                  labels=["shard"])
        last = GaugeMetricFamily("raftledger_feed_last_offset", "last event offset written", labels=["shard"])
        lag = GaugeMetricFamily("raftledger_feed_consumer_lag", "events written after a durable "
                                "consumer's offset", labels=["shard", "consumer"])
        for shard, position in sorted(positions.items()):
            first.add_metric([str(shard)], float(position.first))
            last.add_metric([str(shard)], float(position.last))
            for name, offset in sorted(position.consumers.items()):
                lag.add_metric([str(shard), name], float(position.last - offset))
        yield from (first, last, lag)


class _ClockCollector(Collector):
    def __init__(self, offsets_ns: Callable[[], Mapping[str, int]],
                 own_offset_ns: Callable[[], int | None]) -> None:
        self.offsets_ns = offsets_ns
        self.own_offset_ns = own_offset_ns

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        offsets = GaugeMetricFamily("raftledger_peer_clock_offset_seconds", "this node's wall clock minus "
                                    "the peer's, from the peer's last sealed request (transit included)",
                                    labels=["peer"])
        for peer, offset_ns in sorted(self.offsets_ns().items()):
            offsets.add_metric([peer], offset_ns / 1e9)
        own = self.own_offset_ns()
        off = GaugeMetricFamily("raftledger_clock_off", "1 when a majority of the peers heard from find "
                                "this node's clock off by more than internal.window_s")
        off.add_metric([], float(own is not None))
        yield from (offsets, off)


SHARD_GAUGES = (
    ("raftledger_shard_is_leader", "1 if this replica leads the shard", "is_leader"),
    ("raftledger_shard_term", "current Raft term", "term"),
    ("raftledger_shard_commit_index", "Raft commit index", "commit_index"),
    ("raftledger_shard_applied_index", "index applied to the local store", "applied_index"),
    ("raftledger_shard_lag", "commit index minus applied index", "lag"),
)


class _ShardCollector(Collector):
    def __init__(self, statuses: Callable[[], Mapping[int, Mapping[str, Any]]]) -> None:
        self.statuses = statuses

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        statuses = self.statuses()
        for name, doc, key in SHARD_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["shard"])
            for shard, status in sorted(statuses.items()):
                value = status.get("role") == "leader" if key == "is_leader" else status.get(key)
                if value is not None:
                    family.add_metric([str(shard)], float(value))
            yield family
