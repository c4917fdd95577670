"""The contract between the HTTP layer and a hosted shard replica.

The HTTP API talks to shards only through ``ShardService``; the Raft glue (``raftledger.node.replica``)
implements it. Errors a caller can retry are ``Unavailable`` subclasses and carry ``retry_after_s``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from raftledger.statemachine.commands import AnyCommand
from raftledger.statemachine.records import Outcome
from raftledger.statemachine.store import LedgerStore


class Unavailable(Exception):
    """The shard cannot do it now; the same request may succeed later."""

    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(Unavailable):
    code = "overloaded"


class NotLeader(Unavailable):
    """This replica does not lead the shard; ``leader`` is the leading node's id when known."""

    code = "not_leader"

    def __init__(self, message: str, *, leader: str | None, retry_after_s: float = 0.2) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.leader = leader


class OutcomeUnknown(Unavailable):
    """The command may or may not have been applied (leader changed mid-flight); retry with the same id."""

    code = "outcome_unknown"


@dataclass(frozen=True, slots=True)
class Committed:
    outcome: Outcome
    index: int  # Raft log index of the entry that carried the command: the read-your-writes token


class ShardService(Protocol):
    shard: int
    node_id: str

    @property
    def store(self) -> LedgerStore: ...

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
