"""What a run leaves in ``--out``: ``history.json`` (every operation and fault window),
``report.json`` (the summary and each checker's verdict) and ``timeline.png`` (throughput and
latency over time, fault windows shaded) when matplotlib is installed (``raftledger[chaos]``)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

from .history import History

bucket_s = 1.0
FAULT_COLOURS = {"kill": "tab:red", "pause": "tab:orange", "isolate": "tab:purple",
                 "blackhole": "tab:brown", "split": "tab:pink", "bridge": "tab:olive",
                 "slow": "tab:cyan", "churn": "tab:green", "disk": "tab:gray", "skew": "tab:blue"}


def write_report(out: str, history: History, summary: dict[str, Any], say: Any) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(history.to_json(), f)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    try:
        import matplotlib
    except ImportError:
        say("timeline.png skipped: matplotlib is not installed (pip install 'raftledger[chaos]')")
        return
    matplotlib.use("Agg")
    path = os.path.join(out, "timeline.png")
    plot_timeline(history.to_json(), path)
    say(f"wrote {out}/history.json, report.json, timeline.png")


def plot_timeline(recorded: dict[str, Any], path: str) -> None:
    import matplotlib.pyplot as plt

    ok_per_bucket: dict[int, int] = defaultdict(int)
    latencies: dict[int, list[float]] = defaultdict(list)
    for op in recorded["ops"]:
        if op["complete"] is None:
            continue
        bucket = int(op["complete"] // bucket_s)
        if op["outcome"] == "ok":
            ok_per_bucket[bucket] += 1
            latencies[bucket].append((op["complete"] - op["invoke"]) * 1000)
    end = max([*ok_per_bucket, *latencies, 0]) + 1
    xs = list(range(end))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 6))
    top.plot(xs, [ok_per_bucket.get(x, 0) / bucket_s for x in xs], color="black", lw=1)
    top.set_ylabel("ok ops/s")
    p50 = [sorted(latencies[x])[len(latencies[x]) // 2] if latencies.get(x) else None for x in xs]
    p99 = [sorted(latencies[x])[int(len(latencies[x]) * 0.99)] if latencies.get(x) else None for x in xs]
    bottom.plot(xs, p50, label="p50", color="black", lw=1)
    bottom.plot(xs, p99, label="p99", color="grey", lw=1)
    bottom.set_yscale("log")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds")
    seen = set()
    for fault in recorded["faults"]:
        colour = FAULT_COLOURS.get(fault["kind"], "grey")
        label = None if fault["kind"] in seen else fault["kind"]
        seen.add(fault["kind"])
        for axis in (top, bottom):
            axis.axvspan(fault["start"], fault["end"] or end, color=colour, alpha=0.2,
                         label=label if axis is top else None)
    top.legend(loc="upper right", fontsize="small", ncol=4)
    bottom.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
