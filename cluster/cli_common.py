"""What every admin command shares: how it finds the cluster, how it prints, how it exits.

A command finds its cluster through ``--endpoint URL`` (repeatable), else ``RAFTLEDGER_ENDPOINTS``,
else ``<--data-dir>/cluster.json`` (``raftledger.client.discovery``). It prints for people (tables,
progress) unless ``--json`` asks for one JSON document on stdout for scripts. It exits 0 only on
success: 1 when what it checked or asked for failed, 2 when it could not run (bad arguments, no
cluster found).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from raftledger.client.discovery import DEFAULT_DATA_DIR, Target, discover
from rich.console import Console

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNUSABLE = 2


class CommandFailed(Exception):
    """What the command was asked to do did not happen; its message is the reason (exit 1)."""


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", action="append", default=[], metavar="URL",
                        help="a node's HTTP URL (repeatable); default: $RAFTLEDGER_ENDPOINTS, "
                             "else the nodes of <data-dir>/cluster.json")
    parser.add_argument("--data-dir", default=None,
                        help=f"the directory `raftledger up` used (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--token", default=None, help="bearer token (default: $RAFTLEDGER_TOKEN, "
                                                      "else the data dir's admin_token)")
    parser.add_argument("--ca-file", default=None, help="the CA https:// nodes are verified against "
                                                        "(default: $RAFTLEDGER_CA_FILE, else the data "
                                                        "dir's ca_file, else the system's)")
    parser.add_argument("--json", action="store_true", help="print one JSON document, for scripts")


def target(args: argparse.Namespace) -> Target:
    return discover(args.endpoint, args.token, args.data_dir, getattr(args, "ca_file", None))


def console() -> Console:
    """Where human output goes; ``--json`` runs never write to it on stdout."""
    return Console(highlight=False)


def emit(args: argparse.Namespace, data: Any, human: Callable[[Console], None]) -> None:
    """``data`` as JSON with ``--json``, else ``human`` renders it."""
    if args.json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        human(console())


def run_command(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """Run one admin command and map its failures to exit codes and one line on stderr (a JSON
    ``{"error": ...}`` document on stdout with ``--json``)."""
    try:
        return command(args)
    except CommandFailed as exc:
        return _fail(args, "failed", str(exc), EXIT_FAILED)
    except ValueError as exc:  # DiscoveryError, bad arguments found late
        return _fail(args, "unusable", str(exc), EXIT_UNUSABLE)


def _fail(args: argparse.Namespace, kind: str, message: str, code: int) -> int:
    if args.json:
        json.dump({"error": {"kind": kind, "message": message}}, sys.stdout)
        sys.stdout.write("\n")
    print(f"raftledger: {message}", file=sys.stderr)
    return code
