"""Bugs that ``raftledger chaos`` found, each pinned by a test on a real cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster, wait_until

pytestmark = pytest.mark.slow

restart_deadline_s = 90.0
answers_max = 100_000


def test_restarted_node_never_refuses_a_valid_token_while_it_catches_up(tmp_path: Path) -> None:
    """Seed 7: writes sent to a node just restarted after SIGKILL got 401 ``unauthorized`` with the
    admin token, until its cluster map caught up. It must say 503 (retry) instead: the token is
    valid, and a client told 401 gives up."""
    with LocalCluster(tmp_path, nodes=3, shards=1, credentials=True) as cluster:
        cluster.kill("n2")
        cluster.start_node("n2", wait=False)
        seen: list[int] = []
        deadline = time.monotonic() + restart_deadline_s
        while time.monotonic() < deadline and len(seen) < answers_max:
            try:
                status, _, _ = launcher.http_request("GET", cluster.urls["n2"] + "/v1/cluster",
                                                     token=cluster.admin_token, timeout_s=5.0)
            except OSError:
                continue  # not listening yet
            seen.append(status)
            if status == 200:
                break
        assert seen and seen[-1] == 200, seen[-20:]
        assert 401 not in seen, f"401 among {sorted(set(seen))}"
        wait_until(lambda: cluster.status("n2"), restart_deadline_s, "n2 to answer")
