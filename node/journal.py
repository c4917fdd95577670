"""A PySyncObj journal that is durable before anything depending on it leaves the process.

PySyncObj's ``FileJournal`` appends through an mmap and only flushes when destroyed; its ``.meta`` file
(term, vote, commit index) is written and renamed without fsync. Raft needs a follower's entries on stable
storage before it answers ``append_entries``, the leader's own entries before it counts itself towards a
majority, and term/vote before any vote is sent. ``DurableJournal`` marks itself dirty on every append and
is flushed once per appended batch by ``flush_if_dirty`` — the replica calls it before every network send
and before each tick's commit computation, so one fdatasync covers every entry appended since the last one.

PySyncObj builds its journal through the module-level ``createJournal`` in ``pysyncobj.syncobj``;
``register`` records the options for a journal path and ``install`` points that name at ``create_journal``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pysyncobj.syncobj as _syncobj
from pysyncobj.journal import FileJournal, MetaStorer
from pysyncobj.journal import createJournal as _original_create_journal
from pysyncobj.pickle import dumps

DURABILITY_FSYNC = "fsync"
DURABILITY_NONE = "none"
DURABILITY_MODES = (DURABILITY_FSYNC, DURABILITY_NONE)

FlushObserver = Callable[[int], None]
MetaObserver = Callable[[int, object], None]
FsyncObserver = Callable[[float], None]


@dataclass(frozen=True, slots=True)
class JournalOptions:
    durability: str = DURABILITY_FSYNC
    on_flush: FlushObserver | None = None  # called with the last flushed log index (tests record order)
    on_meta: MetaObserver | None = None  # called with (term, vote) once they are on disk
    on_fsync: FsyncObserver | None = None  # called with the seconds each flush of the entries took


def fsync_dir(path: str) -> None:
    """Make a rename or a file creation in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: str, data: bytes) -> None:
    """Write, fsync, rename over ``path``, fsync the directory: the file is old or new, never torn."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


class DurableMetaStorer(MetaStorer):
    """Term, vote and commit index written with write + fsync + rename + fsync(dir)."""

    def storeMeta(self, meta: dict) -> None:  # noqa: N802 (PySyncObj's name)
        write_file_durably(self.getPath(), dumps(meta))


class DurableJournal(FileJournal):
    """``FileJournal`` whose appends are flushed in groups and whose meta is fsynced."""

    def __init__(self, journal_file: str, options: JournalOptions) -> None:
        existed = os.path.exists(journal_file)
        super().__init__(journal_file)
        self._options = options
        self._sync = options.durability == DURABILITY_FSYNC
        self._dirty = False
        self._last_index = self[-1][1] if len(self) else 0
        self.bytes_held = sum(len(entry[0]) for entry in self[:])  # entries kept in memory
        self._lock = threading.Lock()
        self.flush_count = 0
        if self._sync:
            # Replace the name-mangled storer FileJournal made: same file, durable writes.
            self._FileJournal__metaStorer = DurableMetaStorer(journal_file + ".meta")
            if not existed:
                self._flush_file()
                fsync_dir(os.path.dirname(os.path.abspath(journal_file)))

    def add(self, command, idx, term):  # noqa: ANN001 (PySyncObj's signature)
        super().add(command, idx, term)
        self._last_index = idx
        self.bytes_held += len(command)
        self._dirty = True

    def clear(self):
        super().clear()
        self.bytes_held = 0
        self._dirty = True

    def deleteEntriesFrom(self, entryFrom):  # noqa: N802, N803
        """Followers call this whenever the leader resends entries they hold (often, under load):
        only the removed tail is counted, never the whole journal."""
        self.bytes_held -= sum(len(entry[0]) for entry in self[entryFrom:])
        super().deleteEntriesFrom(entryFrom)
        self._last_index = self[-1][1] if len(self) else 0
        self._dirty = True

    def setCurrentTerm(self, term, votedForNodeId):  # noqa: N802, N803, ANN001 (PySyncObj's name)
        super().setCurrentTerm(term, votedForNodeId)  # stores the meta synchronously
        if self._options.on_meta is not None:
            self._options.on_meta(term, votedForNodeId)

    def flush_if_dirty(self) -> bool:
        """One fdatasync for everything appended since the last flush; True if it flushed."""
        if not self._dirty:
            return False
        took = -1.0
        with self._lock:
            self._dirty = False
            if self._sync:
                started = time.perf_counter()
                self._flush_file()
                took = time.perf_counter() - started
            self.flush_count += 1
        if took >= 0 and self._options.on_fsync is not None:
            self._options.on_fsync(took)
        if self._options.on_flush is not None:
            self._options.on_flush(self._last_index)
        return True

    @property
    def last_index(self) -> int:
        return self._last_index

    def _flush_file(self) -> None:
        """fdatasync of the journal's file. PySyncObj's ``flush`` is ``mmap.flush``, whose msync holds
        the GIL on CPython 3.11 and so froze every thread of the node for each flush (0.3 ms to
        several ms); on Linux msync(MS_SYNC) of a shared mapping is an fdatasync of the file, and
        ``os.fdatasync`` lets the other threads run meanwhile. The file object is looked up each
        time: PySyncObj reopens it when it grows the file."""
        resizable = self._FileJournal__journalFile
        os.fdatasync(resizable._ResizableFile__f.fileno())


_registry: dict[str, JournalOptions] = {}
_registry_lock = threading.Lock()


def register(journal_file: str, options: JournalOptions) -> None:
    """Make the next SyncObj built with ``journalFile=journal_file`` use a DurableJournal."""
    install()
    with _registry_lock:
        _registry[os.path.abspath(journal_file)] = options


def create_journal(journalFile: str | None = None):  # noqa: ANN201, N803 (PySyncObj's signature)
    if journalFile is not None:
        with _registry_lock:
            options = _registry.get(os.path.abspath(journalFile))
        if options is not None:
            return DurableJournal(journalFile, options)
    return _original_create_journal(journalFile)


def install() -> None:
    _syncobj.createJournal = create_journal
