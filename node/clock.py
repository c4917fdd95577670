"""Time as the node's waits see it: the batcher's linger, commit timeouts, leader waits, expiry checks.

Code that waits takes a ``Clock`` instead of calling ``time`` and ``asyncio`` directly, so tests can
drive it with ``raftledger.node.testing.FakeClock`` and check batching and failover logic without
wall time. ``SystemClock`` is the real one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds, for deadlines."""

    def time_ns(self) -> int:
        """Wall-clock nanoseconds since the epoch, for leader timestamps."""

    async def sleep(self, seconds: float) -> None: ...

    async def wait(self, awaitable: Awaitable[Any], timeout_s: float) -> bool:
        """Wait for ``awaitable`` at most ``timeout_s``; True if it finished. A future passed in is
        never cancelled (it may be shared); a coroutine is cancelled when time runs out."""

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time_ns(self) -> int:
        return time.time_ns()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, awaitable: Awaitable[Any], timeout_s: float) -> bool:
        return await wait_with(awaitable, asyncio.sleep(max(0.0, timeout_s)))

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(seconds, callback)


async def wait_with(awaitable: Awaitable[Any], timer: Awaitable[None]) -> bool:
    """True if ``awaitable`` finishes before ``timer``; a coroutine is cancelled if it does not."""
    owned = not asyncio.isfuture(awaitable)
    target = asyncio.ensure_future(awaitable)
    alarm = asyncio.ensure_future(timer)
    try:
        await asyncio.wait({target, alarm}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        alarm.cancel()
        if owned and not target.done():
            target.cancel()
    return target.done()


SYSTEM_CLOCK = SystemClock()


class ProposalHold:
    """New entries wait while a leadership transfer stands: the transfer needs the target's log to
    match the leader's when it gets its cue, which never happens while a leader under load keeps
    appending, and an entry appended after the cue leaves the target behind, so it loses the election
    it was asked to hold. Proposals queue meanwhile; a deposed leader answers them ``not_leader``."""

    def __init__(self, clock: Clock, is_leader: Callable[[], bool]) -> None:
        self.clock = clock
        self.is_leader = is_leader
        self._until = 0.0  # monotonic
        self._released = asyncio.Event()

    def hold(self, seconds: float) -> None:
        """For ``seconds`` or until ``release``."""
        self._until = self.clock.monotonic() + seconds
        self._released.clear()

    def release(self) -> None:
        self._until = 0.0
        self._released.set()

    async def wait(self) -> None:
        """Until the hold ends, if this member leads (a follower proposes nothing to hold)."""
        remaining = self._until - self.clock.monotonic()
        if remaining > 0 and self.is_leader():
            await self.clock.wait(self._released.wait(), remaining)
