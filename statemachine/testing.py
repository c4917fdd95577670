"""Test doubles that ship with the code: command builders, and a harness that drives a real LedgerStore
as a Raft log would.

Each ``Harness.apply`` call is one log entry with the next index; timestamps come from an explicit
logical clock the test controls (``advance``), never from the wall clock.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .codec import encode_requests
from .commands import AccountFlag, AnyCommand, CreateAccount, CreateTransaction, Direction, EntrySpec, Request
from .records import Outcome, Result
from .store import LedgerStore

start_ns_default = 1_700_000_000_000_000_000


def account(account_id: str, currency: str = "BRL", *, normal: Direction = Direction.debit,
            flags: AccountFlag | int = 0, metadata: dict[str, Any] | None = None) -> CreateAccount:
    return CreateAccount(id=account_id, currency=currency, normal=normal, flags=int(flags),
                         metadata=metadata)


def transfer(tx_id: str, debit: str, credit: str, amount: int, currency: str = "BRL", *,
             pending: bool = False, timeout_seconds: int = 0, code: str = "",
             metadata: dict[str, Any] | None = None) -> CreateTransaction:
    """Two entries: ``amount`` from ``debit`` to ``credit``."""
    entries = (EntrySpec(debit, Direction.debit, amount, currency),
               EntrySpec(credit, Direction.credit, amount, currency))
    return CreateTransaction(tx_id, entries, pending, timeout_seconds, code, metadata)


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


def interpreted(name: str) -> ModuleType:
    """A fresh, interpreted copy of the state machine module ``name`` (e.g. ``"ledger"``), loaded
    from its source file whatever the build.

    A test can plant a bug in it by patching its functions (a compiled module's calls to its own
    functions do not see patches) and apply entries through it, e.g. by patching
    ``store.Applier`` with the copy's. It imports the other modules as installed, so its
    exceptions and records are the real ones.
    """
    qualified = f"{__package__}._interpreted_{name}"
    spec = importlib.util.spec_from_file_location(qualified, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[qualified]
    return module
