"""The client's sans-I/O core: what to send where, what an answer means, when to try again.

Nothing here opens a socket, sleeps or reads a clock it was not given. A call is a generator
(``run``) that yields actions, ``Send`` (one HTTP attempt) or ``Sleep`` (a backoff), and is sent
back what each ``Send`` produced: a ``Reply``, or a ``TransportFailure`` when no answer came. The
synchronous and the asyncio transports (``client.sync``, ``client.aio``) are loops that perform
those actions, so both clients share every decision and cannot drift apart.

Retries (``RetryPolicy``): only failures that may go away are retried, connection errors,
timeouts, 503 and 429 (``LedgerError.retryable``) and a 421 ``wrong_shard``, with exponential
backoff and full jitter, over the cluster's nodes, within one total deadline. A write is safe to
send again because it carries an id (an idempotency key, generated once per logical write when the
caller gave none): a retry that meets an already applied write gets its first outcome. A write
whose every attempt may have reached a node without an answer that settles it ends in
``OutcomeUnknown``: it may or may not have been applied, and sending it again with the same id is
safe. A request that is not a ledger write (an admin route through ``request``) is retried only
where it surely was not processed: the connection was refused, or the node said it was overloaded.

Routing (``Session``): the client follows the cluster map (``GET /v1/cluster/map``) and the
shards' leaders (``GET /v1/cluster``, ``not_leader`` details, the ``X-Ledger-Leader`` header of
write answers). A write goes straight to the leader of its shard (an account's, or for a
transaction the home of its id); a read to one of the shard's replicas, in turn. A node that does
not answer is avoided for a moment and the map is read again; an answer naming a newer map epoch
(``X-Ledger-Map-Epoch``) or a ``wrong_shard`` refusal does the same.

Session consistency: the session keeps, per shard, the highest index of the ``X-Ledger-Token`` of
its writes, and sends it as ``min_token`` on reads, so a program reads its own writes from any
replica. A read can ask for ``local`` or ``linearizable`` instead.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar
from urllib.parse import urlencode

from raftledger.cluster.router import route, table_of

from .errors import LedgerError, NotLeader, OutcomeUnknown, Unavailable, WrongShard, from_wire

T = TypeVar("T")
log = logging.getLogger("raftledger.client")  # each retry, at INFO: the admin CLI shows them

Consistency = Literal["session", "local", "linearizable"]
Kind = Literal["read", "write", "admin"]

TOKEN_HEADER = "x-ledger-token"
LEADER_HEADER = "x-ledger-leader"
EPOCH_HEADER = "x-ledger-map-epoch"
USER_AGENT = "raftledger-client/0.1"

# Codes of answers that say the request was not carried out (a write may be sent again without
# risking a second outcome); any other retryable answer to a write leaves its outcome open.
NOT_APPLIED = frozenset({"overloaded", "rate_limited"})
refresh_nodes_max = 3  # nodes asked for the map in one refresh


# -- what the core asks a transport to do, and what it gets back ----------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """One HTTP attempt. ``url`` is absolute; ``timeout_s`` bounds the attempt (the asyncio
    transport: the whole exchange; the synchronous one: each socket operation)."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None
    timeout_s: float
    stream: bool = False  # a 2xx answer's body is left unread, for the caller (``Reply.stream``)


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


class BodyStream(Protocol):
    """The body of a streamed answer, read as it arrives; closing it ends the connection."""

    def read(self, size: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer; ``headers`` keys are lowercase. A streamed 2xx answer (``Send.stream``) has
    an empty ``body`` and its ``stream`` to read instead."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    stream: BodyStream | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        """The decoded body (None when empty or not JSON: a proxy's page, say)."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """No answer: ``sent`` is False only when the request surely never reached the node (the
    connection was refused or could not be made), so it cannot have been processed."""

    reason: str
    sent: bool


Action = Send | Sleep
Outcome = Reply | TransportFailure | None
Program = Generator[Action, Outcome, T]


# -- retry policy -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long and how often a call is tried. ``deadline_s`` bounds a whole call (every attempt and
    every backoff); ``attempt_timeout_s`` one attempt (a write a node cannot finish is answered 503
    ``timeout`` by it after 15 s, but a paused node answers nothing)."""

    deadline_s: float = 30.0
    attempt_timeout_s: float = 10.0
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    attempts_max: int = 100

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**retry)] (retry counts from 0)."""
        return rng.uniform(0.0, min(self.backoff_cap_s, self.backoff_base_s * 2.0 ** min(retry, 30)))


# -- one call -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Operation(Generic[T]):
    """One logical request, built once and sent as often as the retry policy allows.

    ``route_key`` is the id that names the shard (an account id, or a transaction id for its home),
    ``shard`` a shard named directly (a feed read); ``write_id`` the idempotency key of a ledger
    write (its retries reuse it)."""

    method: str
    path: str
    decode: Callable[[Reply], T]
    kind: Kind = "read"
    body: Any = None
    params: Mapping[str, str | int] = field(default_factory=dict)
    route_key: str | None = None
    write_id: str | None = None
    consistency: Consistency | None = None  # reads; None: the session's default
    max_staleness_ms: int | None = None
    stream: bool = False  # the answer's body is the caller's to read (``Reply.stream``)
    shard: int | None = None

    def shard_of(self, session: Session) -> int | None:
        return self.shard if self.shard is not None else session.shard_of(self.route_key)


def decode_json(reply: Reply) -> Any:
    return reply.json()


class Session:
    """What a client knows between calls: endpoints, token, retry policy, the cluster map and the
    leaders it learned, and the tokens of its writes. Shared by every call of one client."""

    def __init__(self, endpoints: Sequence[str], token: str | None = None, *,
                 policy: RetryPolicy | None = None, consistency: Consistency = "session",
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 map_refresh_min_s: float = 0.5, down_s: float = 1.0) -> None:
        if not endpoints:
            raise ValueError("a client needs at least one endpoint URL")
        self.endpoints = tuple(u.rstrip("/") for u in endpoints)
        self.token = token
        self.policy = policy or RetryPolicy()
        self.consistency: Consistency = consistency
        self.clock = clock
        self.rng = rng or random.Random()
        self.map_refresh_min_s = map_refresh_min_s
        self.down_s = down_s
        self._lock = threading.Lock()
        self.epoch = 0
        self.table: tuple[int, ...] | None = None
        self.urls: dict[str, str] = {}  # node id -> URL (nodes of the map that are up)
        self.replicas: dict[int, tuple[str, ...]] = {}
        self.leaders: dict[int, str] = {}
        self.tokens: dict[int, int] = {}
        self.map_stale = True
        self._refreshed_at: float | None = None
        self._down: dict[str, float] = {}  # URL -> until when it is avoided
        self._turn = 0

    # -- what is learned ----------------------------------------------------------------------------
    def learn_map(self, raw: Any) -> None:
        """Take a ``GET /v1/cluster/map`` answer (an older epoch than the one held is ignored)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("epoch"), int):
            return
        with self._lock:
            if raw["epoch"] < self.epoch:
                return
            shards = {int(s["id"]): s for s in raw.get("shards", [])}
            self.table = table_of({sid: [tuple(r) for r in s.get("slot_ranges", [])]
                                   for sid, s in shards.items()})
            self.replicas = {sid: tuple(s.get("replicas", [])) for sid, s in shards.items()}
            self.urls = {n["id"]: str(n["url"]).rstrip("/") for n in raw.get("nodes", [])
                         if n.get("url") and n.get("state", "up") == "up"}
            self.epoch = raw["epoch"]
            self.map_stale = False

    def learn_status(self, raw: Any) -> None:
        """Take a ``GET /v1/cluster`` answer: each shard's leader."""
        if not isinstance(raw, dict):
            return
        for shard in raw.get("shards", []):
            if isinstance(shard, dict) and isinstance(shard.get("id"), int):
                self.learn_leader(shard["id"], shard.get("leader"))

    def learn_leader(self, shard: int, node: Any) -> None:
        with self._lock:
            if isinstance(node, str) and node:
                self.leaders[shard] = node
            else:
                self.leaders.pop(shard, None)

    def learn_reply(self, reply: Reply) -> None:
        """Tokens, leader hints and the map epoch an answer carries."""
        token = reply.header(TOKEN_HEADER)
        if token:
            self.learn_token(token)
        leader = reply.header(LEADER_HEADER)
        if leader:
            for part in leader.split(","):
                shard, _, node = part.strip().partition("=")
                if shard.isdigit() and node:
                    self.learn_leader(int(shard), node)
        epoch = reply.header(EPOCH_HEADER)
        if epoch and epoch.isdigit() and int(epoch) > self.epoch:
            self.map_stale = True

    def learn_token(self, token: str) -> None:
        with self._lock:
            for part in token.split(","):
                shard, _, index = part.strip().partition(":")
                if shard.isdigit() and index.isdigit():
                    self.tokens[int(shard)] = max(int(index), self.tokens.get(int(shard), 0))

    def session_token(self) -> str | None:
        """``min_token`` for reads: every shard this session wrote to, at its highest index."""
        with self._lock:
            return ",".join(f"{s}:{i}" for s, i in sorted(self.tokens.items())) or None

    def failed(self, url: str) -> None:
        """A node did not answer: avoid it for a moment, and read the map again (its leader may
        have moved)."""
        with self._lock:
            self._down[url] = self.clock() + self.down_s
            self.map_stale = True

    def refreshing(self) -> None:
        """A map refresh starts now (the next waits ``map_refresh_min_s``)."""
        self._refreshed_at = self.clock()

    def needs_refresh(self) -> bool:
        if not self.map_stale:
            return False
        return self._refreshed_at is None or self.clock() - self._refreshed_at >= self.map_refresh_min_s

    # -- where to send ------------------------------------------------------------------------------
    def shard_of(self, key: str | None) -> int | None:
        if key is None or self.table is None:
            return None
        shard = route(self.table, key)
        return shard if shard >= 0 else None

    def candidates(self, op: Operation[Any]) -> list[str]:
        """URLs to try for ``op``, best first: the leader of its shard for a write (or a
        linearizable read), the shard's replicas in turn for other reads, then every other node."""
        shard = op.shard_of(self)
        preferred: list[str] = []
        if shard is not None:
            replicas = list(self.replicas.get(shard, ()))
            leader = self.leaders.get(shard)
            if op.kind != "read" or op.consistency == "linearizable":
                order = ([leader] if leader else []) + [r for r in replicas if r != leader]
            else:
                with self._lock:
                    self._turn += 1
                    turn = self._turn
                order = replicas[turn % len(replicas):] + replicas[:turn % len(replicas)] if replicas else []
            preferred = [self.urls[n] for n in order if n in self.urls]
        everyone = list(dict.fromkeys([*preferred, *self.endpoints, *self.urls.values()]))
        now = self.clock()
        healthy = [u for u in everyone if self._down.get(u, 0.0) <= now]
        return healthy or everyone

    def headers(self, op: Operation[Any], request_id: str) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT, "X-Request-Id": request_id}
        if op.body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def target(self, op: Operation[Any]) -> str:
        """Path and query of ``op``, with the consistency parameters of a read."""
        params: dict[str, str | int] = dict(op.params)
        if op.kind == "read":
            consistency = op.consistency or self.consistency
            if consistency == "linearizable":
                params["consistency"] = "linearizable"
            elif consistency == "session":
                token = self.session_token()
                if token:
                    params["min_token"] = token
            if op.max_staleness_ms is not None:
                params["max_staleness_ms"] = op.max_staleness_ms
        return op.path + ("?" + urlencode(params) if params else "")


def encode_body(body: Any) -> bytes | None:
    """JSON of a request body. Amounts are integers; a float anywhere is refused here, before it
    could reach the ledger (the node refuses it too)."""
    if body is None:
        return None
    _refuse_floats(body, "")
    return json.dumps(body, separators=(",", ":")).encode()


def _refuse_floats(value: Any, where: str) -> None:
    if isinstance(value, float):
        code = "invalid_amount" if where.endswith("amount") else "invalid_field"
        raise LedgerError(code, f"{where or 'body'}: {value!r} is a float; money and numbers are integers",
                          details={"field": where})
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_floats(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _refuse_floats(item, f"{where}[{i}]")


# -- running a call ---------------------------------------------------------------------------------
def run(op: Operation[T], session: Session) -> Program[T]:
    """Send ``op`` until an answer settles it, within the policy's deadline; returns the decoded
    answer or raises its error (``OutcomeUnknown`` for a write left unsettled)."""
    policy, clock = session.policy, session.clock
    deadline = clock() + policy.deadline_s
    body = encode_body(op.body)
    request_id = uuid.uuid4().hex
    headers = session.headers(op, request_id)
    tried: dict[str, int] = {}
    may_have_applied = False
    last: LedgerError | None = None
    for attempt in range(policy.attempts_max):
        if (op.route_key is not None or op.shard is not None) and session.needs_refresh():
            yield from refresh(session, deadline)
        remaining = deadline - clock()
        if remaining <= 0:
            break
        candidates = session.candidates(op)
        url = min(candidates, key=lambda u: tried.get(u, 0))  # the best one tried least
        tried[url] = tried.get(url, 0) + 1
        outcome = yield Send(op.method, url + session.target(op), headers, body,
                             min(policy.attempt_timeout_s, remaining), op.stream)
        if isinstance(outcome, Reply):
            session.learn_reply(outcome)
            if 200 <= outcome.status < 300:
                return op.decode(outcome)
            error = from_wire(outcome.status, outcome.json(), outcome.header("retry-after"))
            if not _retryable(op, error):
                raise error
            _learn_from_error(session, op, error)
            may_have_applied |= op.kind == "write" and error.code not in NOT_APPLIED
        else:
            assert isinstance(outcome, TransportFailure), "a transport answers every Send"
            session.failed(url)
            error = Unavailable("unavailable", f"{url}: {outcome.reason}")
            if op.kind == "admin" and outcome.sent:
                raise error  # it may have been processed, and nothing makes a second time safe
            may_have_applied |= op.kind == "write" and outcome.sent
        last = error
        delay = policy.backoff_s(attempt, session.rng)
        if error.code in NOT_APPLIED and error.retry_after_s:
            delay = max(delay, error.retry_after_s)  # the node asked us to slow down
        if clock() + delay >= deadline:
            break
        log.info("%s %s: %s: %s; again in %.1fs", op.method, op.path, error.code, error.message, delay)
        yield Sleep(delay)
    raise _final(op, last, may_have_applied, policy)


def _retryable(op: Operation[Any], error: LedgerError) -> bool:
    if op.kind == "admin":
        return error.code in NOT_APPLIED
    return error.retryable or isinstance(error, WrongShard)


def _learn_from_error(session: Session, op: Operation[Any], error: LedgerError) -> None:
    shard = op.shard_of(session)
    if isinstance(error, NotLeader) and shard is not None:
        session.learn_leader(shard, error.leader)
    if isinstance(error, NotLeader | WrongShard) or error.code == "unavailable":
        session.map_stale = True


def _final(op: Operation[Any], last: LedgerError | None, may_have_applied: bool,
           policy: RetryPolicy) -> LedgerError:
    last_error = {"code": last.code, "message": last.message} if last is not None else None
    if may_have_applied:
        return OutcomeUnknown(
            message=f"the write {op.write_id!r} may or may not have been applied: no answer settled it "
                    f"within {policy.deadline_s:g} s; send it again with the same id",
            details={"id": op.write_id, "last_error": last_error})
    if last is not None:
        return last
    return Unavailable("unavailable", f"no attempt could be made within {policy.deadline_s:g} s")


def refresh(session: Session, deadline: float) -> Program[None]:
    """Read the cluster map and the shards' leaders from the first node that answers (a few at
    most); failing that, routing goes on by what is known."""
    session.refreshing()
    unrouted: Operation[Any] = Operation("GET", "", decode_json)
    headers = session.headers(unrouted, uuid.uuid4().hex)
    for url in session.candidates(unrouted)[:refresh_nodes_max]:
        remaining = deadline - session.clock()
        if remaining <= 0:
            return
        timeout_s = min(session.policy.attempt_timeout_s, remaining)
        answer = yield Send("GET", url + "/v1/cluster/map", headers, None, timeout_s)
        if not isinstance(answer, Reply) or answer.status != 200:
            if isinstance(answer, TransportFailure):
                session.failed(url)
            continue
        session.learn_map(answer.json())
        status = yield Send("GET", url + "/v1/cluster", headers, None, timeout_s)
        if isinstance(status, Reply) and status.status == 200:
            session.learn_status(status.json())
        return
