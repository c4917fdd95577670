"""``raftledger backup DIR`` and ``raftledger restore DIR --data-dir NEW``: a cluster at a point in time.

**Backup.** For every shard, one replica (its leader when known) streams a compacted copy of its LMDB
store taken in one read transaction (``GET /v1/admin/shards/{s}/backup``): the copy is the shard
exactly as it was after one applied log index, while writes go on. Every shard is asked at the same
moment, and the copies are taken again (``cut_attempts_max`` times at most) until they form a
consistent cut across shards (``raftledger.cluster.cut``: no cross-shard decision without its
participants' prepares, no leg finished before its home's decision, no decision completed before
its legs finished), checked from the copies themselves. The whole cluster map comes from
``GET /v1/admin/cluster/map``. Each file is written as it arrives (never held in memory), hashed,
then opened read-only and checked: its applied index and fingerprint are those the node announced,
and the shard passes the same audit ``raftledger verify`` runs. ``manifest.json`` is written last:

    {"format": "raftledger-backup", "version": 1, "created_at_ns": ...,
     "map": {"file", "epoch", "bytes", "sha256"},
     "shards": [{"shard", "node", "applied_index", "fingerprint", "file", "bytes", "sha256",
                 "accounts", "entries", "transactions"}]}

**Restore** checks every file of the manifest (size, sha256) before writing anything, then stages the
backup in ``NEW/restore/``. ``raftledger up --data-dir NEW [--port-base P] [--durability D]`` finds
the staged backup (no ``cluster.json`` yet) and builds the cluster from it (``plan_from_restore``): the
nodes of the map, with new ports; every replica of a shard gets the shard's one copy as a snapshot
dump whose Raft log starts right after the copy's applied index (``node.raft.restored_dump_meta``),
the form a replica that caught up from a leader's snapshot has on disk; the metadata group's members
get the map (same epoch, slots, replicas and sections; the new addresses) as their dump. A new cluster
secret is generated. The restored cluster holds the same accounts, transactions, balances and
fingerprints as the backup's snapshot points; Raft logs after them are not part of a backup.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import lmdb
from raftledger.client import LedgerError
from raftledger.client.core import BodyStream
from raftledger.cluster import launcher
from raftledger.cluster.cli_common import EXIT_OK, CommandFailed, add_target_options, console, emit
from raftledger.cluster.cut import ShardCut, cut_problems, summarize
from raftledger.cluster.map import NODE_REMOVED, ClusterMap, MapError, NodeEntry
from raftledger.cluster.meta import write_dump as write_meta_dump
from raftledger.cluster.verify import Nodes, cluster_map, node_urls, nodes_for
from raftledger.node.config import ClusterSpec, NodeSpec, validate
from raftledger.node.files import fsync_dir
from raftledger.node.raft import restored_dump_meta, restored_log_index_min
from raftledger.node.settings import DURABILITY_FSYNC
from raftledger.node.snapshot import write_snapshot
from raftledger.statemachine.audit import verify_store
from raftledger.statemachine.layout import DB_NAMES
from raftledger.statemachine.ledger import Dbs
from raftledger.statemachine.store import LedgerStore, Reader
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

FORMAT = "raftledger-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAP_FILE = "map.msgpack"
RESTORE_DIR = "restore"  # NEW/restore/: a backup staged for `raftledger up`
APPLIED_INDEX_HEADER = "X-Ledger-Applied-Index"  # node/http/admin.py
FINGERPRINT_HEADER = "X-Ledger-Fingerprint"
MAP_EPOCH_HEADER = "X-Ledger-Map-Epoch"
NODE_HEADER = "X-Ledger-Node"
chunk_bytes = 1 << 20
problems_shown_max = 5
cut_attempts_max = 5  # copies of every shard at once, until they form a consistent cut


def shard_file(shard: int) -> str:
    return f"shard-{shard}.mdb"


# -- reading a store copy without changing it ---------------------------------------------------------

@contextmanager
def read_copy(path: str, shard: int) -> Iterator[Reader]:
    """A read-only view of a store copy (no lock file, nothing written)."""
    env = lmdb.open(path, subdir=False, readonly=True, lock=False, max_dbs=len(DB_NAMES))
    try:
        with env.begin(buffers=False) as txn:
            dbs = Dbs(*(env.open_db(name.encode(), txn=txn, create=False) for name in DB_NAMES))
            yield Reader(txn, dbs, shard)
    finally:
        env.close()


def _save(response: BodyStream, path: str, progress: Progress | None, label: str) -> tuple[int, str]:
    """Write a response to ``path`` chunk by chunk; (bytes, sha256)."""
    digest, size = hashlib.sha256(), 0
    task = None if progress is None else progress.add_task(label, total=None)
    with open(path, "wb") as out:
        while chunk := response.read(chunk_bytes):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            if progress is not None and task is not None:
                progress.update(task, advance=len(chunk))
        out.flush()
        os.fsync(out.fileno())
    return size, digest.hexdigest()


def _file_sha256(path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# -- backup ------------------------------------------------------------------------------------------

def add_parsers(sub: Any) -> None:
    backup = sub.add_parser("backup", help="a consistent copy of every shard and of the cluster map")
    backup.add_argument("dir", help="where to write it: a new or empty directory")
    add_target_options(backup)
    restore = sub.add_parser("restore", help="check a backup and stage it in a new data dir for `up`")
    restore.add_argument("dir", help="the backup's directory")
    restore.add_argument("--data-dir", required=True, help="the new cluster's data dir (new or empty)")
    restore.add_argument("--json", action="store_true", help="print one JSON document, for scripts")


def _require_empty(directory: str, what: str) -> None:
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise CommandFailed(f"{directory} is not an empty directory; {what}")


def run_backup(args: argparse.Namespace) -> int:
    _require_empty(args.dir, "a backup is written into a new or empty directory")
    with nodes_for(args) as (nodes, endpoints):
        cmap = cluster_map(nodes, endpoints)
        urls = node_urls(cmap)
        os.makedirs(args.dir, exist_ok=True)
        started = time.time_ns()
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      transient=True, disable=args.json, console=console()) as progress:
            map_entry = _backup_map(nodes, urls, args.dir)
            leaders = _leaders(nodes, endpoints)
            shards, attempts = _consistent_copies(nodes, urls, args.dir, cmap["shards"], leaders, progress)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "created_at_ns": started,
                "map": map_entry, "shards": shards}
    _write_json_durably(os.path.join(args.dir, MANIFEST), manifest)
    emit(args, manifest, lambda c: _render_manifest(c, args.dir, manifest, attempts))
    return EXIT_OK


def _consistent_copies(nodes: Nodes, urls: dict[str, str], directory: str, shards: list[dict[str, Any]],
                       leaders: dict[int, str], progress: Progress) -> tuple[list[dict[str, Any]], int]:
    """One copy of every shard, all asked for at the same moment, taken again until the copies form
    a consistent cut; (manifest entries, attempts). CommandFailed when none did."""
    def copy(shard: dict[str, Any]) -> tuple[dict[str, Any], ShardCut]:
        return _backup_shard(nodes, urls, directory, shard, leaders.get(shard["id"]), progress)

    problems: list[str] = []
    for attempt in range(1, cut_attempts_max + 1):
        with ThreadPoolExecutor(max_workers=max(1, len(shards))) as pool:
            copies = list(pool.map(copy, shards))
        problems = cut_problems({cut.shard: cut for _, cut in copies})
        if not problems:
            return [entry for entry, _ in copies], attempt
    for shard in shards:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, shard_file(shard["id"])))
    raise CommandFailed(f"the shards' copies did not form a consistent cut in {cut_attempts_max} attempts "
                        f"(cross-shard transactions kept crossing them); the last: "
                        + "; ".join(problems[:problems_shown_max]))


def _write_json_durably(path: str, data: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _backup_map(nodes: Nodes, urls: dict[str, str], directory: str) -> dict[str, Any]:
    failures = []
    for node, url in sorted(urls.items()):
        try:
            with nodes.stream(url, "/v1/admin/cluster/map") as reply:
                epoch = int(reply.header(MAP_EPOCH_HEADER) or "")
                assert reply.stream is not None
                size, sha = _save(reply.stream, os.path.join(directory, MAP_FILE), None, "map")
            return {"file": MAP_FILE, "epoch": epoch, "bytes": size, "sha256": sha, "node": node}
        except (OSError, LedgerError, ValueError) as exc:
            failures.append(f"{node}: {exc}")
    raise CommandFailed("no node gave the cluster map: " + "; ".join(failures))


def _leaders(nodes: Nodes, endpoints: tuple[str, ...]) -> dict[int, str]:
    """Shard -> leader, to copy from (a leader never installs a snapshot under the copy)."""
    for url in endpoints:
        with contextlib.suppress(LedgerError, KeyError, TypeError):
            view = nodes.get(url, "/v1/cluster")
            return {int(s["id"]): s["leader"] for s in view["shards"] if s.get("leader")}
    return {}


def _backup_shard(nodes: Nodes, urls: dict[str, str], directory: str, shard: dict[str, Any],
                  leader: str | None, progress: Progress) -> tuple[dict[str, Any], ShardCut]:
    """The shard from its leader, else from another replica; the first whole, checked copy wins."""
    shard_id = shard["id"]
    sources = sorted(shard["replicas"], key=lambda n: n != leader)
    failures = []
    for node in sources:
        if node not in urls:
            continue
        try:
            return _copy_shard(nodes, urls[node], directory, shard_id, progress)
        except (OSError, LedgerError, KeyError, ValueError, lmdb.Error, CommandFailed) as exc:
            failures.append(f"{node}: {exc}")
    raise CommandFailed(f"shard {shard_id}: no replica gave a good copy: " + "; ".join(failures))


def _copy_shard(nodes: Nodes, url: str, directory: str, shard_id: int,
                progress: Progress) -> tuple[dict[str, Any], ShardCut]:
    """The copy on disk, checked; its manifest entry and its cross-shard state, read whole."""
    path = os.path.join(directory, shard_file(shard_id))
    with nodes.stream(url, f"/v1/admin/shards/{shard_id}/backup") as reply:
        index = int(reply.header(APPLIED_INDEX_HEADER) or "")
        chain = reply.header(FINGERPRINT_HEADER) or ""
        node = reply.header(NODE_HEADER) or ""
        assert reply.stream is not None
        size, sha = _save(reply.stream, path, progress, f"shard {shard_id} from {node}")
    with read_copy(path, shard_id) as reader:
        state = reader.state()
        if (state.applied_index, state.chain.hex()) != (index, chain):
            raise CommandFailed(f"the copy is at ({state.applied_index}, {state.chain.hex()[:16]}), "
                                f"the node announced ({index}, {chain[:16]})")
        problems = verify_store(reader)
        if problems:
            raise CommandFailed(f"the copy fails its audit: {'; '.join(problems[:problems_shown_max])}")
        counts = {name: reader.txn.stat(getattr(reader.dbs, name))["entries"]
                  for name in ("accounts", "entries", "transactions")}
        cut = summarize(reader, 0, node)
    return ({"shard": shard_id, "node": node, "applied_index": index, "fingerprint": chain,
             "file": shard_file(shard_id), "bytes": size, "sha256": sha, **counts}, cut)


def _render_manifest(c: Any, directory: str, manifest: dict[str, Any], attempts: int) -> None:
    m = manifest["map"]
    c.print(f"cluster map: epoch {m['epoch']} ({m['bytes']} bytes)")
    for s in manifest["shards"]:
        c.print(f"shard {s['shard']}: from {s['node']} at index {s['applied_index']}, fingerprint "
                f"{s['fingerprint'][:16]}, {s['accounts']} accounts, {s['transactions']} transactions, "
                f"{s['bytes']} bytes")
    c.print(f"backup written to {directory} ({MANIFEST}); the shards' copies form a consistent cut "
            f"(attempt {attempts} of {cut_attempts_max})")


# -- restore -----------------------------------------------------------------------------------------

def check_backup(directory: str) -> dict[str, Any]:
    """The manifest of a whole backup; CommandFailed names the first thing that is not as recorded."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CommandFailed(f"{path}: no manifest (not a backup, or an incomplete one)") from None
    except (OSError, ValueError) as exc:
        raise CommandFailed(f"{path}: unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CommandFailed(f"{path}: not a raftledger backup manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CommandFailed(f"{path}: backup format version {manifest.get('version')!r}; this release "
                            f"reads version {FORMAT_VERSION}")
    try:
        entries = [manifest["map"], *manifest["shards"]]
        for entry in entries:
            _check_file(directory, entry["file"], int(entry["bytes"]), str(entry["sha256"]))
        with open(os.path.join(directory, MAP_FILE), "rb") as f:
            epoch = ClusterMap.unpack(f.read()).epoch
    except (KeyError, TypeError, ValueError) as exc:
        raise CommandFailed(f"{path}: malformed manifest ({exc!r})") from None
    if epoch != manifest["map"]["epoch"]:
        raise CommandFailed(f"{MAP_FILE}: epoch {epoch}, the manifest says {manifest['map']['epoch']}")
    return manifest


def _check_file(directory: str, name: str, size: int, sha256: str) -> None:
    if os.path.basename(name) != name:
        raise CommandFailed(f"manifest names {name!r}, which is not a file of the backup")
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise CommandFailed(f"damaged backup: {path} is missing; nothing was written")
    found_size, found_sha = _file_sha256(path)
    if (found_size, found_sha) != (size, sha256):
        raise CommandFailed(f"damaged backup: {path} has {found_size} bytes and sha256 {found_sha[:16]}…, "
                            f"the manifest says {size} bytes and {sha256[:16]}…; nothing was written")


def run_restore(args: argparse.Namespace) -> int:
    try:
        manifest = check_backup(args.dir)
    except MapError as exc:
        raise CommandFailed(f"damaged backup: {MAP_FILE}: {exc}; nothing was written") from None
    _require_empty(args.data_dir, "a backup is restored into a new data dir")
    stage = os.path.join(args.data_dir, RESTORE_DIR)
    os.makedirs(stage)
    try:
        for entry in [manifest["map"], *manifest["shards"]]:
            shutil.copyfile(os.path.join(args.dir, entry["file"]), os.path.join(stage, entry["file"]))
            _check_file(stage, entry["file"], int(entry["bytes"]), str(entry["sha256"]))
        _write_json_durably(os.path.join(stage, MANIFEST), manifest)
    except BaseException:
        shutil.rmtree(args.data_dir, ignore_errors=True)
        raise
    summary = {"data_dir": os.path.abspath(args.data_dir), "map_epoch": manifest["map"]["epoch"],
               "shards": [{k: s[k] for k in ("shard", "applied_index", "fingerprint", "accounts",
                                             "transactions")} for s in manifest["shards"]]}
    emit(args, summary, lambda c: c.print(
        f"backup checked and staged in {stage}; start the cluster with: raftledger up --data-dir "
        f"{args.data_dir} [--port-base P] (nodes and shards come from the backup)"))
    return EXIT_OK


# -- the first `raftledger up` of a restored data dir ---------------------------------------------------

def pending_restore(data_dir: str) -> bool:
    return os.path.isfile(os.path.join(data_dir, RESTORE_DIR, MANIFEST)) and \
        launcher.load_plan(data_dir) is None


def plan_from_restore(data_dir: str, *, port_base: int | None, durability: str) -> launcher.Plan:
    """Build the cluster of a staged backup: plan (new ports), every replica's snapshot dump, the
    metadata group's dumps; ``cluster.json`` is saved last and the staged backup removed."""
    stage = os.path.join(data_dir, RESTORE_DIR)
    try:
        manifest = check_backup(stage)
        with open(os.path.join(stage, MAP_FILE), "rb") as f:
            old_map = ClusterMap.unpack(f.read())
    except (CommandFailed, MapError) as exc:
        raise launcher.LaunchError(f"{stage}: {exc}") from None
    plan = _restored_plan(data_dir, old_map, port_base, durability)
    sync = durability == DURABILITY_FSYNC
    for entry in manifest["shards"]:
        _write_shard_dumps(plan, stage, entry, sync)
    _write_meta_dumps(plan, old_map, sync)
    launcher.save_plan(plan)
    shutil.rmtree(stage)
    return plan


def _restored_plan(data_dir: str, old_map: ClusterMap, port_base: int | None,
                   durability: str) -> launcher.Plan:
    nodes = [n for n in old_map.nodes if n.state != NODE_REMOVED]
    shard_ids = sorted(s.id for s in old_map.shards)
    if shard_ids != list(range(len(shard_ids))) or not nodes:
        raise launcher.LaunchError(f"the backup's map has shards {shard_ids} and {len(nodes)} nodes; "
                                   "expected shards 0..n-1 and at least one node")
    taken = {port_base + i for i in range(len(nodes))} if port_base is not None else set()
    ports = iter(launcher.free_ports(len(nodes) * (len(shard_ids) + 3), avoid=taken))
    had_meta = bool(old_map.meta_hosts())
    specs = []
    for i, node in enumerate(nodes):
        http_port = next(ports) if port_base is None else port_base + i
        hosts_meta = node.id in old_map.meta_members if had_meta else i < launcher.META_HOSTS
        specs.append(NodeSpec(node.id, f"http://{launcher.HOST}:{http_port}",
                              f"{launcher.HOST}:{next(ports)}",
                              {s: f"{launcher.HOST}:{next(ports)}" for s in shard_ids},
                              f"{launcher.HOST}:{next(ports)}" if hosts_meta else None))
    placement = {s.id: tuple(s.replicas) for s in old_map.shards}
    cluster = ClusterSpec(len(shard_ids), tuple(specs), placement, "even")
    plan = launcher.Plan(os.path.abspath(data_dir), durability, cluster)
    problems = validate(plan.node_config(specs[0].id))
    if problems:
        raise launcher.LaunchError("the restored cluster is invalid:\n  - " + "\n  - ".join(problems))
    return plan


def _write_shard_dumps(plan: launcher.Plan, stage: str, entry: dict[str, Any], sync: bool) -> None:
    """Every replica of the shard starts from the shard's one copy, as from a leader's snapshot."""
    shard = int(entry["shard"])
    replicas = plan.cluster.replicas(shard)
    addresses = [plan.cluster.node(n).raft[shard] for n in replicas]
    meta = restored_dump_meta(int(entry["applied_index"]), addresses)
    store = LedgerStore(os.path.join(stage, entry["file"]), shard=shard, sync=False)
    try:
        if store.fingerprint() != (int(entry["applied_index"]), entry["fingerprint"]):
            raise launcher.LaunchError(f"shard {shard}: the staged copy is not at the manifest's fingerprint")
        for node in replicas:
            directory = os.path.join(plan.node_config(node).data_dir, f"shard-{shard}")
            os.makedirs(directory, exist_ok=True)
            dump = os.path.join(directory, "raft.dump")
            write_snapshot(dump + ".tmp", store, meta, sync)
            os.replace(dump + ".tmp", dump)
            if sync:
                fsync_dir(directory)
    finally:
        store.close()


def _write_meta_dumps(plan: launcher.Plan, old_map: ClusterMap, sync: bool) -> None:
    """The map as it was (epoch, shards, slots, sections) with the new cluster's addresses."""
    new_nodes = []
    for old in old_map.nodes:
        if old.state == NODE_REMOVED:
            continue
        spec = plan.cluster.node(old.id)
        new_nodes.append(NodeEntry(spec.id, spec.http, spec.internal, tuple(sorted(spec.raft.items())),
                                   spec.meta, old.state))
    hosts = plan.cluster.meta_hosts()
    new_map = ClusterMap(old_map.epoch, tuple(new_nodes), old_map.shards, old_map.sections,
                         tuple(h.id for h in hosts))
    meta = restored_dump_meta(restored_log_index_min, [h.meta for h in hosts if h.meta])
    for host in hosts:
        directory = os.path.join(plan.node_config(host.id).data_dir, "meta")
        os.makedirs(directory, exist_ok=True)
        dump = os.path.join(directory, "raft.dump")
        write_meta_dump(dump + ".tmp", restored_log_index_min, meta, new_map, sync)
        os.replace(dump + ".tmp", dump)
        if sync:
            fsync_dir(directory)
