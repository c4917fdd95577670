"""Log compaction for a shard replica: LMDB snapshots in PySyncObj's full-dump file.

PySyncObj's default compaction pickles the whole SyncObj, which cannot hold an LMDB environment. Its
``serializer``/``deserializer``/``serializeChecker`` hooks let us write our own dump instead:

    MAGIC (8) | store applied index (u64) | meta length (u32) | meta (pickle) | compacted LMDB copy

``meta`` is PySyncObj's own tuple (last applied entry, the one before, cluster). The store's applied index
may be ahead of the entry in ``meta`` because the copy runs in a background thread while the replica keeps
applying; that is safe: entries between the two are committed and the store skips them on replay.

A store is swapped by generation (``state.<gen>.mdb`` named by a ``CURRENT`` file) so readers on other
threads keep a valid environment until the old one is retired.

LMDB commits are not fsynced: the Raft journal (flushed before every acknowledgement) and the dump are
what make a write durable, and the store is derived from them. A process crash loses nothing the page
cache holds, but an operating-system crash can leave an unsynced LMDB file torn. So each generation has
a marker file saying which boot of the machine last wrote it unsynced (``open``) or that it was synced
at a clean close (``clean``). A store written unsynced during an earlier boot is not trusted: it is
deleted and rebuilt from the dump and the journal, as a new replica would be. Where the kernel does
not give a boot id, every LMDB commit is fsynced instead. (With ``durability = none`` nothing is
fsynced: a machine crash may lose or tear anything, as the setting says.)
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

from pysyncobj.config import SERIALIZER_STATE
from raftledger.statemachine.store import LedgerStore

from .journal import fsync_dir, write_file_durably

if TYPE_CHECKING:
    from .applier import Applier

log = logging.getLogger(__name__)

MAGIC = b"RLSNAP01"
HEADER = struct.Struct("<8sQI")
INDEX_OFFSET = 8
COPY_CHUNK_BYTES = 1 << 20
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
MARKER_SUFFIX = "-boot"
MARK_OPEN = "open"  # written unsynced since the boot named in the marker
MARK_CLEAN = "clean"  # synced at a clean close
STORE_FILE_SUFFIXES = ("", "-lock", MARKER_SUFFIX)  # the files of one store generation
snapshot_retry_s = 30.0  # after a failed snapshot, before the next attempt
apply_wait_s = 120.0  # how long a snapshot waits for the applier to reach the snapshot's entries
disk_reserve_min_bytes = 8 << 20  # DiskReserve: the least a store file is allocated ahead of its last page

Retire = Callable[[LedgerStore], None]


class SnapshotError(Exception):
    pass


def boot_id() -> str | None:
    """Changes whenever the operating system restarts; None where the kernel does not say."""
    try:
        with open(BOOT_ID_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


class DiskReserve:
    """Keeps a store's file allocated ahead of LMDB's last page.

    With writemap the file is sparse and LMDB writes new pages through the map: a page the disk
    cannot back raises SIGBUS, which kills the whole node. Allocated ahead (an eighth of the store,
    at least ``disk_reserve_min_bytes``, topped up when half of that is used), a full disk fails the
    allocation instead: an error of this shard's apply, which stops it while the node goes on.
    """

    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self.reserved = 0
        self._fd = os.open(store.path, os.O_RDWR)

    def ensure(self) -> None:
        used = self.store.bytes_used()
        ahead = max(disk_reserve_min_bytes, used // 8)
        if used + ahead // 2 > self.reserved:
            os.posix_fallocate(self._fd, 0, used + ahead)
            self.reserved = used + ahead

    def close(self) -> None:
        os.close(self._fd)


class StoreSlot:
    """The shard's current LedgerStore, replaceable by a newer generation installed from a snapshot."""

    def __init__(self, directory: str, shard: int, *, sync: bool, retire: Retire | None = None) -> None:
        """``sync`` (``durability = fsync``): fsync what this slot writes (markers, installed copies),
        and every LMDB commit where the kernel gives no boot id."""
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.shard = shard
        self.sync = sync
        self.retire = retire
        self.boot = boot_id()
        self.rebuilt = False  # the store on disk was distrusted at open and started empty
        self.generation = self._read_generation()
        self._remove_other_generations()
        self.current = self._open(self.generation)
        self._reserve = DiskReserve(self.current)

    def reserve_disk(self) -> None:
        """Before each apply (the apply thread; a snapshot is installed only while it is idle)."""
        self._reserve.ensure()

    def _open(self, generation: int) -> LedgerStore:
        path = self.path(generation)
        if os.path.exists(path) and not self._trusted(path):
            log.warning("shard %d: %s was written without fsync before the machine restarted; "
                        "rebuilding it from the snapshot and the Raft journal", self.shard, path)
            self._remove_files(path)
            self.rebuilt = True
        if self.boot is None:  # nothing to tell this boot from the last: sync every commit
            return LedgerStore(path, shard=self.shard, sync=self.sync)
        # The marker is durable before the first unsynced LMDB write it vouches for.
        self._mark(path, MARK_OPEN)
        return LedgerStore(path, shard=self.shard, sync=False)

    def _trusted(self, path: str) -> bool:
        """A store is whole if it was synced at close, or written only during this boot (its pages are
        in the page cache). No marker: written with every commit synced, or installed from a
        snapshot just before a crash (both fsynced with ``durability = fsync``)."""
        try:
            with open(path + MARKER_SUFFIX) as f:
                boot, _, mark = f.read().partition("\n")
        except FileNotFoundError:
            return True
        return mark == MARK_CLEAN or (self.boot is not None and boot == self.boot)

    @staticmethod
    def _remove_files(path: str) -> None:
        for suffix in STORE_FILE_SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)

    def _mark(self, path: str, mark: str) -> None:
        data = f"{self.boot}\n{mark}".encode()
        if self.sync:
            write_file_durably(path + MARKER_SUFFIX, data)
        else:
            with open(path + MARKER_SUFFIX, "wb") as f:
                f.write(data)

    def _remove_other_generations(self) -> None:
        """Files of generations a crash left behind (replaced, or installed but never named current)."""
        keep = {os.path.basename(self.path(self.generation)) + s for s in STORE_FILE_SUFFIXES}
        for name in os.listdir(self.directory):
            if name.startswith("state.") and name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.directory, name))

    def path(self, generation: int) -> str:
        return os.path.join(self.directory, f"state.{generation}.mdb")

    def _read_generation(self) -> int:
        try:
            with open(os.path.join(self.directory, "CURRENT")) as f:
                return int(f.read().strip())
        except FileNotFoundError:
            return 0

    def install(self, lmdb_file: str) -> None:
        """Make ``lmdb_file`` (already fsynced) the next generation and switch to it."""
        generation = self.generation + 1
        os.replace(lmdb_file, self.path(generation))
        fsync_dir(self.directory)
        write_file_durably(os.path.join(self.directory, "CURRENT"), str(generation).encode())
        old, old_generation = self.current, self.generation
        self.current = self._open(generation)
        self.generation = generation
        self._reserve.close()
        self._reserve = DiskReserve(self.current)
        self._retire(old, old_generation)

    def _retire(self, old: LedgerStore, generation: int) -> None:
        def close_and_remove(store: LedgerStore = old) -> None:
            store.close()
            self._remove_files(self.path(generation))

        if self.retire is None:
            close_and_remove()
        else:
            self.retire(close_and_remove)  # type: ignore[arg-type]

    def close(self) -> None:
        """Sync the store and mark it clean: the next open trusts it whatever happens to the machine."""
        if self.boot is not None:
            self.current.env.sync(True)
            self._mark(self.current.path, MARK_CLEAN)
        self.current.close()
        self._reserve.close()


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

    def __init__(self, slot: StoreSlot, dump_file: str, applier: Applier, *, sync: bool) -> None:
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
            if not self.applier.wait_processed(handed_over, apply_wait_s):
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
                          snapshot_retry_s)
            with contextlib.suppress(FileNotFoundError):
                os.remove(work)
            with self._lock:
                self._state = SERIALIZER_STATE.FAILED
                self._retry_after = time.monotonic() + snapshot_retry_s
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
        if not self.applier.wait_idle(apply_wait_s):  # the store is about to be swapped under it
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
