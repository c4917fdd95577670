"""raftledger.client: the Python client of a raftledger cluster.

``Client`` (synchronous) and ``LedgerClient`` (asyncio) share one sans-I/O core (``client.core``:
routing by the cluster map, retries, session consistency); results are the frozen types of
``client.types``; errors are the one error tree of ``client.errors``, raised by nodes and clients
alike::

    from raftledger.client import Client, Rejected

    with Client() as ledger:  # RAFTLEDGER_ENDPOINTS, or ./data/cluster.json
        ledger.create_account(id="alice:{u42}", currency="BRL", normal="credit")
        try:
            ledger.transfer("alice:{u42}", "bob:{u42}", 1500, "BRL")
        except Rejected as e:
            print(e.code)  # "exceeds_credits", ...
"""

from .aio import AsyncSubscriber, LedgerClient
from .core import Consistency, RetryPolicy
from .discovery import DiscoveryError, Target, discover
from .errors import (
    Conflict,
    FeedCompacted,
    Forbidden,
    InvalidRequest,
    LedgerError,
    NotFound,
    NotLeader,
    OutcomeUnknown,
    Overloaded,
    RateLimited,
    Rejected,
    RuleViolation,
    StaleReplica,
    Unauthorized,
    Unavailable,
    WrongShard,
)
from .feed import CommitPolicy
from .operations import tagged_id
from .sync import Client, Subscriber
from .types import Account, Balance, BatchItem, Entry, Event, Transaction, TransactionEntry

__all__ = [
    "Account", "AsyncSubscriber", "Balance", "BatchItem", "Client", "CommitPolicy", "Conflict",
    "Consistency", "DiscoveryError", "Entry", "Event", "FeedCompacted", "Forbidden", "InvalidRequest",
    "LedgerClient", "LedgerError", "NotFound", "NotLeader", "OutcomeUnknown", "Overloaded", "RateLimited",
    "Rejected", "RetryPolicy", "RuleViolation", "StaleReplica", "Subscriber", "Target", "Transaction",
    "TransactionEntry", "Unauthorized", "Unavailable", "WrongShard", "discover", "tagged_id",
]
