"""``raftledger token create|list|revoke``: the cluster's API tokens (docs/operations.md, "Security").

``create`` prints the new token's secret once (it is stored nowhere but in what you do with it: the
cluster keeps its hash); ``list`` shows every token without secrets; ``revoke`` removes one, on every
node within a couple of seconds. Each needs an admin token (``--token``, ``$RAFTLEDGER_TOKEN`` or the
data dir's ``admin_token``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from raftledger.client import Client, LedgerError
from rich.console import Console
from rich.table import Table

from . import cli_common
from .cli_common import CommandFailed
from .tokens import ROLES


def add_parser(sub: Any) -> None:
    token = sub.add_parser("token", help="API tokens: raftledger token create|list|revoke")
    commands = token.add_subparsers(dest="token_command", required=True)
    create = commands.add_parser("create", help="create a token (its secret is printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--account-pattern", action="append", default=[], dest="account_patterns",
                        metavar="GLOB", help="confine it to accounts matching GLOB (repeatable)")
    create.add_argument("--expires-in", type=float, default=None, metavar="SECONDS",
                        help="it stops working this long from now")
    create.add_argument("--rate", type=float, default=None, metavar="PER_S",
                        help="requests per second per node (default: the nodes' setting)")
    listing = commands.add_parser("list", help="every token, without secrets")
    revoke = commands.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id")
    for parser in (create, listing, revoke):
        cli_common.add_target_options(parser)


def run(args: argparse.Namespace) -> int:
    command = {"create": _create, "list": _list, "revoke": _revoke}[args.token_command]
    return cli_common.run_command(args, command)


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    found = cli_common.target(args)
    try:
        with Client(list(found.endpoints), found.token, ca_file=found.ca_file) as client:
            return client.request(method, path, json=body)
    except LedgerError as exc:
        raise CommandFailed(f"{exc.code}: {exc.message}") from None


def _create(args: argparse.Namespace) -> int:
    expires = None if args.expires_in is None else time.time_ns() + int(args.expires_in * 1e9)
    body = _call(args, "POST", "/v1/tokens", {
        "name": args.name, "role": args.role, "account_patterns": args.account_patterns,
        "expires_at": expires, "rate_per_s": args.rate})

    def human(console: Console) -> None:
        console.print(f"token {body['id']} ({body['role']}) created; its secret, shown only now:")
        print(body["token"])

    cli_common.emit(args, body, human)
    return cli_common.EXIT_OK


def _list(args: argparse.Namespace) -> int:
    body = _call(args, "GET", "/v1/tokens")

    def human(console: Console) -> None:
        table = Table(title="tokens")
        for column in ("id", "name", "role", "account patterns", "expires", "rate/s"):
            table.add_column(column)
        for t in body["tokens"]:
            expires = "-" if t["expires_at"] is None else \
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["expires_at"] / 1e9))
            table.add_row(t["id"], t["name"], t["role"], ", ".join(t["account_patterns"]) or "*",
                          expires, "default" if t["rate_per_s"] is None else str(t["rate_per_s"]))
        console.print(table)

    cli_common.emit(args, body, human)
    return cli_common.EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    body = _call(args, "DELETE", f"/v1/tokens/{args.id}")
    cli_common.emit(args, body, lambda console: console.print(f"token {args.id} revoked"))
    return cli_common.EXIT_OK
