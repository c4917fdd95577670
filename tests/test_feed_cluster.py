"""The change feed over real node processes on loopback, with a real NATS JetStream server
(``nats-server -js``, started here) and a real webhook receiver (an aiohttp server in this process)
that fails every third request.

The leader of a shard is SIGKILLed while transfers are written and the feed is followed; after it:
every committed event exactly once per shard and in offset order (after de-duplication by event id),
every acknowledged transfer among them, none of a rejected one; the JetStream stream holds each event
once, in order per shard; the webhook receiver got every event, signed, new events in order per shard,
and dead-lettered batches arrive on re-drive. A smaller cluster shows retention: events kept for a
consumer, dropped once it is removed, and 410 for a reader behind the retention point.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from aiohttp import web
from raftledger.cluster.launcher import free_ports
from raftledger.cluster.testing import LocalCluster
from raftledger.node.settings import FeedSettings, NodeSettings
from raftledger.node.testing import account_body, pair_on_shard, transfer_body, wait_until

pytestmark = pytest.mark.slow

SHARDS = 2
SECRET = "feed-test-secret"
SUBJECTS = "ledger"
STREAM = "LEDGERFEED"
recovery_s = 120.0  # elections, restarts and redeliveries on a slow shared machine
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


# -- a real NATS server with JetStream -----------------------------------------------------------------
@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not os.path.exists(NATS_SERVER):  # never skipped: .ci/run installs it
        raise AssertionError("nats-server is not installed: apt-get install -y nats-server")
    port = free_ports(1)[0]
    store = tmp_path_factory.mktemp("jetstream")
    log = open(store / "nats.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _accepts(port):
            assert proc.poll() is None and time.monotonic() < deadline, (store / "nats.log").read_text()
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        log.close()


def _accepts(port: int) -> bool:
    with contextlib.closing(socket.socket()) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- a webhook receiver that fails intermittently ------------------------------------------------------
class Receiver:
    """An aiohttp server on its own thread and loop. Fails every third POST with a 500 (or all of
    them while ``down``); checks every signature with its own HMAC code."""

    def __init__(self) -> None:
        self.port = free_ports(1)[0]
        self.batches: list[tuple[bool, list[dict[str, Any]]]] = []  # (re-drive?, events) as accepted
        self.bad_signatures = 0
        self.requests = 0
        self.down = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers.get("X-Raftledger-Timestamp", "")
        expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
        if request.headers.get("X-Raftledger-Signature") != f"v1={expected}" or not fresh:
            self.bad_signatures += 1
            return web.Response(status=401)
        self.requests += 1
        if self.down or self.requests % 3 == 0:
            return web.Response(status=500)
        redrive = request.headers.get("X-Raftledger-Redrive") == "true"
        self.batches.append((redrive, json.loads(body)["events"]))
        return web.Response(status=204)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def events(self) -> list[dict[str, Any]]:
        return [e for _, batch in list(self.batches) for e in batch]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, nats_url: str, receiver: Receiver):
    feed = FeedSettings(nats_url=nats_url, nats_subject_prefix=SUBJECTS, nats_stream=STREAM,
                        webhook_url=receiver.url, webhook_secret=SECRET, webhook_attempts_max=3,
                        export_backoff_initial_s=0.05, export_backoff_max_s=0.5, export_batch_events_max=20)
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("feed")), nodes=3, shards=SHARDS,
                           durability="none", settings=NodeSettings(feed=feed))
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def live(cluster: LocalCluster) -> list[str]:
    return [n for n, proc in cluster.procs.items() if proc.poll() is None]


async def request(http: aiohttp.ClientSession, cluster: LocalCluster, method: str, path: str,
                  **kwargs: Any) -> tuple[int, Any]:
    """One request to a live node, again (same body) on a lost connection or a 503, to a final answer."""
    async def attempt() -> tuple[int, Any] | None:
        node = random.choice(live(cluster))
        try:
            async with http.request(method, cluster.urls[node] + path, **kwargs) as resp:
                answer = resp.status, await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError):
            return None
        return None if answer[0] == 503 else answer
    return await wait_until(attempt, recovery_s, f"{method} {path} to get a final answer")  # type: ignore[no-any-return]


class Follower:
    """Follows one shard's feed with long-polls from any live node, as a consumer would."""

    def __init__(self, http: aiohttp.ClientSession, cluster: LocalCluster, shard: int) -> None:
        self.http, self.cluster, self.shard = http, cluster, shard
        self.received: list[dict[str, Any]] = []
        self.after = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            params = {"shard": str(self.shard), "after": str(self.after), "wait_ms": "1000", "limit": "50"}
            node = random.choice(live(self.cluster))
            try:
                async with self.http.get(self.cluster.urls[node] + "/v1/feed", params=params) as resp:
                    if resp.status != 200:
                        await asyncio.sleep(0.05)  # 503 during an election: another node, a bit later
                        continue
                    page = await resp.json()
            except (TimeoutError, aiohttp.ClientError):
                continue
            self.received += page["events"]
            self.after = page["next_after"]

    def deduplicated(self) -> list[dict[str, Any]]:
        seen: set[str] = set()
        out = []
        for event in self.received:
            if event["id"] not in seen:
                seen.add(event["id"])
                out.append(event)
        return out


async def last_offsets(http: aiohttp.ClientSession, cluster: LocalCluster) -> dict[int, int]:
    out = {}
    for shard in range(SHARDS):
        status, page = await request(http, cluster, "GET", "/v1/feed", params={
            "shard": str(shard), "after": "0", "limit": "1", "consistency": "linearizable"})
        assert status == 200, page
        out[shard] = page["last_offset"]
    return out


async def write_transfers(http: aiohttp.ClientSession, cluster: LocalCluster,
                          outcomes: dict[str, int], count: int, prefix: str) -> None:
    """Transfers on each shard, cross-shard ones, and some a limit refuses; each to a final answer."""
    pairs = [pair_on_shard(s, SHARDS, prefix) for s in range(SHARDS)]
    for debit, credit in pairs:
        for account_id, fields in ((debit, {}), (credit, {"flags": ["debits_must_not_exceed_credits"]})):
            body = account_body(account_id, **fields)
            status, _ = await request(http, cluster, "POST", "/v1/accounts", json=body)
            assert status in (200, 201)
    for i in range(count):
        debit, credit = pairs[i % SHARDS]
        if i % 5 == 3:  # the limited account pays more than it has: refused (422), never an event
            body = transfer_body(f"{prefix}r{i}", credit, debit, 10**9)
        elif i % 5 == 4:  # across shards (an untagged id and accounts of both shards)
            body = transfer_body(f"{prefix}x{i}", pairs[0][0], pairs[1][1], 3)
        else:
            body = transfer_body(f"{prefix}t{i}{credit[credit.index('{'):]}", debit, credit, 5)
        status, _ = await request(http, cluster, "POST", "/v1/transactions", json=body)
        assert status in (201, 422), status
        outcomes[body["id"]] = status


async def stream_messages(url: str) -> list[Any]:
    connection = await nats.connect(url)
    try:
        jetstream = connection.jetstream()
        info = await jetstream.stream_info(STREAM)
        seqs = range(info.state.first_seq, info.state.last_seq + 1)
        return [await jetstream.get_msg(STREAM, seq) for seq in seqs]
    finally:
        await connection.close()


async def test_feed_through_a_leader_kill_has_every_committed_event_once_in_order_everywhere(
        cluster: LocalCluster, http: aiohttp.ClientSession, nats_url: str, receiver: Receiver) -> None:
    followers = [Follower(http, cluster, s) for s in range(SHARDS)]
    tasks = [asyncio.ensure_future(f.run()) for f in followers]
    outcomes: dict[str, int] = {}
    await write_transfers(http, cluster, outcomes, 30, "k")
    victim = cluster.leader(0)
    cluster.kill(victim)  # mid-stream: followers, writers and the shard's exporters lose it
    await write_transfers(http, cluster, outcomes, 30, "m")
    assert cluster.leader(0) != victim
    cluster.start_node(victim)
    await write_transfers(http, cluster, outcomes, 20, "n")
    last = await last_offsets(http, cluster)
    await wait_until(lambda: all(f.after >= last[f.shard] for f in followers), recovery_s,
                     "followers to catch up")
    for f in followers:
        f.stop.set()
    await asyncio.gather(*tasks)

    feed: dict[int, list[dict[str, Any]]] = {}
    for f in followers:
        events = f.deduplicated()
        assert [e["offset"] for e in events] == list(range(1, last[f.shard] + 1))  # once, in order
        feed[f.shard] = events
    transactions: dict[str, list[dict[str, Any]]] = {}
    for events in feed.values():
        for e in events:
            if e["type"].startswith("transaction."):
                transactions.setdefault(e["data"]["id"], []).append(e)
    for txid, status in outcomes.items():
        if status == 201:
            assert txid in transactions, f"acknowledged {txid} is not in the feed"
        else:
            assert txid not in transactions, f"rejected {txid} is in the feed"
    crossed = [events for txid, events in transactions.items() if "x" in txid.split("{")[0]]
    assert crossed and all(len(events) == SHARDS and all(e["data"]["cross_shard"] for e in events)
                           for events in crossed)
    ids = {s: [e["id"] for e in events] for s, events in feed.items()}

    async def in_stream() -> dict[int, list[str]] | None:
        got: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
        for msg in await stream_messages(nats_url):
            event = json.loads(msg.data)
            assert msg.subject == f"{SUBJECTS}.{event['shard']}.{event['type']}"
            assert msg.headers["Nats-Msg-Id"] == event["id"]
            got[event["shard"]].append(event["id"])
        return got if all(len(got[s]) >= len(ids[s]) for s in ids) else None
    assert await wait_until(in_stream, recovery_s, "every event in the JetStream stream") == ids

    async def redriven() -> bool:
        status, _ = await request(http, cluster, "POST", "/v1/feed/dlq/redrive")
        delivered = {e["id"] for e in receiver.events()}
        return status == 200 and all(i in delivered for s in ids for i in ids[s])
    await wait_until(redriven, recovery_s, "every event at the webhook receiver")
    assert receiver.bad_signatures == 0 and len(receiver.batches) < receiver.requests  # some failed
    for shard in range(SHARDS):
        first_seen: list[int] = []
        for redrive, batch in receiver.batches:
            offsets = [e["offset"] for e in batch if e["shard"] == shard]
            if not redrive:
                first_seen += [o for o in offsets if o not in first_seen]
        assert first_seen == sorted(first_seen)  # new events arrive in order (re-drives aside)


async def test_dead_lettered_batches_are_listed_and_arrive_on_redrive(
        cluster: LocalCluster, http: aiohttp.ClientSession, receiver: Receiver) -> None:
    receiver.down = True
    try:
        outcomes: dict[str, int] = {}
        await write_transfers(http, cluster, outcomes, 6, "d")

        async def listed() -> list[dict[str, Any]] | None:
            status, body = await request(http, cluster, "GET", "/v1/feed/dlq", params={"sink": "webhook"})
            assert status == 200
            last = await last_offsets(http, cluster)
            covered = {s: max([d["last"] for d in body["dead_letters"] if d["shard"] == s], default=0)
                       for s in range(SHARDS)}
            return body["dead_letters"] if covered == last else None
        letters = await wait_until(listed, recovery_s, "the failing batches in the dead-letter store")
    finally:
        receiver.down = False
    waiting = {(d["shard"], o) for d in letters for o in range(d["first"], d["last"] + 1)}

    async def redriven() -> bool:
        """Every dead letter arrived, and the store is empty: a re-driven batch leaves it once its
        removal commits, which may take another round on a loaded machine (a re-drive sends again)."""
        status, _ = await request(http, cluster, "POST", "/v1/feed/dlq/redrive", params={"sink": "webhook"})
        arrived = {(e["shard"], e["offset"]) for redrive, batch in receiver.batches if redrive for e in batch}
        listed_status, body = await request(http, cluster, "GET", "/v1/feed/dlq")
        return status == listed_status == 200 and waiting <= arrived and body["dead_letters"] == []
    await wait_until(redriven, recovery_s, "the dead letters to be re-driven and gone from the store")
    assert receiver.bad_signatures == 0
    totals = await sink_totals(http, cluster)
    assert totals["dead_lettered"] >= len(waiting) and totals["delivered"] > 0 and totals["failed"] > 0


async def sink_totals(http: aiohttp.ClientSession, cluster: LocalCluster) -> dict[str, float]:
    """The webhook exporter's counters, summed over the live nodes' /metrics."""
    totals = {"delivered": 0.0, "failed": 0.0, "dead_lettered": 0.0}
    for node in live(cluster):
        async with http.get(cluster.urls[node] + "/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            for name in totals:
                if line.startswith(f"raftledger_feed_sink_{name}_total{{") and 'sink="webhook"' in line:
                    totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


# -- retention --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory: pytest.TempPathFactory):
    feed = FeedSettings(retention_age_min_s=0, compaction_interval_s=0.2)
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("retention")), nodes=3, shards=1,
                           durability="none", settings=NodeSettings(feed=feed))
    try:
        yield cluster.start()
    finally:
        cluster.close()


async def test_retention_keeps_events_for_a_consumer_then_a_reader_behind_it_gets_410(
        small_cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    cluster = small_cluster
    status, body = await request(http, cluster, "PUT", "/v1/feed/consumers/audit/offsets",
                                 json={"offsets": {"0": 0}})
    assert status == 200, body
    for name in ("a{r}", "b{r}"):
        assert (await request(http, cluster, "POST", "/v1/accounts", json=account_body(name)))[0] == 201
    for i in range(4):
        body = transfer_body(f"t{i}{{r}}", "a{r}", "b{r}", 1)
        assert (await request(http, cluster, "POST", "/v1/transactions", json=body))[0] == 201
    status, body = await request(http, cluster, "PUT", "/v1/feed/consumers/audit/offsets",
                                 json={"offsets": {"0": 3}})
    assert status == 200, body

    async def first_offsets() -> set[int]:
        firsts = set()
        for node in cluster.node_ids:  # every replica drops the same events
            async with http.get(cluster.urls[node] + "/v1/feed", params={"shard": "0", "limit": "1",
                                                                         "after": "1000"}) as resp:
                firsts.add((await resp.json())["first_offset"])
        return firsts
    await wait_until(lambda: first_offsets_are(first_offsets, {4}), recovery_s,
                     "compaction up to the consumer")
    status, body = await request(http, cluster, "GET", "/v1/feed", params={"shard": "0", "after": "0"})
    assert status == 410 and body["error"]["code"] == "feed_compacted"
    assert body["error"]["details"]["earliest_offset"] == 4
    status, consumer = await request(http, cluster, "GET", "/v1/feed/consumers/audit")
    assert status == 200 and consumer["shards"]["0"]["lag"] == 3  # 6 events, 3 processed

    assert (await request(http, cluster, "DELETE", "/v1/feed/consumers/audit"))[0] == 200
    await wait_until(lambda: first_offsets_are(first_offsets, {7}), recovery_s, "compaction of everything")
    status, body = await request(http, cluster, "GET", "/v1/feed", params={"shard": "0", "after": "6"})
    assert status == 200 and body["events"] == [] and body["first_offset"] == 7
    cluster.wait_converged(0)


async def first_offsets_are(read: Any, expected: set[int]) -> bool:
    return bool(await read() == expected)
