"""An in-process Raft group for tests: N ReplicaServices of one shard on one event loop, free ports."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from raftledger.cluster.launcher import port_is_free
from raftledger.node.replica import ReplicaService, ReplicaSettings
from raftledger.node.service import Committed, NotLeader, Unavailable
from raftledger.node.transport import shard_key
from raftledger.statemachine.codec import encode_requests
from raftledger.statemachine.commands import (
    CreateAccount,
    CreateTransaction,
    Direction,
    EntrySpec,
    Request,
)
from raftledger.statemachine.store import LedgerStore

TEST_SECRET = bytes(range(32))  # the cluster secret of in-process groups
leader_wait_s = 15.0
poll_s = 0.01


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def consecutive_free_ports(count: int, first: int = 21000, tries: int = 50) -> int:
    """The first of ``count`` consecutive free ports (for commands that take a port base)."""
    for base in range(first, first + 100 * tries, 100):
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise AssertionError("no free port range")


def account(account_id: str, currency: str = "BRL") -> CreateAccount:
    return CreateAccount(id=account_id, currency=currency)


def transfer(tx_id: str, debit: str, credit: str, amount: int, currency: str = "BRL") -> CreateTransaction:
    return CreateTransaction(id=tx_id, entries=(
        EntrySpec(debit, Direction.debit, amount, currency),
        EntrySpec(credit, Direction.credit, amount, currency)))


async def poll(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


class Group:
    def __init__(self, root: str, size: int = 3, shard: int = 0, preferred: int | None = None,
                 secret: bytes = TEST_SECRET, **overrides: Any) -> None:
        self.root = root
        self.raft_key = shard_key(secret, shard)
        self.preferred = preferred
        self.shard = shard
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(size)]
        self.overrides = overrides
        self.services: dict[int, ReplicaService] = {}

    def settings(self, i: int) -> ReplicaSettings:
        extra = {k: (v(i) if callable(v) and k.startswith("on_") else v) for k, v in self.overrides.items()}
        return ReplicaSettings(
            shard=self.shard, self_address=self.addresses[i],
            partner_addresses=tuple(a for j, a in enumerate(self.addresses) if j != i),
            directory=os.path.join(self.root, f"r{i}"), raft_key=self.raft_key,
            address_to_node={a: f"n{j}" for j, a in enumerate(self.addresses)},
            preferred_leader=i == self.preferred, **extra)

    def start(self, i: int) -> ReplicaService:
        self.services[i] = ReplicaService(self.settings(i), f"n{i}")
        return self.services[i]

    def start_all(self) -> None:
        for i in range(len(self.addresses)):
            self.start(i)

    async def stop(self, i: int) -> None:
        await self.services.pop(i).close()

    async def stop_all(self) -> None:
        for i in list(self.services):
            await self.stop(i)

    async def leader(self) -> ReplicaService:
        def find() -> ReplicaService | None:
            leaders = [s for s in self.services.values() if s.is_leader()]
            return leaders[0] if len(leaders) == 1 else None
        return await poll(find, leader_wait_s, "a single leader")

    async def converged(self, timeout_s: float = 15.0) -> tuple[int, str]:
        def same() -> tuple[int, str] | None:
            prints = {s.fingerprint() for s in self.services.values()}
            indexes = {(s.replica.raftCommitIndex, s.replica.raft_applied_index())
                       for s in self.services.values()}
            if len(prints) == 1 and len(indexes) == 1:
                commit, applied = indexes.pop()
                return prints.pop() if commit == applied else None
            return None
        return await poll(same, timeout_s, "equal fingerprints on every replica")


class DirectShard:
    """A ShardService that applies commands directly: leader of its shard, no replication."""

    def __init__(self, store: LedgerStore, shard: int, node_id: str = "n1") -> None:
        self.store = store
        self.shard = shard
        self.node_id = node_id
        self.leading = True
        self.contact_age_ms: float | None = 0.0
        self._clock = 1_700_000_000_000_000_000

    async def submit(self, command: Any) -> Committed:
        if not self.leading:
            raise NotLeader("follower", leader=None)
        self._clock += 1_000_000
        index = self.store.applied_index() + 1
        outcomes = self.store.apply_entry(index, encode_requests([Request(self._clock, command)]))
        assert outcomes is not None
        return Committed(outcomes[0], index)

    def is_leader(self) -> bool:
        return self.leading

    def leader_node_id(self) -> str | None:
        return self.node_id if self.leading else None

    def leader_changed(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()  # no elections here

    def fingerprint(self) -> tuple[int, str]:
        return self.store.fingerprint()

    def applied_index(self) -> int:
        return self.store.applied_index()

    def leader_contact_age_ms(self) -> float | None:
        return self.contact_age_ms

    async def wait_applied(self, index: int, timeout_s: float) -> bool:
        return self.applied_index() >= index

    async def read_barrier(self, timeout_s: float) -> int:
        if not self.leading:
            raise Unavailable("no leader")
        return self.applied_index()

    def status(self) -> dict[str, Any]:
        applied = self.applied_index()
        return {"role": "leader" if self.leading else "follower", "term": 1,
                "commit_index": applied, "applied_index": applied, "lag": 0,
                "leader": self.leader_node_id()}
