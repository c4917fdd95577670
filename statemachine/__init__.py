"""The ledger rules: a pure, deterministic double-entry state machine over LMDB.

Nothing here reads a clock, draws random numbers, starts threads or touches the network: time and the
Raft log index are arguments, so every replica that applies the same log reaches the same state.

The apply path is compiled to C by mypyc when the package is installed (see setup.py); ``COMPILED``
says whether this process runs that build or the plain Python modules.
"""

from . import ledger as _ledger
from .codes import ResultCode
from .store import LedgerStore, QueryError, Reader

COMPILED = not _ledger.__file__.endswith(".py")

__all__ = ["COMPILED", "LedgerStore", "QueryError", "Reader", "ResultCode"]
