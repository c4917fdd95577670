"""The workloads of a run: a bank, a retry storm and a feed subscriber, each a bounded thread.

- **Bank**: transfers among a fixed set of accounts spread over every shard (single-shard when both
  accounts share a hash tag, cross-shard otherwise), all ``debits_must_not_exceed_credits``, and
  concurrent balance reads at consistency ``local``, ``min_token`` (the token and entry of the
  worker's own last write) and ``linearizable``. Each request goes, as it is and once, to a node
  picked at random, which forwards it: the history records what that one attempt answered. A
  linearizable read reads every bank account at one consistent cut of the shards (``read_cut``),
  with the transfers in flight between shards, so that a checker can sum the money.
- **Retry storm**: the same transaction ids (payload unchanged) sent again through other nodes.
- **Feed**: ``Client.subscribe`` from the first event of every shard, recording what it hands out.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from raftledger.client import Client
from raftledger.client.core import Send, TransportFailure
from raftledger.client.transport import SyncTransport
from raftledger.cluster.cut import OPEN, OUTCOME_NAMES, ShardCut, cut_problems, settling
from raftledger.cluster.router import route, table_of

from .history import FAIL, INFO, OK, History

CURRENCY = "USD"
FLAGS = ["debits_must_not_exceed_credits"]
initial_balance = 1000
accounts_per_shard = 3
amount_max = 400  # large enough against balances of ~1000 that refusals (exceeds_credits) happen
request_timeout_s = 5.0
tag_search_max = 10_000
recent_ids_max = 200  # transfers the retry storm picks from
cut_readings_max = 5  # readings of every shard for one linearizable read, until one is a consistent cut
cut_recent_s = 300  # a reading keeps the cross-shard steps of the last 5 minutes ...
cut_judged_s = 150  # ... and the cut judges those of the last 2.5 (each step's cause is in the window)
READ_FIELDS = ("balance", "available", "seq", "debits_pending", "credits_pending", "currency")
NOT_APPLIED = frozenset({"overloaded", "rate_limited"})  # the node says it did not carry it out


@dataclass
class Bank:
    """The accounts of a run and the money among them."""

    accounts: list[str]
    funding: str
    run_id: str = ""
    setup_ids: list[str] = field(default_factory=list)
    by_shard: dict[int, list[str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return initial_balance * len(self.accounts)

    @property
    def funded(self) -> dict[str, int]:
        """Currency -> the money among the bank's accounts."""
        return {CURRENCY: self.total}

    def initial(self) -> dict[str, int]:
        return {a: initial_balance for a in self.accounts}

    def tag(self, account: str) -> str:
        return account[account.index("{"):account.index("}") + 1]


def tags_per_shard(cmap: dict[str, Any]) -> dict[int, str]:
    """A hash tag routed to each shard of the map (``{g<k>}``, the first k that lands there)."""
    table = table_of({s["id"]: [tuple(r) for r in s["slot_ranges"]] for s in cmap["shards"]})
    found: dict[int, str] = {}
    for k in range(tag_search_max):
        tag = f"{{g{k}}}"
        found.setdefault(route(table, f"x:{tag}"), tag)
        if len(found) == len(cmap["shards"]):
            return found
    raise RuntimeError("no hash tag found for some shard")


def open_bank(client: Client, run_id: str) -> Bank:
    """Create the accounts and fund each with ``initial_balance`` (before any fault)."""
    tags = tags_per_shard(client.cluster_map())
    by_shard = {shard: [f"{run_id}-a{i}:{tag}" for i in range(accounts_per_shard)]
                for shard, tag in sorted(tags.items())}
    accounts = [a for group in by_shard.values() for a in group]
    funding = f"{run_id}-bank:{tags[min(tags)]}"
    client.create_account(id=funding, currency=CURRENCY, normal="debit")
    for account in accounts:
        client.create_account(id=account, currency=CURRENCY, normal="credit", flags=FLAGS)
    bank = Bank(accounts, funding, run_id, by_shard=by_shard)
    for i, account in enumerate(accounts):
        txid = f"{run_id}-fund{i}:{bank.tag(account)}"
        client.transfer(funding, account, initial_balance, CURRENCY, id=txid)
        bank.setup_ids.append(txid)
    return bank


class Worker(threading.Thread):
    """One process of the history; subclasses say what one step does."""

    def __init__(self, name: str, history: History, urls: list[str], token: str | None,
                 stop: threading.Event, rng: random.Random) -> None:
        super().__init__(name=name, daemon=True)
        self.history, self.urls, self.token, self.stop_event, self.rng = history, urls, token, stop, rng
        self.transport = SyncTransport()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set() and not self.history.full:
                self.step()
        except BaseException as exc:  # reported by the runner: a harness bug must not pass silently
            self.error = exc
        finally:
            self.transport.close()

    def step(self) -> None:
        raise NotImplementedError

    def send(self, method: str, path: str, body: Any = None,
             url: str | None = None) -> tuple[int | None, dict[str, str], Any]:
        """One attempt at one node (``url``, else one at random); (None, {}, reason) when no answer
        came."""
        url = url or self.rng.choice(self.urls)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        raw = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            raw = json.dumps(body).encode()
        answer = self.transport.send(Send(method, url + path, headers, raw, request_timeout_s))
        if isinstance(answer, TransportFailure):
            return None, {}, answer.reason
        try:
            decoded = json.loads(answer.body or b"null")
        except ValueError:
            decoded = answer.body.decode(errors="replace")
        return answer.status, {k.lower(): v for k, v in answer.headers.items()}, decoded

    def transfer(self, body: dict[str, Any], retry: bool = False) -> dict[str, Any] | None:
        """Send one transfer; the transaction on success."""
        op = self.history.invoke(self.name, "transfer", txid=body["id"], debit=body["debit_account_id"],
                                 credit=body["credit_account_id"], amount=body["amount"], retry=retry)
        status, headers, answer = self.send("POST", "/v1/transactions", body)
        if status in (200, 201):
            seqs = {e["account_id"]: e["seq"] for e in answer.get("entries", [])}
            self.history.complete(op, OK, seqs=seqs, token=headers.get("x-ledger-token"))
            return dict(answer)
        code = _code(answer) if status is not None else "no_answer"
        definite = status is not None and (400 <= status < 500 or code in NOT_APPLIED)
        self.history.complete(op, FAIL if definite else INFO, code, status=status)
        return None


def _code(answer: Any) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("code"))
    return "unreadable_answer"


class BankWorker(Worker):
    def __init__(self, *args: Any, bank: Bank, storm: deque[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bank, self.storm = bank, storm
        self.sent = 0
        self.last_write: tuple[str, int, str] | None = None  # account, seq, token
        self.replicas: dict[int, list[str]] | None = None  # shard -> urls of its replicas' nodes

    def step(self) -> None:
        if self.rng.random() < 0.55:
            self.step_transfer()
        else:
            self.step_read()

    def step_transfer(self) -> None:
        debit, credit = self.rng.sample(self.bank.accounts, 2)
        self.sent += 1
        body = {"id": f"{self.name}-{self.sent}:{self.bank.tag(debit)}", "debit_account_id": debit,
                "credit_account_id": credit, "amount": self.rng.randint(1, amount_max),
                "currency": CURRENCY}
        self.storm.append(body)
        transaction = self.transfer(body)
        token = self.history.ops[-1].fields.get("token") if transaction else None
        if transaction and token:
            account = self.rng.choice([debit, credit])
            seq = next(e["seq"] for e in transaction["entries"] if e["account_id"] == account)
            self.last_write = (account, seq, token)

    def step_read(self) -> None:
        consistency = self.rng.choice(["local", "min_token", "linearizable"])
        if consistency == "linearizable":
            self.read_cut()
            return
        if consistency == "min_token" and self.last_write is None:
            consistency = "local"
        params: dict[str, str] = {}
        fields: dict[str, Any] = {"consistency": consistency}
        if consistency == "min_token":
            account, seq, token = self.last_write  # type: ignore[misc]
            params["min_token"] = token
            fields["min_seq"] = seq
        else:
            account = self.rng.choice(self.bank.accounts)
        op = self.history.invoke(self.name, "read", account=account, **fields)
        path = f"/v1/accounts/{quote(account, safe='')}/balance"
        status, headers, answer = self.send("GET", path + ("?" + urlencode(params) if params else ""))
        if status == 200:
            value = {k: answer[k] for k in READ_FIELDS}
            self.history.complete(op, OK, value=value, node=headers.get("x-ledger-node"))
        else:
            code = _code(answer) if status is not None else "no_answer"
            self.history.complete(op, FAIL if status is not None else INFO, code, status=status)


    def read_cut(self) -> None:
        """Every bank account, linearizably, at one consistent cut of the shards: each shard's
        accounts and cross-shard state from one read transaction of one replica (the admin cut
        route, after a read barrier), every shard at once, read again (bounded) until the readings
        fit together (``cluster.cut.cut_problems``). Recorded: each account's balance, the cut, and
        each open leg of the run's transfers with the outcome its home decided for it."""
        op = self.history.invoke(self.name, "read", consistency="linearizable", accounts=self.bank.accounts)
        code, status = "no_consistent_cut", None
        for attempt in range(1, cut_readings_max + 1):
            started_ns = time.time_ns()
            readings = self.read_every_shard(started_ns - cut_recent_s * 10**9)
            failed = [r for r in readings.values() if isinstance(r, tuple)]
            if failed:
                status, code = failed[0]
                break
            cuts = {s: ShardCut.from_json(body) for s, body in readings.items()}  # type: ignore[arg-type]
            if not cut_problems(cuts, started_ns - cut_judged_s * 10**9):
                values = {a: {k: b[k] for k in READ_FIELDS}
                          for body in readings.values() for a, b in body["balances"].items()}  # type: ignore[union-attr]
                self.history.complete(op, OK, values=values, in_flight=self.in_flight(cuts),
                                      cut={str(s): c.applied_index for s, c in cuts.items()},
                                      readings=attempt)
                return
        self.history.complete(op, FAIL if status is not None or code == "no_consistent_cut" else INFO,
                              code, status=status)

    def read_every_shard(self, since_ns: int) -> dict[int, dict[str, Any] | tuple[int | None, str]]:
        """Shard -> its reading, or (status, code) when none came; one thread per shard."""
        urls = {shard: self.replica_url(shard) for shard in self.bank.by_shard}

        def one(shard: int) -> dict[str, Any] | tuple[int | None, str]:
            params = {"since_ns": since_ns, "accounts": ",".join(self.bank.by_shard[shard]),
                      "consistency": "linearizable"}
            status, _headers, answer = self.send("GET", f"/v1/admin/shards/{shard}/cut?{urlencode(params)}",
                                                 url=urls[shard])
            if status == 200:
                return dict(answer)
            if status == 404:
                self.replicas = None  # that node holds no replica of the shard now: ask the map again
            return status, _code(answer) if status is not None else "no_answer"

        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            return dict(zip(urls, pool.map(one, urls), strict=True))

    def replica_url(self, shard: int) -> str | None:
        """A node holding a replica of ``shard`` (from the cluster map, read again after a 404);
        None (a node at random) while no map could be read."""
        if self.replicas is None:
            status, _headers, cmap = self.send("GET", "/v1/cluster/map")
            if status != 200:
                return None
            urls = {n["id"]: n["url"] for n in cmap["nodes"]}
            self.replicas = {s["id"]: [urls[n] for n in s["replicas"] if n in urls] for s in cmap["shards"]}
        return self.rng.choice(self.replicas.get(shard) or [None])

    def in_flight(self, cuts: dict[int, ShardCut]) -> list[dict[str, Any]]:
        """Each open leg of a transfer of the bank's workers with what its home decided for it
        (``cluster.cut.settling``: an undecided one is voided). Funding transfers are left out:
        each was finished before the first read."""
        out = []
        for shard, cut in sorted(cuts.items()):
            for leg in cut.legs.values():
                if leg.status not in OPEN or not leg.id.startswith(self.bank.run_id) \
                        or leg.id in self.bank.setup_ids:
                    continue
                outcome, amount = settling(shard, leg, cuts.get(leg.coordinator))
                out += [{"txid": leg.id, "shard": shard, "status": leg.status, "currency": currency,
                         "side": "credit" if side else "debit", "amount": amount or placed,
                         "outcome": OUTCOME_NAMES[outcome]} for currency, side, placed in leg.entries]
        return out


class RetryStorm(Worker):
    """Sends transfers the bank already sent (the same id and payload) through a random node."""

    def __init__(self, *args: Any, storm: deque[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.storm = storm

    def step(self) -> None:
        recent = tuple(self.storm)  # a copy: the bank workers append meanwhile
        if not recent:
            self.stop_event.wait(0.05)
            return
        self.transfer(dict(self.rng.choice(recent)), retry=True)


class FeedFollower(threading.Thread):
    """Follows every shard's feed from its first event, recording each event it is handed."""

    def __init__(self, client: Client) -> None:
        super().__init__(name="feed", daemon=True)
        self.received: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.subscriber = client.subscribe(start=0, wait_ms=500)

    def run(self) -> None:
        try:
            for event in self.subscriber:
                self.received.append({"shard": event.shard, "offset": event.offset, "type": event.type,
                                      "txid": event.data.get("id")})
        except BaseException as exc:  # reported by the runner (a 500 from a node, say)
            self.error = exc

    def finish(self) -> None:
        """Ends the iteration within one long-poll (after the runner saw it catch up)."""
        self.subscriber.stop()
