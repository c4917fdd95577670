"""What the ``disk`` and ``skew`` faults need of the machine before the nodes start, and undo after."""

from __future__ import annotations

import os
from typing import Any

from raftledger.cluster.testing import LocalCluster

from . import clocks, disks
from .clocks import Clocks
from .disks import Disks
from .nemesis import KINDS


class Faults:
    """What the ``disk`` and ``skew`` faults need before the nodes start: each node's data directory
    on a filesystem of its own (``disks``), each node under libfaketime (``clocks``). A kind this
    machine cannot inject is said once and left out of the plan."""

    def __init__(self, kinds: frozenset[str] | None, given_data_dir: bool, say: Any) -> None:
        """``kinds``: the kinds asked for (None: every kind); ``given_data_dir``: the cluster lives in
        directories the harness did not make (``--data-dir``)."""
        self.say = say
        self.kinds = set(KINDS if kinds is None else kinds)
        self.disks: Disks | None = None
        self.clocks: Clocks | None = None
        if given_data_dir and "disk" in self.kinds:
            self._leave_out("disk", "--data-dir names data directories the harness did not make")

    def prepare(self, cluster: LocalCluster, folder: str) -> None:
        if "disk" in self.kinds:
            self._mount(cluster, folder)
        if "skew" in self.kinds:
            reason = clocks.unavailable_reason()
            try:
                self.clocks = None if reason else Clocks(os.path.join(folder, "clocks"))
            except clocks.ClockUnavailable as exc:
                reason = str(exc)
            if self.clocks is None:
                self._leave_out("skew", reason or "")
            for node in cluster.node_ids if self.clocks is not None else []:
                cluster.node_env[node] = self.clocks.env(node)

    def _mount(self, cluster: LocalCluster, folder: str) -> None:
        reason = disks.unavailable_reason()
        if reason is None:
            self.disks = Disks(os.path.join(folder, "disks"))
            try:
                for node in cluster.node_ids:
                    self.disks.mount(node, os.path.join(cluster.data_dir, node))
            except disks.DiskUnavailable as exc:
                reason = str(exc)
        if reason is not None:
            self.close()
            self._leave_out("disk", reason)
            return
        cluster.log_dir = os.path.join(folder, "logs")  # a full data disk must not swallow the log

    def _leave_out(self, kind: str, reason: str) -> None:
        self.kinds.discard(kind)
        self.say(f"chaos: the {kind} fault is unavailable: {reason}; planning without it")

    def close(self) -> None:
        if self.disks is not None:
            for problem in self.disks.close():
                self.say(f"chaos: could not unmount: {problem}")
            self.disks = None


__all__ = ["Faults"]
