"""The cluster map as values: its first layout, the commands that change it, their epochs, its forms."""

from __future__ import annotations

import dataclasses

import pytest
from raftledger.cluster import map as cmap
from raftledger.cluster.map import (
    EMPTY,
    AssignSlots,
    Bootstrap,
    ClusterMap,
    MapError,
    NodeEntry,
    PutNode,
    PutValue,
    SetNodeState,
    SetReplicas,
    apply,
    initial_map,
)
from raftledger.cluster.router import modulo_table, shard_for_account
from raftledger.node.config import ClusterSpec, NodeSpec
from raftledger.statemachine.slots import slot_of


def spec(shards: int = 3, nodes: int = 4, layout: str = "even") -> ClusterSpec:
    specs = tuple(NodeSpec(f"n{i}", f"http://h{i}:8080", f"h{i}:7000",
                           {s: f"h{i}:{9000 + s}" for s in range(shards)},
                           meta=f"h{i}:9100" if i < 3 else None) for i in range(nodes))
    return ClusterSpec(shards, specs, {s: ("n0", "n1", "n2") for s in range(shards)}, layout)


def bootstrapped(shards: int = 3, layout: str = "even") -> ClusterMap:
    first, outcome = apply(EMPTY, Bootstrap(initial_map(spec(shards, layout=layout))))
    assert outcome.ok, outcome
    return first


def owners(m: ClusterMap) -> list[int]:
    """Per slot, how many shards' ranges hold it (computed from the ranges, not from ``table``)."""
    count = [0] * 4096
    for shard in m.shards:
        for first, last in shard.slot_ranges:
            for slot in range(first, last + 1):
                count[slot] += 1
    return count


def test_bootstrap_lays_out_every_slot_once_and_starts_epoch_one():
    m = bootstrapped(3)
    assert m.epoch == 1 and [s.epoch for s in m.shards] == [1, 1, 1]
    assert owners(m) == [1] * 4096 and m.problems() == []
    assert [s.slot_ranges for s in m.shards] == [((0, 1364),), ((1365, 2729),), ((2730, 4095),)]
    assert all(m.shard_of(f"a{i}") == shard_for_account(f"a{i}", 3) for i in range(300))
    assert [n.id for n in m.meta_hosts()] == ["n0", "n1", "n2"]
    assert m.node("n3") is not None and m.node("n3").meta is None  # type: ignore[union-attr]


def test_a_modulo_layout_keeps_every_account_where_sha256_modulo_put_it():
    m = bootstrapped(4, layout="modulo")
    assert owners(m) == [1] * 4096
    assert all(m.shard_of(f"a{i}") == modulo_table(4)[slot_of(f"a{i}")] for i in range(300))
    assert len(m.shard(0).slot_ranges) == 1024  # type: ignore[union-attr]


def test_bootstrap_applies_only_to_an_empty_map():
    m = bootstrapped()
    again, outcome = apply(m, Bootstrap(initial_map(spec(2))))
    assert again is m and not outcome.ok and outcome.epoch == 1 and "exists" in outcome.reason
    holes = dataclasses.replace(initial_map(spec(2)), shards=initial_map(spec(2)).shards[:1])
    refused, outcome = apply(EMPTY, Bootstrap(holes))
    assert refused is EMPTY and not outcome.ok and "2048 slots have no shard" in outcome.reason


def test_every_change_increments_the_epoch_and_a_refusal_keeps_it():
    m = bootstrapped()
    steps = [PutNode(NodeEntry("n4", "http://h4:8080", "h4:7000")),
             SetNodeState("n3", "draining"),
             SetReplicas(1, ("n1", "n2", "n4")),
             PutValue("tokens", "t1", {"role": "admin"})]
    for step in steps:
        before = m.epoch
        m, outcome = apply(m, step)
        assert outcome.ok and m.epoch == outcome.epoch == before + 1
    assert m.epoch == 5
    assert m.node("n3").state == "draining"  # type: ignore[union-attr]
    assert m.shard(1).replicas == ("n1", "n2", "n4") and m.shard(1).epoch == 4  # type: ignore[union-attr]
    assert m.shard(0).epoch == 1  # type: ignore[union-attr]
    assert m.sections == {"tokens": {"t1": {"role": "admin"}}}
    for bad in (SetNodeState("n9", "up"), SetNodeState("n3", "gone"), SetReplicas(0, ("n9",)),
                SetReplicas(0, ()), AssignSlots(0, 4096, 1), AssignSlots(0, 5, 7), PutValue("", "k", 1)):
        after, outcome = apply(m, bad)
        assert after is m and not outcome.ok and outcome.epoch == 5, bad
    m, _ = apply(m, PutValue("tokens", "t1", None))
    assert m.sections == {} and m.epoch == 6


def test_assigning_a_slot_range_moves_it_and_renews_the_epoch_of_the_shards_it_touched():
    m = bootstrapped()
    m, outcome = apply(m, AssignSlots(1300, 1400, 2))
    assert outcome.ok and m.epoch == 2
    assert [s.slot_ranges for s in m.shards] == [((0, 1299),), ((1401, 2729),),
                                                 ((1300, 1400), (2730, 4095))]
    assert [s.epoch for s in m.shards] == [2, 2, 2]
    m, _ = apply(m, AssignSlots(1401, 2729, 2))
    assert [s.slot_ranges for s in m.shards] == [((0, 1299),), (), ((1300, 4095),)]
    assert [s.epoch for s in m.shards] == [2, 3, 3] and owners(m) == [1] * 4096
    assert m.table[1350] == 2 and m.table[5] == 0


def test_commands_and_maps_survive_their_encodings():
    m = bootstrapped()
    m, _ = apply(m, PutValue("consumers", "c1", {"offsets": [1, 2]}))
    assert ClusterMap.unpack(m.pack()) == m
    assert ClusterMap.unpack(m.pack()).table == m.table
    commands = [Bootstrap(initial_map(spec())), PutNode(NodeEntry("x", "u", "a", ((0, "r"),), "m")),
                SetNodeState("n1", "removed"), SetReplicas(0, ("n1",)), AssignSlots(1, 2, 0),
                PutValue("s", "k", [1, "two"])]
    for command in commands:
        assert cmap.decode_command(cmap.encode_command(command)) == command
    for junk in (b"\xc1", cmap.encode_command(SetReplicas(0, ("n1",))).replace(b"\x04", b"\x63", 1)):
        with pytest.raises(MapError):
            cmap.decode_command(junk)
    with pytest.raises(MapError):
        cmap.command_from_wire([cmap.TAG_ASSIGN_SLOTS, "1", 2, 3])


def test_the_public_form_has_the_shape_of_the_api_and_no_addresses_or_sections():
    m, _ = apply(bootstrapped(2), PutValue("tokens", "t", "hash"))
    body = m.to_json()
    assert body == {"epoch": 2, "slots": 4096,
                    "nodes": [{"id": f"n{i}", "url": f"http://h{i}:8080", "state": "up"} for i in range(4)],
                    "shards": [{"id": 0, "replicas": ["n0", "n1", "n2"], "epoch": 1,
                                "slot_ranges": [[0, 2047]]},
                               {"id": 1, "replicas": ["n0", "n1", "n2"], "epoch": 1,
                                "slot_ranges": [[2048, 4095]]}]}
