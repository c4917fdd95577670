"""``raftledger audit``: check the ledger from outside, trusting only HTTP answers' math and the public keys.

Self-contained on purpose (STYLE.md 16): it re-implements from docs/integrity.md the leaf format, the
RFC 9162 tree checks, the signed head message and the account hash chains, and imports nothing of the
node or the state machine that produce them, so one bug cannot hide in both.

Per shard of the cluster map it verifies the latest tree head's signatures (Ed25519, by keys from
``--keys``; at least a majority of the shard's replicas, and at least ``--min-signatures``), then the
consistency of that head with the one ``--state`` saved last time (a rewritten or truncated history
fails here), then the inclusion of the ``--tx`` transactions and of ``--sample`` random leaves per
shard, each leaf compared with the transaction the API serves; then each ``--account``'s hash chain
from genesis to the head the API reports. Exit 0 when everything verifies, 1 on any failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console
from rich.markup import escape

HEAD_PREFIX = "raftledger.tree-head.v1"
ACCOUNT_GENESIS_PREFIX = b"raftledger/account/v1\0"
http_timeout_s = 30.0
chain_page_limit = 1000
chain_pages_max = 100_000
sample_default = 8
EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


class AuditFailed(Exception):
    """What the servers answered does not verify."""


# ---- the math (docs/integrity.md) ----------------------------------------------------------------

def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def leaf_hash(leaf: bytes) -> bytes:
    return sha256(b"\x00" + leaf)


def node_hash(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right)


def root_from_inclusion(index: int, size: int, leaf_digest: bytes, path: list[bytes]) -> bytes:
    """RFC 9162 2.1.3.2: the root that ``path`` gives for leaf ``index`` of a tree of ``size``."""
    if not 0 <= index < size:
        raise AuditFailed(f"leaf index {index} is not below tree size {size}")
    fn, sn, r = index, size - 1, leaf_digest
    for p in path:
        if sn == 0:
            raise AuditFailed("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise AuditFailed("inclusion proof is too short")
    return r


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: list[bytes]) -> None:
    """RFC 9162 2.1.4.2; raises ``AuditFailed`` unless the first tree is a prefix of the second."""
    if first > second:
        raise AuditFailed(f"tree shrank from {first} to {second} leaves")
    if first == second:
        if proof or first_root != second_root:
            raise AuditFailed(f"two different roots for tree size {first}")
        return
    if first == 0:
        if proof:
            raise AuditFailed("a consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise AuditFailed("empty consistency proof")
    if first & (first - 1) == 0:
        proof = [first_root, *proof]
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            raise AuditFailed("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or fr != first_root or sr != second_root:
        raise AuditFailed(f"history between tree sizes {first} and {second} is not consistent")


def head_message(shard: int, tree_size: int, root_hex: str, timestamp: int) -> bytes:
    return f"{HEAD_PREFIX}\n{shard}\n{tree_size}\n{root_hex.lower()}\n{timestamp}".encode("ascii")


def key_id(public_key: bytes) -> str:
    return sha256(public_key)[:8].hex()


class _Bytes:
    """A reader over a leaf's or an entry's bytes; running off the end is a failure, not a crash."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise AuditFailed("record bytes end early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def text(self) -> str:
        return self.take(self.uint(2)).decode()


STATUSES = ("pending", "posted", "voided", "expired")
DIRECTIONS = ("debit", "credit")
LEAF_KINDS = {1: "record", 2: "decision", 3: "leg"}


def parse_leaf(leaf: bytes) -> dict[str, Any]:
    """The fields of a leaf (docs/integrity.md, "Leaves"); metadata stays as its msgpack bytes."""
    r = _Bytes(leaf)
    version, kind, timestamp = r.uint(1), r.uint(1), r.uint(8)
    if version != 1 or kind not in LEAF_KINDS:
        raise AuditFailed(f"unknown leaf version {version} or kind {kind}")
    out: dict[str, Any] = {"kind": LEAF_KINDS[kind], "timestamp": timestamp, "id": r.text()}
    status = r.uint(1)
    if status >= len(STATUSES):
        raise AuditFailed(f"unknown leaf status {status}")
    out.update(status=STATUSES[status], pending_id=r.text() or None, reverses=r.text() or None,
               code=r.text(), timeout_seconds=r.uint(4))
    out["shards"] = [r.uint(2) for _ in range(r.uint(1))]
    entries = []
    for _ in range(r.uint(2)):
        account, direction, amount = r.text(), r.uint(1), r.uint(8)
        entries.append({"account_id": account, "direction": DIRECTIONS[direction & 1], "amount": amount,
                        "currency": r.text(), "seq": r.uint(8), "hash": r.take(32).hex()})
    out["entries"] = entries
    out["metadata_msgpack"] = r.take(r.uint(4)).hex()
    if r.pos != len(leaf):
        raise AuditFailed("leaf has trailing bytes")
    return out


def parse_entry_bytes(data: bytes) -> dict[str, Any]:
    """An account entry's hashed bytes (the chain's format in docs/integrity.md)."""
    r = _Bytes(data)
    out = {"account_id": r.text(), "seq": r.uint(8), "transaction_id": r.text(),
           "direction": DIRECTIONS[r.uint(1) & 1], "amount": r.uint(8), "currency": r.text(),
           "status": STATUSES[min(r.uint(1), 3)],
           "balance_after": int.from_bytes(r.take(16), "big", signed=True),
           "timestamp": r.uint(8), "released": r.uint(8)}
    if r.pos != len(data):
        raise AuditFailed("entry bytes have trailing bytes")
    return out


# ---- talking to the ledger -----------------------------------------------------------------------

@dataclass
class Api:
    endpoint: str
    token: str | None = None

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = self.endpoint.rstrip("/") + path + (f"?{query}" if query else "")
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=http_timeout_s) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:300]
            raise AuditFailed(f"GET {path}: HTTP {exc.code} {body}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AuditFailed(f"GET {path}: {exc}") from None


def quoted(value: str) -> str:
    return urllib.parse.quote(value, safe="")


# ---- the audit -----------------------------------------------------------------------------------

@dataclass
class Report:
    checks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.failures, "checks": self.checks, "failures": self.failures,
                "heads": self.heads}


def load_keys(path: str) -> dict[str, tuple[str, Ed25519PublicKey]]:
    """key id -> (node, key), from a file in the shape of ``GET /v1/keys``; ids are recomputed."""
    with open(path) as f:
        listed = json.load(f)["keys"]
    keys: dict[str, tuple[str, Ed25519PublicKey]] = {}
    for k in listed:
        raw = bytes.fromhex(k["public_key"])
        if k.get("algorithm", "ed25519") != "ed25519" or key_id(raw) != k["key_id"]:
            raise AuditFailed(f"key {k.get('key_id')} of {k.get('node')}: id does not match its key")
        keys[k["key_id"]] = (k["node"], Ed25519PublicKey.from_public_bytes(raw))
    return keys


@dataclass
class Auditor:
    api: Api
    keys: dict[str, tuple[str, Ed25519PublicKey]]
    min_signatures: int
    report: Report = field(default_factory=Report)
    replicas: dict[int, int] = field(default_factory=dict)  # shard -> number of replicas (the map)
    heads: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)

    def signed_head(self, shard: int, tree_size: int | None = None) -> dict[str, Any]:
        """A head whose signatures verify; cached by (shard, size)."""
        if tree_size is not None and (shard, tree_size) in self.heads:
            return self.heads[(shard, tree_size)]
        head = self.api.get(f"/v1/shards/{shard}/tree-head", tree_size=tree_size)
        self.check_head(shard, head)
        self.heads[(shard, head["tree_size"])] = head
        return head

    def check_head(self, shard: int, head: dict[str, Any]) -> None:
        if head["shard"] != shard or (head["tree_size"] == 0 and head["root"] != sha256(b"").hex()):
            raise AuditFailed(f"shard {shard}: head does not describe this shard's tree")
        message = head_message(shard, head["tree_size"], head["root"], head["timestamp"])
        signers: set[str] = set()
        for sig in head["signatures"]:
            known = self.keys.get(sig["key_id"])
            if known is None or known[0] != sig["node"]:
                continue  # a key the auditor does not trust counts for nothing
            try:
                known[1].verify(bytes.fromhex(sig["signature"]), message)
            except (InvalidSignature, ValueError):
                raise AuditFailed(f"shard {shard}: bad signature by {sig['node']} on head of size "
                                  f"{head['tree_size']}") from None
            signers.add(known[0])
        needed = max(self.replicas.get(shard, 1) // 2 + 1, self.min_signatures)
        if len(signers) < needed:
            raise AuditFailed(f"shard {shard}: head of size {head['tree_size']} has {len(signers)} "
                              f"trusted signatures, {needed} needed")

    def check_consistency(self, shard: int, old: dict[str, Any], new: dict[str, Any]) -> None:
        first, second = old["tree_size"], new["tree_size"]
        if first > second:
            raise AuditFailed(f"shard {shard}: tree shrank from {first} to {second} leaves (truncated)")
        answer = self.api.get(f"/v1/shards/{shard}/consistency", first=first, second=second)
        proof = [bytes.fromhex(h) for h in answer["proof"]]
        verify_consistency(first, second, bytes.fromhex(old["root"]), bytes.fromhex(new["root"]), proof)

    def check_proof(self, proof: dict[str, Any], txid: str | None) -> dict[str, Any]:
        """Inclusion of the proof's leaf under a signed head, and the leaf against the served record."""
        shard, size, index = proof["shard"], proof["tree_size"], proof["leaf_index"]
        head = self.signed_head(shard, size)
        if head["root"] != proof["root"]:
            raise AuditFailed(f"shard {shard}: proof root differs from the signed head of size {size}")
        leaf = bytes.fromhex(proof["leaf"])
        path = [bytes.fromhex(h) for h in proof["audit_path"]]
        if root_from_inclusion(index, size, leaf_hash(leaf), path).hex() != head["root"]:
            raise AuditFailed(f"shard {shard}: leaf {index} is not in the signed tree of size {size}")
        fields = parse_leaf(leaf)
        if txid is not None and fields["id"] != txid:
            raise AuditFailed(f"proof for {txid} proves leaf of {fields['id']}")
        self.compare_with_served(fields)
        return fields

    def compare_with_served(self, leaf: dict[str, Any]) -> None:
        """The transaction the API serves must say what the signed leaf says (its status may have
        moved on: a hold is posted, voided or expires later; a cross-shard leg's entries are its own)."""
        if leaf["kind"] == "leg":
            return
        served = self.api.get(f"/v1/transactions/{quoted(leaf['id'])}")
        mine = [(e["account_id"], e["direction"], e["amount"], e["currency"]) for e in leaf["entries"]]
        theirs = [(e["account_id"], e["direction"], int(e["amount"]), e["currency"])
                  for e in served.get("entries", [])]
        if leaf["kind"] == "record" and leaf["shards"]:  # a leg's finish: its entries are a subset
            if not set(mine) <= set(theirs):
                raise AuditFailed(f"transaction {leaf['id']}: served entries differ from the signed leaf")
            return
        if mine != theirs or served.get("timestamp") != leaf["timestamp"] and leaf["status"] != "expired":
            raise AuditFailed(f"transaction {leaf['id']}: served record differs from the signed leaf")

    def check_chain(self, account_id: str) -> int:
        """The account's whole hash chain from genesis; returns its length."""
        prev = sha256(ACCOUNT_GENESIS_PREFIX + account_id.encode())
        after, seq = 0, 0
        for _ in range(chain_pages_max):
            page = self.api.get(f"/v1/accounts/{quoted(account_id)}/chain", after_seq=after,
                                limit=chain_page_limit)
            for entry in page["entries"]:
                seq += 1
                data = bytes.fromhex(entry["bytes"])
                fields = parse_entry_bytes(data)
                if entry["seq"] != seq or fields["seq"] != seq or fields["account_id"] != account_id:
                    raise AuditFailed(f"account {account_id}: entry {entry['seq']} out of place")
                if bytes.fromhex(entry["prev_hash"]) != prev or sha256(prev + data).hex() != entry["hash"]:
                    raise AuditFailed(f"account {account_id}: hash chain breaks at seq {seq}")
                for name in ("transaction_id", "direction", "amount", "status", "balance_after"):
                    if name in entry and entry[name] != fields[name]:
                        raise AuditFailed(f"account {account_id}: seq {seq} shows another {name} "
                                          "than its hashed bytes")
                prev = bytes.fromhex(entry["hash"])
            if page.get("next") is None:
                break
            after = page["next"]
        account = self.api.get(f"/v1/accounts/{quoted(account_id)}")
        if account["seq"] != seq or account["head"] != prev.hex():
            raise AuditFailed(f"account {account_id}: head {account['head'][:16]} at seq {account['seq']} "
                              f"is not the end of its chain (seq {seq})")
        return seq


def audit(auditor: Auditor, state: dict[str, Any], txids: list[str], accounts: list[str],
          sample: int, rng: random.Random) -> dict[str, Any]:
    """Run every check; failures are collected, not raised. Returns the heads to save as state."""
    report = auditor.report
    cmap = auditor.api.get("/v1/cluster/map")
    auditor.replicas = {s["id"]: len(s["replicas"]) for s in cmap["shards"]}
    saved = state.get("heads", {})
    new_state: dict[str, Any] = {"heads": dict(saved)}
    for shard in sorted(auditor.replicas):
        _step(report, f"shard {shard}: signed head", lambda s=shard: _shard(auditor, s, saved, new_state,
                                                                             sample, rng))
    for txid in txids:
        _step(report, f"transaction {txid}: included in a signed head",
              lambda t=txid: auditor.check_proof(auditor.api.get(f"/v1/transactions/{quoted(t)}/proof"), t))
    for account_id in accounts:
        _step(report, f"account {account_id}: hash chain from genesis",
              lambda a=account_id: auditor.check_chain(a))
    return new_state


def _shard(auditor: Auditor, shard: int, saved: dict[str, Any], new_state: dict[str, Any], sample: int,
           rng: random.Random) -> None:
    head = auditor.signed_head(shard)
    auditor.report.heads[str(shard)] = head
    old = saved.get(str(shard))
    if old is not None:
        _step(auditor.report, f"shard {shard}: consistent with the head saved at size {old['tree_size']}",
              lambda: auditor.check_consistency(shard, old, head))
        if any(f.startswith(f"shard {shard}: consistent") for f in auditor.report.failures):
            return  # keep the saved head: the next run must fail again
    new_state["heads"][str(shard)] = {k: head[k] for k in ("tree_size", "root", "timestamp")}
    size = head["tree_size"]
    for index in sorted(rng.sample(range(size), min(sample, size))):
        _step(auditor.report, f"shard {shard}: leaf {index} included",
              lambda i=index: auditor.check_proof(
                  auditor.api.get(f"/v1/shards/{shard}/leaves/{i}/proof", tree_size=size), None))


def _step(report: Report, name: str, check: Any) -> None:
    try:
        check()
    except AuditFailed as exc:
        report.failures.append(f"{name}: {exc}")
    except (KeyError, TypeError, ValueError) as exc:
        report.failures.append(f"{name}: malformed answer ({type(exc).__name__}: {exc})")
    else:
        report.checks.append(name)


# ---- the command ---------------------------------------------------------------------------------

def add_parser(sub: Any) -> None:
    parser = sub.add_parser("audit", help="verify signed tree heads, proofs and hash chains from outside")
    parser.add_argument("--endpoint", required=True, metavar="URL", help="any node's HTTP URL")
    parser.add_argument("--keys", required=True, metavar="FILE",
                        help="the trusted public keys, in the shape of GET /v1/keys")
    parser.add_argument("--state", metavar="FILE", help="the heads seen last time: checked for "
                        "consistency with today's, then replaced by them")
    parser.add_argument("--tx", action="append", default=[], metavar="ID", help="prove this transaction")
    parser.add_argument("--account", action="append", default=[], metavar="ID",
                        help="verify this account's hash chain from genesis")
    parser.add_argument("--sample", type=int, default=sample_default, metavar="N",
                        help=f"random leaves proved per shard (default {sample_default})")
    parser.add_argument("--min-signatures", type=int, default=1, metavar="N",
                        help="never accept a head with fewer trusted signers (the map's replica "
                             "count, which sets the majority, is itself untrusted)")
    parser.add_argument("--token", default=os.environ.get("RAFTLEDGER_TOKEN"), help="bearer token")
    parser.add_argument("--json", action="store_true", help="print one JSON document, for scripts")


def run(args: argparse.Namespace) -> int:
    try:
        keys = load_keys(args.keys)
        state = _load_state(args.state)
    except (OSError, ValueError, KeyError, AuditFailed) as exc:
        print(f"raftledger audit: {exc}")
        return EXIT_UNUSABLE
    auditor = Auditor(Api(args.endpoint, args.token), keys, args.min_signatures)
    try:
        new_state = audit(auditor, state, args.tx, args.account, max(args.sample, 0), random.Random())
    except AuditFailed as exc:
        auditor.report.failures.append(str(exc))
        new_state = state
    report = auditor.report
    if args.state and not report.failures:
        _save_state(args.state, new_state)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        _render(Console(highlight=False), report)
    return EXIT_OK if not report.failures else EXIT_FAILED


def _load_state(path: str | None) -> dict[str, Any]:
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        state: dict[str, Any] = json.load(f)
    return state


def _save_state(path: str, state: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _render(console: Console, report: Report) -> None:
    for check in report.checks:
        console.print(f"[green]ok[/green]    {escape(check)}")
    for failure in report.failures:
        console.print(f"[red]FAIL[/red]  {escape(failure)}")
    verdict = "[green]verified[/green]" if not report.failures else "[red]audit failed[/red]"
    console.print(f"{verdict}: {len(report.checks)} checks passed, {len(report.failures)} failed")

