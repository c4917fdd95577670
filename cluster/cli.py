"""The ``raftledger`` command: ``node`` runs one node, ``up`` runs a local cluster of them, ``cluster``
administers a running one (``raftledger.cluster.admin``)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from typing import Any

from raftledger.client import Client, LedgerError, RetryPolicy
from raftledger.cluster import admin as cluster_admin
from raftledger.cluster import audit, backup, feed_cli, launcher, token_cli, verify
from raftledger.cluster.chaos import cli as chaos_cli
from raftledger.cluster.cli_common import run_command
from raftledger.node.config import ConfigError
from raftledger.node.secret import SecretError
from raftledger.node.secret import generate as generate_secret
from raftledger.node.settings import DURABILITY_MODES

DEMO_ACCOUNTS = ("alice:{demo}", "bob:{demo}")
DEMO_TRANSFER = "demo-transfer-1:{demo}"
DEMO_AMOUNT = 1500
DEMO_CURRENCY = "USD"
demo_deadline_s = 30.0
watch_period_s = 0.5


def parser() -> argparse.ArgumentParser:
    """Every command and its options (tests parse their arguments with it too)."""
    parser = argparse.ArgumentParser(prog="raftledger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node", help="run one node")
    node.add_argument("--config", required=True, help="node TOML file")
    node.add_argument("--join", metavar="URL", default=None,
                      help="register this node with the cluster that URL's node belongs to")
    up = sub.add_parser("up", help="run a local cluster on loopback")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--shards", type=int, default=2)
    up.add_argument("--data-dir", default="./data")
    up.add_argument("--durability", choices=DURABILITY_MODES, default="fsync")
    up.add_argument("--port-base", type=int, default=8080)
    up.add_argument("--no-demo", action="store_true", help="skip the demo transfer")
    up.add_argument("--dev", action="store_true", help="no credentials: every route answers anyone "
                    "(without it, the first admin token is written to <data-dir>/cluster.json)")
    up.add_argument("--tls", action="store_true", help="a new cluster speaks TLS on every listener but "
                    "Raft's: a local CA and per-node certificates in <data-dir>/tls, the CA recorded in "
                    "cluster.json for the CLI and the client")
    up.add_argument("--feed-nats", metavar="URL", help="export the change feed to NATS JetStream at URL "
                    "(e.g. nats://127.0.0.1:4222)")
    up.add_argument("--feed-webhook", metavar="URL", help="POST the change feed, in signed batches, to URL")
    up.add_argument("--feed-webhook-secret", metavar="S", help="the key of the webhook's signatures")
    feed_cli.add_commands(sub.add_parser("feed", help="the change feed: raftledger feed tail|replay|dlq"))
    new_secret = sub.add_parser("secret", help="write a new cluster secret file (mode 0600)")
    new_secret.add_argument("path", help="where to write it; an existing file is never replaced")
    verify.add_parser(sub)
    audit.add_parser(sub)
    keys = sub.add_parser("keys", help="a node's tree-head signing keys").add_subparsers(dest="keys_command",
                                                                                         required=True)
    rotate = keys.add_parser("rotate", help="give a node of a local cluster a new signing key (the old "
                             "one is retired and stays published)")
    rotate.add_argument("--node", required=True, help="the node's id")
    rotate.add_argument("--data-dir", default="./data", help="the directory `raftledger up` used")
    backup.add_parsers(sub)
    cluster_admin.add_parser(sub)
    token_cli.add_parser(sub)
    chaos_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    admin = {"verify": verify.run, "backup": backup.run_backup, "restore": backup.run_restore}
    try:
        if args.command in admin:
            sys.exit(run_command(args, admin[args.command]))
        if args.command == "node":
            run_node(args.config, args.join)
        elif args.command == "cluster":
            sys.exit(cluster_admin.run(args))
        elif args.command == "secret":
            write_secret(args.path)
        elif args.command == "feed":
            sys.exit(feed_cli.run(args))
        elif args.command == "token":
            sys.exit(token_cli.run(args))
        elif args.command == "audit":
            sys.exit(audit.run(args))
        elif args.command == "keys":
            sys.exit(rotate_key(args.data_dir, args.node))
        elif args.command == "chaos":
            sys.exit(chaos_cli.run_command(args))
        else:
            sys.exit(run_up(args))
    except (ConfigError, SecretError, launcher.LaunchError) as exc:
        print(f"raftledger: {exc}", file=sys.stderr)
        sys.exit(2)


def write_secret(path: str) -> None:
    try:
        generate_secret(path)
    except FileExistsError:
        raise launcher.LaunchError(f"{path} exists; a cluster keeps its secret") from None
    print(f"wrote a new cluster secret to {path}; name it as secret_file in every node's config")


def rotate_key(data_dir: str, node_id: str) -> int:
    """Ask a running node of the local cluster in ``data_dir`` for a new signing key."""
    plan = launcher.load_plan(data_dir)
    if plan is None or node_id not in {n.id for n in plan.cluster.nodes}:
        raise launcher.LaunchError(f"no node {node_id!r} in {data_dir}/{launcher.CLUSTER_FILE}")
    try:
        status, answer = launcher.call_internal(plan, node_id, "/keys/rotate")
    except OSError as exc:
        raise launcher.LaunchError(f"node {node_id} cannot be reached: {exc}") from None
    if status != 200:
        print(f"raftledger keys rotate: {answer}", file=sys.stderr)
        return 1
    print(f"node {node_id}: new signing key {answer['key_id']}; earlier keys stay published, retired")
    return 0


def run_node(path: str, join: str | None = None) -> None:
    from raftledger.node import config, logs, runtime

    node_config = config.load(path)
    logs.configure(node_config.node_id, logging.INFO)  # JSON lines on stderr, with the request id
    runtime.run(node_config, join)


# -- up ---------------------------------------------------------------------------------------------
def run_up(args: argparse.Namespace) -> int:
    plan = _plan(args)
    busy = launcher.busy_ports(plan)
    if busy:
        raise launcher.LaunchError(f"ports already in use: {', '.join(busy)} "
                                   "(is this cluster already running? see cluster.json)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    procs = {n.id: launcher.start_node(plan, n.id) for n in plan.cluster.nodes}
    launcher.save_plan(plan)
    try:
        _print_endpoints(plan)
        found = launcher.wait_for_leaders(plan, cancel=stop)
        print("leaders: " + ", ".join(f"shard {s} -> {n}" for s, n in sorted(found.items())))
        _credentials(plan)
        if not args.no_demo:
            demo(plan)
        print("cluster is up; Ctrl-C to stop", flush=True)
        _watch(procs, stop)
    finally:
        print("stopping nodes...", flush=True)
        for proc in procs.values():
            launcher.stop_process(proc)
        plan = launcher.load_plan(plan.data_dir) or plan  # with the nodes `cluster add-node` added
        for node_id, pid in plan.pids.items():  # added since, or restarted by `raftledger chaos`
            if node_id not in procs or procs[node_id].pid != pid:
                launcher.stop_pid(pid, launcher.node_config_path(plan, node_id))
        plan.pids.clear()
        launcher.save_plan(plan)
    return 0


def _credentials(plan: launcher.Plan) -> None:
    if launcher.ensure_admin_token(plan) is None:
        print("credentials: off (--dev): every route answers anyone who reaches the port", flush=True)
        return
    print(f"admin token: \"admin_token\" in {os.path.join(plan.data_dir, launcher.CLUSTER_FILE)} "
          "(mode 0600); the CLI and the client read it from there", flush=True)


def _plan(args: argparse.Namespace) -> launcher.Plan:
    plan = _planned(args)
    auth = dataclasses.replace(plan.settings.auth, required=not args.dev)
    plan.settings = dataclasses.replace(plan.settings, auth=auth)
    feed = _feed_options(args)
    if feed:  # on a resumed cluster too: the options replace what its plan had
        feed_settings = dataclasses.replace(plan.settings.feed, **feed)
        plan.settings = dataclasses.replace(plan.settings, feed=feed_settings)
    return plan


def _feed_options(args: argparse.Namespace) -> dict[str, str]:
    """The [feed] settings the exporters' options give (docs/feed.md)."""
    if bool(args.feed_webhook) != bool(args.feed_webhook_secret):
        raise launcher.LaunchError("--feed-webhook and --feed-webhook-secret go together")
    options = {"nats_url": args.feed_nats, "webhook_url": args.feed_webhook,
               "webhook_secret": args.feed_webhook_secret}
    return {name: value for name, value in options.items() if value}


def _planned(args: argparse.Namespace) -> launcher.Plan:
    if backup.pending_restore(args.data_dir):
        print(f"starting the cluster restored in {args.data_dir} (nodes and shards from the backup)")
        return backup.plan_from_restore(args.data_dir, port_base=args.port_base,
                                        durability=args.durability)
    plan = launcher.load_plan(args.data_dir)
    if plan is not None:
        print(f"resuming the cluster in {plan.data_dir} ({len(plan.cluster.nodes)} nodes, "
              f"{plan.cluster.shards} shards, durability {plan.durability}, slot layout "
              f"{plan.cluster.slot_layout})")
        return plan
    if args.nodes < 1 or args.shards < 1:
        raise launcher.LaunchError("--nodes and --shards must be at least 1")
    return launcher.new_plan(args.data_dir, nodes=args.nodes, shards=args.shards,
                             durability=args.durability, port_base=args.port_base, use_tls=args.tls)


def _print_endpoints(plan: launcher.Plan) -> None:
    for node in plan.cluster.nodes:
        raft = ", ".join(f"shard {s} {a}" for s, a in sorted(node.raft.items()))
        meta = f"; cluster map raft: {node.meta}" if node.meta else ""
        print(f"{node.id}: {node.http}  (internal {node.internal}; raft: {raft}{meta}; "
              f"pid {plan.pids.get(node.id)})")
    print(f"cluster file: {os.path.join(plan.data_dir, launcher.CLUSTER_FILE)}")
    print(f"cluster secret: {plan.secret_file} (node-to-node traffic is sealed with it)", flush=True)
    if plan.ca_file:
        print(f"TLS: every listener but Raft's; the cluster CA is {plan.ca_file} (\"ca_file\" in "
              "cluster.json: the CLI and the client trust it from there)", flush=True)


def _watch(procs: dict[str, Any], stop: threading.Event) -> None:
    reported: set[str] = set()
    while not stop.wait(watch_period_s):
        for node_id, proc in procs.items():
            if proc.poll() is not None and node_id not in reported:
                reported.add(node_id)
                print(f"warning: node {node_id} exited with status {proc.returncode}", flush=True)


# -- demo: two accounts and a transfer, then the balances -------------------------------------------
def demo(plan: launcher.Plan) -> None:
    """Through the public HTTP API, with the client library (it retries with the same ids while
    the cluster settles, so a demo run again on a resumed cluster replays instead of repeating)."""
    policy = RetryPolicy(deadline_s=demo_deadline_s)
    with Client([n.http for n in plan.cluster.nodes], plan.admin_token, policy=policy,
                ca_file=plan.ca_file) as ledger:
        try:
            for account_id in DEMO_ACCOUNTS:
                account = ledger.create_account(id=account_id, currency=DEMO_CURRENCY, normal="credit")
                print(f"  account {account_id}: ok{' (replayed)' if account.replayed else ''}")
            tx = ledger.transfer(DEMO_ACCOUNTS[0], DEMO_ACCOUNTS[1], DEMO_AMOUNT, DEMO_CURRENCY,
                                 id=DEMO_TRANSFER)
            print(f"  transfer {DEMO_TRANSFER}: ok{' (replayed)' if tx.replayed else ''}")
            for account_id in DEMO_ACCOUNTS:
                balance = ledger.balance(account_id, consistency="linearizable")
                print(f"  {account_id}: balance {balance.balance} {DEMO_CURRENCY} "
                      f"(debits {balance.debits_posted}, credits {balance.credits_posted})")
        except LedgerError as exc:
            raise launcher.LaunchError(f"demo: {exc.code}: {exc.message}") from None


if __name__ == "__main__":
    main()
