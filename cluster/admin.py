"""``raftledger cluster ...``: the membership commands an operator runs against a live cluster.

- ``status`` — shards x replicas (role, term, commit and applied index, lag, last contact with the
  leader), the map's epoch, slot ranges and any membership change in progress.
- ``add-node`` — on a local cluster of ``raftledger up``: plans the next node (next id, free ports),
  starts it with ``--join``, waits until the map lists it, records it (and its pid) in cluster.json.
- ``add-replica SHARD NODE`` — returns once the new replica caught up and votes, showing its progress.
- ``remove-replica SHARD NODE [--force]`` — refused (``quorum_at_risk``) when the healthy replicas left
  would not be a majority, unless forced.
- ``remove-node NODE [--force] [--shrink-meta]`` — moves its member of the metadata group, if it
  hosts one, to a node that hosts none (refused with ``no_free_meta_host`` when there is none: add a
  node first, or shrink the group with ``--shrink-meta``), moves each of its replicas to a node that
  hosts none of that shard (else removes it, with the same safety), marks it removed, then stops it
  when this machine runs it (cluster.json has its pid), or says it may be stopped.
- ``move-meta --from A [--to B] [--shrink] [--force]`` — the metadata group's member on A moves to B
  (or to a free node), as ``remove-node`` does it.

Each change is a request the nodes make safe to repeat (docs/operations.md): a command that failed
half-way is finished by running it again. Commands retry while the cluster answers "not now" (503),
within ``--timeout``. Every HTTP call goes through ``request`` (the client library).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
import time
from typing import Any

from raftledger.client import Client, LedgerError, RetryPolicy
from raftledger.client.discovery import CLUSTER_FILE, Target
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from . import launcher
from .cli_common import EXIT_OK, CommandFailed, add_target_options, emit, run_command, target

http_timeout_s = 20.0  # one attempt: a node answers every request within [http] request_timeout_s
read_timeout_s = 30.0
health_timeout_s = 1.0
command_timeout_s = 300.0
retry_s = 0.5
progress_poll_s = 0.5
progress_timeout_s = 5.0
join_wait_s = 90.0


class Refused(CommandFailed):
    """The cluster refused (a 4xx), or did not finish within the command's time; ``code`` is the
    error's stable code."""

    def __init__(self, error: LedgerError) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.code = error.code


_clients: dict[tuple[Target, float], Client] = {}


def request(where: Target, method: str, path: str, json_body: Any = None,
            params: dict[str, str] | None = None, timeout_s: float = command_timeout_s) -> Any:
    """One request through the client library, sent again while the cluster answers "not now" or
    not at all, within ``timeout_s`` (every membership request is safe to repeat); the decoded
    answer, or ``Refused``."""
    client = _clients.get((where, timeout_s))
    if client is None:
        policy = RetryPolicy(deadline_s=timeout_s, attempt_timeout_s=http_timeout_s)
        client = _clients[(where, timeout_s)] = Client(_by_liveness(where), where.token, policy=policy,
                                                       ca_file=where.ca_file)
    try:
        return client.request(method, path, json=json_body, params=params, idempotent=True)
    except LedgerError as exc:
        raise Refused(exc) from None


def _by_liveness(where: Target) -> list[str]:
    """The endpoints, those that answer ``/healthz`` at once first: a hung node accepts connections
    and answers nothing, and would hold a request for a whole attempt."""
    policy = RetryPolicy(deadline_s=health_timeout_s, attempt_timeout_s=health_timeout_s, attempts_max=1)
    answering = []
    for endpoint in where.endpoints:
        with Client([endpoint], where.token, policy=policy, ca_file=where.ca_file) as probe, \
                contextlib.suppress(LedgerError):
            probe.request("GET", "/healthz")
            answering.append(endpoint)
    return answering + [e for e in where.endpoints if e not in answering]


def until_done(where: Target, method: str, path: str, json_body: Any = None,
               params: dict[str, str] | None = None, timeout_s: float = command_timeout_s) -> Any:
    """``request``, sent again while the answer says the change is still under way (202: a new
    replica catching up), within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = request(where, method, path, json_body, params, timeout_s)
        if not (isinstance(answer, dict) and answer.get("state") == "catching_up"):
            return answer
        if time.monotonic() >= deadline:
            raise CommandFailed(f"not done within {timeout_s:.0f}s: the replica has applied "
                                f"{answer['applied_index']} of {answer['target_index']}; run the "
                                "same command again to go on waiting")


def get(where: Target, path: str) -> Any:
    return request(where, "GET", path, timeout_s=read_timeout_s)


# -- status ------------------------------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    body = get(target(args), "/v1/cluster")
    emit(args, body, lambda console: _print_status(console, body))
    return EXIT_OK


def _print_status(console: Console, body: dict[str, Any]) -> None:
    console.print(f"cluster map epoch [bold]{body['epoch']}[/bold], {body['slots']} slots "
                  f"(asked node {body['node']})")
    nodes = Table("node", "url", "state", "reachable", title="nodes")
    for n in body["nodes"]:
        nodes.add_row(n["id"], str(n["url"]), n["state"], "yes" if n["reachable"] else "[red]no[/red]")
    console.print(nodes)
    table = Table("shard", "slots", "node", "role", "term", "commit", "applied", "lag",
                  "last contact", title="replicas")
    for column in (table.columns[1], table.columns[3]):  # slot ranges and roles stay whole
        column.no_wrap = True
    for shard in body["shards"]:
        slots = ", ".join(f"{a}-{b}" for a, b in shard["slot_ranges"]) or "-"
        change = shard.get("change")
        label = f"{shard['id']}" + (f" ({change['op']} {change['node']})" if change else "")
        for i, r in enumerate(shard["replicas"]):
            if not r.get("reachable"):
                table.add_row(label if i == 0 else "", slots if i == 0 else "", r["node"],
                              "[red]unreachable[/red]", *[""] * 5)
                continue
            contact = "-" if r["last_contact_ms"] is None else f"{r['last_contact_ms']:.0f} ms"
            role = f"[bold]{r['role']}[/bold]" if r["role"] == "leader" else r["role"]
            table.add_row(label if i == 0 else "", slots if i == 0 else "", r["node"], role,
                          str(r["term"]), str(r["commit_index"]), str(r["applied_index"]),
                          str(r["lag"]), contact)
    console.print(table)


# -- replicas ----------------------------------------------------------------------------------------


def add_replica(args: argparse.Namespace) -> int:
    where = target(args)
    params = {"force": "true"} if args.force else None
    body = _with_progress(args, where, args.shard, args.node, lambda: until_done(
        where, "POST", f"/v1/shards/{args.shard}/replicas", {"node": args.node}, params,
        timeout_s=args.timeout))
    emit(args, body, lambda console: console.print(
        f"shard {body['shard']}: replica on {body['node']} caught up (applied index {body['applied_index']}; "
        f"the leader had committed {body['target_index']} when it joined) and votes; replicas now "
        f"{', '.join(body['replicas'])}"))
    return EXIT_OK


def _with_progress(args: argparse.Namespace, where: Target, shard: int, node: str,
                   call: Any) -> Any:
    """Run ``call`` (the add) while showing how far the new replica has applied (not with --json)."""
    if args.json:
        return call()  # type: ignore[no-any-return]
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: _capture(result, call), daemon=True)
    worker.start()
    with Progress(TextColumn("shard {task.fields[shard]} on {task.fields[node]}"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f} applied")) as progress:
        task = progress.add_task("catching up", total=1, shard=shard, node=node)
        while worker.is_alive():
            seen = _replica_progress(where, shard, node)
            if seen is not None:
                progress.update(task, completed=seen[0], total=max(seen[1], 1))
            worker.join(progress_poll_s)
    if "error" in result:
        raise result["error"]
    return result["answer"]


def _capture(result: dict[str, Any], call: Any) -> None:
    try:
        result["answer"] = call()
    except Exception as exc:  # handed to the main thread, raised there
        result["error"] = exc


def _replica_progress(where: Target, shard: int, node: str) -> tuple[int, int] | None:
    """(applied index of the replica on ``node``, the leader's commit index), if both are known."""
    try:
        answer = request(where, "GET", "/v1/cluster", timeout_s=progress_timeout_s)
    except CommandFailed:
        return None
    shards = answer.get("shards", []) if isinstance(answer, dict) else []
    entry = next((s for s in shards if s.get("id") == shard), None)
    row = None if entry is None else next((r for r in entry["replicas"] if r["node"] == node), None)
    if entry is None or row is None or not row.get("reachable") or entry.get("commit_index") is None:
        return None
    return int(row["applied_index"]), int(entry["commit_index"])


def remove_replica(args: argparse.Namespace) -> int:
    where = target(args)
    body = _remove_replica(where, args.shard, args.node, args.force, args.timeout)
    emit(args, body, lambda console: console.print(
        f"shard {body['shard']}: replica on {body['node']} removed; replicas now "
        f"{', '.join(body['replicas'])} (leader {body['leader']})"))
    return EXIT_OK


def _remove_replica(where: Target, shard: int, node: str, force: bool, timeout_s: float) -> Any:
    params = {"force": "true"} if force else None
    return until_done(where, "DELETE", f"/v1/shards/{shard}/replicas/{node}", params=params,
                      timeout_s=timeout_s)


# -- nodes -------------------------------------------------------------------------------------------


def add_node(args: argparse.Namespace) -> int:
    plan = launcher.load_plan(args.data_dir or "./data")
    if plan is None:
        raise ValueError(f"add-node starts a node of a local cluster: no {CLUSTER_FILE} in "
                         f"{args.data_dir or './data'} (for a cluster run elsewhere, start the node "
                         "with `raftledger node --config FILE --join URL`)")
    where = target(args)
    known = {n["id"] for n in get(where, "/v1/cluster/map")["nodes"]} | {n.id for n in plan.cluster.nodes}
    node = launcher.plan_node(plan, next_node_id(known))
    launcher.with_node(plan, node)
    proc = launcher.start_node(plan, node.id, join=where.endpoints[0])
    launcher.save_plan(plan)
    deadline = time.monotonic() + join_wait_s
    while not any(n["id"] == node.id for n in get(where, "/v1/cluster/map")["nodes"]):
        if proc.poll() is not None or time.monotonic() >= deadline:
            raise CommandFailed(f"node {node.id} did not join (see {plan.node_config(node.id).data_dir}"
                                f"/node.log); it is recorded in {CLUSTER_FILE}")
        time.sleep(retry_s)  # the new process registers itself: nothing here is signalled
    body = {"id": node.id, "url": node.http, "pid": proc.pid}
    emit(args, body, lambda console: console.print(node.id))
    return EXIT_OK


def next_node_id(known: set[str]) -> str:
    """``n<k>`` with k one past the largest number any node (removed ones too) ever had."""
    numbers = [int(n[1:]) for n in known if n.startswith("n") and n[1:].isdigit()]
    return f"n{max(numbers, default=-1) + 1}"


def remove_node(args: argparse.Namespace) -> int:
    where = target(args)
    meta = _move_meta_off(where, args.node, args.shrink_meta, args.force, args.timeout)
    steps = _empty_node(where, args.node, args.force, args.timeout)
    until_done(where, "DELETE", f"/v1/cluster/nodes/{args.node}", timeout_s=args.timeout)
    stopped = _stop_if_local(args, where, args.node)
    body = {"node": args.node, "state": "removed", "steps": steps, "stopped": stopped, "meta": meta}
    emit(args, body, lambda console: _print_removed(console, body))
    return EXIT_OK


def _move_meta_off(where: Target, node: str, shrink: bool, force: bool,
                   timeout_s: float) -> dict[str, Any] | None:
    """Move the node's member of the metadata group, when it hosts one (or its removal is under
    way); the move's answer, or None."""
    status = get(where, "/v1/cluster")
    entry = next((n for n in status["nodes"] if n["id"] == node), None)
    if entry is None:
        raise CommandFailed(f"node_not_found: no node {node!r} in the cluster map")
    change = (status.get("meta") or {}).get("change")
    if not entry.get("meta") and change != {"op": "remove", "node": node}:
        return None
    moved = _move_meta(where, node, None, shrink, force, timeout_s)
    return {"moved_to": moved["to"], "members": moved["members"]}


def _move_meta(where: Target, node: str, to: str | None, shrink: bool, force: bool,
               timeout_s: float) -> Any:
    payload = {"from": node, **({"to": to} if to else {}), **({"shrink": True} if shrink else {})}
    return until_done(where, "POST", "/v1/cluster/meta/move", payload,
                      {"force": "true"} if force else None, timeout_s)


def move_meta(args: argparse.Namespace) -> int:
    body = _move_meta(target(args), args.source, args.to, args.shrink, args.force, args.timeout)
    emit(args, body, lambda console: console.print(
        f"metadata group: the member on {body['from']} "
        + (f"moved to {body['to']}" if body["to"] else "left (the group shrank)")
        + f"; members now {', '.join(body['members'])} (leader {body['leader']})"))
    return EXIT_OK


def _empty_node(where: Target, node: str, force: bool, timeout_s: float) -> list[dict[str, Any]]:
    """Move each replica the node holds to an up node without one of that shard, else remove it."""
    cluster_map = get(where, "/v1/cluster/map")
    steps = []
    for shard in cluster_map["shards"]:
        if node not in shard["replicas"]:
            continue
        spare = [n["id"] for n in cluster_map["nodes"]
                 if n["state"] == "up" and n["id"] != node and n["id"] not in shard["replicas"]]
        moved_to = None
        for candidate in spare:
            try:
                until_done(where, "POST", f"/v1/shards/{shard['id']}/replicas", {"node": candidate},
                           timeout_s=timeout_s)
            except Refused as refused:
                if refused.code in ("node_cannot_host", "node_not_up"):
                    continue  # try the next spare
                raise
            moved_to = candidate
            break
        _remove_replica(where, shard["id"], node, force, timeout_s)
        steps.append({"shard": shard["id"], "moved_to": moved_to})
    return steps


def _stop_if_local(args: argparse.Namespace, where: Target, node: str) -> bool:
    plan = launcher.load_plan(args.data_dir or "./data")
    if plan is None or node not in {n.id for n in plan.cluster.nodes}:
        return False
    pid = plan.pids.get(node)
    stopped = pid is not None and launcher.stop_pid(pid, launcher.node_config_path(plan, node))
    placement = {s["id"]: tuple(s["replicas"]) for s in get(where, "/v1/cluster/map")["shards"]}
    launcher.without_node(plan, node, placement)
    launcher.save_plan(plan)
    return stopped


def _print_removed(console: Console, body: dict[str, Any]) -> None:
    if body["meta"] is not None:
        moved_to = body["meta"]["moved_to"]
        console.print(f"metadata group: its member on {body['node']} "
                      + (f"moved to {moved_to}" if moved_to else "left (the group shrank)"))
    for step in body["steps"]:
        where = f"moved to {step['moved_to']}" if step["moved_to"] else "removed"
        console.print(f"shard {step['shard']}: its replica on {body['node']} {where}")
    tail = "stopped" if body["stopped"] else "not run from here: it may be stopped now"
    console.print(f"node {body['node']} removed from the cluster; {tail}")


# -- the command line --------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """``raftledger cluster <command>`` (registered by ``raftledger.cluster.cli``)."""
    cluster = sub.add_parser("cluster", help="administer a running cluster: status and membership")
    commands = cluster.add_subparsers(dest="cluster_command", required=True)
    show = commands.add_parser("status", help="shards x replicas, the map's epoch and slot ranges")
    add_target_options(show)
    show.set_defaults(handler=status)
    node = commands.add_parser("add-node", help="start a new node of a local cluster; it joins")
    add_target_options(node)
    node.set_defaults(handler=add_node)
    for name, handler, help_text in (
            ("add-replica", add_replica, "add a replica of SHARD on NODE (returns once it caught up)"),
            ("remove-replica", remove_replica, "remove the replica of SHARD on NODE")):
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("shard", type=int)
        parser.add_argument("node")
        _change_options(parser)
        parser.set_defaults(handler=handler)
    gone = commands.add_parser("remove-node", help="move its metadata group member and replicas, "
                               "then remove NODE")
    gone.add_argument("node")
    _change_options(gone)
    gone.add_argument("--shrink-meta", action="store_true",
                      help="when no node can take its metadata group member, let the group shrink "
                           "(only while a healthy majority remains)")
    gone.set_defaults(handler=remove_node)
    move = commands.add_parser("move-meta", help="move the metadata group's member off a node")
    move.add_argument("--from", dest="source", required=True, help="the node whose member moves")
    move.add_argument("--to", help="the node that takes it (default: an up node hosting none)")
    move.add_argument("--shrink", action="store_true",
                      help="when no node can take it, let the group shrink (keeps a healthy majority)")
    _change_options(move)
    move.set_defaults(handler=move_meta)


def _change_options(parser: argparse.ArgumentParser) -> None:
    add_target_options(parser)
    parser.add_argument("--force", action="store_true",
                        help="go ahead although the healthy replicas left would not be a majority")
    parser.add_argument("--timeout", type=float, default=command_timeout_s,
                        help=f"seconds to keep trying (default {command_timeout_s:.0f})")


_retries_to_stderr = logging.StreamHandler(sys.stderr)
_retries_to_stderr.setFormatter(logging.Formatter("raftledger: %(message)s"))


def _say_retries() -> None:
    """A change can take minutes (a replica catching up, a leadership that will not move): each
    answer "not now" and the wait before the next try go to stderr, so an operator sees why (once,
    however often commands run in one process)."""
    client_log = logging.getLogger("raftledger.client")
    if _retries_to_stderr not in client_log.handlers:
        client_log.addHandler(_retries_to_stderr)
    client_log.setLevel(logging.INFO)


def run(args: argparse.Namespace) -> int:
    _say_retries()
    try:
        return run_command(args, args.handler)
    finally:
        for client in _clients.values():
            client.close()
        _clients.clear()
