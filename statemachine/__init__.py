"""The ledger rules: a pure, deterministic double-entry state machine over LMDB.

Nothing here reads a clock, draws random numbers, starts threads or touches the network: time and the
Raft log index are arguments, so every replica that applies the same log reaches the same state.
"""

from .codes import ResultCode
from .store import LedgerStore, QueryError, Reader

__all__ = ["LedgerStore", "QueryError", "Reader", "ResultCode"]
