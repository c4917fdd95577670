"""A shard's LMDB store, replaceable by a newer generation, and kept backed by disk.

A store is swapped by generation (``state.<gen>.mdb`` named by a ``CURRENT`` file) so readers on other
threads keep a valid environment until the old one is retired.

LMDB commits are not fsynced: the Raft journal (flushed before every acknowledgement) and the snapshot
dump are what make a write durable, and the store is derived from them. A process crash loses nothing
the page cache holds, but an operating-system crash can leave an unsynced LMDB file torn. So each
generation has a marker file saying which boot of the machine last wrote it unsynced (``open``) or
that it was synced at a clean close (``clean``). A store written unsynced during an earlier boot is
not trusted: it is deleted and rebuilt from the dump and the journal, as a new replica would be. Where
the kernel does not give a boot id, every LMDB commit is fsynced instead. (With ``durability = none``
nothing is fsynced: a machine crash may lose or tear anything, as the setting says.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

from raftledger.statemachine.store import LedgerStore

from .files import fsync_dir, write_file_durably
from .settings import SnapshotSettings

log = logging.getLogger(__name__)

BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
MARKER_SUFFIX = "-boot"
MARK_OPEN = "open"  # written unsynced since the boot named in the marker
MARK_CLEAN = "clean"  # synced at a clean close
STORE_FILE_SUFFIXES = ("", "-lock", MARKER_SUFFIX)  # the files of one store generation

Retire = Callable[[LedgerStore], None]


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
    at least ``ahead_min_bytes``, topped up when half of that is used), a full disk fails the
    allocation instead: an error of this shard's apply, which stops it while the node goes on.
    """

    def __init__(self, store: LedgerStore, ahead_min_bytes: int) -> None:
        self.store = store
        self.ahead_min_bytes = ahead_min_bytes
        self.reserved = 0
        self._fd = os.open(store.path, os.O_RDWR)

    def ensure(self) -> None:
        used = self.store.bytes_used()
        ahead = max(self.ahead_min_bytes, used // 8)
        if used + ahead // 2 > self.reserved:
            os.posix_fallocate(self._fd, 0, used + ahead)
            self.reserved = used + ahead

    def close(self) -> None:
        os.close(self._fd)


class StoreSlot:
    """The shard's current LedgerStore, replaceable by a newer generation installed from a snapshot."""

    def __init__(self, directory: str, shard: int, *, sync: bool, retire: Retire | None = None,
                 reserve_ahead_min_bytes: int | None = None) -> None:
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
        if reserve_ahead_min_bytes is None:
            reserve_ahead_min_bytes = SnapshotSettings().disk_reserve_min_bytes
        self._reserve = DiskReserve(self.current, reserve_ahead_min_bytes)

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
        self._reserve = DiskReserve(self.current, self._reserve.ahead_min_bytes)
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
