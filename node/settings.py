"""Every tunable limit of a node, in one place: one frozen settings object per concern.

Each field's default is written here once, with its unit in its name (``_s``, ``_ms``, ``_bytes``,
``_max`` for counts) and a line saying what it bounds. The node file (``node.toml``) sets them per
section (``[batching]``, ``[raft]``, ...); ``load_sections`` refuses unknown names, wrong types and values
out of range, listing every problem at once. ``docs/configuration.md`` is generated from these
definitions (``python -m raftledger.node.settings``), and a test keeps it in step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

DURABILITY_FSYNC = "fsync"
DURABILITY_NONE = "none"
DURABILITY_MODES = (DURABILITY_FSYNC, DURABILITY_NONE)


def setting(default: Any, doc: str, *, minimum: float | None = 0, maximum: float | None = None) -> Any:
    """A field with its documentation and its allowed range (``minimum`` inclusive)."""
    return field(default=default, metadata={"doc": doc, "minimum": minimum, "maximum": maximum})


@dataclass(frozen=True, slots=True)
class BatchingSettings:
    """Group commit on a shard's leader: requests that arrive close together share one Raft entry."""

    SECTION: ClassVar[str] = "batching"
    requests_max: int = setting(1000, "requests in one Raft entry", minimum=1)
    bytes_max: int = setting(1 << 20, "encoded size of one Raft entry (about)", minimum=1024)
    linger_ms: float = setting(2.0, "how long a partial batch waits for more requests", maximum=1000)
    requests_queued_max: int = setting(50_000, "requests waiting for a batch; beyond it 503 overloaded",
                                       minimum=1)
    entries_in_flight_max: int = setting(16, "entries proposed and not yet applied", minimum=1)
    commit_timeout_s: float = setting(10.0, "a request not committed by then answers outcome_unknown",
                                      minimum=0.1)
    overloaded_retry_after_s: float = setting(1.0, "Retry-After of every 503 overloaded", minimum=0)
    drain_timeout_s: float = setting(5.0, "on shutdown, how long queued and in-flight batches may finish")
    expiry_check_interval_s: float = setting(
        0.5, "how often a leader looks for holds past their deadline on an idle shard", minimum=0.01)


@dataclass(frozen=True, slots=True)
class RaftSettings:
    """Raft timing, PySyncObj's queues and the Raft transport's bounds (per shard replica)."""

    SECTION: ClassVar[str] = "raft"
    heartbeat_period_s: float = setting(0.05, "a leader's append_entries period", minimum=0.001)
    election_timeout_min_s: float = setting(0.8, "a follower waits at least this long before an election",
                                            minimum=0.01)
    election_timeout_max_s: float = setting(1.6, "... and at most this long", minimum=0.01)
    preferred_election_timeout_min_s: float = setting(
        0.4, "the same for a shard's preferred replica, which so usually wins", minimum=0.01)
    preferred_election_timeout_max_s: float = setting(0.7, "... and at most this long", minimum=0.01)
    leader_fallback_timeout_s: float = setting(
        3.0, "a leader that hears from no majority for this long steps down", minimum=0.1)
    connection_timeout_s: float = setting(
        3.0, "a Raft connection silent for this long is closed (a quiet one sends a keepalive every "
        "third of it); at least election_timeout_max_s", minimum=0.1)
    connection_retry_s: float = setting(0.3, "between attempts to reconnect to a peer", minimum=0.01)
    commands_queued_max: int = setting(1000, "entries PySyncObj queues before QUEUE_FULL", minimum=1)
    append_entries_bytes_max: int = setting(8 << 20, "entries sent to a follower in one message",
                                            minimum=1024)
    apply_bytes_per_tick_max: int = setting(256 << 10, "payload handed to the apply thread per tick",
                                            minimum=1)
    apply_backlog_entries_max: int = setting(32, "entries waiting for the apply thread before the tick "
                                             "thread stops handing more", minimum=1)
    handshake_timeout_s: float = setting(3.0, "an incoming connection must authenticate within this",
                                         minimum=0.1)
    unauthenticated_connections_max: int = setting(
        64, "incoming connections waiting to authenticate (a new one pushes out the oldest)", minimum=1)
    frame_bytes_max: int = setting(64 << 20, "one authenticated Raft frame", minimum=1 << 20)


@dataclass(frozen=True, slots=True)
class SnapshotSettings:
    """Log compaction: LMDB snapshots that cut the Raft journal and catch up new or lagging replicas."""

    SECTION: ClassVar[str] = "snapshots"
    log_compaction_entries_min: int = setting(5000, "journal entries before a snapshot", minimum=1)
    log_compaction_interval_s: float = setting(300.0, "... or seconds since the last one", minimum=1)
    log_compaction_bytes_max: int = setting(64 << 20, "... or journal bytes held in memory",
                                            minimum=1 << 16)
    chunk_bytes: int = setting(1 << 20, "a snapshot is sent to a follower in chunks of this size",
                               minimum=1024)
    retry_s: float = setting(30.0, "after a failed snapshot, before the next attempt", minimum=0)
    apply_wait_s: float = setting(120.0, "a snapshot waits this long for the applier to catch up",
                                  minimum=1)
    disk_reserve_min_bytes: int = setting(8 << 20, "a store file is allocated at least this far ahead "
                                          "of its last page (a full disk stops the apply, not the node)",
                                          minimum=0)


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The public API's listener and the bounds of its edge."""

    SECTION: ClassVar[str] = "http"
    host: str = setting("127.0.0.1", "address the public API listens on", minimum=None)
    port: int = setting(8080, "its TCP port", minimum=1, maximum=65535)
    body_bytes_max: int = setting(8 << 20, "a request body (413 body_too_large)", minimum=1024)
    body_read_timeout_s: float = setting(10.0, "time to receive a body (408 request_timeout)",
                                         minimum=0.1)
    request_timeout_s: float = setting(15.0, "a whole request (503 timeout)", minimum=0.1)
    requests_in_flight_max: int = setting(2048, "requests served at once (503 overloaded)", minimum=1)
    consistency_wait_s: float = setting(2.0, "a read waits this long for min_token, a read barrier "
                                        "or linearizable (503 stale_replica)", minimum=0)
    connections_max: int = setting(10_000, "open connections per listener; at the bound the oldest idle "
                                   "one is closed for a new one", minimum=1)
    header_timeout_s: float = setting(10.0, "a connection must send a request's headers within this, "
                                      "from its opening or its previous response", minimum=0.1)
    descriptors_reserved: int = setting(512, "file descriptors kept free of connections for the journal, "
                                        "snapshots, LMDB, Raft and forwarding", minimum=16)


@dataclass(frozen=True, slots=True)
class ForwardingSettings:
    """Writes that reach a node whose replica does not lead their shard."""

    SECTION: ClassVar[str] = "forwarding"
    timeout_s: float = setting(12.0, "one forwarded request to a leader node", minimum=0.1)
    attempts_max: int = setting(4, "leaders tried for one write", minimum=1)
    leader_wait_s: float = setting(5.0, "a write waits this long for an election's result", minimum=0)
    connections_max: int = setting(256, "connections to other nodes", minimum=1)
    requests_in_flight_max: int = setting(4, "forwarded requests under way per (leader, shard); more "
                                          "commands ride the next one", minimum=1)
    commands_per_request_max: int = setting(512, "commands coalesced into one forwarded request",
                                            minimum=1)
    bytes_per_request_max: int = setting(8 << 20, "... and their encoded bytes", minimum=1024)
    map_wait_s: float = setting(5.0, "a write a shard refused as wrong_shard waits this long for this "
                                "node's map to reach the epoch the shard named, then is routed again",
                                minimum=0)
    reroutes_max: int = setting(3, "times one write is routed again after wrong_shard", minimum=0)


@dataclass(frozen=True, slots=True)
class InternalSettings:
    """The internal listener (node-to-node protocol, sealed with the cluster secret)."""

    SECTION: ClassVar[str] = "internal"
    body_bytes_max: int = setting(32 << 20, "a request body on the internal listener", minimum=1 << 20)
    window_s: float = setting(10.0, "clock difference tolerated between nodes (the replay window)",
                              minimum=1)
    replay_nonces_max: int = setting(1_000_000, "requests remembered within the window", minimum=1000)
    peer_status_timeout_s: float = setting(1.0, "GET /v1/cluster waits this long for each peer",
                                           minimum=0.1)
    connections_max: int = setting(256, "open connections to the internal listener (other nodes, "
                                   "tools); their descriptors come out of the public listener's", minimum=8)


@dataclass(frozen=True, slots=True)
class CrossShardSettings:
    """Transactions across shards (two-phase commit) and the resolvers that finish interrupted ones."""

    SECTION: ClassVar[str] = "cross_shard"
    prepare_timeout_s: float = setting(30.0, "a leg prepared this long without a decision is resolved: its "
                                       "coordinator decides (abort, if it had not)", minimum=1)
    finish_timeout_s: float = setting(5.0, "a decision whose legs are not all finished after this is driven "
                                      "by its home's resolver", minimum=0.1)
    resolver_interval_s: float = setting(1.0, "how often each shard leader's resolver looks", minimum=0.05)
    resolved_per_pass_max: int = setting(100, "decisions and legs one resolver pass takes on", minimum=1)
    retry_max_s: float = setting(30.0, "a decision or leg the resolver failed to finish is tried again after "
                                 "twice its last wait, at most this long", minimum=0.1)


@dataclass(frozen=True, slots=True)
class MetaSettings:
    """The metadata Raft group (the cluster map; its Raft timings are `[raft]`'s) and its followers."""

    SECTION: ClassVar[str] = "meta"
    long_poll_s: float = setting(10.0, "a node that hosts no member asks a host for a newer map; the "
                                 "host answers at once when it has one, else after this", minimum=0.1)
    follow_retry_s: float = setting(1.0, "after no host answered a follower, before it asks again",
                                    minimum=0.01)
    propose_timeout_s: float = setting(5.0, "a change of the map not applied by then answers "
                                       "outcome_unknown", minimum=0.1)
    retry_s: float = setting(1.0, "a shard leader whose SetSlots failed, or a metadata leader whose "
                             "bootstrap failed, tries again after this (a new map or leader: at once)",
                             minimum=0.01)


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """The change feed: long-polls and streams, retention, and the exporters each shard leader runs
    (docs/feed.md). An exporter is on when its URL is set; every node of a cluster should say the same."""

    SECTION: ClassVar[str] = "feed"
    page_events_max: int = setting(1000, "events in one answer of GET /v1/feed (its limit)", minimum=1,
                                   maximum=10_000)
    wait_ms_max: int = setting(10_000, "a long-poll waits at most this long for new events (keep it below "
                               "[http] request_timeout_s and [forwarding] timeout_s)", minimum=0)
    stream_heartbeat_s: float = setting(15.0, "an idle event stream sends a comment this often",
                                        minimum=0.05)
    streams_max: int = setting(256, "event streams served at once by a node (503 overloaded beyond)",
                               minimum=1)
    retention_age_min_s: float = setting(86_400.0, "an event is kept at least this long after it was "
                                         "written, and until every consumer has passed it", minimum=0)
    compaction_interval_s: float = setting(10.0, "how often a shard leader looks for events to drop",
                                           minimum=0.05)
    nats_url: str = setting("", "NATS server of the JetStream exporter (e.g. nats://127.0.0.1:4222); "
                            "empty: off", minimum=None)
    nats_subject_prefix: str = setting("raftledger", "events go to <prefix>.<shard>.<event type>",
                                       minimum=None)
    nats_stream: str = setting("RAFTLEDGER", "the JetStream stream, created over <prefix>.> if missing",
                               minimum=None)
    kafka_bootstrap: str = setting("", "Kafka bootstrap servers of the Kafka exporter (host:port[,...]); "
                                   "empty: off. Needs the raftledger[kafka] extra", minimum=None)
    kafka_topic_prefix: str = setting("raftledger", "events of shard S go to topic <prefix>.<S>, partition 0",
                                      minimum=None)
    webhook_url: str = setting("", "endpoint the webhook exporter POSTs batches of events to; empty: off",
                               minimum=None)
    webhook_secret: str = setting("", "key of the batches' HMAC-SHA256 signature (required with a URL)",
                                  minimum=None)
    webhook_attempts_max: int = setting(8, "a batch that failed this many times goes to the dead-letter "
                                        "store and the exporter moves on", minimum=1)
    webhook_timeout_s: float = setting(10.0, "one POST of a batch", minimum=0.1)
    export_batch_events_max: int = setting(100, "events an exporter sends (NATS) or POSTs (webhook) "
                                           "before it commits its offset", minimum=1, maximum=10_000)
    export_backoff_initial_s: float = setting(0.2, "an exporter's first wait after a failure; then "
                                              "doubled, with jitter", minimum=0.001)
    export_backoff_max_s: float = setting(30.0, "... up to this", minimum=0.001)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Credentials on the public API (docs/operations.md, "Security"): bearer tokens from the cluster
    map, and each token's rate limit, counted per node."""

    SECTION: ClassVar[str] = "auth"
    required: bool = setting(True, "every route but /healthz, /readyz, /metrics and /openapi.json takes "
                             "a bearer token (false: no credentials, for dev clusters)", minimum=None)
    rate_per_s_default: float = setting(0.0, "requests per second per token on this node when the token "
                                        "names no rate_per_s; 0: unlimited", minimum=0)
    rate_burst_s: float = setting(1.0, "a token's bucket holds this many seconds of its rate (at least "
                                  "one request)", minimum=0.001)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS (docs/operations.md, "TLS"). With ``cert_file`` the public API speaks HTTPS; with
    ``ca_file`` too, so does the internal listener, and this node verifies every other node it calls
    against that CA (the cluster's). Paths are PEM files; relative ones are taken from the node's
    working directory. Every node of a cluster should name the same CA."""

    SECTION: ClassVar[str] = "tls"
    cert_file: str = setting("", "this node's certificate chain, served on both listeners; empty: "
                             "plain HTTP", minimum=None)
    key_file: str = setting("", "its private key (keep it mode 0600)", minimum=None)
    ca_file: str = setting("", "the cluster CA: the internal listener speaks TLS and other nodes are "
                           "verified against it; empty: plain internal listener", minimum=None)
    client_ca_file: str = setting("", "the public API asks every client for a certificate signed by "
                                  "this CA and refuses the handshake without one; empty: none asked",
                                  minimum=None)


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """Every section, each with its defaults unless the node file sets it."""

    batching: BatchingSettings = field(default_factory=BatchingSettings)
    raft: RaftSettings = field(default_factory=RaftSettings)
    snapshots: SnapshotSettings = field(default_factory=SnapshotSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    forwarding: ForwardingSettings = field(default_factory=ForwardingSettings)
    internal: InternalSettings = field(default_factory=InternalSettings)
    cross_shard: CrossShardSettings = field(default_factory=CrossShardSettings)
    meta: MetaSettings = field(default_factory=MetaSettings)
    feed: FeedSettings = field(default_factory=FeedSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)


# Each section is the NodeSettings attribute of its own name.
SECTIONS: tuple[type, ...] = (BatchingSettings, RaftSettings, SnapshotSettings, HttpSettings,
                              ForwardingSettings, InternalSettings, CrossShardSettings,
                              MetaSettings, FeedSettings, AuthSettings, TlsSettings)


def _value_problem(cls: type, name: str, value: Any) -> str | None:
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    where = f"{cls.SECTION}.{name}"  # type: ignore[attr-defined]
    kind = f.type
    if kind == "bool" and not isinstance(value, bool):
        return f"{where} must be true or false, not {value!r}"
    if kind == "bool":
        return None
    if kind == "int" and (type(value) is not int):
        return f"{where} must be an integer, not {value!r}"
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
        return f"{where} must be a number, not {value!r}"
    if kind == "str" and not isinstance(value, str):
        return f"{where} must be a string, not {value!r}"
    low, high = f.metadata["minimum"], f.metadata["maximum"]
    if low is not None and value < low or high is not None and value > high:
        bounds = f"at least {low}" if high is None else f"in {low}..{high}"
        return f"{where} must be {bounds}, not {value!r}"
    return None


def load_section(cls: type, raw: Any, problems: list[str]) -> Any:
    """One section from its TOML table; problems are appended, defaults stand in for bad values."""
    section = cls.SECTION  # type: ignore[attr-defined]
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.append(f"[{section}] must be a table")
        return cls()
    known = cls.__dataclass_fields__  # type: ignore[attr-defined]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        problems.append(f"[{section}] has unknown settings {unknown}; known: {sorted(known)}")
    values = {}
    for name, value in raw.items():
        if name in known:
            problem = _value_problem(cls, name, value)
            if problem:
                problems.append(problem)
            else:
                values[name] = float(value) if known[name].type == "float" else value
    return cls(**values)


def load_sections(raw: dict[str, Any], problems: list[str]) -> NodeSettings:
    settings = NodeSettings(**{cls.SECTION: load_section(cls, raw.get(cls.SECTION), problems)  # type: ignore[attr-defined]
                               for cls in SECTIONS})
    raft = settings.raft
    if raft.election_timeout_min_s >= raft.election_timeout_max_s or \
            raft.preferred_election_timeout_min_s >= raft.preferred_election_timeout_max_s:
        problems.append("raft: each election_timeout_min_s must be below its max_s")
    if raft.connection_timeout_s < raft.election_timeout_max_s:
        problems.append("raft: connection_timeout_s must be at least election_timeout_max_s")
    if settings.feed.webhook_url and not settings.feed.webhook_secret:
        problems.append("feed: webhook_url needs a webhook_secret (batches are signed with it)")
    if settings.feed.kafka_bootstrap and importlib.util.find_spec("aiokafka") is None:
        problems.append("feed: kafka_bootstrap needs aiokafka: pip install 'raftledger[kafka]'")
    return settings


def tls_problems(tls: TlsSettings) -> list[str]:
    """What a node's ``[tls]`` lacks (a cluster-wide plan names only the CA; each node adds its own)."""
    problems = []
    if bool(tls.cert_file) != bool(tls.key_file):
        problems.append("tls: cert_file and key_file go together")
    if (tls.ca_file or tls.client_ca_file) and not tls.cert_file:
        problems.append("tls: ca_file and client_ca_file need this node's cert_file and key_file")
    return problems


def section_toml(settings: Any, defaults_too: bool = False) -> list[str]:
    """``[section]`` lines for the values that differ from the defaults (all of them if asked)."""
    default = type(settings)()
    lines = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if defaults_too or value != getattr(default, f.name):
            lines.append(f"{f.name} = {_toml_value(value)}")
    return [f"[{settings.SECTION}]", *lines] if lines else []


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def reference_markdown() -> str:
    """docs/configuration.md: every setting, its default, its unit and what it bounds."""
    out = ["# Configuration reference", "",
           "Generated from `node/settings.py` by `python -m raftledger.node.settings > "
           "docs/configuration.md`; a test keeps the two in step. Every setting is optional: a node file "
           "sets only what differs from the default. Units are in the names (`_s` seconds, `_ms` "
           "milliseconds, `_bytes`; `_max` and `_min` are counts or sizes as named). A setting the "
           "loader does not know, a value of the wrong type or out of range is refused at start with "
           "every problem listed.", "",
           "The node file also names the node and its cluster (`node_id`, `data_dir`, `secret_file`, "
           "`durability` = `fsync` | `none`, `[cluster]`): see `node/config.py`.", ""]
    for cls in SECTIONS:
        out += [f"## `[{cls.SECTION}]`", "", (cls.__doc__ or "").strip(), "",  # type: ignore[attr-defined]
                "| setting | default | allowed | what it bounds |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            low, high = f.metadata["minimum"], f.metadata["maximum"]
            allowed = "" if low is None else (f"≥ {low}" if high is None else f"{low}..{high}")
            out.append(f"| `{f.name}` | `{_toml_value(f.default)}` | {allowed} | {f.metadata['doc']} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
