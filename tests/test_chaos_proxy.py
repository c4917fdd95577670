"""The link proxy of the chaos harness against a real echo server on loopback: it passes bytes,
cuts (closes and refuses), drops (silence, no error) and delays."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
from raftledger.cluster.chaos import nemesis, proxy
from raftledger.cluster.chaos.proxy import ProxyHub
from raftledger.cluster.launcher import free_ports, wait_until
from raftledger.cluster.testing import LocalCluster

io_timeout_s = 5.0


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub() -> Iterator[ProxyHub]:
    h = ProxyHub()
    yield h
    h.close()


def connect(address: str, timeout_s: float = io_timeout_s) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout_s)


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    return sock.recv(4096)


def closed_by_peer(sock: socket.socket) -> bool:
    """The far end closed: an end of stream, or a reset when it closed with our bytes unread."""
    try:
        sock.sendall(b"x")
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_pass_forwards_both_ways(hub: ProxyHub, echo: str) -> None:
    proxy = hub.add("a>b", echo)
    with connect(proxy.address) as sock:
        assert round_trip(sock) == b"ping"


def test_cut_closes_open_connections_and_refuses_new_ones(hub: ProxyHub, echo: str) -> None:
    proxy = hub.add("a>b", echo)
    sock = connect(proxy.address)
    assert round_trip(sock) == b"ping"
    hub.set("a>b", "cut")
    wait_until(lambda: proxy.mode == "cut", io_timeout_s, "the cut")
    assert sock.recv(4096) == b""  # closed by the proxy
    sock.close()
    with connect(proxy.address) as again:
        assert closed_by_peer(again)
    hub.set("a>b", "pass")
    wait_until(lambda: proxy.mode == "pass", io_timeout_s, "the heal")
    with connect(proxy.address) as healed:
        assert round_trip(healed) == b"ping"


def test_drop_swallows_bytes_without_closing(hub: ProxyHub, echo: str) -> None:
    proxy = hub.add("a>b", echo)
    with connect(proxy.address, timeout_s=0.5) as sock:
        hub.set("a>b", "drop")
        wait_until(lambda: proxy.mode == "drop", io_timeout_s, "the black hole")
        sock.sendall(b"lost")
        with pytest.raises(TimeoutError):
            sock.recv(4096)
        hub.set("a>b", "pass")
        wait_until(lambda: proxy.mode == "pass", io_timeout_s, "the heal")
        sock.settimeout(io_timeout_s)
        assert round_trip(sock, b"found") == b"found"


def test_delay_slows_each_chunk(hub: ProxyHub, echo: str) -> None:
    proxy = hub.add("a>b", echo)
    hub.set("a>b", "pass", delay_ms=300)
    wait_until(lambda: proxy.delay_ms == 300, io_timeout_s, "the delay")
    with connect(proxy.address) as sock:
        started = time.monotonic()
        assert round_trip(sock) == b"ping"
        assert time.monotonic() - started >= 0.6  # one delay each way, a lower bound only


def test_no_proxy_listens_on_a_port_a_node_of_the_cluster_will_listen_on(tmp_path, monkeypatch, echo):
    """Found by the hour-long run: the proxies are made before the nodes start, and a free port then
    was one a node had been planned on. The proxy held it, so that node's replica of a shard could
    never bind its Raft port, and stayed at term 0 for the whole hour. Here the kernel is made to
    offer the planned ports first."""
    cluster = LocalCluster(tmp_path / "c", nodes=3, shards=2)  # planned, not started
    planned = nemesis.listening_ports(cluster.plan.cluster)
    assert len(planned) == 3 * (1 + 1 + 2 + 1)  # http, internal, 2 shards' Raft, metadata group
    spare = [p for p in free_ports(64) if p not in planned]

    def offering_planned_first(count: int, avoid: set[int] | None = None, host: str = "") -> list[int]:
        offered = [*sorted(planned), *spare]  # the same list each time: avoid does the rest
        return [p for p in offered if p not in (avoid or set())][:count]
    monkeypatch.setattr(proxy, "free_ports", offering_planned_first)
    h = ProxyHub()
    try:
        network = nemesis.Network(h, cluster, str(tmp_path))
        taken = {p.port for p in h.proxies.values()}
        assert len(taken) == len(h.proxies) == 3 * 2 * 4  # per ordered pair: 2 Raft, internal, meta
        assert not taken & planned, sorted(taken & planned)
        nodes = cluster.node_ids
        assert set(network.links) == {(a, b) for a in nodes for b in nodes if a != b}
    finally:
        h.close()
