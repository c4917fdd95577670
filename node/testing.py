"""Test doubles that ship with the node (as ``trio.testing`` does): for tests of raftledger and of code
built on it.

- ``wait_until``: the one way to wait for a condition in async tests (a deadline, never a bare sleep).
- ``FakeClock``: a ``Clock`` whose time moves only when a test says so; inject it into a
  ``ReplicaService`` (linger, commit timeouts, expiry checks) or a ``NodeContext`` (leader waits).
- ``DirectShard``: a ``ShardService`` that applies each command to a real store at once, for the HTTP
  layer without Raft.
- ``ReplicaGroup``: a real Raft group of one shard in this process, on free loopback ports.
- ``ids_on_shard``: account ids that route to a given shard.

Command builders live in ``raftledger.statemachine.testing`` (``account``, ``transfer``); a real
multi-process cluster in ``raftledger.cluster.testing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from raftledger.client.errors import NotLeader
from raftledger.cluster.launcher import free_ports, port_is_free
from raftledger.cluster.router import shard_for_account
from raftledger.statemachine.codec import encode_requests
from raftledger.statemachine.commands import AnyCommand, Request
from raftledger.statemachine.store import LedgerStore

from .clock import wait_with
from .frames import shard_key
from .replica import ReplicaService, ReplicaSettings
from .service import Committed

TEST_SECRET = bytes(range(32))  # the cluster secret of in-process groups and contexts
poll_s = 0.01
leader_wait_s = 15.0
converge_wait_s = 15.0
start_ns_default = 1_700_000_000_000_000_000


async def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``predicate()``'s first truthy value, polled until ``timeout_s``; AssertionError after."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(poll_s)


def free_port() -> int:
    return free_ports(1)[0]


def consecutive_free_ports(count: int, first: int = 21000, tries: int = 50) -> int:
    """The first of ``count`` consecutive free ports (for commands that take a port base)."""
    for base in range(first, first + 100 * tries, 100):
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise AssertionError("no free port range")


def ids_on_shard(shard: int, shards: int, prefix: str, count: int = 1) -> list[str]:
    """The first ``count`` ids ``prefix0``, ``prefix1``... that route to ``shard`` of ``shards``."""
    found = (f"{prefix}{i}" for i in itertools.count())
    return list(itertools.islice((i for i in found if shard_for_account(i, shards) == shard), count))


def pair_on_shard(shard: int, shards: int, prefix: str) -> tuple[str, str]:
    """Two account ids sharing a hash tag that routes to ``shard``: their transfers stay on it."""
    for tag in itertools.count():
        pair = (f"{prefix}a:{{t{tag}}}", f"{prefix}b:{{t{tag}}}")
        if shard_for_account(pair[0], shards) == shard:
            return pair
    raise AssertionError("unreachable")


def account_body(account_id: str, currency: str = "BRL", **fields: Any) -> dict[str, Any]:
    """A ``POST /v1/accounts`` body."""
    return {"id": account_id, "currency": currency, **fields}


def transfer_body(tx_id: str, debit: str, credit: str, amount: int | str, currency: str = "BRL",
                  **fields: Any) -> dict[str, Any]:
    """A ``POST /v1/transactions`` shorthand transfer body."""
    return {"id": tx_id, "debit_account_id": debit, "credit_account_id": credit, "amount": amount,
            "currency": currency, **fields}


# -- time ------------------------------------------------------------------------------------------------


class _Timer:
    def __init__(self, clock: FakeClock, entry: list[Any]) -> None:
        self._clock, self._entry = clock, entry

    def cancel(self) -> None:
        self._entry[2] = None


class FakeClock:
    """Time that moves only on ``advance``: timers and sleeps due by then fire, in order.

    ``await clock.advance(s)`` also lets the event loop run what those firings woke, so a test reads
    like a timeline: submit, advance 1 ms, look, advance 1 ms, look."""

    def __init__(self, start_s: float = 1000.0, start_ns: int = start_ns_default) -> None:
        self._now = start_s
        self._wall_offset = start_ns - int(start_s * 1e9)
        self._timers: list[list[Any]] = []  # heap of [due, seq, callback or None]
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def time_ns(self) -> int:
        return int(self._now * 1e9) + self._wall_offset

    def call_later(self, seconds: float, callback: Callable[[], None]) -> _Timer:
        entry = [self._now + max(0.0, seconds), next(self._seq), callback]
        heapq.heappush(self._timers, entry)
        return _Timer(self, entry)

    async def sleep(self, seconds: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call_later(seconds, lambda: done.done() or done.set_result(None))
        await done

    async def wait(self, awaitable: Awaitable[Any], timeout_s: float) -> bool:
        return await wait_with(awaitable, self.sleep(timeout_s))

    def pending(self) -> int:
        """Timers not yet fired or cancelled."""
        return sum(1 for entry in self._timers if entry[2] is not None)

    async def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer due by then, and let the loop run what they woke."""
        target = self._now + seconds
        await _settle()
        while self._timers and self._timers[0][0] <= target:
            due, _, callback = heapq.heappop(self._timers)
            self._now = max(self._now, due)
            if callback is not None:
                callback()
                await _settle()
        self._now = target
        await _settle()


async def _settle(rounds: int = 20) -> None:
    """Let callbacks and tasks that are ready run (a few loop iterations)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- shard doubles ----------------------------------------------------------------------------------------


class DirectShard:
    """A ShardService that applies commands to its store at once: the leader of its shard, no Raft.

    Each command is one log index; timestamps advance 1 ms per command. ``elect(node)`` plays the
    result of an election (this replica leads only if ``node`` is its own id; None: no leader known)
    and wakes whoever awaits ``leader_changed()``; ``leading = False`` is ``elect(None)``."""

    def __init__(self, store: LedgerStore, shard: int, node_id: str = "n1") -> None:
        self.store = store
        self.shard = shard
        self.node_id = node_id
        self.leader: str | None = node_id
        self.contact_age_ms: float | None = 0.0
        self._clock = start_ns_default
        self._changed: asyncio.Future[None] | None = None
        self._applied: asyncio.Event | None = None  # set (and replaced) by each submit

    @property
    def leading(self) -> bool:
        return self.leader == self.node_id

    @leading.setter
    def leading(self, value: bool) -> None:
        self.elect(self.node_id if value else None)

    def elect(self, leader: str | None) -> None:
        self.leader = leader
        if leader is not None and self._changed is not None:
            changed, self._changed = self._changed, None
            if not changed.done():
                changed.set_result(None)

    async def submit(self, command: AnyCommand) -> Committed:
        if not self.leading:
            raise NotLeader(message="follower", leader=self.leader)
        self._clock += 1_000_000
        index = self.store.applied_index() + 1
        outcomes = self.store.apply_entry(index, encode_requests([Request(self._clock, command)]))
        assert outcomes is not None
        if self._applied is not None:
            applied, self._applied = self._applied, None
            applied.set()
        return Committed(outcomes[0], index)

    def is_leader(self) -> bool:
        return self.leading

    def leader_node_id(self) -> str | None:
        return self.leader

    def leader_changed(self) -> asyncio.Future[None]:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def applied_index(self) -> int:
        return self.store.applied_index()

    def leader_contact_age_ms(self) -> float | None:
        return self.contact_age_ms

    async def wait_applied(self, index: int, timeout_s: float) -> bool:
        """Until a submit applies ``index`` (bounded), as a replica waits for its apply thread."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.applied_index() < index:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self._applied is None:
                self._applied = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._applied.wait(), remaining)
        return True

    async def read_barrier(self, timeout_s: float) -> int:
        if not self.leading:
            raise NotLeader(message="follower", leader=self.leader)
        return self.applied_index()

    def status(self) -> dict[str, Any]:
        applied = self.applied_index()
        return {"role": "leader" if self.leading else "follower", "term": 1,
                "commit_index": applied, "applied_index": applied, "lag": 0,
                "leader": self.leader_node_id()}

    def fingerprint(self) -> tuple[int, str]:
        return self.store.fingerprint()


class ReplicaGroup:
    """The replicas of one shard in this process, each a real ``ReplicaService`` on a free port.

    ``settings`` fields are passed to every replica's ``ReplicaSettings`` (``batching=...``,
    ``snapshots=...``, ``raft=...``); ``observers(i)`` gives replica i's test observers."""

    def __init__(self, root: str, size: int = 3, shard: int = 0, preferred: int | None = None,
                 secret: bytes = TEST_SECRET, observers: Callable[[int], Any] | None = None,
                 **settings: Any) -> None:
        self.root = root
        self.raft_key = shard_key(secret, shard)
        self.preferred = preferred
        self.shard = shard
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(size)]
        self.observers = observers
        self.overrides = settings
        self.services: dict[int, ReplicaService] = {}

    def settings(self, i: int) -> ReplicaSettings:
        settings = ReplicaSettings(
            shard=self.shard, self_address=self.addresses[i],
            partner_addresses=tuple(a for j, a in enumerate(self.addresses) if j != i),
            directory=os.path.join(self.root, f"r{i}"), raft_key=self.raft_key,
            address_to_node={a: f"n{j}" for j, a in enumerate(self.addresses)},
            preferred_leader=i == self.preferred, **self.overrides)
        if self.observers is not None:
            settings = dataclasses.replace(settings, observers=self.observers(i))
        return settings

    def start(self, i: int, **kwargs: Any) -> ReplicaService:
        self.services[i] = ReplicaService(self.settings(i), f"n{i}", **kwargs)
        return self.services[i]

    def start_all(self) -> None:
        for i in range(len(self.addresses)):
            self.start(i)

    def __iter__(self) -> Iterator[ReplicaService]:
        return iter(self.services.values())

    async def stop(self, i: int) -> None:
        await self.services.pop(i).close()

    async def stop_all(self) -> None:
        for i in list(self.services):
            await self.stop(i)

    async def leader(self, timeout_s: float = leader_wait_s) -> ReplicaService:
        def find() -> ReplicaService | None:
            leaders = [s for s in self.services.values() if s.is_leader()]
            return leaders[0] if len(leaders) == 1 else None
        return await wait_until(find, timeout_s, "a single leader")  # type: ignore[no-any-return]

    async def converged(self, timeout_s: float = converge_wait_s) -> tuple[int, str]:
        """Every running replica at the same commit and applied index, with the same fingerprint."""
        def same() -> tuple[int, str] | None:
            prints = {s.fingerprint() for s in self.services.values()}
            indexes = {(s.raft.commit_index, s.raft_applied_index()) for s in self.services.values()}
            if len(prints) == 1 and len(indexes) == 1:
                commit, applied = indexes.pop()
                return prints.pop() if commit == applied else None
            return None
        return await wait_until(same, timeout_s, "equal fingerprints on every replica")  # type: ignore[no-any-return]
