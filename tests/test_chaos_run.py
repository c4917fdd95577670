"""A short chaos run (fixed seed) in the suite: a real 3-node, 2-shard cluster with a proxy on every
link, the bank, retry storm and feed workloads under seeded faults; every checker must pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from raftledger.cluster.chaos import nemesis
from raftledger.cluster.chaos.runner import Options, run

pytestmark = pytest.mark.slow

run_seed = 7
run_duration_s = 60.0


def test_same_seed_plans_the_same_faults() -> None:
    assert nemesis.plan_schedule(run_seed, 600) == nemesis.plan_schedule(run_seed, 600)
    assert nemesis.plan_schedule(run_seed, 600) != nemesis.plan_schedule(run_seed + 1, 600)
    kinds = {p.kind for p in nemesis.plan_schedule(run_seed, 3600)}
    assert kinds == set(nemesis.KINDS)


def test_short_run_under_faults_passes_every_checker(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run(Options(duration_s=run_duration_s, seed=run_seed, out=str(tmp_path / "out")),
                 say=lines.append)
    report = "\n".join(lines)
    assert result.ok, report
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["faults"] >= 5, report
    assert summary["operations_by_outcome"].get("transfer:ok", 0) > 100, report
    assert summary["operations_by_outcome"].get("read:ok", 0) > 100, report
    assert summary["verdicts"]["reads"]["stats"]["reads"]["conservation"] > 20, report
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert {f["kind"] for f in history["faults"]} and all(f["end"] for f in history["faults"])
