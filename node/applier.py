"""Applies committed Raft entries to the ledger store on a thread of its own, in log order.

PySyncObj calls the replicated method on its tick thread, the same thread that sends heartbeats, acks
``append_entries`` and checks election deadlines. Applying a 1000-transfer entry takes 100 ms alone and
far longer on a busy machine; done inline, one such entry can make followers start elections. The tick
thread therefore only hands ``(index, payload)`` here, and stops handing more while ``backlog_max``
entries wait (PySyncObj then simply applies later). Results reach their callers through ``notify``
markers queued right behind their entry. The store's exactly-once rule (skip ``index <= applied``) is
unchanged, so journal replays after a restart remain harmless. An apply that fails on the disk (full,
or an I/O error) stops the whole node (``files.fail_stop``); any other failure stops this shard's
applying, never skipping an entry.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from raftledger.statemachine.records import Outcome

from .files import fail_stop, is_disk_error
from .store_slot import StoreSlot

log = logging.getLogger(__name__)

Notify = Callable[[list[Outcome] | None], None]


class Applier:
    def __init__(self, slot: StoreSlot, on_applied: Callable[[int], None] | None = None,
                 stop_node: Callable[[str, BaseException], None] = fail_stop) -> None:
        """``stop_node``: what a failure on the disk does (the process exits; a test of the applier
        alone records it instead, and this shard then stops applying)."""
        self.slot = slot
        self._on_applied = on_applied
        self._stop_node = stop_node
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._backlog = 0
        self.enqueued = 0  # last index handed over (tick thread)
        self.processed = 0  # last index applied (apply thread)
        self.failed: BaseException | None = None
        self._last: tuple[int, list[Outcome] | None] = (0, None)
        self._thread = threading.Thread(target=self._run, name=f"apply-{slot.shard}", daemon=True)
        self._thread.start()

    # -- tick thread --------------------------------------------------------------------------------
    def submit(self, index: int, payload: bytes) -> None:
        with self._cond:
            self._backlog += 1
            self.enqueued = index
        self._queue.put(("apply", index, payload))

    def notify(self, index: int, fn: Notify) -> None:
        """Call ``fn(outcomes)`` on the apply thread once entry ``index`` (just submitted) is applied."""
        self._queue.put(("notify", index, fn))

    def backlog(self) -> int:
        return self._backlog

    def wait_processed(self, index: int, timeout_s: float) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self.processed >= index or self.failed is not None, timeout_s)
            return self.processed >= index and self.failed is None

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._backlog == 0 or self.failed is not None, timeout_s)
            return self._backlog == 0 and self.failed is None

    def close(self) -> None:
        """Apply what was handed over, then stop."""
        self._queue.put(None)
        self._thread.join()

    # -- apply thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if item[0] == "apply":
                if self.failed is None:
                    self._apply(item[1], item[2])
            else:
                _, index, fn = item
                fn(self._last[1] if self._last[0] == index else None)

    def _apply(self, index: int, payload: bytes) -> None:
        try:
            self.slot.reserve_disk()
            outcomes = self.slot.current.apply_entry(index, payload)
        except BaseException as exc:  # the store cannot go on: stop applying, never skip an entry
            if is_disk_error(exc):  # every shard of the node shares the disk: the node stops
                self._stop_node(f"shard {self.slot.shard}: applying entry {index}", exc)
            log.critical("shard %d: applying entry %d failed; replica stops applying",
                         self.slot.shard, index, exc_info=True)
            with self._cond:
                self.failed = exc
                self._cond.notify_all()
            return
        self._last = (index, outcomes)
        with self._cond:
            self.processed = index
            self._backlog -= 1
            self._cond.notify_all()
        if self._on_applied is not None:
            self._on_applied(index)
