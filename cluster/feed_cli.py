"""``raftledger feed``: follow the change feed, replay it, and tend the exporters' dead letters
(docs/feed.md).

- ``tail`` follows every shard's new events (from now, from ``--from OFFSET``, or after the
  committed offsets of ``--consumer``, when it has committed some) and prints one line per event,
  or one JSON event per line with ``--json``; it stops on Ctrl-C or after ``--count N`` events.
- ``replay`` prints every event from ``--from`` (0: the beginning) up to each shard's last event as
  of the start, in per-shard order, then exits: what a downstream projection is rebuilt from.
  With ``--consumer NAME`` both commit what they printed as that consumer's offsets.
- ``dlq list`` shows every dead-lettered batch (sink, shard, offsets, since when, why); ``dlq
  redrive`` sends them again, once each, and exits 1 when one of them failed again (it stays).

Everything goes through the client library (``raftledger.client``): its routing, retries and
subscriber.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Any
from urllib.parse import quote

from raftledger.client import Client, Event, FeedCompacted, LedgerError, NotFound, RetryPolicy
from raftledger.client.feed import Start
from rich.console import Console
from rich.table import Table

from . import cli_common
from .cli_common import CommandFailed

request_timeout_s = 120.0  # a re-drive waits for every batch's POST
follow_deadline_s = 120.0  # a feed read goes on through elections and restarts this long


def add_commands(parser: argparse.ArgumentParser) -> None:
    feed = parser.add_subparsers(dest="feed_command", required=True)
    tail = feed.add_parser("tail", help="follow every shard's new events (Ctrl-C stops)")
    tail.add_argument("--from", dest="from_offset", type=int, metavar="OFFSET",
                      help="start after this offset on every shard (default: from now, or after "
                           "--consumer's committed offsets)")
    tail.add_argument("--count", type=int, metavar="N", help="stop after N events")
    replay = feed.add_parser("replay", help="every event from --from until caught up, then exit")
    replay.add_argument("--from", dest="from_offset", type=int, default=0, metavar="OFFSET",
                        help="start after this offset on every shard (default 0: the beginning)")
    replay.add_argument("--count", type=int, metavar="N", help="stop after N events")
    for command in (tail, replay):
        command.add_argument("--audit", action="store_true",
                             help="the audit trail of administrative changes instead of the shards")
        command.add_argument("--consumer", metavar="NAME",
                             help="commit what is printed as this durable consumer's offsets")
        cli_common.add_target_options(command)
    dlq = feed.add_parser("dlq", help="the exporters' dead-letter store").add_subparsers(
        dest="dlq_command", required=True)
    for name, helptext in (("list", "list the dead-lettered batches"),
                           ("redrive", "send every dead-lettered batch again, once each")):
        command = dlq.add_parser(name, help=helptext)
        command.add_argument("--sink", choices=("webhook", "nats"), help="only this sink's batches")
        command.add_argument("--shard", type=int, help="only this shard's batches")
        cli_common.add_target_options(command)


def run(args: argparse.Namespace) -> int:
    if args.feed_command in ("tail", "replay"):
        return cli_common.run_command(args, _follow)
    return cli_common.run_command(args, _redrive if args.dlq_command == "redrive" else _list)


# -- tail and replay ---------------------------------------------------------------------------------
def _follow(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise ValueError("--count is at least 1")
    if args.from_offset is not None and args.from_offset < 0:
        raise ValueError("--from is an offset >= 0")
    replay = args.feed_command == "replay"
    if args.audit and args.consumer:
        raise ValueError("--audit is followed without --consumer")
    printed = 0
    with _client(args, follow_deadline_s) as ledger:
        start = args.from_offset if args.from_offset is not None else _tail_start(ledger, args.consumer)
        subscriber = ledger.subscribe(args.consumer, start=start, until_caught_up=replay,
                                      audit=args.audit)
        try:
            for event in subscriber:
                _print_event(event, args.json)
                printed += 1
                if args.count is not None and printed >= args.count:
                    break
        except KeyboardInterrupt:
            pass  # Ctrl-C: the events printed count as processed
        except BrokenPipeError:  # the reader went away (| head): nothing more to print to
            with contextlib.suppress(OSError):
                sys.stdout = open("/dev/null", "w")  # noqa: SIM115 (interpreter exit closes it)
        except FeedCompacted as exc:
            raise CommandFailed(f"{exc.message}: shard {exc.shard} holds events from offset "
                                f"{exc.earliest_offset} on; the events before it are gone "
                                f"(--from {(exc.earliest_offset or 1) - 1} starts there)") from None
        except LedgerError as exc:
            raise CommandFailed(f"{exc.code}: {exc.message}") from None
        finally:
            with contextlib.suppress(LedgerError, KeyboardInterrupt):
                subscriber.close()
    return cli_common.EXIT_OK


def _tail_start(ledger: Client, consumer: str | None) -> Start:
    """After the consumer's committed offsets when it has some; else from now."""
    if consumer is None:
        return "latest"
    try:
        ledger.request("GET", f"/v1/feed/consumers/{quote(consumer, safe='')}")
    except NotFound:
        return "latest"
    except LedgerError as exc:
        raise CommandFailed(f"{exc.code}: {exc.message}") from None
    return "committed"


def event_json(event: Event) -> dict[str, Any]:
    return {"id": event.id, "shard": event.shard, "offset": event.offset, "type": event.type,
            "timestamp": event.timestamp, "data": dict(event.data)}


def _print_event(event: Event, as_json: bool) -> None:
    if as_json:
        line = json.dumps(event_json(event), separators=(",", ":"), sort_keys=True)
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event.timestamp // 1_000_000_000))
        line = f"{event.id:>10}  {when}Z  {event.type:<21}  {describe(event)}"
    print(line, flush=True)


def describe(event: Event) -> str:
    """One line for people: the account created, or the transaction's entries on this shard."""
    account = event.account
    if account is not None:
        return f"{account.id} {account.currency} ({account.normal} normal)"
    tx = event.transaction
    if tx is None:
        return json.dumps(dict(event.data), separators=(",", ":"))[:200]
    moves = "; ".join(f"{e.direction} {e.account_id} {e.amount} {e.currency}" for e in tx.entries)
    extra = [f"{name} {value}" for name, value in (("pending", tx.pending_id), ("reverses", tx.reverses))
             if value] + (["cross-shard"] if tx.cross_shard else [])
    return f"{tx.id}: {moves}" + (f" ({', '.join(extra)})" if extra else "")


def _client(args: argparse.Namespace, deadline_s: float) -> Client:
    target = cli_common.target(args)
    policy = RetryPolicy(deadline_s=deadline_s, attempt_timeout_s=min(deadline_s, request_timeout_s))
    return Client(list(target.endpoints), target.token, policy=policy, consistency="local",
                  ca_file=target.ca_file)


# -- dead letters ------------------------------------------------------------------------------------
def _list(args: argparse.Namespace) -> int:
    body = _call(args, "GET", "/v1/feed/dlq")

    def human(console: Console) -> None:
        letters = body["dead_letters"]
        if not letters:
            console.print("the dead-letter store is empty")
            return
        console.print(_table("dead-lettered batches", letters))

    cli_common.emit(args, body, human)
    return cli_common.EXIT_OK


def _redrive(args: argparse.Namespace) -> int:
    body = _call(args, "POST", "/v1/feed/dlq/redrive")

    def human(console: Console) -> None:
        console.print(f"re-driven: {len(body['redriven'])} batches")
        if body["failed"]:
            console.print(_table("failed again (still in the store)", body["failed"]))

    cli_common.emit(args, body, human)
    return cli_common.EXIT_FAILED if body["failed"] else cli_common.EXIT_OK


def _table(title: str, letters: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for column in ("sink", "shard", "offsets", "events", "since", "error"):
        table.add_column(column)
    for d in letters:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["since"] / 1e9))
        table.add_row(d["sink"], str(d["shard"]), f"{d['first']}-{d['last']}", str(d["events"]), since,
                      d.get("error", ""))
    return table


def _call(args: argparse.Namespace, method: str, path: str) -> Any:
    """The JSON answer of the cluster (a refusal is the command's failure)."""
    query = {k: str(v) for k, v in (("sink", args.sink), ("shard", args.shard)) if v is not None}
    with _client(args, request_timeout_s) as ledger:
        try:
            return ledger.request(method, path, params=query)
        except LedgerError as exc:
            raise CommandFailed(f"{exc.status} {exc.code}: {exc.message}") from None
