"""A chaos run on a cluster that is already running (``raftledger chaos --data-dir DIR`` while
``raftledger up`` or ``raftledger node`` processes serve ``DIR``).

Each node's process is found by the pid ``DIR/cluster.json`` records for it (``raftledger up`` and
the launcher keep it there), checked against its command line (it names the node's config file),
else by the processes whose command line names that file. A fault acts on that pid: SIGKILL, then
the same command line started again (its arguments, working directory and environment, read from
``/proc``, its output appended to the node's log), the new pid written back to ``cluster.json`` so
``raftledger down`` finds it; SIGSTOP and SIGCONT; membership churn through the admin API. The
faults that need the harness's proxies on every node-to-node link (``PROXIED_KINDS``) cannot be
injected into processes that dial their peers directly: they are left out of the schedule, and the
run says so. The cluster keeps running after the run (a node the harness restarted included).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster

ATTACHED_KINDS = frozenset({"kill", "pause", "churn"})
exit_wait_s = 30.0
poll_s = 0.05


class AttachError(launcher.LaunchError):
    """The cluster in the data directory is not running as the harness needs it."""


@dataclass
class NodeProcess:
    """A node process the harness did not start, driven by its pid (what ``LocalCluster`` asks of a
    ``subprocess.Popen``: ``poll``, ``send_signal``, ``wait``)."""

    pid: int
    argv: list[str]
    cwd: str
    env: dict[str, str]

    @classmethod
    def of(cls, pid: int) -> NodeProcess:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(e.decode(errors="replace").partition("=")[::2] for e in f.read().split(b"\0") if e)
        return cls(pid, argv, os.readlink(f"/proc/{pid}/cwd"), env)

    def poll(self) -> int | None:
        return None if launcher.is_running(self.pid) else 0

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout_s: float | None = None) -> int:
        deadline = time.monotonic() + (exit_wait_s if timeout_s is None else timeout_s)
        while launcher.is_running(self.pid):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.argv, timeout_s or exit_wait_s)
            time.sleep(poll_s)
        return 0

    def again(self, log_path: str) -> subprocess.Popen[bytes]:
        """The same command line started anew, its output appended to ``log_path``."""
        with open(log_path, "ab") as log_file:
            return subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def find_pid(plan: launcher.Plan, node_id: str) -> int | None:
    """The running process of ``node_id``: the pid ``cluster.json`` records when it still runs the
    node's config, else a process whose command line names that config."""
    config = launcher.node_config_path(plan, node_id)
    recorded = plan.pids.get(node_id)
    if recorded is not None and _names(recorded, config):
        return recorded
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _names(int(entry), config) and launcher.is_running(int(entry)):
            return int(entry)
    return None


def _names(pid: int, config: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return config.encode() in argv and b"node" in argv


class AttachedCluster(LocalCluster):
    """``LocalCluster``'s faults and views over processes found running (see the module's doc)."""

    def __init__(self, data_dir: str) -> None:  # the plan is read, never made
        plan = launcher.load_plan(data_dir)
        if plan is None:
            raise AttachError(f"no {launcher.CLUSTER_FILE} in {data_dir}")
        self.plan = plan
        self.preexec_fn = None
        self.log_dir: str | None = None  # its nodes log where they were started to
        self.node_env: dict[str, dict[str, str]] = {}
        self.dial_files: dict[str, str] = {}
        self.procs: dict[str, Any] = {}
        missing = []
        for node_id in self.node_ids:
            pid = find_pid(plan, node_id)
            if pid is None:
                missing.append(node_id)
            else:
                self.procs[node_id] = NodeProcess.of(pid)
        if missing:
            raise AttachError(f"{', '.join(missing)} of {data_dir} not running: start the cluster "
                              "(raftledger up), or run without it running for the harness to start it")
        self.commands = dict(self.procs)  # node -> how to start it again

    def start(self, timeout_s: float = launcher.ready_timeout_s) -> AttachedCluster:
        self.wait_ready(timeout_s)
        return self

    def start_node(self, node_id: str, wait: bool = True) -> None:
        if node_id in self.procs and self.procs[node_id].poll() is None:
            raise RuntimeError(f"{node_id} is already running")
        self.procs[node_id] = self.commands[node_id].again(self.log_path(node_id))
        self.plan.pids[node_id] = self.procs[node_id].pid
        launcher.save_plan(self.plan)
        if wait:
            launcher.wait_until(lambda: (self.status(node_id) or {}).get("map_epoch"),
                                launcher.ready_timeout_s, f"{node_id} to answer with a cluster map")

    def close(self) -> None:
        """The cluster is left running: it was running before the run."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # never left paused


def schedule_for_attached(schedule: list[Any]) -> tuple[list[Any], list[str]]:
    """The planned faults that act on processes alone, and the kinds left out (they need proxies)."""
    kept = [p for p in schedule if p.kind in ATTACHED_KINDS]
    return kept, sorted({p.kind for p in schedule} - ATTACHED_KINDS)
