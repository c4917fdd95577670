"""The internal protocol between nodes: msgpack bodies sealed with a key derived from the cluster secret.

Nodes talk to each other (forwarded writes, read barriers, replica status, shard totals) over HTTP on
an internal listener of their own, never on the public port. Every request and every answer is
sealed with AES-256-GCM under the cluster's internal key, so the secret authenticates the sender,
keeps transaction payloads private on the wire, and binds each body to its request line:

- request: headers ``X-Ledger-Peer`` (sender node id), ``X-Ledger-Time`` (sender clock, ns) and
  ``X-Ledger-Nonce`` (12 random bytes, hex); the body is the sealed msgpack payload, with
  ``method, path, peer, time`` as associated data. A receiver refuses a time outside
  ``± window_s`` of its own clock and a nonce it has seen within that window (``ReplayGuard``).
- answer: ``X-Ledger-Nonce`` of its own; the body is sealed with the request's nonce and the status
  as associated data, so an answer cannot be replayed for another request or status.

An answer that could not be sealed (the request did not authenticate) is a plain JSON error body
with status 401; nothing else is ever sent unsealed. Mutual TLS would need a certificate authority
per cluster before the first node starts; one shared secret that ``raftledger up`` generates, and
that the Raft transport uses too, needs nothing more (docs/design.md, "Node-to-node traffic").

Integers beyond 64 bits (balances reach 2**127) travel as msgpack ext type ``BIG_INT_EXT``.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import secret as secret_mod

PREFIX = "/internal/v1"
PEER_HEADER = "X-Ledger-Peer"
TIME_HEADER = "X-Ledger-Time"
NONCE_HEADER = "X-Ledger-Nonce"
SEALED_TYPE = "application/vnd.raftledger.sealed"
BIG_INT_EXT = 1
NONCE_BYTES = 12


class Unauthenticated(Exception):
    """The request or answer was not sealed with this cluster's key (or is stale, or replayed)."""


class Busy(Exception):
    """Authentic, but more requests arrived within the replay window than it can remember."""


def internal_key(cluster_secret: bytes) -> bytes:
    return secret_mod.derive(cluster_secret, "internal")


def _big_int(value: Any) -> msgpack.ExtType:
    if isinstance(value, int):
        return msgpack.ExtType(BIG_INT_EXT, str(value).encode())
    raise TypeError(f"cannot send {type(value).__name__}")


def _ext(code: int, data: bytes) -> Any:
    return int(data) if code == BIG_INT_EXT else msgpack.ExtType(code, data)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, default=_big_int)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext, strict_map_key=False)


def _request_aad(method: str, path: str, peer: str, time_ns: int) -> bytes:
    return f"raftledger/v1/internal request\n{method}\n{path}\n{peer}\n{time_ns}".encode()


def _vouch_aad(peer: str, time_ns: int, credential: str) -> bytes:
    digest = hashlib.sha256(credential.encode()).hexdigest()
    return f"raftledger/v1/proxied request\n{peer}\n{time_ns}\n{digest}".encode()


def _answer_aad(request_nonce: bytes, status: int) -> bytes:
    return b"raftledger/v1/internal answer\n" + request_nonce + f"\n{status}".encode()


@dataclass(frozen=True, slots=True)
class SealedRequest:
    headers: dict[str, str]
    body: bytes
    nonce: bytes


class Sealer:
    """Seals and opens the internal protocol's bodies with one cluster's internal key."""

    def __init__(self, key: bytes, node_id: str) -> None:
        self._aead = AESGCM(key)
        self.node_id = node_id

    # -- a public request one node makes for its caller to another ----------------------------------
    def vouch(self, credential: str) -> str:
        """The ``X-Ledger-Proxied`` value of a request this node proxies for the holder of
        ``credential``: the receiving node has counted it already, so it does not count it again."""
        nonce = os.urandom(NONCE_BYTES)
        now = time.time_ns()
        tag = self._aead.encrypt(nonce, b"", _vouch_aad(self.node_id, now, credential))
        return f"{self.node_id}:{now}:{nonce.hex()}:{tag.hex()}"

    def vouched(self, value: str, credential: str, window_s: float) -> bool:
        """Whether ``value`` came from a node of this cluster for this credential within the window."""
        try:
            peer, when, nonce, tag = value.rsplit(":", 3)
            time_ns = int(when)
            if abs(time.time_ns() - time_ns) > window_s * 1e9:
                return False
            self._aead.decrypt(bytes.fromhex(nonce), bytes.fromhex(tag),
                               _vouch_aad(peer, time_ns, credential))
        except (ValueError, InvalidTag):
            return False
        return True

    # -- the caller's side --------------------------------------------------------------------------
    def seal_request(self, method: str, path: str, payload: Any) -> SealedRequest:
        nonce = os.urandom(NONCE_BYTES)
        now = time.time_ns()
        body = self._aead.encrypt(nonce, pack(payload), _request_aad(method, path, self.node_id, now))
        headers = {PEER_HEADER: self.node_id, TIME_HEADER: str(now), NONCE_HEADER: nonce.hex(),
                   "Content-Type": SEALED_TYPE}
        return SealedRequest(headers, body, nonce)

    def open_answer(self, request: SealedRequest, status: int, headers: Any, body: bytes) -> Any:
        try:
            nonce = bytes.fromhex(headers.get(NONCE_HEADER, ""))
            plain = self._aead.decrypt(nonce, body, _answer_aad(request.nonce, status))
        except (ValueError, InvalidTag):
            raise Unauthenticated(f"answer with status {status} is not sealed with this cluster's "
                                  "key") from None
        return unpack(plain)

    # -- the receiver's side ------------------------------------------------------------------------
    def open_request(self, method: str, path: str, headers: Any, body: bytes,
                     guard: ReplayGuard) -> tuple[str, bytes, Any]:
        """(sender node id, request nonce, payload); raises Unauthenticated."""
        peer = headers.get(PEER_HEADER, "")
        try:
            sent_ns = int(headers.get(TIME_HEADER, ""))
            nonce = bytes.fromhex(headers.get(NONCE_HEADER, ""))
        except ValueError:
            raise Unauthenticated("missing or malformed peer headers") from None
        if len(nonce) != NONCE_BYTES:
            raise Unauthenticated("malformed nonce")
        try:
            plain = self._aead.decrypt(nonce, body, _request_aad(method, path, peer, sent_ns))
        except InvalidTag:
            raise Unauthenticated("not sealed with this cluster's key") from None
        guard.admit(nonce, sent_ns, peer=peer)  # only authenticated requests may fill the replay cache
        try:
            return peer, nonce, unpack(plain)
        except (ValueError, msgpack.UnpackException) as exc:
            raise Unauthenticated(f"sealed payload is not msgpack: {exc}") from None

    def seal_answer(self, request_nonce: bytes, status: int, payload: Any) -> tuple[dict[str, str], bytes]:
        nonce = os.urandom(NONCE_BYTES)
        body = self._aead.encrypt(nonce, pack(payload), _answer_aad(request_nonce, status))
        return {NONCE_HEADER: nonce.hex(), "Content-Type": SEALED_TYPE}, body


class ReplayGuard:
    """Refuses a request whose time is outside the window, or whose nonce was seen within it.

    A nonce is remembered until its request's own time leaves the window: after that the time check
    refuses a replay anyway, whatever the skew between the two clocks."""

    def __init__(self, window_s: float, nonces_max: int, peer_clocks: PeerClocks | None = None) -> None:
        self.window_ns = int(window_s * 1e9)
        self.nonces_max = nonces_max
        self.peer_clocks = peer_clocks
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[int, bytes]] = []  # heap of (sent time + window, nonce)

    def admit(self, nonce: bytes, sent_ns: int, now_ns: int | None = None, peer: str = "") -> None:
        now = time.time_ns() if now_ns is None else now_ns
        if peer and self.peer_clocks is not None:  # authenticated: its time is the peer's word
            self.peer_clocks.observe(peer, now - sent_ns)
        if abs(now - sent_ns) > self.window_ns:
            raise Unauthenticated(f"request time is {(now - sent_ns) / 1e9:+.1f}s off this node's clock "
                                  f"(window ±{self.window_ns / 1e9:.0f}s)")
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        if nonce in self._seen:
            raise Unauthenticated("replayed request")
        if len(self._seen) >= self.nonces_max:
            raise Busy(f"{self.nonces_max} requests within the replay window")
        self._seen.add(nonce)
        heapq.heappush(self._expiry, (sent_ns + self.window_ns, nonce))


peers_off_min = 2  # peers that must find this node's clock off before it believes them
TOOL_SENDER = "raftledger-cli"  # the sender named by the operator's tools (raftledger.cluster.launcher)


class PeerClocks:
    """How far this node's wall clock is from its peers', as the times of their authenticated
    internal requests show it (the last offset of each peer, for ``memory_s``).

    Clocks are expected within ``window_s`` of each other (the internal protocol refuses requests
    beyond it). When at least two peers, and a majority of those heard from recently, are further
    off than that, the clock that is wrong is this node's: ``own_offset_ns`` says by how much (their
    median), so that what the cluster decides by time (a token's expiry) is not decided by this
    node's clock alone. One peer alone proves nothing: it may be the one that is off."""

    def __init__(self, window_s: float, memory_s: float, monotonic: Any = time.monotonic,
                 own_id: str = "") -> None:
        self.own_id = own_id
        self.window_ns = int(window_s * 1e9)
        self.memory_s = memory_s
        self._monotonic = monotonic
        self._last: dict[str, tuple[int, float]] = {}  # peer -> (own clock - its clock, when seen)

    def observe(self, peer: str, offset_ns: int) -> None:
        if peer in (TOOL_SENDER, self.own_id):  # an operator's tool, or this node calling itself:
            return                                # neither tells anything of the cluster's clocks
        self._last[peer] = (offset_ns, self._monotonic())

    def offsets_ns(self) -> dict[str, int]:
        """Per peer heard from recently: this node's clock minus the peer's, as its last sealed
        request showed it (the request's transit included, milliseconds on a LAN)."""
        since = self._monotonic() - self.memory_s
        return {peer: offset for peer, (offset, seen) in self._last.items() if seen >= since}

    def own_offset_ns(self) -> int | None:
        """This node's clock minus the cluster's, when it is off by more than the window for a
        majority of the peers heard from recently; None when it agrees with them (or heard none)."""
        recent = list(self.offsets_ns().values())
        off = sorted(offset for offset in recent if abs(offset) > self.window_ns)
        if len(off) < peers_off_min or 2 * len(off) <= len(recent):
            return None
        return off[len(off) // 2]
