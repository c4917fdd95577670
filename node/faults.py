"""Crash points, for tests that kill a node at an exact step of a protocol.

A node started with ``RAFTLEDGER_FAULTS=1`` serves ``/internal/v1/faults`` (sealed, like every
internal route), which arms named points; a node that reaches an armed point exits at once, as a
SIGKILL would leave it: nothing flushed, nothing answered. Without that variable nothing can arm a
point, and reaching one costs a set lookup.

Points:
- ``cross_shard.prepared``: the driver of a cross-shard transaction, after every prepare answered;
- ``cross_shard.decided``: the driver, after the coordinator recorded the decision;
- ``leg.prepared``: a shard leader, after it committed a forwarded prepare, before it answers.
"""

from __future__ import annotations

import logging
import os

FAULTS_ENV = "RAFTLEDGER_FAULTS"
POINTS = frozenset({"cross_shard.prepared", "cross_shard.decided", "leg.prepared"})
crash_exit_status = 137  # what a shell reports for a process killed by SIGKILL

log = logging.getLogger(__name__)
_armed: set[str] = set()


def enabled() -> bool:
    return os.environ.get(FAULTS_ENV) == "1"


def arm(points: list[str]) -> None:
    unknown = set(points) - POINTS
    if unknown:
        raise ValueError(f"unknown crash points: {sorted(unknown)}")
    _armed.update(points)


def is_armed(name: str) -> bool:
    return name in _armed


def crash_point(name: str) -> None:
    if name in _armed:
        log.critical("crash point %s reached: exiting now", name)
        logging.shutdown()
        os._exit(crash_exit_status)
