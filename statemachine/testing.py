"""A test double that ships with the code: drives a real LedgerStore as a Raft log would.

Each ``apply`` call is one log entry with the next index; timestamps come from an explicit logical
clock the test controls (``advance``), never from the wall clock.
"""

from __future__ import annotations

from .codec import encode_requests
from .commands import AnyCommand, Request
from .records import Outcome, Result
from .store import LedgerStore

start_ns_default = 1_700_000_000_000_000_000


class Harness:
    def __init__(self, store: LedgerStore, start_ns: int = start_ns_default) -> None:
        self.store = store
        self.now_ns = start_ns
        self.index = store.applied_index()
        self.log: list[tuple[int, bytes]] = []

    def advance(self, seconds: int) -> None:
        self.now_ns += seconds * 1_000_000_000

    def apply(self, *commands: AnyCommand) -> list[Outcome]:
        """One log entry carrying one request per command."""
        self.index += 1
        requests = []
        for command in commands:
            self.now_ns += 1000
            requests.append(Request(self.now_ns, command))
        payload = encode_requests(requests)
        self.log.append((self.index, payload))
        outcomes = self.store.apply_entry(self.index, payload)
        assert outcomes is not None
        return outcomes

    def one(self, command: AnyCommand) -> Result:
        outcome = self.apply(command)[0]
        assert isinstance(outcome, Result)
        return outcome

    def batch(self, command: AnyCommand) -> list[Result]:
        outcome = self.apply(command)[0]
        assert isinstance(outcome, list)
        return outcome
