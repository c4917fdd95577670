"""Writing files so that a crash leaves the old or the new version, never a torn one; and what the
node does when a write it cannot take back fails (``fail_stop``)."""

from __future__ import annotations

import errno
import logging
import os
from typing import NoReturn

import lmdb

disk_failed_exit_status = 74  # EX_IOERR (sysexits.h)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

log = logging.getLogger(__name__)


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


def is_disk_error(exc: BaseException) -> bool:
    """A write that reached the disk and failed there: full (ENOSPC, EDQUOT, LMDB's DiskError) or an
    I/O error; not a programming error or a refused command."""
    return isinstance(exc, lmdb.DiskError) or (isinstance(exc, OSError) and (
        exc.errno in DISK_FULL_ERRNOS or exc.errno == errno.EIO))


def fail_stop(what: str, exc: BaseException) -> NoReturn:
    """Exit the process at once: ``what`` (a Raft journal append, its meta, an entry's apply) failed,
    and a node that went on could acknowledge or apply what is not on disk, or skip an entry.
    Nothing else is flushed (as after SIGKILL); a restart, once the disk has room again, replays the
    journal and catches up from the leader."""
    full = isinstance(exc, lmdb.DiskError) or getattr(exc, "errno", None) in DISK_FULL_ERRNOS
    log.critical("%s failed (%s): %r; the node stops (exit status %d): restart it once %s", what,
                 "disk full" if full else "disk error" if is_disk_error(exc) else "journal error",
                 exc, disk_failed_exit_status, "the disk has room again" if full else "the cause is fixed")
    logging.shutdown()
    os._exit(disk_failed_exit_status)
