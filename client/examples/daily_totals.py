"""Daily totals per account in SQLite, kept from the change feed: a worked example of a projection.

One row per account, currency and UTC day: the sums of the posted debits and credits moved that day
and how many entries did it. Posted movements are the entries of every event whose transaction is
``posted``: a transfer, the posting of a hold (the amount posted) and a reversal. A hold, a void or
an expiry moves no posted money. Amounts are Python integers, stored as decimal text (a day's total
can outgrow SQLite's 64-bit integers); no float touches them.

The projection keeps, in the same SQLite transaction as the totals, the last offset it applied per
shard (``applied``). It starts after those offsets and skips an event at or below them, so the
feed's at-least-once delivery gives exactly-once totals, across restarts too. ``rebuild`` makes the
same table from scratch by replaying the feed from the start: the two are equal (tests/test_feed_client.py).

    from raftledger.client import Client
    from raftledger.client.examples import daily_totals

    with Client() as ledger:
        daily_totals.follow(ledger, "totals.sqlite", consumer="daily-totals")  # runs until stopped

    python -m raftledger.client.examples.daily_totals totals.sqlite [--rebuild] [--consumer NAME]
"""

from __future__ import annotations

import argparse
import datetime
import sqlite3
from collections.abc import Iterable

from raftledger.client import Client, CommitPolicy, Event

Key = tuple[str, str, str]  # account id, currency, day (YYYY-MM-DD, UTC)
Totals = tuple[int, int, int]  # debits, credits, entries

SCHEMA = """
CREATE TABLE IF NOT EXISTS daily_totals (
    account_id TEXT NOT NULL, currency TEXT NOT NULL, day TEXT NOT NULL,
    debits TEXT NOT NULL, credits TEXT NOT NULL, entries INTEGER NOT NULL,
    PRIMARY KEY (account_id, currency, day));
CREATE TABLE IF NOT EXISTS applied (shard INTEGER PRIMARY KEY, last_offset INTEGER NOT NULL);
"""


def open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    return db


def applied_offsets(db: sqlite3.Connection) -> dict[int, int]:
    return {int(s): int(o) for s, o in db.execute("SELECT shard, last_offset FROM applied")}


def day_of(timestamp_ns: int) -> str:
    return datetime.datetime.fromtimestamp(timestamp_ns // 1_000_000_000, datetime.UTC).date().isoformat()


def apply(db: sqlite3.Connection, event: Event) -> bool:
    """Fold one event in, in one SQLite transaction; False when it was applied already."""
    with db:
        row = db.execute("SELECT last_offset FROM applied WHERE shard = ?", (event.shard,)).fetchone()
        if row is not None and event.offset <= row[0]:
            return False
        tx = event.transaction
        if tx is not None and tx.status == "posted":
            for entry in tx.entries:
                debit = entry.amount if entry.direction == "debit" else 0
                _add(db, (entry.account_id, entry.currency, day_of(event.timestamp)),
                     (debit, entry.amount - debit, 1))
        db.execute("INSERT INTO applied (shard, last_offset) VALUES (?, ?) ON CONFLICT (shard) "
                   "DO UPDATE SET last_offset = excluded.last_offset", (event.shard, event.offset))
    return True


def _add(db: sqlite3.Connection, key: Key, delta: Totals) -> None:
    row = db.execute("SELECT debits, credits, entries FROM daily_totals WHERE account_id = ? AND "
                     "currency = ? AND day = ?", key).fetchone()
    debits, credits, entries = (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
    db.execute("INSERT OR REPLACE INTO daily_totals VALUES (?, ?, ?, ?, ?, ?)",
               (*key, str(debits + delta[0]), str(credits + delta[1]), entries + delta[2]))


def totals(db: sqlite3.Connection) -> dict[Key, Totals]:
    rows = db.execute("SELECT account_id, currency, day, debits, credits, entries FROM daily_totals")
    return {(a, c, d): (int(dr), int(cr), int(n)) for a, c, d, dr, cr, n in rows}


def apply_all(db: sqlite3.Connection, events: Iterable[Event], count_max: int | None = None) -> int:
    """Fold events in until they end (or ``count_max`` were read); how many were new."""
    applied = 0
    for read, event in enumerate(events, 1):
        applied += apply(db, event)
        if count_max is not None and read >= count_max:
            break
    return applied


def follow(ledger: Client, path: str, consumer: str | None = None, *, until_caught_up: bool = False,
           count_max: int | None = None) -> int:
    """Keep the projection in ``path`` up to date, from where it stands. ``consumer`` also commits
    the offsets in the cluster, so that retention keeps what the projection has not read."""
    db = open_db(path)
    try:
        start = applied_offsets(db) or 0
        with ledger.subscribe(consumer, start=start, until_caught_up=until_caught_up,
                              commit=CommitPolicy(every_events=500, interval_s=5.0)) as events:
            return apply_all(db, events, count_max)
    finally:
        db.close()


def rebuild(ledger: Client, path: str) -> int:
    """The projection from scratch (``path`` must be new): every event from the start, until caught up."""
    db = open_db(path)
    try:
        if applied_offsets(db):
            raise ValueError(f"{path} holds a projection already; rebuild into a new file")
        with ledger.subscribe(start=0, until_caught_up=True) as events:
            return apply_all(db, events)
    finally:
        db.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the SQLite file")
    parser.add_argument("--rebuild", action="store_true", help="replay the feed from the start, then exit")
    parser.add_argument("--consumer", help="commit offsets as this durable consumer")
    parser.add_argument("--endpoint", action="append", help="a node's URL (default: ./data/cluster.json)")
    args = parser.parse_args(argv)
    with Client(args.endpoint) as ledger:
        try:
            done = rebuild(ledger, args.path) if args.rebuild else follow(ledger, args.path, args.consumer)
        except KeyboardInterrupt:
            return
    print(f"{done} events applied to {args.path}")


if __name__ == "__main__":
    main()
