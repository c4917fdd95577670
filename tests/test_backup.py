"""``raftledger backup``, ``restore`` and ``verify``, driven as a user would (subprocesses) against real
clusters: a backup taken while a writer keeps writing (cross-shard transactions mostly) restores to a
cluster that ``raftledger up`` starts with every write the backup's snapshot points hold, the same
balances and fingerprints, on which ``verify`` passes at once, and that takes new writes; a damaged
backup is refused; a replica damaged offline fails ``verify``. The cut check a backup relies on is
tested on store copies taken at chosen steps of two-phase commit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any

import lmdb
import pytest
from raftledger.cluster import launcher
from raftledger.cluster.backup import read_copy
from raftledger.cluster.cut import cut_problems, imbalances, settled_totals, summarize
from raftledger.cluster.testing import LocalCluster, UpProcess
from raftledger.node.testing import consecutive_free_ports
from raftledger.statemachine.codec import payload_hash
from raftledger.statemachine.commands import (
    DECIDE_NEW,
    LEG_POST,
    Complete,
    Decide,
    FinishLeg,
    PrepareLeg,
    TxEntry,
)
from raftledger.statemachine.records import Transaction
from raftledger.statemachine.store import LedgerStore
from raftledger.statemachine.testing import Harness, transfer
from raftledger.statemachine.testing import account as new_account

CURRENCY = "USD"
UNTAGGED = [f"acct-{i}" for i in range(8)]  # spread over both shards: transfers among them cross shards
TAGGED = ["cash:{u1}", "alice:{u1}"]  # one shard: transfers between them are single-shard
writes_max = 400
writer_time_max_s = 90.0
acked_before_backup_min = 20
command_timeout_s = 300.0
up_timeout_s = 120.0
ACCOUNT_ROW_DEBITS_POSTED = 41  # byte offset in an account row (statemachine/layout.py, audit._ACCOUNT)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", *args], capture_output=True,
                          text=True, timeout=command_timeout_s)


def call(method: str, url: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    data = None if body is None else json.dumps(body).encode()
    return launcher.http_request(method, url, data, timeout_s=30.0)


def quoted(value: str) -> str:
    return urllib.parse.quote(value, safe="")


class Writer:
    """Transfers from a few threads, each one at a time, until told to stop (bounded in count and
    time), most of them between shards; remembers every acknowledged one with its X-Ledger-Token and
    when it was acknowledged."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.acked: list[tuple[str, str, float]] = []  # (id, token, monotonic time of the ack)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self.threads)

    def join(self, timeout_s: float) -> None:
        for thread in self.threads:
            thread.join(timeout_s)

    def _run(self, k: int) -> None:
        deadline = time.monotonic() + writer_time_max_s
        for n in range(writes_max):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            if n % 5 == 4:
                body = {"id": f"t-{k}-{n}:{{u1}}", "debit_account_id": TAGGED[0],
                        "credit_account_id": TAGGED[1], "amount": n + 1, "currency": CURRENCY}
            else:
                debit, credit = UNTAGGED[(n + k) % 8], UNTAGGED[(n * 3 + k + 1) % 8]
                if debit == credit:
                    credit = UNTAGGED[(n + k + 1) % 8]
                body = {"id": f"t-{k}-{n}", "debit_account_id": debit, "credit_account_id": credit,
                        "amount": n + 1, "currency": CURRENCY}
            try:
                status, headers, _ = call("POST", f"{self.url}/v1/transactions", body)
            except OSError:
                continue
            if status == 201:
                self.acked.append((body["id"], headers.get("X-Ledger-Token", ""), time.monotonic()))


# -- the cut check, on copies of real stores taken at chosen steps of two-phase commit -----------------

HOME, A, B = 0, 1, 2


class ThreeShards:
    """Shard 0 is the home of ``x1``, a transfer from alice (shard 1) to bob (shard 2); ``copy``
    keeps a shard's store as it is now, as a backup's copy would."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.stores = [LedgerStore(str(root / f"s{i}.mdb"), shard=i, map_size=2**26) for i in range(3)]
        self.logs = [Harness(store) for store in self.stores]
        self.copies: dict[int, str] = {}
        assert self.logs[A].one(new_account("alice")).ok and self.logs[B].one(new_account("bob")).ok
        self.cmd = transfer("x1", "alice", "bob", 70)
        self.digest = payload_hash(self.cmd)
        self.prepared: dict[int, Any] = {}

    def copy(self, shard: int) -> None:
        path = str(self.root / f"copy-{shard}.mdb")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.stores[shard].copy_to_fd(fd)
        finally:
            os.close(fd)
        self.copies[shard] = path

    def prepare(self, shard: int) -> None:
        entries = tuple(e for e in self.cmd.entries if (e.account_id == "alice") == (shard == A))
        leg = PrepareLeg("x1", HOME, self.digest, entries, shards=(A, B))
        self.prepared[shard] = self.logs[shard].one(leg)
        assert self.prepared[shard].ok

    def decide(self) -> None:
        placed = []
        for shard in (A, B):
            record = self.prepared[shard].record
            assert isinstance(record, Transaction)
            placed += [TxEntry(e.account_id, e.direction, e.amount, e.currency, e.seq, e.hash)
                       for e in record.entries]
        assert self.logs[HOME].one(Decide("x1", self.digest, DECIDE_NEW, 0, {}, tuple(placed),
                                          shards=(A, B))).ok

    def finish(self, shard: int) -> None:
        assert self.logs[shard].one(FinishLeg("x1", self.digest, LEG_POST, "x1")).ok

    def check(self) -> tuple[list[str], list[str]]:
        """(cut problems, imbalances once open legs are settled) of the copies."""
        cuts = {}
        for shard, path in self.copies.items():
            with read_copy(path, shard) as reader:
                cuts[shard] = summarize(reader, 0)
        return cut_problems(cuts), imbalances(settled_totals(cuts))

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture
def shards(tmp_path):
    three = ThreeShards(tmp_path)
    yield three
    three.close()


def test_a_cut_with_a_decision_whose_participant_was_copied_before_its_prepare_is_refused(shards):
    shards.prepare(A)
    shards.copy(B)  # before its prepare
    shards.prepare(B)
    shards.copy(A)
    shards.decide()
    shards.copy(HOME)  # after the decision
    problems, _ = shards.check()
    assert problems == ["shard 0 decided x1, but shard 2 has no leg of x1 (read before its prepare)"]


def test_a_cut_with_a_leg_finished_before_its_home_decided_is_refused(shards):
    shards.prepare(A)
    shards.prepare(B)
    shards.copy(HOME)  # before the decision
    shards.copy(B)
    shards.decide()
    shards.finish(A)
    shards.copy(A)  # after its finish
    problems, _ = shards.check()
    assert problems == ["leg x1 on shard 1 is posted by x1, which its home shard 0 had not decided when read"]


def test_a_cut_with_a_completed_decision_and_a_leg_still_prepared_is_refused(shards):
    shards.prepare(A)
    shards.prepare(B)
    shards.copy(B)  # prepared
    shards.decide()
    shards.finish(A)
    shards.finish(B)
    assert shards.logs[HOME].one(Complete("x1")).ok
    shards.copy(HOME)
    shards.copy(A)
    problems, _ = shards.check()
    assert problems == ["shard 0 decided x1 and completed it, but its leg on shard 2 is still prepared"]


@pytest.mark.parametrize("step", ["undecided", "decided", "half-finished", "done"])
def test_consistent_cuts_in_flight_balance_once_open_legs_are_settled_as_decided(shards, step):
    shards.prepare(A)
    if step != "undecided":
        shards.prepare(B)
        shards.decide()
    if step in ("half-finished", "done"):
        shards.finish(A)
    if step == "done":
        shards.finish(B)
    for shard in (HOME, A, B):
        shards.copy(shard)
    problems, unbalanced = shards.check()
    assert problems == [] and unbalanced == []
    cuts = {}
    for shard, path in shards.copies.items():
        with read_copy(path, shard) as reader:
            cuts[shard] = summarize(reader, 0)
    raw = {c: sum(cut.currencies.get(c, [0] * 4)[0] - cut.currencies.get(c, [0] * 4)[1]
                  for cut in cuts.values()) for c in ("BRL",)}
    assert (raw["BRL"] != 0) == (step == "half-finished")  # what the settling accounts for


# -- backup, restore and verify of real clusters -----------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("source"), nodes=3, shards=2, durability="none") as cluster:
        url = cluster.urls[cluster.node_ids[0]]
        for account in UNTAGGED + TAGGED:
            status, _, body = call("POST", f"{url}/v1/accounts", {"id": account, "currency": CURRENCY})
            assert status == 201, body
        yield cluster


@pytest.fixture(scope="module")
def backed_up(source, tmp_path_factory):
    """A backup taken while the writer writes; (backup dir, manifest, writer, when the backup began)."""
    url = source.urls[source.node_ids[0]]
    writer = Writer(url)
    writer.start()
    try:
        launcher.wait_until(lambda: len(writer.acked) >= acked_before_backup_min, writer_time_max_s,
                            "the writer's first acknowledged writes")
        directory = str(tmp_path_factory.mktemp("backups") / "b1")
        began = time.monotonic()
        done = cli("backup", directory, "--endpoint", url, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        assert writer.alive(), "the writer must still be writing when the backup is done"
    finally:
        writer.stop.set()
        writer.join(writer_time_max_s)
    manifest = json.loads(done.stdout)
    with open(os.path.join(directory, "manifest.json")) as f:
        assert json.load(f) == manifest
    return directory, manifest, writer, began


def _token_parts(token: str) -> dict[int, int]:
    return {int(s): int(i) for s, i in (part.split(":") for part in token.split(",") if part)}


@pytest.mark.slow
def test_backup_while_writing_restores_to_a_cluster_with_every_acknowledged_write(backed_up, source,
                                                                                  tmp_path):
    directory, manifest, writer, began = backed_up
    points = {s["shard"]: s["applied_index"] for s in manifest["shards"]}
    assert sorted(points) == [0, 1] and manifest["map"]["epoch"] >= 1
    for entry in manifest["shards"]:
        assert os.path.getsize(os.path.join(directory, entry["file"])) == entry["bytes"]

    new = str(tmp_path / "restored")
    done = cli("restore", directory, "--data-dir", new, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    port_base = consecutive_free_ports(3, first=23000)
    up = UpProcess("--dev", "--data-dir", new, "--port-base", str(port_base), "--durability", "none",
                   "--no-demo", timeout_s=up_timeout_s)
    try:
        up.wait_for("cluster is up")
        restored = f"http://127.0.0.1:{port_base + 1}"
        source_url = source.urls[source.node_ids[0]]
        single, cross = _check_transactions(restored, source_url, writer, began, points)
        assert single and cross, "the backup should hold single-shard and cross-shard transactions"
        _check_balances(restored, directory, manifest)

        # The copies form a consistent cut: the restored cluster verifies on the first run, with
        # transactions in flight at the cut settled as their homes decided (or not yet).
        checked = cli("verify", "--endpoint", restored, "--json")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        report = json.loads(checked.stdout)
        assert all(len(report["shards"][str(s)]["fingerprints"]) == 3 for s in points)
        for entry in manifest["shards"]:  # every replica starts from the copy (resolvers may go on)
            for i in range(3):
                status, _, answer = call("GET", f"http://127.0.0.1:{port_base + i}/v1/admin/shards/"
                                                f"{entry['shard']}/fingerprint?index={entry['applied_index']}")
                assert status == 200, answer
                assert (answer["index"], answer["fingerprint"]) == (entry["applied_index"],
                                                                    entry["fingerprint"])

        status, headers, body = call("POST", f"{restored}/v1/transactions", {
            "id": "after-restore:{u1}", "debit_account_id": TAGGED[0], "credit_account_id": TAGGED[1],
            "amount": 7, "currency": CURRENCY})
        assert status == 201, body
        (shard, index), = _token_parts(headers["X-Ledger-Token"]).items()
        assert index > points[shard]
    finally:
        assert up.stop() == 0
    with open(os.path.join(new, "cluster.json")) as f:
        plan = json.load(f)
    assert [n["http"] for n in plan["nodes"]] == [f"http://127.0.0.1:{port_base + i}" for i in range(3)]
    assert not os.path.exists(os.path.join(new, "restore"))


def _check_transactions(restored: str, source_url: str, writer: Writer, began: float,
                        points: dict[int, int]) -> tuple[int, int]:
    """Acknowledged before the backup began: present, as in the source. A single-shard write is
    present exactly when its token's index is at or below its shard's snapshot point."""
    single = cross = 0
    for txid, token, acked_at in writer.acked:
        status, _, record = call("GET", f"{restored}/v1/transactions/{quoted(txid)}")
        parts = _token_parts(token)
        in_snapshot = all(index <= points[shard] for shard, index in parts.items())
        if acked_at < began or (len(parts) == 1 and in_snapshot):
            assert status == 200, (txid, token, record)
            _, _, original = call("GET", f"{source_url}/v1/transactions/{quoted(txid)}")
            assert record == original
            if len(record["shards"]) > 1:
                cross += 1
            else:
                single += 1
        elif len(parts) == 1:
            assert status == 404, (txid, token, points, record)
    return single, cross


def _check_balances(restored: str, directory: str, manifest: dict[str, Any]) -> None:
    """Every account of every backed-up shard has, in the restored cluster, the balances it had in
    the copy (cross-shard legs the copy left decided but unfinished may be posted since)."""
    seen = 0
    for entry in manifest["shards"]:
        with read_copy(os.path.join(directory, entry["file"]), entry["shard"]) as reader:
            accounts = [reader.account(a) for a in reader.account_ids()]
        for account in accounts:
            assert account is not None
            status, _, body = call("GET", f"{restored}/v1/accounts/{quoted(account.id)}/balance")
            assert status == 200, body
            # A cross-shard leg the copy holds as decided but unfinished may be finished by the
            # restored cluster's resolvers already: pending moves to posted, never the other way.
            restored_state = (body["debits_posted"] + body["debits_pending"],
                              body["credits_posted"] + body["credits_pending"])
            assert restored_state == (account.debits_posted + account.debits_pending,
                                      account.credits_posted + account.credits_pending), body
            assert body["debits_posted"] >= account.debits_posted, body
            assert body["credits_posted"] >= account.credits_posted, body
            seen += 1
    assert seen == len(UNTAGGED) + len(TAGGED)


@pytest.mark.slow
def test_restore_refuses_a_damaged_backup_and_writes_nothing(backed_up, tmp_path):
    directory = backed_up[0]
    damaged = str(tmp_path / "damaged")
    shutil.copytree(directory, damaged)
    victim = os.path.join(damaged, "shard-1.mdb")
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    new = str(tmp_path / "never")
    done = cli("restore", damaged, "--data-dir", new)
    assert done.returncode == 1
    assert "damaged backup" in done.stderr and "shard-1.mdb" in done.stderr
    assert not os.path.exists(new)

    os.remove(victim)
    done = cli("restore", damaged, "--data-dir", new)
    assert done.returncode == 1 and "missing" in done.stderr
    assert not os.path.exists(new)


@pytest.mark.slow
def test_backup_refuses_a_directory_that_is_not_empty(source, tmp_path):
    directory = tmp_path / "used"
    directory.mkdir()
    (directory / "keep.txt").write_text("mine")
    done = cli("backup", str(directory), "--endpoint", source.urls[source.node_ids[0]])
    assert done.returncode == 1 and "not an empty directory" in done.stderr
    assert os.listdir(directory) == ["keep.txt"]


@pytest.mark.slow
def test_verify_passes_on_a_healthy_cluster_and_fails_naming_a_replica_damaged_offline(source, backed_up):
    url = source.urls[source.node_ids[0]]
    healthy = cli("verify", "--endpoint", url, "--json")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert json.loads(healthy.stdout)["ok"] is True

    victim_node, account = source.node_ids[2], TAGGED[1]
    status, _, body = call("GET", f"{url}/v1/accounts/{quoted(account)}")
    assert status == 200
    shard_id = body["shard"]
    source.stop(victim_node)
    _add_to_debits_posted(source.plan.node_config(victim_node).data_dir, shard_id, account)
    source.start_node(victim_node)
    source.wait_ready()

    damaged = cli("verify", "--endpoint", url)
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    assert f"shard {shard_id} on {victim_node}" in damaged.stdout
    assert account in damaged.stdout
    as_json = cli("verify", "--endpoint", url, "--json")
    assert as_json.returncode == 1
    problems = json.loads(as_json.stdout)["problems"]
    assert any(f"shard {shard_id} on {victim_node}: {account}" in p for p in problems)


def _add_to_debits_posted(node_dir: str, shard: int, account: str) -> None:
    """Change one account's stored total behind the ledger's back (the node is stopped)."""
    directory = os.path.join(node_dir, f"shard-{shard}")
    try:
        with open(os.path.join(directory, "CURRENT")) as f:
            generation = int(f.read().strip())
    except FileNotFoundError:
        generation = 0
    env = lmdb.open(os.path.join(directory, f"state.{generation}.mdb"), subdir=False, max_dbs=16)
    try:
        accounts = env.open_db(b"accounts")
        with env.begin(write=True) as txn:
            row = bytearray(txn.get(account.encode(), db=accounts))
            at = ACCOUNT_ROW_DEBITS_POSTED
            value = int.from_bytes(row[at:at + 16], "big") + 1
            row[at:at + 16] = value.to_bytes(16, "big")
            txn.put(account.encode(), bytes(row), db=accounts)
    finally:
        env.close()
