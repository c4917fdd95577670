"""How a node follows the cluster map: the newest map it has seen, and a signal when a newer one arrives.

Every node keeps one ``MapFollower``. On a node hosting a member of the metadata group, the member
hands it each map as it applies it (``update``, on the event loop). Any other node runs ``long_poll``:
it asks a host for a map newer than the one it has (``/internal/v1/map``, which the host answers as
soon as its epoch passes the caller's, or after a bounded wait with what it has) and asks again at
once; only when no host answered does it wait before the next round. Nothing polls on a timer.

Waiters never poll either: ``changed()`` is a future that resolves at the next newer map (shared by
every waiter: await it with ``asyncio.wait`` or ``shield``, never cancel it), and ``wait_epoch`` waits
(bounded) for the map to reach an epoch that a shard or a peer named.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from raftledger.node.clock import SYSTEM_CLOCK, Clock

from .map import ClusterMap

log = logging.getLogger(__name__)

Ask = Callable[[str, int], Awaitable[ClusterMap | None]]  # (host, epoch held) -> a map or None


class MapFollower:
    """This node's map (None until it has one) and the future of its next change."""

    def __init__(self, current: ClusterMap | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.current = current
        self.clock = clock
        self.closed = False  # the node is stopping: waits for a newer map end at once
        self._next: asyncio.Future[None] | None = None

    @property
    def epoch(self) -> int:
        """The epoch of the map this node has (0: none yet)."""
        return 0 if self.current is None else self.current.epoch

    def changed(self) -> asyncio.Future[None]:
        """Resolves when a newer map arrives."""
        if self._next is None or self._next.done():
            self._next = asyncio.get_running_loop().create_future()
        return self._next

    def update(self, new: ClusterMap) -> bool:
        """Take ``new`` if it is newer than the map held (on the event loop); True if it was."""
        if new.epoch <= self.epoch:
            return False
        self.current = new
        waiting, self._next = self._next, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        return True

    def close(self) -> None:
        """The node is stopping: wake every waiter, and make later waits end at once (a host's long
        polls answer instead of holding its shutdown)."""
        self.closed = True
        waiting, self._next = self._next, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def wait_epoch(self, epoch: int, timeout_s: float) -> bool:
        """Wait until the map held is at ``epoch`` or newer, at most ``timeout_s``; True if it is."""
        deadline = self.clock.monotonic() + timeout_s
        while self.epoch < epoch and not self.closed:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return False
            await self.clock.wait(self.changed(), remaining)  # never cancels the shared future
        return self.epoch >= epoch


async def long_poll(follower: MapFollower, hosts: Callable[[], Sequence[str]], ask: Ask,
                    retry_s: float) -> None:
    """Follow the map from the metadata group's hosts, forever (cancel the task to stop).

    ``ask(host, epoch)`` is one long poll: a map newer than ``epoch`` or the host's own, or None when
    the host has none; it raises when the host cannot be reached. A round that reaches no host waits
    ``retry_s`` before the next: that host is down, and nothing else would say when it is back.
    """
    start = 0
    while True:
        candidates = list(hosts())
        answered = False
        for i in range(len(candidates)):
            host = candidates[(start + i) % len(candidates)]
            try:
                found = await ask(host, follower.epoch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable, or not a host (yet): try the next one
                log.debug("map: no answer from %s: %s", host, exc)
                continue
            answered = True
            start = (start + i) % len(candidates)  # stay with a host that answers
            if found is not None and follower.update(found):
                log.info("map: epoch %d from %s", found.epoch, host)
            break
        if not answered:
            start += 1
            await follower.clock.sleep(retry_s)
