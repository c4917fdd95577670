"""Fuzzing the HTTP API from its own ``/openapi.json`` (schemathesis): requests that follow the
schema and requests that break it, with a valid admin token, a made-up one and none, against a
real node with credentials on. Nothing may answer 500 (503 is a documented "not now"), no node may
exit, and no node may log a traceback."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

pytestmark = pytest.mark.slow

examples_per_operation = 60
budget_s = 75.0  # the whole fuzzing run; operations not reached by then are reported, not run
request_timeout_s = 15.0
stream_timeout_s = 1.0
BOGUS_TOKEN = "rlt_" + "x" * 43


def test_fuzzed_requests_never_answer_500_nor_crash_a_node(tmp_path):
    with LocalCluster(tmp_path, nodes=2, shards=2, durability="none", credentials=True) as cluster:
        status, raw = launcher.http_json("GET", cluster.urls["n0"] + "/openapi.json")
        assert status == 200
        schema = schemathesis.openapi.from_dict(raw)
        operations = [r.ok() for r in schema.get_all_operations()]
        assert len(operations) >= 30
        failures: list[str] = []
        answered: dict[int, int] = {}
        started = time.monotonic()
        skipped = []
        for operation in operations:
            if time.monotonic() - started > budget_s:
                skipped.append(f"{operation.method.upper()} {operation.path}")
                continue
            fuzz(operation, cluster, failures, answered)
        print(f"fuzzed {len(operations) - len(skipped)} operations in {time.monotonic() - started:.0f}s: "
              f"statuses {sorted(answered.items())}")
        assert not failures, "\n".join(failures[:20])
        assert not skipped or len(skipped) < len(operations) // 4, f"not reached: {skipped}"
        assert set(answered) & {400, 401} and any(200 <= s < 300 for s in answered), answered
        for node_id, proc in cluster.procs.items():
            assert proc.poll() is None, f"{node_id} exited with {proc.returncode}"
            assert "Traceback" not in cluster.log(node_id), f"{node_id} logged a traceback"


def fuzz(operation: Any, cluster: LocalCluster, failures: list[str], answered: dict[int, int]) -> None:
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                      operation.as_strategy(GenerationMode.NEGATIVE))
    tokens = st.sampled_from([cluster.admin_token, BOGUS_TOKEN, None])
    urls = st.sampled_from(sorted(cluster.urls.values()))
    streams = operation.path.endswith("/stream")  # an event stream answers until its reader leaves
    timeout_s = stream_timeout_s if streams else request_timeout_s

    @settings(max_examples=examples_per_operation, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases, token=tokens, url=urls)
    def one(case: Any, token: str | None, url: str) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if case.headers:
            case.headers.pop("Authorization", None)
        try:
            response = case.call(base_url=url, headers=headers, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 (a read timeout of a long-poll or a stream is fine)
            if "timed out" not in str(exc).lower():
                failures.append(f"{case.method} {case.formatted_path}: no answer: {exc!r:.200}")
            return
        status = response.status_code
        answered[status] = answered.get(status, 0) + 1
        if status >= 500 and status != 503:
            failures.append(f"{case.method} {case.formatted_path} query={case.query} "
                            f"body={str(case.body)[:200]} -> {status}")

    one()
