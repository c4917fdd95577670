"""Cluster bootstrap configuration: round trip through TOML, and refusal of bad configs with reasons."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from raftledger.node.config import ClusterSpec, ConfigError, NodeConfig, NodeSpec, dump_toml, load, parse
from raftledger.node.settings import (
    BatchingSettings,
    HttpSettings,
    NodeSettings,
    RaftSettings,
    reference_markdown,
)

ROOT = Path(__file__).resolve().parent.parent


def three_nodes(shards: int = 2) -> NodeConfig:
    nodes = tuple(NodeSpec(f"n{i}", f"http://127.0.0.1:{8080 + i}", f"127.0.0.1:{7080 + i}",
                           {s: f"127.0.0.1:{9000 + 10 * i + s}" for s in range(shards)},
                           meta=f"127.0.0.1:{9100 + i}")
                  for i in range(3))
    placement = {s: ("n0", "n1", "n2") for s in range(shards)}
    settings = NodeSettings(http=HttpSettings(port=8081), batching=BatchingSettings(linger_ms=3.5),
                            raft=RaftSettings(heartbeat_period_s=0.1))
    return NodeConfig("n1", "/tmp/data/n1", "/etc/raftledger/cluster.secret", "fsync",
                      ClusterSpec(shards, nodes, placement), settings)


def test_config_survives_a_toml_round_trip(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(dump_toml(three_nodes()))
    assert load(str(path)) == three_nodes()


def test_a_relative_secret_file_is_next_to_the_node_file(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(dump_toml(dataclasses.replace(three_nodes(), secret_file="keys/cluster.secret")))
    assert load(str(path)).secret_file == str(tmp_path / "keys" / "cluster.secret")


def test_a_node_without_secret_file_or_internal_address_is_refused(tmp_path):
    good = three_nodes()
    nodes = list(good.cluster.nodes)
    nodes[0] = dataclasses.replace(nodes[0], internal="")
    config = dataclasses.replace(good, cluster=dataclasses.replace(good.cluster, nodes=tuple(nodes)))
    text = dump_toml(config).replace('secret_file = "/etc/raftledger/cluster.secret"\n', "")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert "secret_file is required" in str(err.value)
    assert "node n0: internal address '' must be host:port" in str(err.value)


def test_placement_defaults_to_every_node_hosting_every_shard():
    raw = {"node_id": "a", "data_dir": "d", "secret_file": "s", "cluster": {"shards": 2, "nodes": [
        {"id": "a", "http": "http://h:1", "internal": "h:7", "raft": ["h:2", "h:3"], "meta": "h:9"},
        {"id": "b", "http": "http://h:4", "internal": "h:8", "raft": {"0": "h:5", "1": "h:6"}}]}}
    config = parse(raw)
    assert config.cluster.placement == {0: ("a", "b"), 1: ("a", "b")}
    assert config.hosted_shards() == [0, 1]


def test_preferred_leaders_spread_over_the_nodes_in_placement_order():
    cluster = three_nodes(shards=4).cluster
    assert [cluster.preferred_leader(s) for s in range(4)] == ["n0", "n1", "n2", "n0"]
    placed = dataclasses.replace(cluster, placement={**cluster.placement, 1: ("n2", "n0")})
    assert placed.preferred_leader(1) == "n0"


def refused(config: NodeConfig, tmp_path) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(dump_toml(config))
    with pytest.raises(ConfigError) as err:
        load(str(path))
    return str(err.value)


def test_duplicate_node_ids_and_raft_addresses_are_refused(tmp_path):
    good = three_nodes()
    nodes = list(good.cluster.nodes)
    nodes[2] = dataclasses.replace(nodes[2], id="n1", raft=dict(nodes[1].raft),
                                   internal=nodes[0].raft[1])
    message = refused(dataclasses.replace(good, cluster=dataclasses.replace(
        good.cluster, nodes=tuple(nodes), placement={0: ("n0", "n1"), 1: ("n0", "n1")})), tmp_path)
    assert "node id 'n1' appears twice" in message
    assert "address 127.0.0.1:9010 is used twice (n1 shard 0 raft and n1 shard 0 raft)" in message
    assert "address 127.0.0.1:9001 is used twice (n0 shard 1 raft and n1 internal)" in message


def test_placement_on_an_unknown_node_or_without_raft_address_is_refused(tmp_path):
    good = three_nodes()
    nodes = list(good.cluster.nodes)
    nodes[0] = dataclasses.replace(nodes[0], raft={0: nodes[0].raft[0]})
    cluster = dataclasses.replace(good.cluster, nodes=tuple(nodes),
                                  placement={0: ("n0", "n9"), 1: ("n0", "n1")})
    message = refused(dataclasses.replace(good, cluster=cluster), tmp_path)
    assert "shard 0 placement names unknown node 'n9'" in message
    assert "node n0 hosts shard 1 but has no raft address for it" in message


def test_meta_addresses_and_the_slot_layout_are_checked(tmp_path):
    good = three_nodes(shards=3)
    nodes = [dataclasses.replace(n, meta=None) for n in good.cluster.nodes]
    message = refused(dataclasses.replace(good, cluster=dataclasses.replace(
        good.cluster, nodes=tuple(nodes), slot_layout="modulo")), tmp_path)
    assert "no node has a meta address" in message
    assert "cluster.slot_layout modulo needs a shard count that divides 4096, not 3" in message
    nodes = list(good.cluster.nodes)
    nodes[1] = dataclasses.replace(nodes[1], meta=nodes[0].raft[2])
    nodes[2] = dataclasses.replace(nodes[2], meta="nowhere")
    message = refused(dataclasses.replace(good, cluster=dataclasses.replace(
        good.cluster, nodes=tuple(nodes), slot_layout="striped")), tmp_path)
    assert "address 127.0.0.1:9002 is used twice (n0 shard 2 raft and n1 meta raft)" in message
    assert "node n2: meta raft address 'nowhere' must be host:port" in message
    assert "cluster.slot_layout must be one of even, modulo, not 'striped'" in message
    loaded = parse({"node_id": "a", "data_dir": "d", "secret_file": "s", "cluster": {
        "shards": 4, "slot_layout": "modulo", "nodes": [
            {"id": "a", "http": "http://h:1", "internal": "h:7", "raft": ["h:2", "h:3", "h:4", "h:5"],
             "meta": "h:9"}]}})
    assert loaded.cluster.slot_layout == "modulo" and loaded.meta_address == "h:9"
    with pytest.raises(ConfigError, match=r"cluster.nodes\[0\] has unknown settings \['metta'\]"):
        parse({"node_id": "a", "data_dir": "d", "secret_file": "s", "cluster": {"nodes": [
            {"id": "a", "http": "http://h:1", "internal": "h:7", "raft": ["h:2"], "metta": "h:9"}]}})


def test_bad_durability_and_foreign_node_id_are_refused(tmp_path):
    message = refused(dataclasses.replace(three_nodes(), durability="sometimes", node_id="zz"),
                      tmp_path)
    assert "durability must be one of fsync, none" in message
    assert "node_id 'zz' is not one of cluster.nodes" in message


def test_unreadable_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("node_id = [")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load(str(path))


def test_settings_the_loader_does_not_know_or_cannot_take_are_refused_all_at_once(tmp_path):
    text = dump_toml(three_nodes()) + "\n".join([
        "", "[batching]", "requests_max = 0", 'linger_ms = "2"', "batch_requests_max = 10",
        "", "[raft]", "commands_queued_max = 1.5", "election_timeout_min_s = 2.0",
        "connection_timeout_s = 1.0",
        "", "[caching]", "size = 1"])
    text = text.replace("[batching]\nlinger_ms = 3.5\n", "").replace("[raft]\nheartbeat_period_s = 0.1\n", "")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(path))
    message = str(err.value)
    assert "batching.requests_max must be at least 1, not 0" in message
    assert "batching.linger_ms must be a number, not '2'" in message
    assert "[batching] has unknown settings ['batch_requests_max']" in message
    assert "raft.commands_queued_max must be an integer, not 1.5" in message
    assert "raft: each election_timeout_min_s must be below its max_s" in message
    assert "raft: connection_timeout_s must be at least election_timeout_max_s" in message
    assert "unknown settings ['caching']" in message


def test_settings_set_in_the_node_file_reach_the_node(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(dump_toml(three_nodes()).replace("linger_ms = 3.5", "linger_ms = 7"))
    settings = load(str(path)).settings
    assert settings.batching.linger_ms == 7.0 and isinstance(settings.batching.linger_ms, float)
    assert settings.raft.heartbeat_period_s == 0.1 and settings.http.port == 8081
    assert settings.snapshots == NodeSettings().snapshots  # untouched sections keep their defaults


def test_the_configuration_reference_lists_every_setting_as_defined():
    """docs/configuration.md is generated from node/settings.py: regenerate it when a setting changes
    (python -m raftledger.node.settings > docs/configuration.md)."""
    assert (ROOT / "docs" / "configuration.md").read_text() == reference_markdown()

