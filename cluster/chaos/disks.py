"""A small filesystem of its own under each node's data directory, so that the ``disk`` fault can fill
one replica's disk and no other's.

Each is an ext4 image (sparse, in the run's folder) loop-mounted on the node's data directory before
the node first starts, with no blocks reserved for root (the nodes run as root: a reserve would let
them write on after the filler stops). Mounting needs root; without it the harness plans no ``disk``
fault. ``fill`` writes a filler file until the filesystem answers ENOSPC (data first, then the last
blocks one by one), ``drain`` deletes it. ``close`` unmounts every filesystem it mounted, whatever
happened before (the runner calls it on errors and Ctrl-C too).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess

log = logging.getLogger(__name__)

FILLER = "chaos-filler"
disk_size_bytes = 1 << 30  # a 1-hour run at 5 nodes, 4 shards stays far below (docs/reliability.md)
command_timeout_s = 60.0
fill_step_max_bytes = 64 << 20
block_bytes = 4096
fill_steps_max = 100_000  # bounds each loop (a step halves at each refusal: 15 refusals end it)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskUnavailable(Exception):
    """The harness cannot give nodes filesystems of their own here (not root, no loop device...)."""


def unavailable_reason() -> str | None:
    """Why the ``disk`` fault cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "the harness is not root (mounting a filesystem per node needs root)"
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    return None


class Disks:
    """The filesystems mounted for one run: node -> mount point (its data directory)."""

    def __init__(self, images_dir: str, size_bytes: int = disk_size_bytes) -> None:
        self.images_dir = images_dir
        self.size_bytes = size_bytes
        self.mounts: dict[str, str] = {}

    def mount(self, node: str, path: str) -> None:
        """An empty ext4 filesystem of ``size_bytes`` on ``path`` (made empty first)."""
        os.makedirs(self.images_dir, exist_ok=True)
        image = os.path.join(self.images_dir, f"{node}.ext4")
        with open(image, "wb") as f:
            f.truncate(self.size_bytes)
        os.makedirs(path, exist_ok=True)
        if os.listdir(path):
            raise DiskUnavailable(f"{path} is not empty: mounting would hide its files")
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-L", f"chaos-{node}", image)
        _run("mount", "-o", "loop", image, path)
        self.mounts[node] = path
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(os.path.join(path, "lost+found"))  # a data directory holds the node's files only

    def fill(self, node: str) -> int:
        """Take every free block with the filler; returns the bytes it holds. The bulk is allocated
        (``posix_fallocate``: no data written, so a fault costs no I/O), halving the step at each
        ENOSPC; the last blocks are written one by one until the filesystem refuses."""
        path = os.path.join(self.mounts[node], FILLER)
        with open(path, "ab", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            step = fill_step_max_bytes
            for _ in range(fill_steps_max):
                if step < block_bytes:
                    break
                try:
                    os.posix_fallocate(f.fileno(), size, step)
                    size += step
                except OSError as exc:
                    if exc.errno not in DISK_FULL_ERRNOS:
                        raise
                    step //= 2
            block = b"\0" * block_bytes
            for _ in range(fill_steps_max):
                try:
                    f.write(block)
                    os.fsync(f.fileno())  # delayed allocation: ENOSPC shows at the latest here
                except OSError as exc:
                    if exc.errno not in DISK_FULL_ERRNOS:
                        raise
                    break
            return os.fstat(f.fileno()).st_size

    def drain(self, node: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.mounts[node], FILLER))

    def free_bytes(self, node: str) -> int:
        stat = os.statvfs(self.mounts[node])
        return stat.f_bavail * stat.f_frsize

    def close(self) -> list[str]:
        """Unmount everything mounted (the nodes stopped first); returns what could not be."""
        failed = []
        for node, path in list(self.mounts.items()):
            try:
                _run("umount", path)
            except DiskUnavailable:
                try:  # still busy (a process left behind): detach it once nothing uses it
                    _run("umount", "-l", path)
                except DiskUnavailable as exc:
                    failed.append(str(exc))
                    continue
            del self.mounts[node]
        shutil.rmtree(self.images_dir, ignore_errors=True)
        return failed


def _run(*command: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=command_timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskUnavailable(f"{' '.join(command)}: {exc}") from None
    if done.returncode != 0:
        raise DiskUnavailable(f"{' '.join(command)}: {' '.join(done.stderr.split()) or done.returncode}")


__all__ = ["FILLER", "DiskUnavailable", "Disks", "disk_size_bytes", "unavailable_reason"]
