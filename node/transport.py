"""Raft traffic between the replicas of a shard: authenticated and encrypted with the cluster secret, always.

PySyncObj's own TCP transport pickles every message and unpickles every frame it receives; without its
optional password anyone who reaches a Raft port runs code in the node, reads the log and sends
membership commands. This transport replaces its framing:

- Each side of a connection first sends ``HELLO_MAGIC`` and 32 random bytes. Both derive the
  connection's two keys (one per direction) with HKDF from the shard's Raft key (itself derived from
  the cluster secret) and both random values, so keys are fresh per connection and a recorded
  connection cannot be replayed into another.
- Every message is then a frame: a 4-byte big-endian length and AES-256-GCM ciphertext whose nonce
  is the frame's number in its direction, so frames cannot be reordered, repeated or dropped unseen.
- A frame that fails authentication closes the connection. Nothing is unpickled before its frame
  authenticates, and what is unpickled may hold only plain data: the unpickler resolves no class or
  function at all.
- Before a peer has authenticated, its frames are small and its time is short: at most
  ``unauthenticated_connections_max`` incoming connections wait for their first frame (a new one
  pushes out the oldest, so a flood cannot keep a real peer out for longer than it takes the peer to
  send one frame), each for at most ``handshake_timeout_s``. The listener binds only to the
  replica's own Raft address, accepts floods quickly, and a full descriptor table pauses accepting
  instead of closing the listener for good (PySyncObj's server gives up on any accept error).
- Messages are no longer zlib-compressed: on the networks a ledger runs on, compressing every entry
  cost more CPU than the bytes it saved.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.transport import TCPTransport

from . import secret as secret_mod

log = logging.getLogger(__name__)

HELLO_MAGIC = b"RLRAFT01"
NONCE_BYTES = 32
HELLO = struct.Struct(f">{len(HELLO_MAGIC)}s{NONCE_BYTES}s")
LENGTH = struct.Struct(">I")
TAG_BYTES = 16
# A peer that has not authenticated yet sends its address or a utility command: a few bytes.
unauthenticated_frame_bytes_max = 64 << 10
# An authenticated frame holds at most one append_entries message (PySyncObj splits entries larger
# than its batch size into chunks) or one snapshot chunk: a few MiB. This bound only guards memory.
frame_bytes_max = 64 << 20
held_bytes_max = 64 << 20  # messages queued on a connection before its handshake completes
unauthenticated_connections_max = 64
handshake_timeout_s = 3.0
listen_backlog = 128
accepts_per_event_max = 64  # a flood is accepted (and turned away) quickly, not one per tick
accept_pause_s = 0.5  # after EMFILE/ENFILE, before accepting again
refusal_log_interval_s = 60.0
ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class DataOnlyUnpickler(pickle.Unpickler):
    """Plain data only (dict, list, tuple, str, bytes, numbers, None): every class is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def loads(data: bytes) -> Any:
    return DataOnlyUnpickler(io.BytesIO(data)).load()


def dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def shard_key(cluster_secret: bytes, shard: int) -> bytes:
    """The Raft key of one shard: a peer of another shard's group cannot talk to this one."""
    return secret_mod.derive(cluster_secret, f"raft shard {shard}")


class Session:
    """The two AES-GCM keys of one connection and its frame counters."""

    __slots__ = ("_seal", "_open", "_sent", "_received")

    def __init__(self, key: bytes, client_nonce: bytes, server_nonce: bytes, outgoing: bool) -> None:
        keys = secret_mod.derive(key, "raft connection", salt=client_nonce + server_nonce, length=64)
        to_server, to_client = AESGCM(keys[:32]), AESGCM(keys[32:])
        self._seal, self._open = (to_server, to_client) if outgoing else (to_client, to_server)
        self._sent = 0
        self._received = 0

    def seal(self, data: bytes) -> bytes:
        self._sent += 1
        sealed = self._seal.encrypt(self._sent.to_bytes(12, "big"), data, None)
        return LENGTH.pack(len(sealed)) + sealed

    def open(self, sealed: bytes) -> bytes:
        """Raises InvalidTag for a frame not sealed with this connection's key, in this order."""
        self._received += 1
        return self._open.decrypt(self._received.to_bytes(12, "big"), sealed, None)


class SecureConnection(TcpConnection):
    """A PySyncObj connection whose frames are sealed (see the module docstring)."""

    def __init__(self, key: bytes, on_refused: Callable[[str], None], **kwargs: Any) -> None:
        self._key = key
        self._on_refused = on_refused
        self._outgoing = kwargs.get("socket") is None
        self._reset_session()
        self.opened_at = raft_clock()
        super().__init__(**kwargs)
        if not self._outgoing:
            self._say_hello()

    def _reset_session(self) -> None:
        self._nonce = os.urandom(NONCE_BYTES)
        self._session: Session | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self.authenticated = False

    def _say_hello(self) -> None:
        self._TcpConnection__writeBuffer += HELLO.pack(HELLO_MAGIC, self._nonce)

    def connect(self, host: str, port: int) -> bool:  # PySyncObj's signature
        self._reset_session()
        self.opened_at = raft_clock()
        connected = super().connect(host, port)
        if connected:
            self._say_hello()  # written once the socket is connected
        return bool(connected)

    def disconnect(self) -> None:
        self._reset_session()
        super().disconnect()

    def send(self, message: Any) -> None:
        data = dumps(message)
        session = self._session
        if session is None:  # the peer's hello has not arrived: keep it until the keys exist
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > held_bytes_max:
                self.disconnect()
            return
        self._TcpConnection__writeBuffer += session.seal(data)
        self._TcpConnection__trySendBuffer()

    def _refuse(self, reason: str) -> None:
        self._on_refused(reason)
        self.disconnect()

    def _start_session(self, hello: bytes) -> None:
        magic, peer_nonce = HELLO.unpack(hello)
        if magic != HELLO_MAGIC:
            self._refuse("not a raftledger raft peer")
            return
        client, server = (self._nonce, peer_nonce) if self._outgoing else (peer_nonce, self._nonce)
        session = self._session = Session(self._key, client, server, self._outgoing)
        held, self._held, self._held_bytes = self._held, [], 0
        if held:
            self._TcpConnection__writeBuffer += b"".join(session.seal(data) for data in held)
            self._TcpConnection__trySendBuffer()

    def _TcpConnection__processParseMessage(self) -> Any:  # noqa: N802 (overrides PySyncObj's parser)
        """The next authenticated message, or None (not enough bytes yet, or the connection closed)."""
        if self._session is None:
            buffer = self._TcpConnection__readBuffer
            if len(buffer) < HELLO.size:
                return None
            self._TcpConnection__readBuffer = buffer[HELLO.size:]
            self._start_session(buffer[:HELLO.size])
            if self._session is None:
                return None
        buffer = self._TcpConnection__readBuffer
        if len(buffer) < LENGTH.size:
            return None
        (length,) = LENGTH.unpack_from(buffer)
        bound = frame_bytes_max if self.authenticated else unauthenticated_frame_bytes_max
        if not TAG_BYTES <= length <= bound:
            self._refuse(f"frame of {length} bytes")
            return None
        if len(buffer) < LENGTH.size + length:
            return None
        end = LENGTH.size + length
        sealed, self._TcpConnection__readBuffer = buffer[LENGTH.size:end], buffer[end:]
        try:
            data = self._session.open(sealed)
        except InvalidTag:
            self._refuse("frame failed authentication (wrong cluster secret?)")
            return None
        self.authenticated = True
        try:
            return loads(data)
        except Exception:  # an authenticated peer sent what a peer never sends
            self._refuse("authenticated frame is not plain data")
            return None


class GuardedServer(TcpServer):
    """PySyncObj's listener, accepting ``SecureConnection`` and surviving a full descriptor table."""

    def __init__(self, make_connection: Callable[[socket.socket], SecureConnection],
                 *args: Any, **kwargs: Any) -> None:
        self._make_connection = make_connection
        self._paused_until = 0.0
        super().__init__(*args, **kwargs)

    def bind(self) -> None:
        super().bind()
        self._TcpServer__socket.listen(listen_backlog)  # PySyncObj listens with a backlog of 5

    def _TcpServer__onNewConnection(self, descr: int, event: int) -> None:  # noqa: N802
        if event & POLL_EVENT_TYPE.READ:
            for _ in range(accepts_per_event_max):
                if not self._accept_one():
                    break
        if event & POLL_EVENT_TYPE.ERROR:
            self.unbind()

    def _accept_one(self) -> bool:
        try:
            sock, _ = self._TcpServer__socket.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno not in ACCEPT_EXHAUSTED:
                raise
            self._pause(exc)
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._TcpServer__sendBufferSize)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._TcpServer__recvBufferSize)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self._TcpServer__onNewConnectionCallback(self._make_connection(sock))
        return True

    def _pause(self, exc: OSError) -> None:
        """The poller is level-triggered: a pending connection that cannot be accepted would wake the
        tick thread at once, forever. Stop listening for a moment instead."""
        log.warning("raft listener: cannot accept (%s); pausing %.1fs", os.strerror(exc.errno or 0),
                    accept_pause_s)
        self._TcpServer__poller.unsubscribe(self._TcpServer__fileno)
        self._paused_until = raft_clock() + accept_pause_s

    def resume_if_due(self) -> None:
        if self._paused_until and raft_clock() >= self._paused_until and \
                self._TcpServer__fileno is not None:
            self._paused_until = 0.0
            self._TcpServer__poller.subscribe(self._TcpServer__fileno, self._TcpServer__onNewConnection,
                                              POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)


class SecureTransport(TCPTransport):
    """PySyncObj's TCP transport over ``SecureConnection``. The SyncObj passes ``raft_key`` (see
    ``shard_key``) and ``before_send`` (the journal flush) as attributes set before its own init."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:  # noqa: N803
        self._key: bytes = syncObj.raft_key
        self._before_send: Callable[[Any, Any], None] = syncObj.before_send
        self.last_append_entries = 0.0
        self.refused: dict[str, int] = {}
        self._refusals_logged_at = 0.0
        super().__init__(syncObj, selfNode, otherNodes)

    def _new_connection(self, **kwargs: Any) -> SecureConnection:
        conf = self._syncObj.conf
        return SecureConnection(self._key, self._count_refusal, poller=self._syncObj._poller,
                                timeout=conf.connectionTimeout, sendBufferSize=conf.sendBufferSize,
                                recvBufferSize=conf.recvBufferSize, keepalive=conf.tcp_keepalive,
                                **kwargs)

    def _count_refusal(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        now = raft_clock()
        if now - self._refusals_logged_at >= refusal_log_interval_s:
            self._refusals_logged_at = now
            log.warning("raft %s: refused a connection: %s (refusals so far: %s)",
                        self._selfNode.address if self._selfNode else "?", reason, self.refused)

    def _createServer(self) -> None:  # noqa: N802 (PySyncObj's name)
        """Listen on this replica's own Raft address, never on every interface."""
        conf = self._syncObj.conf
        host, port = (conf.bindAddress or self._selfNode.address).rsplit(":", 1)
        self._server = GuardedServer(
            lambda sock: self._new_connection(socket=sock), self._syncObj._poller, host, port,
            onNewConnection=self._onNewIncomingConnection, sendBufferSize=conf.sendBufferSize,
            recvBufferSize=conf.recvBufferSize, connectionTimeout=conf.connectionTimeout)

    def addNode(self, node: Any) -> None:  # noqa: N802 (PySyncObj's name)
        """As PySyncObj's, with a ``SecureConnection`` for the nodes this one dials."""
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conn = self._new_connection()
            conn.setOnConnectedCallback(lambda: self._onOutgoingConnected(conn))
            conn.setOnMessageReceivedCallback(lambda message: self._onMessageReceived(node, message))
            conn.setOnDisconnectedCallback(lambda: self._onDisconnected(conn))
            self._connections[node] = conn

    def _onNewIncomingConnection(self, conn: SecureConnection) -> None:  # noqa: N802
        if len(self._unknownConnections) >= unauthenticated_connections_max:
            oldest = min(self._unknownConnections, key=lambda c: c.opened_at)
            self._count_refusal("pushed out by newer connections before authenticating")
            oldest.disconnect()
            self._unknownConnections.discard(oldest)
        super()._onNewIncomingConnection(conn)

    def _onTick(self) -> None:  # noqa: N802 (PySyncObj's name)
        super()._onTick()
        if isinstance(self._server, GuardedServer):
            self._server.resume_if_due()
        if self._unknownConnections:
            self._drop_slow_handshakes()

    def _drop_slow_handshakes(self) -> None:
        deadline = raft_clock() - handshake_timeout_s
        for conn in list(self._unknownConnections):
            if conn.opened_at < deadline and conn.state != CONNECTION_STATE.DISCONNECTED:
                self._count_refusal("no authenticated frame in time")
                conn.disconnect()
            elif conn.state == CONNECTION_STATE.DISCONNECTED:
                self._unknownConnections.discard(conn)

    def send(self, node: Any, message: Any) -> bool:
        self._before_send(node, message)
        return bool(super().send(node, message))

    def setOnMessageReceivedCallback(self, callback: Any) -> None:  # noqa: N802 (PySyncObj's name)
        """Note the last append_entries from a leader (for staleness bounds) on the way in."""
        if callback is None:
            super().setOnMessageReceivedCallback(None)
            return

        def received(node: Any, message: Any) -> None:
            if message.get("type") == "append_entries":
                self.last_append_entries = time.monotonic()
            callback(node, message)

        super().setOnMessageReceivedCallback(received)
