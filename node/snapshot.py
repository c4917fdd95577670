"""Log compaction for a shard replica: LMDB snapshots in PySyncObj's full-dump file.

PySyncObj's default compaction pickles the whole SyncObj, which cannot hold an LMDB environment. Its
``serializer``/``deserializer``/``serializeChecker`` hooks let us write our own dump instead:

    MAGIC (8) | store applied index (u64) | meta length (u32) | meta (pickle) | compacted LMDB copy

``meta`` is PySyncObj's own tuple (last applied entry, the one before, cluster). The store's applied index
may be ahead of the entry in ``meta`` because the copy runs in a background thread while the replica keeps
applying; that is safe: entries between the two are committed and the store skips them on replay.
Installing a dump swaps in a new store generation (``node/store_slot.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raftledger.statemachine.store import LedgerStore

from .files import fsync_dir
from .raft import SERIALIZER_STATE
from .settings import SnapshotSettings
from .store_slot import StoreSlot

if TYPE_CHECKING:
    from .applier import Applier

log = logging.getLogger(__name__)

MAGIC = b"RLSNAP01"
HEADER = struct.Struct("<8sQI")
INDEX_OFFSET = 8
COPY_CHUNK_BYTES = 1 << 20


class SnapshotError(Exception):
    pass


def write_snapshot(path: str, store: LedgerStore, meta: Any, sync: bool) -> int:
    """Write a complete dump to ``path`` (not atomically: callers write a temp file and rename)."""
    meta_bytes = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, HEADER.pack(MAGIC, 0, len(meta_bytes)) + meta_bytes)
        store_index = store.copy_to_fd(fd)
        os.pwrite(fd, struct.pack("<Q", store_index), INDEX_OFFSET)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return store_index


def read_header(path: str) -> tuple[int, Any, int]:
    """(store applied index, PySyncObj meta, offset of the LMDB bytes)."""
    with open(path, "rb") as f:
        magic, store_index, meta_len = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise SnapshotError(f"{path}: not a raftledger snapshot")
        meta = pickle.loads(f.read(meta_len))
    return store_index, meta, HEADER.size + meta_len


def extract_lmdb(path: str, offset: int, target: str, sync: bool) -> None:
    """Copy the LMDB part of a dump into ``target``."""
    with open(path, "rb") as src, open(target, "wb") as dst:
        src.seek(offset)
        while chunk := src.read(COPY_CHUNK_BYTES):
            dst.write(chunk)
        dst.flush()
        if sync:
            os.fsync(dst.fileno())


class Snapshotter:
    """PySyncObj's serializer hooks for one replica; the copy runs on a background thread."""

    def __init__(self, slot: StoreSlot, dump_file: str, applier: Applier, *, sync: bool,
                 settings: SnapshotSettings | None = None) -> None:
        self.settings = settings or SnapshotSettings()
        self.slot = slot
        self.applier = applier
        self.dump_file = dump_file
        self.sync = sync
        self._lock = threading.Lock()
        self._state = SERIALIZER_STATE.NOT_SERIALIZING
        self._thread: threading.Thread | None = None
        self._cancelled = False
        self._retry_after = 0.0
        self.last_duration_s = 0.0
        self.installed = 0  # snapshots installed from a leader (or a newer local dump)
        self.on_installed: Callable[[], None] | None = None
        self.completed = 0  # snapshots this replica wrote

    # -- serializer: called on the tick thread by PySyncObj's Serializer.serialize -------------------
    def serialize(self, tmp_file: str, data: Any) -> None:
        """Start the copy in the background.

        PySyncObj renames ``tmp_file`` over the dump right after this returns. Hard-link the existing
        dump there so that rename keeps the old dump intact; with no dump yet the rename fails, which
        PySyncObj logs and ignores because ``serializeChecker`` owns the outcome.
        """
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_file)
        if os.path.exists(self.dump_file):
            os.link(self.dump_file, tmp_file)
        with self._lock:
            self._state = SERIALIZER_STATE.SERIALIZING
            self._cancelled = False
            if time.monotonic() < self._retry_after:
                # PySyncObj retries a failed compaction on the very next tick; hold it off instead.
                self._thread = None
                return
        # Every entry PySyncObj has applied so far was handed to the applier up to this index; the copy
        # must contain them all before the journal is cut at the snapshot's entry.
        handed_over = self.applier.enqueued
        self._thread = threading.Thread(target=self._write, args=(handed_over, data), daemon=True,
                                        name=f"snapshot-{self.slot.shard}")
        self._thread.start()

    def _write(self, handed_over: int, meta: Any) -> None:
        started = time.monotonic()
        work = self.dump_file + ".bg"
        try:
            if not self.applier.wait_processed(handed_over, self.settings.apply_wait_s):
                raise SnapshotError(f"applier did not reach index {handed_over}")
            write_snapshot(work, self.slot.current, meta, self.sync)
            with self._lock:
                if self._cancelled:
                    os.remove(work)
                    self._state = SERIALIZER_STATE.FAILED
                    return
                os.replace(work, self.dump_file)
                if self.sync:
                    fsync_dir(os.path.dirname(os.path.abspath(self.dump_file)))
                self._state = SERIALIZER_STATE.SUCCESS
                self.completed += 1
        except Exception:
            log.exception("shard %d: snapshot failed; next attempt in %.0fs", self.slot.shard,
                          self.settings.retry_s)
            with contextlib.suppress(FileNotFoundError):
                os.remove(work)
            with self._lock:
                self._state = SERIALIZER_STATE.FAILED
                self._retry_after = time.monotonic() + self.settings.retry_s
        finally:
            self.last_duration_s = time.monotonic() - started

    @property
    def busy(self) -> bool:
        return self._state != SERIALIZER_STATE.NOT_SERIALIZING

    def check(self) -> int:
        """serializeChecker: SUCCESS/FAILED are reported once, then NOT_SERIALIZING. An attempt made
        while backing off after a failure shows as in progress until the backoff ends, then FAILED."""
        with self._lock:
            if self._thread is None and self._state == SERIALIZER_STATE.SERIALIZING and \
                    time.monotonic() >= self._retry_after:
                self._state = SERIALIZER_STATE.FAILED
            state = self._state
            if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._state = SERIALIZER_STATE.NOT_SERIALIZING
        return state

    def _cancel_background(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._cancelled = True
        thread.join()
        self._thread = None

    # -- deserializer: restart (our own dump) or install (a leader's dump) ---------------------------
    def deserialize(self, dump_file: str) -> Any:
        """Install the dump's LMDB copy unless the local store already applied as far; return meta.

        PySyncObj swallows any exception raised here and carries on without the snapshot, so a
        failure is logged as critical: a replica whose store was rebuilt has nothing else to go on."""
        try:
            return self._install_dump(dump_file)
        except Exception:
            log.critical("shard %d: loading the snapshot %s failed%s", self.slot.shard, dump_file,
                         "; the store was distrusted and is empty" if self.slot.rebuilt else "",
                         exc_info=True)
            raise

    def _install_dump(self, dump_file: str) -> Any:
        if self.sync:
            # A dump received from the leader was written and renamed by PySyncObj without fsync; the
            # journal is cut right after this returns and a distrusted store is rebuilt from the dump.
            with open(dump_file, "rb") as f:
                os.fsync(f.fileno())
            fsync_dir(os.path.dirname(os.path.abspath(dump_file)))
        self._cancel_background()
        # The store is about to be swapped under the applier: it must be idle.
        if not self.applier.wait_idle(self.settings.apply_wait_s):
            raise SnapshotError("applier did not drain before snapshot install")
        store_index, meta, offset = read_header(dump_file)
        if self.slot.current.applied_index() < store_index:
            target = os.path.join(self.slot.directory, "incoming.mdb")
            extract_lmdb(dump_file, offset, target, self.sync)
            self.slot.install(target)
            self.installed += 1
            log.info("shard %d: installed snapshot at store index %d", self.slot.shard, store_index)
            if self.on_installed is not None:
                self.on_installed()
        return meta

    def close(self) -> None:
        self._cancel_background()
