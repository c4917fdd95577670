"""The exporters' pieces that need no cluster: webhook signatures, the retry backoff, dead-letter
names, and how ``raftledger up`` configures the sinks (real deliveries: test_feed_cluster.py)."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import tomllib
from pathlib import Path

import pytest
from raftledger.cluster import cli, launcher
from raftledger.node.feed import exporter
from raftledger.node.feed.sinks import signature, verify_signature
from raftledger.node.http import NodeContext
from raftledger.node.settings import FeedSettings, NodeSettings, load_sections

NOW_S = 1_800_000_000


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"events":[]}'
    expected = hmac.new(b"s3cret", b"1800000000." + body, hashlib.sha256).hexdigest()
    assert signature("s3cret", "1800000000", body) == f"v1={expected}"


def test_a_receiver_refuses_a_bad_signature_and_an_old_or_malformed_timestamp() -> None:
    body = b'{"events":[1]}'
    signed = signature("k", str(NOW_S), body)
    assert verify_signature("k", str(NOW_S), body, signed, NOW_S)
    assert not verify_signature("other", str(NOW_S), body, signed, NOW_S)
    assert not verify_signature("k", str(NOW_S), body + b" ", signed, NOW_S)
    assert not verify_signature("k", str(NOW_S), body, signed, NOW_S + 301)  # a replay, later
    assert not verify_signature("k", "-1", body, signed, NOW_S)


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    ctx = NodeContext("n0", {}, 1, settings=NodeSettings(feed=FeedSettings(
        export_backoff_initial_s=0.1, export_backoff_max_s=1.0)))
    for attempt, cap in ((1, 0.1), (2, 0.2), (4, 0.8), (5, 1.0), (60, 1.0)):
        waits = [exporter.backoff_s(ctx, attempt) for _ in range(50)]
        assert all(cap / 2 <= w <= cap for w in waits), (attempt, waits)
        assert len(set(waits)) > 1  # jittered


def test_dead_letter_names_round_trip() -> None:
    name = exporter.dead_letter_name("webhook", 17, 20)
    assert name == "dlq.webhook.17-20"
    match = exporter.DLQ_RE.fullmatch(name)
    assert match is not None and match.groups() == ("webhook", "17", "20")


def up_args(data_dir: Path, **feed: str) -> argparse.Namespace:
    options = {"nats": "--feed-nats", "webhook": "--feed-webhook", "secret": "--feed-webhook-secret"}
    argv = ["up", "--data-dir", str(data_dir), "--durability", "none"]
    for name, value in feed.items():
        argv += [options[name], value]
    return cli.parser().parse_args(argv)


def test_up_feed_options_reach_every_node_file(tmp_path: Path) -> None:
    plan = cli._plan(up_args(tmp_path, nats="nats://127.0.0.1:4222", webhook="http://127.0.0.1:9/h",
                             secret="s"))
    path = launcher.write_node_config(plan, "n1")
    with open(path, "rb") as f:
        feed = tomllib.load(f)["feed"]
    assert feed == {"nats_url": "nats://127.0.0.1:4222", "webhook_url": "http://127.0.0.1:9/h",
                    "webhook_secret": "s"}


def test_up_refuses_a_webhook_without_its_secret(tmp_path: Path) -> None:
    with pytest.raises(launcher.LaunchError, match="go together"):
        cli._plan(up_args(tmp_path, webhook="http://127.0.0.1:9/h"))


def test_a_node_file_with_a_webhook_and_no_secret_is_refused() -> None:
    problems: list[str] = []
    load_sections({"feed": {"webhook_url": "http://127.0.0.1:9/h", "nats_url": 4222}}, problems)
    assert any("webhook_secret" in p for p in problems) and any("nats_url" in p for p in problems)
