"""``Client``: the synchronous client. Every method builds its operation (``client.operations``) and
hands it to the core (``client.core.run``) through a blocking ``http.client`` transport; the asyncio
``LedgerClient`` has the same methods over the same core."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from . import operations as ops
from .core import Consistency, Operation, Reply, RetryPolicy, Session, run
from .discovery import discover
from .feed import CommitPolicy, Start, Subscription
from .transport import SyncTransport, trust
from .types import Account, Balance, BatchItem, Entry, Event, Transaction

T = TypeVar("T")


class Client:
    """A ledger client for one cluster: ``Client(["http://127.0.0.1:8080", ...])``, or with no URL
    from ``RAFTLEDGER_ENDPOINTS`` or ``<data_dir or ./data>/cluster.json``; the token from the
    argument, ``RAFTLEDGER_TOKEN`` or that file (none: no ``Authorization`` header); ``https://``
    nodes are verified against ``ca_file``, ``RAFTLEDGER_CA_FILE`` or the file's ``ca_file`` (else the
    system's CAs).

    Thread-safe; close it (or use it as a context manager) to drop its kept-alive connections.
    Reads default to session consistency (``consistency="session"``): they see this client's own
    writes on any replica. Writes are retried within ``policy.deadline_s``; see ``client.core``."""

    def __init__(self, endpoints: Sequence[str] | None = None, token: str | None = None, *,
                 data_dir: str | None = None, policy: RetryPolicy | None = None,
                 consistency: Consistency = "session", ca_file: str | None = None) -> None:
        found = discover(endpoints, token, data_dir, ca_file)
        self.session = Session(found.endpoints, found.token, policy=policy, consistency=consistency)
        self.transport = SyncTransport(trust(found.ca_file))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def run(self, op: Operation[T]) -> T:
        return self.transport.drive(run(op, self.session))

    def request(self, method: str, path: str, *, json: Any = None,
                params: Mapping[str, str | int] | None = None, idempotent: bool | None = None) -> Any:
        """Any route of the API; the decoded JSON answer, or the error tree's exception."""
        return self.run(ops.request(method, path, json, params, idempotent))

    @contextmanager
    def stream(self, path: str, *, params: Mapping[str, str | int] | None = None) -> Iterator[Reply]:
        """``GET path`` with its body read as it arrives (a shard's copy for a backup): read the
        answer's ``stream``; its connection is closed when the block ends."""
        reply = self.run(ops.stream(path, params))
        assert reply.stream is not None, "a streamed 2xx answer carries its stream"
        try:
            yield reply
        finally:
            reply.stream.close()

    # -- accounts -----------------------------------------------------------------------------------
    def create_account(self, **fields: Any) -> Account:
        return self.run(ops.create_account(fields))

    def create_accounts(self, accounts: Sequence[Mapping[str, Any]]) -> list[BatchItem[Account]]:
        return self.run(ops.create_accounts(accounts))

    def get_account(self, id: str, *, consistency: Consistency | None = None,  # noqa: A002
                    max_staleness_ms: int | None = None) -> Account:
        return self.run(ops.get_account(id, consistency, max_staleness_ms))

    def balance(self, id: str, at_seq: int | None = None, at: int | None = None, *,  # noqa: A002
                consistency: Consistency | None = None, max_staleness_ms: int | None = None) -> Balance:
        return self.run(ops.balance(id, at_seq, at, consistency, max_staleness_ms))

    def entries(self, id: str, *, order: str = "asc", after_seq: int | None = None,  # noqa: A002
                before_seq: int | None = None, from_ns: int | None = None, to_ns: int | None = None,
                page_size: int = ops.statement_page_size_default, consistency: Consistency | None = None,
                max_staleness_ms: int | None = None) -> Iterator[Entry]:
        """Every entry of the account's statement, page after page, in ``order``."""
        statement = ops.Statement(id, order=order, after_seq=after_seq, before_seq=before_seq,
                                  from_ns=from_ns, to_ns=to_ns, page_size=page_size,
                                  consistency=consistency, max_staleness_ms=max_staleness_ms)
        page = statement.next_page()
        while page is not None:
            yield from statement.take(self.run(page))
            page = statement.next_page()

    # -- transactions -------------------------------------------------------------------------------
    def transfer(self, debit_account_id: str, credit_account_id: str, amount: int, currency: str,
                 id: str | None = None, **fields: Any) -> Transaction:  # noqa: A002
        return self.run(ops.create_transaction(
            {"id": id, "debit_account_id": debit_account_id, "credit_account_id": credit_account_id,
             "amount": amount, "currency": currency, **fields}))

    def create_transaction(self, entries: Sequence[Mapping[str, Any]], id: str | None = None,  # noqa: A002
                           **fields: Any) -> Transaction:
        return self.run(ops.create_transaction({"id": id, "entries": list(entries), **fields}))

    def create_transactions(self, transactions: Sequence[Mapping[str, Any]],
                            atomic: bool = False) -> list[BatchItem[Transaction]]:
        return self.run(ops.create_transactions(transactions, atomic))

    def post(self, id: str, amount: int | None = None, *, post_id: str | None = None) -> Transaction:  # noqa: A002
        return self.run(ops.follow_up("post", id, post_id, amount))

    def void(self, id: str, *, void_id: str | None = None) -> Transaction:  # noqa: A002
        return self.run(ops.follow_up("void", id, void_id))

    def reverse(self, id: str, *, reverse_id: str | None = None) -> Transaction:  # noqa: A002
        return self.run(ops.follow_up("reverse", id, reverse_id))

    def get_transaction(self, id: str, *, consistency: Consistency | None = None,  # noqa: A002
                        max_staleness_ms: int | None = None) -> Transaction:
        return self.run(ops.get_transaction(id, consistency, max_staleness_ms))

    # -- change feed --------------------------------------------------------------------------------
    def subscribe(self, consumer: str | None = None, *, start: Start = "committed",
                  until_caught_up: bool = False, commit: CommitPolicy | None = None,
                  page_events: int = 500, wait_ms: int = 2000, audit: bool = False) -> Subscriber:
        """Every new event of every shard, in per-shard order, each once (``client.feed``).

        ``consumer`` names a durable consumer: it starts after its committed offsets and commits
        what was processed (``commit``; always on close). ``start``: ``"committed"``, ``"latest"``
        (from now), an offset for every shard, or ``{shard: offset}``; ``until_caught_up`` ends the
        iteration at each shard's last event as of the start (a replay). ``audit``: the audit trail
        of administrative changes instead of the shards (admin and auditor tokens; no consumer)."""
        return Subscriber(self, Subscription(self.session, consumer, start=start,
                                             until_caught_up=until_caught_up, commit=commit,
                                             page_events=page_events, wait_ms=wait_ms,
                                             audit=audit))

    # -- cluster ------------------------------------------------------------------------------------
    def cluster_status(self) -> dict[str, Any]:
        """``GET /v1/cluster``: every shard's replicas with role, term, indexes and lag."""
        return dict(self.run(ops.cluster_status()))

    def cluster_map(self) -> dict[str, Any]:
        """``GET /v1/cluster/map``: the map the nodes route by (epoch, nodes, slot ranges)."""
        return dict(self.run(ops.cluster_map()))


class Subscriber:
    """An iterator of ``Event`` over a ``Subscription``; as a context manager it closes on exit (an
    exception leaves the last event unprocessed), committing what was processed."""

    def __init__(self, client: Client, subscription: Subscription) -> None:
        self.client = client
        self.subscription = subscription

    def __iter__(self) -> Subscriber:
        return self

    def __next__(self) -> Event:
        if self.subscription.finished:
            raise StopIteration
        event = self.client.transport.drive(self.subscription.next_event())
        if event is None:
            self.close()
            raise StopIteration
        return event

    def stop(self) -> None:
        """End the iteration from another thread, a signal handler or a task: what was read is
        still handed out, then it ends (within one long-poll) and closes."""
        self.subscription.stopping = True

    def commit(self) -> None:
        """Commit what was processed now (the event handed out last is not, until the next)."""
        self.client.transport.drive(self.subscription.commit())

    def close(self, processed: bool = True) -> None:
        self.client.transport.drive(self.subscription.close(processed))

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(processed=exc_type is None)
