"""The contract between the HTTP layer and a hosted shard replica.

The HTTP API talks to shards only through ``ShardService``; ``raftledger.node.replica`` implements it.
What it raises is the one error tree (``raftledger.client.errors``): ``NotLeader`` (with a leader hint),
``Overloaded``, ``OutcomeUnknown`` and ``Unavailable``, all retryable, with ``retry_after_s``.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from raftledger.statemachine.commands import AnyCommand
from raftledger.statemachine.records import Outcome
from raftledger.statemachine.store import LedgerStore


@dataclass(frozen=True, slots=True)
class Committed:
    outcome: Outcome
    index: int  # Raft log index of the entry that carried the command: the read-your-writes token


class ShardService(Protocol):
    shard: int
    node_id: str

    @property
    def store(self) -> LedgerStore: ...

    def store_lease(self) -> AbstractContextManager[LedgerStore]:
        """The current store, kept open while held (on the loop thread) for a worker thread's reads,
        even if a snapshot install replaces it meanwhile."""

    async def submit(self, command: AnyCommand) -> Committed:
        """Propose through this replica's batcher; raises NotLeader on a follower, Overloaded when full."""

    def is_leader(self) -> bool: ...

    def leader_node_id(self) -> str | None: ...

    def leader_changed(self) -> asyncio.Future[None]:
        """Resolves when this replica next learns of a leader (an election won, here or elsewhere).
        Shared by every waiter: await it with ``asyncio.wait`` or ``shield``, never cancel it."""

    def applied_index(self) -> int: ...

    def leader_contact_age_ms(self) -> float | None:
        """Milliseconds since this replica last heard from a leader (0 on the leader itself)."""

    async def wait_applied(self, index: int, timeout_s: float) -> bool:
        """Wait until the local store has applied ``index``; False on timeout."""

    async def read_barrier(self, timeout_s: float) -> int:
        """Linearizable read point: an index committed after this call began (raises Unavailable)."""

    def status(self) -> dict[str, Any]:
        """role, term, commit_index, applied_index, lag, leader, for /v1/cluster and /metrics."""

    def fingerprint(self) -> tuple[int, str]:
        """(applied index, shard chain hash): equal on every replica that applied the same log."""
