"""Each node's wall clock, movable at run time: the ``skew`` fault.

When a ``skew`` fault may be planned, every node process starts under libfaketime (Debian's
``faketime`` package: ``LD_PRELOAD`` of ``libfaketime.so.1``) reading its offset from a file of its
own (``FAKETIME_TIMESTAMP_FILE``, "+0" when calm), re-read at most every
``FAKETIME_CACHE_DURATION`` second. Only the wall clock moves (``FAKETIME_DONT_FAKE_MONOTONIC=1``:
Raft timers, leases and every deadline of the node run on the monotonic clock) and file times are
left alone (``NO_FAKE_STAT``).

libfaketime 0.9.10 (Debian 12) has one bug that matters here: with the monotonic clock excluded,
``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, ...)`` reaches the kernel with a bad time and
fails with EINVAL (wolfcw/libfaketime#426), and that is exactly how Python 3.11's ``time.sleep``
sleeps. A ten-line shim preloaded before libfaketime sends monotonic sleeps straight to the kernel
(nothing of them is faked) and every other clock to libfaketime; it is compiled with ``cc`` into the
run's folder. Without libfaketime or a C compiler the harness plans no ``skew`` fault.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
SHARED_MEMORY = "/dev/shm"  # libfaketime's faketime_shm_<pid> and sem.faketime_sem_<pid>
cache_duration_s = 1  # how soon a node sees its new offset
compile_timeout_s = 60.0

MONOTONIC_SLEEP_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

/* Monotonic sleeps go to the kernel as they are (libfaketime 0.9.10 breaks the absolute ones). */
int clock_nanosleep(clockid_t clock, int flags, const struct timespec *request, struct timespec *remain) {
    static int (*next)(clockid_t, int, const struct timespec *, struct timespec *);
    if (clock == CLOCK_MONOTONIC)
        return syscall(SYS_clock_nanosleep, clock, flags, request, remain) == 0 ? 0 : errno;
    if (next == NULL)
        next = dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock, flags, request, remain);
}
"""


class ClockUnavailable(Exception):
    """The nodes' clocks cannot be moved here."""


def unavailable_reason() -> str | None:
    """Why the ``skew`` fault cannot run on this machine, or None when it can."""
    if not os.path.exists(LIBFAKETIME):
        return f"{LIBFAKETIME} not found (apt-get install faketime)"
    if shutil.which("cc") is None:
        return "no C compiler (cc) for the monotonic-sleep shim"
    return None


class Clocks:
    """The offset file of every node, and the environment that makes its process read it."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        source = os.path.join(folder, "monotonic_sleep.c")
        self.shim = os.path.join(folder, "monotonic_sleep.so")
        with open(source, "w") as f:
            f.write(MONOTONIC_SLEEP_SHIM)
        try:
            done = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", self.shim, source, "-ldl"],
                                  capture_output=True, text=True, timeout=compile_timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClockUnavailable(f"compiling the shim: {exc}") from None
        if done.returncode != 0:
            raise ClockUnavailable(f"compiling the shim: {done.stderr.strip()}")
        self.offsets: dict[str, float] = {}

    def env(self, node: str) -> dict[str, str]:
        self.set_offset(node, 0.0)
        return {"LD_PRELOAD": f"{self.shim} {LIBFAKETIME}",
                "FAKETIME_TIMESTAMP_FILE": self._file(node),
                "FAKETIME_CACHE_DURATION": str(cache_duration_s),
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "NO_FAKE_STAT": "1"}

    def set_offset(self, node: str, seconds: float) -> None:
        """The node's wall clock ``seconds`` off the real one (seen within ``cache_duration_s``)."""
        path = self._file(node)
        with open(path + ".tmp", "w") as f:
            f.write(f"{round(seconds):+d}\n")
        os.replace(path + ".tmp", path)  # never a half-written offset
        self.offsets[node] = seconds

    def forget(self, pid: int) -> None:
        """Remove what libfaketime kept in /dev/shm for a node process that ended without its exit
        handlers (SIGKILL, a fail-stop): left there, it breaks a later process given the same pid."""
        for name in (f"faketime_shm_{pid}", f"sem.faketime_sem_{pid}"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(SHARED_MEMORY, name))

    def reset_all(self) -> None:
        for node in list(self.offsets):
            self.set_offset(node, 0.0)

    def _file(self, node: str) -> str:
        return os.path.join(self.folder, f"faketime-{node}.rc")


__all__ = ["LIBFAKETIME", "ClockUnavailable", "Clocks", "cache_duration_s", "unavailable_reason"]
