"""``LedgerClient``: the asyncio client, an async context manager, with the methods of ``Client``
over the same core (``client.core.run``) and an aiohttp transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, TypeVar

from . import operations as ops
from .core import Consistency, Operation, RetryPolicy, Session, run
from .discovery import discover
from .feed import CommitPolicy, Start, Subscription
from .transport import AsyncTransport, trust
from .types import Account, Balance, BatchItem, Entry, Event, Transaction

T = TypeVar("T")


class LedgerClient:
    """An asyncio ledger client for one cluster: ``Client(["http://127.0.0.1:8080", ...])``, or with no URL
    from ``RAFTLEDGER_ENDPOINTS`` or ``<data_dir or ./data>/cluster.json``; the token from the
    argument, ``RAFTLEDGER_TOKEN`` or that file (none: no ``Authorization`` header); ``https://``
    nodes are verified against ``ca_file``, ``RAFTLEDGER_CA_FILE`` or the file's ``ca_file`` (else the
    system's CAs).

    Use it as ``async with LedgerClient(...) as ledger:`` (or ``await ledger.close()``), from one
    event loop.
    Reads default to session consistency (``consistency="session"``): they see this client's own
    writes on any replica. Writes are retried within ``policy.deadline_s``; see ``client.core``."""

    def __init__(self, endpoints: Sequence[str] | None = None, token: str | None = None, *,
                 data_dir: str | None = None, policy: RetryPolicy | None = None,
                 consistency: Consistency = "session", ca_file: str | None = None) -> None:
        found = discover(endpoints, token, data_dir, ca_file)
        self.session = Session(found.endpoints, found.token, policy=policy, consistency=consistency)
        self.transport = AsyncTransport(trust(found.ca_file))

    async def __aenter__(self) -> LedgerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    async def run(self, op: Operation[T]) -> T:
        return await self.transport.drive(run(op, self.session))

    async def request(self, method: str, path: str, *, json: Any = None,
                params: Mapping[str, str | int] | None = None, idempotent: bool | None = None) -> Any:
        """Any route of the API; the decoded JSON answer, or the error tree's exception."""
        return await self.run(ops.request(method, path, json, params, idempotent))

    # -- accounts -----------------------------------------------------------------------------------
    async def create_account(self, **fields: Any) -> Account:
        return await self.run(ops.create_account(fields))

    async def create_accounts(self, accounts: Sequence[Mapping[str, Any]]) -> list[BatchItem[Account]]:
        return await self.run(ops.create_accounts(accounts))

    async def get_account(self, id: str, *, consistency: Consistency | None = None,  # noqa: A002
                    max_staleness_ms: int | None = None) -> Account:
        return await self.run(ops.get_account(id, consistency, max_staleness_ms))

    async def balance(self, id: str, at_seq: int | None = None, at: int | None = None, *,  # noqa: A002
                consistency: Consistency | None = None, max_staleness_ms: int | None = None) -> Balance:
        return await self.run(ops.balance(id, at_seq, at, consistency, max_staleness_ms))

    async def entries(self, id: str, *, order: str = "asc", after_seq: int | None = None,  # noqa: A002
                before_seq: int | None = None, from_ns: int | None = None, to_ns: int | None = None,
                page_size: int = ops.statement_page_size_default, consistency: Consistency | None = None,
                max_staleness_ms: int | None = None) -> AsyncIterator[Entry]:
        """Every entry of the account's statement, page after page, in ``order``."""
        statement = ops.Statement(id, order=order, after_seq=after_seq, before_seq=before_seq,
                                  from_ns=from_ns, to_ns=to_ns, page_size=page_size,
                                  consistency=consistency, max_staleness_ms=max_staleness_ms)
        page = statement.next_page()
        while page is not None:
            for entry in statement.take(await self.run(page)):
                yield entry
            page = statement.next_page()

    # -- transactions -------------------------------------------------------------------------------
    async def transfer(self, debit_account_id: str, credit_account_id: str, amount: int, currency: str,
                 id: str | None = None, **fields: Any) -> Transaction:  # noqa: A002
        return await self.run(ops.create_transaction(
            {"id": id, "debit_account_id": debit_account_id, "credit_account_id": credit_account_id,
             "amount": amount, "currency": currency, **fields}))

    async def create_transaction(self, entries: Sequence[Mapping[str, Any]], id: str | None = None,  # noqa: A002
                           **fields: Any) -> Transaction:
        return await self.run(ops.create_transaction({"id": id, "entries": list(entries), **fields}))

    async def create_transactions(self, transactions: Sequence[Mapping[str, Any]],
                            atomic: bool = False) -> list[BatchItem[Transaction]]:
        return await self.run(ops.create_transactions(transactions, atomic))

    async def post(self, id: str, amount: int | None = None, *, post_id: str | None = None) -> Transaction:  # noqa: A002
        return await self.run(ops.follow_up("post", id, post_id, amount))

    async def void(self, id: str, *, void_id: str | None = None) -> Transaction:  # noqa: A002
        return await self.run(ops.follow_up("void", id, void_id))

    async def reverse(self, id: str, *, reverse_id: str | None = None) -> Transaction:  # noqa: A002
        return await self.run(ops.follow_up("reverse", id, reverse_id))

    async def get_transaction(self, id: str, *, consistency: Consistency | None = None,  # noqa: A002
                        max_staleness_ms: int | None = None) -> Transaction:
        return await self.run(ops.get_transaction(id, consistency, max_staleness_ms))

    # -- change feed --------------------------------------------------------------------------------
    def subscribe(self, consumer: str | None = None, *, start: Start = "committed",
                  until_caught_up: bool = False, commit: CommitPolicy | None = None,
                  page_events: int = 500, wait_ms: int = 2000, audit: bool = False) -> AsyncSubscriber:
        """``async for event in ledger.subscribe("billing")``: as ``Client.subscribe``."""
        return AsyncSubscriber(self, Subscription(self.session, consumer, start=start,
                                                  until_caught_up=until_caught_up, commit=commit,
                                                  page_events=page_events, wait_ms=wait_ms,
                                             audit=audit))

    # -- cluster ------------------------------------------------------------------------------------
    async def cluster_status(self) -> dict[str, Any]:
        """``GET /v1/cluster``: every shard's replicas with role, term, indexes and lag."""
        return dict(await self.run(ops.cluster_status()))

    async def cluster_map(self) -> dict[str, Any]:
        """``GET /v1/cluster/map``: the map the nodes route by (epoch, nodes, slot ranges)."""
        return dict(await self.run(ops.cluster_map()))


class AsyncSubscriber:
    """An async iterator of ``Event`` over a ``Subscription``; as an async context manager it
    closes on exit (an exception leaves the last event unprocessed), committing what was processed."""

    def __init__(self, client: LedgerClient, subscription: Subscription) -> None:
        self.client = client
        self.subscription = subscription

    def __aiter__(self) -> AsyncSubscriber:
        return self

    async def __anext__(self) -> Event:
        if self.subscription.finished:
            raise StopAsyncIteration
        event = await self.client.transport.drive(self.subscription.next_event())
        if event is None:
            await self.close()
            raise StopAsyncIteration
        return event

    def stop(self) -> None:
        """End the iteration from another thread, a signal handler or a task: what was read is
        still handed out, then it ends (within one long-poll) and closes."""
        self.subscription.stopping = True

    async def commit(self) -> None:
        """Commit what was processed now (the event handed out last is not, until the next)."""
        await self.client.transport.drive(self.subscription.commit())

    async def close(self, processed: bool = True) -> None:
        await self.client.transport.drive(self.subscription.close(processed))

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await self.close(processed=exc_type is None)
