"""Raft traffic is authenticated and encrypted with the cluster secret: strangers reach no unpickler.

The attack of the outside probe: connect to a Raft port and send PySyncObj's own frame,
``struct.pack("i", len(z)) + z`` with ``z = zlib.compress(pickle.dumps(obj))``. Stock PySyncObj
unpickles it (and so runs whatever ``obj`` reduces to); these tests show our replicas refuse it, and
every other way of talking to a Raft port without the secret, while the group keeps committing.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest
from pysyncobj import pickle as raft_pickle
from raftledger.node import frames
from raftledger.node.frames import HELLO, HELLO_MAGIC, Session, shard_key
from raftledger.node.replica import ReplicaService
from raftledger.node.settings import RaftSettings
from raftledger.node.testing import TEST_SECRET, ReplicaGroup, wait_until
from raftledger.statemachine.testing import account

pytestmark = pytest.mark.slow
RAFT = RaftSettings()


class Plant:
    """Unpickling this creates ``path``: proof that a frame reached an unpickler."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return open, (self.path, "w")


def pysyncobj_frame(obj: object) -> bytes:
    z = zlib.compress(pickle.dumps(obj))
    return struct.pack("i", len(z)) + z


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def refused(address: str, payload: bytes, timeout_s: float = 10.0) -> bytes:
    """Send ``payload`` to a Raft port; return what came back before the node closed the socket."""
    received = b""
    with socket.create_connection(host_port(address), timeout=timeout_s) as sock:
        sock.sendall(payload)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    raise AssertionError(f"{address} kept the connection open")


@pytest.fixture
async def group(tmp_path):
    g = ReplicaGroup(str(tmp_path / "raft"))
    g.start_all()
    try:
        await g.leader()
        yield g
    finally:
        await g.stop_all()


def test_the_probe_payload_runs_code_in_a_stock_pysyncobj_unpickler(tmp_path):
    """The control: the frame below really executes when PySyncObj's parser unpickles it."""
    planted = tmp_path / "planted"
    frame = pysyncobj_frame(Plant(planted))
    raft_pickle.loads(zlib.decompress(frame[4:]))
    assert planted.exists()


async def test_a_strangers_pickle_frame_is_refused_without_being_unpickled(group, tmp_path):
    planted = tmp_path / "planted"
    for address in group.addresses:
        answer = refused(address, pysyncobj_frame(["status"]) + pysyncobj_frame(Plant(planted)))
        assert answer.startswith(HELLO_MAGIC) and len(answer) == HELLO.size  # only our hello
    assert not planted.exists()
    leader = await group.leader()
    assert (await leader.submit(account("still-works"))).outcome.ok


async def test_a_stranger_that_speaks_the_handshake_still_reaches_no_unpickler(group, tmp_path):
    planted = tmp_path / "planted"
    hello = HELLO.pack(HELLO_MAGIC, os.urandom(32))
    body = pickle.dumps(Plant(planted))
    plain = struct.pack(">I", len(body)) + body  # a frame that is not sealed at all
    forged = Session(shard_key(b"another cluster's secret" * 2, 0), os.urandom(32), os.urandom(32),
                     outgoing=True).seal(body)  # sealed, but with the wrong key
    for frame in (plain, forged, struct.pack(">I", 2**31) + b"x" * 64):
        refused(group.addresses[0], hello + frame)
    assert not planted.exists()
    assert (await (await group.leader()).submit(account("ok"))).outcome.ok


@pytest.mark.parametrize("outsider_key", [shard_key(os.urandom(32), 0), shard_key(TEST_SECRET, 1)],
                         ids=["another cluster's secret", "another shard's key"])
async def test_a_replica_without_the_shards_key_never_joins(tmp_path, outsider_key):
    group = ReplicaGroup(str(tmp_path))
    group.start(0)
    group.start(1)
    try:
        leader = await group.leader()
        committed = await leader.submit(account("secret"))
        assert committed.outcome.ok
        outsider = dataclasses.replace(group.settings(2), raft_key=outsider_key)
        group.services[2] = ReplicaService(outsider, "n2")
        with pytest.raises(AssertionError, match="timed out"):
            await wait_until(lambda: group.services[2].applied_index() >= committed.index, 2.0,
                       "a replica without the key to receive entries")
        assert group.services[2].leader_node_id() is None
        await group.stop(2)
        group.start(2)  # the same replica with the shard's key catches up
        await wait_until(lambda: group.services[2].applied_index() >= committed.index, 15, "the member")
    finally:
        await group.stop_all()


async def test_connections_that_never_authenticate_are_bounded_and_closed(group):
    address = group.addresses[0]
    socks = []
    try:
        for _ in range(RAFT.unauthenticated_connections_max + 40):
            sock = socket.create_connection(host_port(address), timeout=5)
            sock.setblocking(False)
            socks.append(sock)

        def closed_by_node() -> int:
            count = 0
            for sock in socks:
                try:
                    while chunk := sock.recv(4096):  # our hello, then EOF once closed
                        del chunk
                    count += 1
                except BlockingIOError:
                    pass
                except OSError:
                    count += 1
            return count

        await wait_until(lambda: closed_by_node() >= 40, RAFT.handshake_timeout_s - 1,
                   "the oldest connections beyond the bound to be pushed out")
        await wait_until(lambda: closed_by_node() == len(socks), RAFT.handshake_timeout_s + 10,
                   "silent connections to be closed after the handshake timeout")
        refusals = group.services[0].raft.transport_refusals()
        assert refusals.get("pushed out by newer connections before authenticating", 0) >= 40
        assert refusals.get("no authenticated frame in time", 0) >= 1
    finally:
        for sock in socks:
            sock.close()
    assert (await (await group.leader()).submit(account("after-flood"))).outcome.ok


async def test_the_raft_port_listens_only_on_its_own_address(group):
    host, port = host_port(group.addresses[0])
    assert host == "127.0.0.1"
    with pytest.raises(ConnectionRefusedError):  # 127.0.0.2 is loopback too: reachable via 0.0.0.0
        socket.create_connection(("127.0.0.2", port), timeout=5).close()


def test_a_session_refuses_frames_replayed_reordered_or_tampered():
    key, client, server = os.urandom(32), os.urandom(32), os.urandom(32)
    sender, receiver = Session(key, client, server, True), Session(key, client, server, False)
    first, second = sender.seal(b"one")[4:], sender.seal(b"two")[4:]
    assert receiver.open(first) == b"one"
    assert Session(key, client, server, False).open(second) is None  # out of order
    tampered = bytearray(second)
    tampered[0] ^= 1
    assert receiver.open(bytes(tampered)) is None
    # A frame of one's own direction cannot be reflected back.
    assert Session(key, client, server, True).open(Session(key, client, server, True).seal(b"x")[4:]) is None


def test_authenticated_frames_are_unpickled_as_plain_data_only(tmp_path):
    message = {"type": "append_entries", "entries": [(b"cmd", 3, 1)], "term": 1, "x": None}
    assert frames.loads(frames.dumps(message)) == message
    with pytest.raises(pickle.UnpicklingError):
        frames.loads(pickle.dumps(Plant(tmp_path / "planted")))
    assert not (tmp_path / "planted").exists()


async def test_a_replica_whose_raft_port_is_taken_says_so_and_joins_once_it_is_free(tmp_path, caplog):
    """PySyncObj retries a failed bind silently: a replica whose port another process holds (the chaos
    harness's proxy once did, for a whole hour) took no part in its group without a word."""
    group = ReplicaGroup(str(tmp_path))
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(host_port(group.addresses[2]))
    squatter.listen()
    try:
        group.start(0)
        group.start(1)
        leader = await group.leader()
        committed = await leader.submit(account("while-squatted"))
        with caplog.at_level("ERROR", logger="raftledger.node.raft"):
            group.start(2)
            await wait_until(lambda: any("cannot listen" in r.getMessage() for r in caplog.records), 10,
                             "the replica to say it cannot listen")
        assert group.services[2].applied_index() < committed.index
        squatter.close()
        await wait_until(lambda: group.services[2].applied_index() >= committed.index, 20,
                         "the replica to join once its port is free")
    finally:
        squatter.close()
        await group.stop_all()
