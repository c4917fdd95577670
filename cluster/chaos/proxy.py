"""A TCP proxy per link, so the harness can cut, black-hole or slow one link between two nodes.

``ProxyHub`` runs every proxy of a run on one asyncio loop in a background thread. Each ``LinkProxy``
listens on a free loopback port and forwards to one peer address; its ``mode`` is, at any moment:

- ``pass``: bytes flow (after ``delay_ms``, when set: a slow link);
- ``cut``: open connections are closed and new ones are closed as soon as accepted (a refused link);
- ``drop``: bytes are read and thrown away in both directions (a black hole: the sender sees no
  error, only silence, as behind a partition that loses packets).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any

from raftledger.cluster.launcher import HOST, free_ports

MODES = ("pass", "cut", "drop")
chunk_bytes_max = 65536
connections_max = 256  # per proxy: a bound, far above what a node opens to one peer
start_timeout_s = 10.0


class LinkProxy:
    """One direction of dialing: whoever connects here reaches ``target``."""

    def __init__(self, name: str, port: int, target: str) -> None:
        self.name = name
        self.port = port
        self.target = target
        self.mode = "pass"
        self.delay_ms = 0
        self.bytes_forwarded = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, HOST, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_connections()

    def set(self, mode: str, delay_ms: int = 0) -> None:
        """Runs on the hub's loop (``ProxyHub.set``)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode, self.delay_ms = mode, delay_ms
        if mode == "cut":
            self._close_connections()

    def _close_connections(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut" or len(self._writers) >= connections_max:
            writer.close()
            return
        host, port = self.target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(chunk_bytes_max)
                if not data or self.mode == "cut":
                    break
                if self.mode == "drop":
                    continue
                if self.delay_ms:
                    await asyncio.sleep(self.delay_ms / 1000)
                writer.write(data)
                await writer.drain()
                self.bytes_forwarded += len(data)
        writer.close()


class ProxyHub:
    """Every link proxy of a run, on one loop in one daemon thread; safe to call from any thread."""

    def __init__(self) -> None:
        self.proxies: dict[str, LinkProxy] = {}
        self.reserved: set[int] = set()  # ports the cluster's nodes will listen on: never a proxy's
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxies", daemon=True)
        self._thread.start()

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(start_timeout_s)

    def add(self, name: str, target: str) -> LinkProxy:
        """A new proxy named ``name`` (unique) forwarding to ``target``; listening on return."""
        if name in self.proxies:
            raise ValueError(f"a proxy named {name!r} exists")
        (port,) = free_ports(1, avoid=self.reserved | {p.port for p in self.proxies.values()})
        proxy = LinkProxy(name, port, target)
        self._run(proxy.start())
        self.proxies[name] = proxy
        return proxy

    def set(self, name: str, mode: str, delay_ms: int = 0) -> None:
        proxy = self.proxies[name]
        self._loop.call_soon_threadsafe(proxy.set, mode, delay_ms)

    def heal_all(self) -> None:
        for name in self.proxies:
            self.set(name, "pass")

    def close(self) -> None:
        async def close_all() -> None:
            for proxy in self.proxies.values():
                await proxy.close()
        with contextlib.suppress(Exception):
            self._run(close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(start_timeout_s)
        self._loop.close()
