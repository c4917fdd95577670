"""``raftledger feed dlq list|redrive``: the change feed exporters' dead-letter store (docs/feed.md).

``list`` shows every dead-lettered batch (sink, shard, offsets, since when); ``redrive`` sends them
again, once each, and exits 1 when one of them failed again (it stays in the store).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rich.console import Console
from rich.table import Table

from . import cli_common
from .cli_common import CommandFailed

request_timeout_s = 120.0  # a re-drive waits for every batch's POST


def add_commands(parser: argparse.ArgumentParser) -> None:
    feed = parser.add_subparsers(dest="feed_command", required=True)
    dlq = feed.add_parser("dlq", help="the exporters' dead-letter store").add_subparsers(
        dest="dlq_command", required=True)
    for name, helptext in (("list", "list the dead-lettered batches"),
                           ("redrive", "send every dead-lettered batch again, once each")):
        command = dlq.add_parser(name, help=helptext)
        command.add_argument("--sink", choices=("webhook", "nats"), help="only this sink's batches")
        command.add_argument("--shard", type=int, help="only this shard's batches")
        cli_common.add_target_options(command)


def run(args: argparse.Namespace) -> int:
    return cli_common.run_command(args, _redrive if args.dlq_command == "redrive" else _list)


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
    """The first endpoint that answers; its JSON body (a refusal is the command's failure)."""
    target = cli_common.target(args)
    query = {k: str(v) for k, v in (("sink", args.sink), ("shard", args.shard)) if v is not None}
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    reasons = []
    for endpoint in target.endpoints:
        url = f"{endpoint}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=request_timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            error = json.loads(exc.read() or b"{}").get("error", {})
            if exc.code < 500:
                raise CommandFailed(f"{endpoint}: {exc.code} {error.get('code')}: {error.get('message')}") \
                    from None
            reasons.append(f"{endpoint}: {exc.code} {error.get('code')}")
        except (OSError, ValueError) as exc:
            reasons.append(f"{endpoint}: {exc}")
    raise CommandFailed("no endpoint answered: " + "; ".join(reasons))
